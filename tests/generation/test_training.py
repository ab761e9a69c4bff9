"""Training lowers the loss on a tiny tokenized set; samples decode at the asked ratio's size; cat-gen end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from cat_foundations.ratios import latent_size, tokens_for
from cat_generation.cli import main
from cat_generation.sample import SampleSettings, generate, read_run_info
from cat_generation.train import TrainSettings, train
from router import RoutingPolicy, load_scorer

STEPS = 300
LOG_EVERY = 50


@pytest.fixture(scope="module")
def trained_runs(tiny_tokens, tmp_path_factory):
    """One short run per objective on the tiny set (packed batches, labels from the name prefix)."""
    model = {"hidden_size": 32, "depth": 2, "num_heads": 2, "head_hidden_size": 32, "caption_dim": 16}
    runs = {}
    for objective in ("flow", "masked"):
        settings = TrainSettings(
            tokens=tiny_tokens,
            out=tmp_path_factory.mktemp(f"run_{objective}"),
            objective=objective,
            steps=STEPS,
            max_tokens=96,
            rows=2,
            learning_rate=3e-3,
            label_rule="prefix",
            log_every=LOG_EVERY,
            model=model,
        )
        runs[objective] = (settings, train(settings))
    return runs


@pytest.mark.parametrize("objective", ["flow", "masked"])
def test_the_loss_falls_on_a_tiny_tokenized_set(trained_runs, objective):
    _, result = trained_runs[objective]
    losses = [loss for _, loss in result.losses]
    assert len(losses) == STEPS // LOG_EVERY
    # Both start near 2 (zero-initialised output: E|data - noise|^2 for unit-variance data).
    assert 1.5 < losses[0] < 2.5
    assert losses[-1] < 0.85 * losses[0], losses  # measured: about 0.65x (flow), 0.8x (masked)
    assert 0.0 <= result.padding_fraction < 0.5


@pytest.mark.parametrize("objective", ["flow", "masked"])
@pytest.mark.parametrize("ratio", [8, 16, 32])
def test_samples_decode_at_the_requested_ratio_size(trained_runs, objective, ratio):
    settings, _ = trained_runs[objective]
    result = generate(
        SampleSettings(run=settings.out, n=2, ratio=ratio, steps=3, head_steps=2, label="simple")
    )
    assert result.ratio == ratio
    size = tuple(read_run_info(settings.out)["image_size"])
    assert result.size == size == (64, 96)
    assert (
        result.tokens
        == tokens_for(ratio, size)
        == latent_size(*size, ratio)[0] * latent_size(*size, ratio)[1]
    )
    assert [image.size for image in result.images] == [(96, 64)] * 2  # PIL: (W, H)
    other = generate(SampleSettings(run=settings.out, n=1, ratio=ratio, size=(32, 32), steps=2, head_steps=2))
    assert other.images[0].size == (32, 32)


def test_auto_routes_the_caption_with_the_tokens_router_and_policy(trained_runs, tiny_llama_dir):
    settings, _ = trained_runs["flow"]
    info = read_run_info(settings.out)
    caption = "a detailed bar chart with twelve labelled categories and a dense legend"
    score = load_scorer(str(tiny_llama_dir)).score([caption])[0]
    expected = RoutingPolicy(**info["policy"]).decide(score).ratio
    result = generate(
        SampleSettings(
            run=settings.out, n=1, ratio="auto", caption=caption, router_model=str(tiny_llama_dir), steps=2
        )
    )
    assert result.ratio == expected
    assert result.score == pytest.approx(score.score)


def test_cli_train_then_sample_round_trip(tiny_tokens, tmp_path):
    run, samples = tmp_path / "run", tmp_path / "samples"
    train_argv = ["train", "--tokens", tiny_tokens, "--objective", "masked", "--steps", 4, "--out", run]
    train_argv += [
        "--hidden-size",
        32,
        "--depth",
        1,
        "--num-heads",
        2,
        "--max-tokens",
        96,
        "--batching",
        "bucket",
    ]
    completed = subprocess.run(
        [sys.executable, "-m", "cat_generation.cli", *map(str, train_argv)], capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr
    assert "trained 4 steps" in completed.stderr
    assert {p.name for p in run.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "latents_stats.json",
        "run.json",
    }
    code = main(
        [
            "sample",
            "--run",
            str(run),
            "--n",
            "3",
            "--ratio",
            "16",
            "--steps",
            "2",
            "--head-steps",
            "2",
            "--out",
            str(samples),
        ]
    )
    assert code == 0
    assert sorted(p.name for p in samples.glob("sample_*.png")) == [
        "sample_000.png",
        "sample_001.png",
        "sample_002.png",
    ]
    assert Image.open(samples / "grid.png").size == (2 * 96, 2 * 64)
    assert json.loads((samples / "samples.json").read_text())["tokens"] == tokens_for(16, (64, 96))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sample", "--run", "nowhere", "--out", "x"], "not a cat-gen train run folder"),
        (["train", "--tokens", "nowhere", "--out", "x"], "is not a folder"),
        (["sample", "--run", "r", "--out", "x", "--ratio", "12"], "--ratio takes 8, 16, 32 or auto"),
        ([], "expected a command"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_1(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("cat-gen: error:") and message in err and "\n" not in err
