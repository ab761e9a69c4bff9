"""eval/bench_generation.py end to end on the tiny tokenized set (tiny model, one repeat)."""

from __future__ import annotations

import json

from eval.bench_generation import main


def test_the_generation_benchmark_writes_its_three_tables(tiny_tokens, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--tokens", str(tiny_tokens), "--out", str(out), "--subset", "9", "--repeats", "1"]
    argv += [
        "--hidden-size",
        "32",
        "--depth",
        "1",
        "--num-heads",
        "2",
        "--sample-steps",
        "1",
        "--head-steps",
        "1",
    ]
    main(argv + ["--batch-tokens", "256", "--max-tokens", "96", "--rows", "2"])
    results = json.loads(out.read_text())
    assert [row["ratio"] for row in results["per_ratio"]] == [8, 16, 32]
    assert [row["images_per_batch"] for row in results["per_ratio"]] == [
        1,
        1,
        4,
    ]  # 256 tokens of 1024 / 256 / 64
    mix, fixed = results["mix_vs_16"]["router_mix"], results["mix_vs_16"]["all_16x"]
    assert mix["images"] == fixed["images"] == 9 and fixed["ratio_mix"] == {"8": 0, "16": 9, "32": 0}
    assert sum(mix["ratio_mix"].values()) == 9 and all(mix["ratio_mix"].values())  # stratified: every ratio
    packed, padded = mix["packed_flow_train"], mix["padded_flow_train"]
    assert packed["real_tokens"] == padded["real_tokens"] and padded["token_slots"] > packed["token_slots"]
    assert padded["padding_fraction"] > packed["padding_fraction"]
    assert "| router mix |" in out.with_suffix(".md").read_text()
