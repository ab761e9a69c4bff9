"""`cat-tokenize` under a real 2-process `accelerate launch` on CPU (torch.distributed with gloo)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import pytest

from cat_tokenizer.readers import iter_encoded, read_index
from cat_tokenizer.shard_store import committed
from cat_tokenizer.store import read_shard_records


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(arguments: list[str]) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``cat_tokenizer.cli`` with 2 CPU processes (gloo)."""
    launcher = shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the accelerate launcher is not on PATH")
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
        *arguments,
    ]
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)


def test_two_process_launch_splits_the_images_and_rank0_merges(
    tiny_vae_dir, tmp_path, write_small_images, cli_args
):
    names = write_small_images(tmp_path / "images", 6)
    out = tmp_path / "out"
    result = _launch(
        cli_args(tmp_path / "images", out, tiny_vae_dir, "--ratio", 16, "--shard-size", 2, "--quiet")
    )
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


def test_two_process_launch_splits_input_shards_every_image_exactly_once(
    tiny_vae_dir, tmp_path, write_tar_shards
):
    ids = write_tar_shards(tmp_path / "in", 20, 3)
    out = tmp_path / "out"
    arguments = ["--shards", str(tmp_path / "in" / "{00000..00019}.tar"), "--out", str(out)]
    result = _launch(
        arguments + ["--vae", str(tiny_vae_dir), "--ratio", "16", "--format", "webdataset", "--quiet"]
    )
    assert result.returncode == 0, result.stderr[-3000:]

    # One output shard per input shard, holding exactly that shard's samples under their own keys.
    outputs = {meta["name"]: meta for meta in committed(out).values()}
    assert sorted(outputs) == [f"{i:05d}" for i in range(20)]
    for name, meta in outputs.items():
        assert [r["id"] for r in meta["records"]] == [i for i in ids if i.startswith(name + "/")]
    per_tar = [r["id"] for r, _ in iter_encoded(out)]
    assert sorted(per_tar) == sorted(ids) and len(per_tar) == len(set(per_tar))
    index = read_index(out).column("id").to_pylist()
    assert sorted(index) == sorted(ids) and len(index) == len(set(index))
    # Both ranks worked, on disjoint input shards (no shard read twice).
    processes = json.loads((out / "summary.json").read_text())["processes"]
    assert [p["shards"] for p in processes] == [10, 10] and sum(p["done"] for p in processes) == len(ids)
    by_rank = {rank: {n for n, m in outputs.items() if m["rank"] == rank} for rank in (0, 1)}
    assert len(by_rank[0]) == len(by_rank[1]) == 10 and not by_rank[0] & by_rank[1]
    assert (out / "errors.jsonl").read_text() == "" and not list(out.glob("errors.rank*"))
