"""eval/bench_train.py on real devset crops: rows per variant, side by side, and channels-last runs."""

from __future__ import annotations

import json

from eval.bench_train import main


def test_bench_train_times_every_variant_and_thread_count(tmp_path, devset_dir):
    out = tmp_path / "bench_train.json"
    argv = ["--sizes", "32", "--steps", "1", "--batch", "2", "--variants", "no", "bf16:cl"]
    argv += ["--threads", "1", "--perceptual", "none", "--captions", str(devset_dir / "captions.jsonl")]
    result = main([*argv, "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert set(result["rows"]) == {"reconstruction@32 no x1", "reconstruction@32 bf16:cl x1"}
    for row in result["rows"].values():
        assert row["step_s_wall"] > 0 and row["images_per_s_wall"] > 0 and row["peak_step_memory_mib"] > 0
