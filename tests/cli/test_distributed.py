"""`cat-tokenize` under a real 2-process `accelerate launch` on CPU (torch.distributed with gloo)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import pytest

from cat_tokenizer.store import read_shard_records


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_launch_splits_the_images_and_rank0_merges(
    tiny_vae_dir, tmp_path, write_small_images, cli_args
):
    launcher = shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the accelerate launcher is not on PATH")
    names = write_small_images(tmp_path / "images", 6)
    out = tmp_path / "out"
    # --multi_gpu on a GPU-less host makes accelerate use torchrun; cat-tokenize then asks for a
    # CPU state, which accelerate sets up as a gloo process group (DistributedType.MULTI_CPU).
    command = [
        launcher,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "cat_tokenizer.cli",
        *cli_args(tmp_path / "images", out, tiny_vae_dir, "--ratio", 16, "--shard-size", 2, "--quiet"),
    ]
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]

    shards = sorted(p.name for p in (out / "shards").iterdir())
    assert {name[:3] for name in shards} == {"r00", "r01"}  # both ranks wrote their own shards
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    ids = [record["id"] for record in manifest]
    assert sorted(ids) == sorted(names) and len(ids) == len(set(ids))  # union = input set, no duplicates
    by_rank = {
        rank: {r["id"] for r in manifest if r["shard"].startswith(f"shards/{rank}")}
        for rank in ("r00", "r01")
    }
    assert by_rank["r00"] and by_rank["r01"] and not by_rank["r00"] & by_rank["r01"]
    assert sorted(r["id"] for r in read_shard_records(out)) == sorted(names)
    assert not list(out.glob("errors.rank*")) and (out / "errors.jsonl").read_text() == ""
    assert json.loads((out / "summary.json").read_text())["images_done_this_run"] == len(names)
