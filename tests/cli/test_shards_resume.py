"""Kill a real `cat-tokenize --shards` process, resume, and check that only unfinished input shards are redone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from cat_tokenizer.cli import main
from cat_tokenizer.readers import iter_encoded, read_index, read_records
from cat_tokenizer.shard_store import committed
from cat_tokenizer.store import KILL_AFTER_SHARDS_ENV


def _fingerprint(path):
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, path.read_bytes()


def test_sigkill_then_resume_redoes_only_unfinished_shards(tiny_vae_dir, tmp_path, write_tar_shards):
    ids = write_tar_shards(tmp_path / "in", 6, 3)
    out = tmp_path / "out"
    args = [
        "--shards",
        str(tmp_path / "in" / "{00000..00005}.tar"),
        "--out",
        str(out),
        "--vae",
        str(tiny_vae_dir),
    ]
    args += ["--ratio", "16", "--format", "webdataset", "--quiet"]
    # The run SIGKILLs itself right after committing its 2nd input shard (the store's fault hook),
    # so the kill lands at the same point on any machine.
    environment = {**os.environ, "OMP_NUM_THREADS": "1", KILL_AFTER_SHARDS_ENV: "2"}
    process = subprocess.run(
        [sys.executable, "-m", "cat_tokenizer.cli", *args], capture_output=True, env=environment, timeout=600
    )
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-3000:]
    assert sorted(committed(out)) == ["00000", "00001"] and not (out / "manifest.jsonl").exists()
    finished = {p.name: _fingerprint(p) for p in (out / "shards").iterdir()}

    # Half-done shards as a kill can leave them: 00002's data file without its marker, 00003's temp file.
    (out / "shards" / "00002.tar").write_bytes(b"a data file whose marker was never written")
    (out / "shards" / "00003.tar.4242.tmp").write_bytes(b"half a shard")

    assert main(args + ["--resume"]) == 0
    for name, fingerprint in finished.items():
        assert _fingerprint(out / "shards" / name) == fingerprint, f"{name} was rewritten"
    assert sorted(committed(out)) == [f"{i:05d}" for i in range(6)]
    assert not list(out.rglob("*.tmp"))
    records = read_records(out)
    assert sorted(r["id"] for r in records) == sorted(ids)  # every image exactly once
    assert sorted(read_index(out).column("id").to_pylist()) == sorted(ids)
    assert sorted(r["id"] for r, _ in iter_encoded(out)) == sorted(ids)  # 00002.tar was rewritten whole
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_done"] == len(ids) and summary["images_done_this_run"] == 4 * 3
    assert summary["processes"][0]["shards"] == 4

    # A second resume finds nothing to do and changes nothing.
    before = {p.name: _fingerprint(p) for p in (out / "shards").iterdir()}
    assert main(args + ["--resume"]) == 0
    assert {p.name: _fingerprint(p) for p in (out / "shards").iterdir()} == before
    assert json.loads((out / "summary.json").read_text())["images_done_this_run"] == 0


def test_rerun_without_resume_and_resume_with_another_format_are_refused(
    tiny_vae_dir, tmp_path, write_tar_shards, capsys
):
    write_tar_shards(tmp_path / "in", 2, 2)
    out = tmp_path / "out"
    args = [
        "--shards",
        str(tmp_path / "in" / "{00000..00001}.tar"),
        "--out",
        str(out),
        "--vae",
        str(tiny_vae_dir),
    ]
    args += ["--ratio", "16", "--quiet"]
    assert main(args) == 0
    assert main(args) == 1 and "pass --resume" in capsys.readouterr().err
    assert main(args + ["--resume", "--format", "webdataset"]) == 1
    assert "output_format changed" in capsys.readouterr().err
