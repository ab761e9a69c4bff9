"""Hub checkpoints resolved by the real huggingface_hub code from an HF cache laid out on disk, offline."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from cat_tokenizer.tokenizer import CATTokenizer
from nested_vae import NestedVAE
from router import RoutingPolicy

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay ``folder`` out as huggingface_hub's cache does: blobs/<sha256>, snapshots/<rev>/ links, refs/main."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    for source in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = source.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / REVISION / source.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(REVISION)


# Runs in a fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE when imported.
_LOAD = """
import sys, torch
from nested_vae import NestedVAE
from cat_tokenizer.tokenizer import CATTokenizer
vae = NestedVAE.from_pretrained("org/tiny-vae")
reference = torch.load(sys.argv[1])
assert all(torch.equal(vae.state_dict()[k], reference[k]) for k in reference), "weights differ"
print("vae", vae.weights_path)
tok = CATTokenizer.from_pretrained("org/tiny-bundle", router=None, device="cpu")
print("policy", tok.policy.low, tok.policy.high, tok.max_side)
try:
    NestedVAE.from_pretrained("org/not-cached")
except FileNotFoundError as error:
    print("missing", error)
"""


def test_offline_from_pretrained_resolves_a_hub_cache(tiny_vae_dir, tmp_path):
    cache = tmp_path / "hub"
    _cache_repo(cache, "org/tiny-vae", tiny_vae_dir)
    bundle = tmp_path / "bundle"
    CATTokenizer(
        NestedVAE.from_pretrained(tiny_vae_dir), policy=RoutingPolicy(3.0, 6.5), max_side=96
    ).save_pretrained(bundle)
    _cache_repo(cache, "org/tiny-bundle", bundle)
    reference = tmp_path / "state.pt"
    torch.save(NestedVAE.from_pretrained(tiny_vae_dir).state_dict(), reference)
    script = tmp_path / "load.py"
    script.write_text(_LOAD)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path)}
    # Run from tmp_path so "org/..." can never be taken for a local folder.
    result = subprocess.run(
        [sys.executable, str(script), str(reference)],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["vae"].startswith(str(cache / "models--org--tiny-vae" / "snapshots" / REVISION))
    assert lines["policy"] == "3.0 6.5 96"
    assert "org/not-cached" in lines["missing"] and "HF cache" in lines["missing"]


def test_local_directories_and_default_still_win(tiny_vae_dir, tmp_path, monkeypatch):
    # A local folder spelled like a repo id is the folder, never a Hub lookup.
    shutil.copytree(tiny_vae_dir, tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    assert NestedVAE.from_pretrained("org/name").weights_path == Path("org/name/model.safetensors")
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="checkpoint file not found: .*nowhere/config.json"):
        NestedVAE.from_pretrained(missing)
    assert NestedVAE.from_pretrained("default").weights_path.parent.name == "default"


def test_cli_tokenizes_and_decodes_with_a_hub_vae_offline(tiny_vae_dir, tmp_path):
    from cat_tokenizer.testing import write_tar_shards

    cache = tmp_path / "hub"
    _cache_repo(cache, "org/tiny-vae", tiny_vae_dir)
    ids = write_tar_shards(tmp_path / "in", 2, 2)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    tokenize = [
        sys.executable,
        "-m",
        "cat_tokenizer.cli",
        "--shards",
        "in/{00000..00001}.tar",
        "--out",
        "tokens",
    ]
    tokenize += ["--vae", "org/tiny-vae", "--ratio", "16", "--quiet"]
    result = subprocess.run(tokenize, capture_output=True, text=True, env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "tokens" / "run.json").read_text())["vae"] == "org/tiny-vae"
    decode = [
        sys.executable,
        "-m",
        "cat_tokenizer.cli",
        "decode",
        "--tokens",
        "tokens",
        "--out",
        "recon",
        "--quiet",
    ]
    result = subprocess.run(decode, capture_output=True, text=True, env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        sorted(
            str(p.relative_to(tmp_path / "recon").with_suffix(""))
            for p in (tmp_path / "recon").rglob("*.png")
        )
        == ids
    )
    row = pq.read_table(tmp_path / "tokens" / "index.parquet").to_pylist()[0]
    assert row["vae"] == "org/tiny-vae"
    assert (
        row["vae_weights_sha256"]
        == hashlib.sha256((tiny_vae_dir / "model.safetensors").read_bytes()).hexdigest()
    )
