"""Kill a real `cat-tokenize` process mid-run, resume, and check nothing was lost, doubled or corrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from safetensors import safe_open

from cat_tokenizer.cli import main
from cat_tokenizer.store import KILL_AFTER_SHARDS_ENV, read_jsonl, read_shard_records, shard_paths


def _shard_keys(out):
    keys = []
    for path in shard_paths(out):
        with safe_open(str(path), framework="pt") as handle:  # a torn file would fail to open
            keys.extend(handle.keys())
    return keys


def test_killed_run_resumes_with_every_image_exactly_once(
    tiny_vae_dir, tmp_path, write_small_images, cli_args
):
    names = write_small_images(tmp_path / "images", 24)
    out = tmp_path / "out"
    args = cli_args(
        tmp_path / "images", out, tiny_vae_dir, "--ratio", 16, "--shard-size", 2, "--batch-size", 2, "--quiet"
    )
    # The run kills itself right after committing its 3rd shard (the store's fault-injection
    # hook), so the kill lands at the same point on any machine, however fast.
    environment = {**os.environ, "OMP_NUM_THREADS": "1", KILL_AFTER_SHARDS_ENV: "3"}
    process = subprocess.run(
        [sys.executable, "-m", "cat_tokenizer.cli", *args], capture_output=True, env=environment, timeout=600
    )
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-3000:]

    assert not (out / "manifest.jsonl").exists()  # the manifest is only written by a finished run
    committed = _shard_keys(out)
    assert len(committed) == 3 * 2 and len(committed) == len(set(committed))  # 3 shards of 2 images
    # A partial shard from the kill (or a planted one) must be cleaned up, never read.
    (out / "shards" / "r00-00099.safetensors.12345.tmp").write_bytes(b"half a shard")

    assert main(args[:-1] + ["--resume", "--quiet"]) == 0
    manifest = read_jsonl(out / "manifest.jsonl")
    assert sorted(r["id"] for r in manifest) == sorted(names)
    assert sorted(_shard_keys(out)) == sorted(names)  # every image exactly once across all shards
    assert sorted(r["id"] for r in read_shard_records(out)) == sorted(names)
    assert not list(out.rglob("*.tmp"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_done"] == len(names)
    assert summary["images_done_this_run"] == len(names) - len(committed)


def test_resume_of_a_finished_run_does_nothing(tiny_vae_dir, tmp_path, write_small_images, cli_args):
    write_small_images(tmp_path / "images", 3)
    args = cli_args(tmp_path / "images", tmp_path / "out", tiny_vae_dir, "--ratio", 8, "--quiet")
    assert main(args) == 0
    before = (tmp_path / "out" / "manifest.jsonl").read_text()
    assert main(args + ["--resume"]) == 0
    assert (tmp_path / "out" / "manifest.jsonl").read_text() == before
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["images_done_this_run"] == 0


def test_resume_with_other_settings_is_refused(tiny_vae_dir, tmp_path, write_small_images, capsys, cli_args):
    write_small_images(tmp_path / "images", 2)
    args = cli_args(tmp_path / "images", tmp_path / "out", tiny_vae_dir, "--quiet")
    assert main(args + ["--ratio", "8"]) == 0
    assert main(args + ["--ratio", "32", "--resume"]) == 1
    assert "different settings" in capsys.readouterr().err
