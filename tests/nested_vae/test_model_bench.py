"""The VAE benchmark's measuring tools measure what they claim (not timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from eval import bench_vae  # noqa: E402
from nested_vae import NestedVAE  # noqa: E402


def test_peak_tensor_memory_replays_allocations_and_frees():
    megabyte = 2**20

    def allocate():
        first = torch.empty(4 * megabyte, dtype=torch.uint8)
        second = torch.empty(4 * megabyte, dtype=torch.uint8)
        del first
        third = torch.empty(8 * megabyte, dtype=torch.uint8)
        return second, third

    # 4 + 4 held, the first 4 freed, then 8 more: 12 MB held at the peak (16 if frees were missed).
    assert bench_vae.peak_tensor_memory_bytes(allocate) == 12 * megabyte


def test_reference_autoencoderkl_matches_width_and_ratio():
    vae = NestedVAE(base_channels=8, norm_num_groups=8)
    for ratio, widths in {8: (8, 16, 32, 32), 16: (8, 16, 32, 32, 64), 32: (8, 16, 32, 32, 64, 64)}.items():
        reference = bench_vae.autoencoderkl_matching(vae, ratio)
        assert tuple(reference.config.block_out_channels) == widths
        with torch.no_grad():
            latent = reference.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        assert latent.shape == (1, 16, 64 // ratio, 64 // ratio)


def test_benchmark_writes_rows_and_consistent_summary(tmp_path):
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        bench_vae.main(["--sizes", "32", "--repeats", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    rows = {(row["model"], row["ratio"]): row for row in result["rows"]}
    assert set(rows) == {(model, ratio) for model in ("nested", "autoencoderkl") for ratio in (8, 16, 32)}
    for row in rows.values():
        assert row["total_ms"] == pytest.approx(row["encode_ms"] + row["decode_ms"])
        assert row["total_cpu_ms"] == pytest.approx(row["encode_cpu_ms"] + row["decode_cpu_ms"])
        assert row["encode_peak_mb"] > 0 and row["decode_peak_mb"] > 0 and row["gflops"] > 0
    summary = result["summary"][0]
    for measure in ("total_ms", "total_cpu_ms"):
        ratio_32x_8x = rows["nested", 32][measure] / rows["nested", 8][measure]
        assert summary[f"nested_32x_vs_8x_{measure}"] == pytest.approx(ratio_32x_8x)
        assert summary[f"target_32x_vs_8x_met_{measure}"] == (ratio_32x_8x <= bench_vae.TARGET_32X_VS_8X)
    # FLOPs are exact: the 32x path does strictly more work than the 8x path it contains.
    assert rows["nested", 32]["gflops"] > rows["nested", 8]["gflops"]
