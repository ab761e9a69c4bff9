"""The one-batch learning-rate probe on the real default model and real devset crops."""

from __future__ import annotations

import json

import pytest

from eval.lr_probe import fit_one_batch, fixed_batch, main


@pytest.fixture(scope="module")
def batch(devset_dir):
    return fixed_batch(devset_dir / "captions.jsonl", None, count=2, size=32)


def test_fixed_batch_is_the_same_crops_every_time(batch, devset_dir):
    assert batch.shape == (2, 3, 32, 32)
    assert batch.min() >= -1 and batch.max() <= 1
    assert fixed_batch(devset_dir / "captions.jsonl", None, count=2, size=32).equal(batch)


def test_a_new_model_starts_at_its_shortcut_and_a_small_rate_improves_on_it(batch):
    row = fit_one_batch(batch, ratio=8, lr=1e-4, steps=8, bf16=False)
    again = fit_one_batch(batch, ratio=8, lr=1e-4, steps=8, bf16=False)
    assert row["psnr_start"] == again["psnr_start"] and row["psnr_end"] == again["psnr_end"]
    assert row["gain_db"] > 0.1


def test_main_writes_the_table_as_json(tmp_path, devset_dir, capsys):
    out = tmp_path / "probe.json"
    main(
        ["--lrs", "1e-4", "--steps", "1", "--batch", "1", "--size", "32"]
        + ["--captions", str(devset_dir / "captions.jsonl"), "--out", str(out)]
    )
    result = json.loads(out.read_text())
    assert [row["lr"] for row in result["rows"]] == [1e-4]
    assert "gain dB" in capsys.readouterr().out
