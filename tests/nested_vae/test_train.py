"""The accelerate trainer on a tiny model and real devset images (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cat_foundations.hardware import cpu_has_native_bf16
from nested_vae import NestedVAE
from nested_vae.train import Trainer, build_vae, checkpoint_dirs, export_checkpoint, load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = {
    "base_channels": 8,
    "channel_multipliers": [1, 1, 2, 2, 2],
    "norm_num_groups": 4,
    "latent_channels": 4,
    "attention_ratios": [32],
}


@pytest.fixture(scope="module")
def captions_file(devset_dir, devset_sample, tmp_path_factory) -> Path:
    """A 4-image captions.jsonl (absolute image paths) over real devset images."""
    path = tmp_path_factory.mktemp("data") / "captions.jsonl"
    rows = [{"image": str(devset_dir / r["image"]), "caption": r["caption"]} for r in devset_sample[:4]]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _overrides(output_dir: Path, captions_file: Path, **extra) -> list[str]:
    values = {
        "output_dir": str(output_dir),
        "data.source": str(captions_file),
        "data.resolution": 32,
        "batch_size": 2,
        "model": json.dumps(TINY_MODEL),
        "loss.perceptual": "efficientnet",
        "loss.disc_start": 1,
        "loss.disc_channels": 8,
        "loss.disc_layers": 2,
        "loss.lecam_weight": 0.1,
        "lr_warmup_steps": 1,
        "learning_rate": 1e-3,
        "ema_decay": 0.9,
        "checkpoint_every": 2,
        "image_every": 0,
        "log_every": 1,
        "ratio_sampling": "uniform",
        **extra,
    }
    return [f"--{key}={value}" for key, value in values.items()]


def _run(overrides: list[str]) -> Trainer:
    trainer = Trainer(load_config(None, overrides))
    trainer.train()
    return trainer


def _states(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    unwrap = trainer.accelerator.unwrap_model
    return {
        "vae": unwrap(trainer.vae).state_dict(),
        "disc": unwrap(trainer.disc).state_dict(),
        "ema": trainer.ema.state_dict(),
        "opt_g": {str(k): v["exp_avg"] for k, v in trainer.opt_g.state_dict()["state"].items()},
    }


def test_resume_continues_exactly(tmp_path, captions_file):
    straight = _run(_overrides(tmp_path / "straight", captions_file, max_steps=4))
    _run(_overrides(tmp_path / "split", captions_file, max_steps=2))
    resumed = _run(_overrides(tmp_path / "split", captions_file, max_steps=4, resume="latest"))
    assert resumed.state.step == straight.state.step == 4
    expected, got = _states(straight), _states(resumed)
    for part in expected:
        for name, tensor in expected[part].items():
            assert torch.equal(tensor, got[part][name]), f"{part}.{name} differs after resume"
    # The discriminator trained (disc_start=1), so resuming had to restore it and its optimizer too.
    assert resumed.state.step > resumed.loss.disc_start


def test_run_outputs_checkpoints_config_logs_grids_and_export(tmp_path, captions_file):
    output = tmp_path / "run"
    trainer = _run(_overrides(output, captions_file, max_steps=3, image_every=3, checkpoints_to_keep=1))
    # Atomic checkpoints: only finished directories, the newest one kept.
    assert [p.name for p in checkpoint_dirs(output)] == ["step-00000003"]
    assert not list((output / "checkpoints").glob("*.tmp"))
    saved = json.loads((output / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert saved["step"] == 3
    # Resolved config, CSV metrics with per-ratio terms, reconstruction grids for every ratio.
    resolved = yaml.safe_load((output / "config.yaml").read_text())
    assert resolved["batch_size"] == 2 and resolved["model"]["base_channels"] == 8
    metrics = (output / "logs" / "metrics.csv").read_text()
    assert "train/efficientnet_feature" not in metrics and "/efficientnet_feature" in metrics
    assert "train/logits_real" in metrics and "train/logits_fake" in metrics
    for ratio in (8, 16, 32):
        assert (output / "images" / f"step-00000003_r{ratio}.png").is_file()
    # The export is the EMA model, loadable by from_pretrained.
    loaded = NestedVAE.from_pretrained(output / "export")
    for name, tensor in trainer.ema.module.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_discriminator_is_untouched_before_disc_start(tmp_path, captions_file):
    config = load_config(
        None, _overrides(tmp_path / "run", captions_file, max_steps=2, **{"loss.disc_start": 5})
    )
    trainer = Trainer(config)
    before = {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.disc).state_dict().items()}
    logs = trainer.train()
    after = trainer.accelerator.unwrap_model(trainer.disc).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "train/disc_loss" not in logs and logs["train/disc_factor"] == 0.0


def test_export_checkpoint_fp16_with_scaling_factor(tmp_path, captions_file):
    output = tmp_path / "run"
    _run(_overrides(output, captions_file, max_steps=1, **{"loss.perceptual": "none"}))
    images = [torch.rand(3, 32, 32) * 2 - 1 for _ in range(2)]
    path = export_checkpoint(checkpoint_dirs(output)[-1], tmp_path / "export", "float16", images)
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float16 for t in load_file(str(path / "model.safetensors")).values())
    model = NestedVAE.from_pretrained(path)
    assert model.config.scaling_factor != 1.0 and model.config.scaling_factor > 0


def test_config_from_yaml_with_cli_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 7\nloss:\n  kl_weight: 1.0e-5\ndata:\n  resolution: 96\n")
    config = load_config(
        str(path), ["--loss.kl_weight=2e-6", "--adam_betas=[0.8, 0.95]", "--mixed_precision=no"]
    )
    assert config.max_steps == 7 and config.data.resolution == 96 and config.mixed_precision == "no"
    assert config.loss.kl_weight == 2e-6 and config.adam_betas == (0.8, 0.95)


def test_config_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("loss:\n  kl_wieght: 1.0\n")
    with pytest.raises(ValueError, match=r"bad\.yaml\.loss: unknown key 'kl_wieght'"):
        load_config(str(path))
    path.write_text("max_steps: [1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(str(path))
    with pytest.raises(ValueError, match="--key=value"):
        load_config(None, ["max_steps=3"])


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, captions_file):
    trainer = Trainer(load_config(None, _overrides(tmp_path / "empty", captions_file, max_steps=1)))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        trainer.load_checkpoint("latest")


@pytest.mark.slow
def test_two_process_cpu_accelerate_launch(tmp_path, captions_file):
    """Two gloo processes on CPU through ``accelerate launch`` complete a few steps.

    accelerate's ``--cpu`` launcher starts ONE process unless MPI is used; the torchrun launcher
    (``--multi_gpu``) with ``ACCELERATE_USE_CPU=true`` gives MULTI_CPU with the gloo backend.
    """
    output = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "nested_vae.train",
        *_overrides(output, captions_file, max_steps=3, **{"loss.perceptual": "none", "cpu_threads": 1}),
    ]  # fmt: skip
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MULTI_CPU" in result.stdout and "world size 2" in result.stdout
    saved = json.loads((checkpoint_dirs(output)[-1] / "trainer_state.json").read_text())
    assert saved["step"] == 3
    # Both ranks saved their RNG state; the export exists once.
    assert {p.name for p in checkpoint_dirs(output)[-1].glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    assert NestedVAE.from_pretrained(output / "export").config.base_channels == 8


def test_bf16_config_trains_in_the_precision_this_cpu_runs_natively(tmp_path, captions_file):
    """A bf16 config (the CPU recipes') on this machine: bf16 where the CPU has it, else fp32 + a warning.

    A subprocess: accelerate fixes one mixed precision per process, and the other tests train in fp32.
    """
    output = tmp_path / "bf16"
    command = [
        sys.executable, "-m", "nested_vae.train",
        *_overrides(output, captions_file, max_steps=1, mixed_precision="bf16", **{"loss.perceptual": "none"}),
    ]  # fmt: skip
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    if cpu_has_native_bf16():
        assert "mixed precision bf16" in result.stdout and "no native bf16" not in result.stderr
    else:
        assert "mixed precision no" in result.stdout
        assert "this CPU has no native bf16" in result.stderr and "training in fp32" in result.stderr
    # The run records what was asked for; the precision used is the machine's business.
    assert yaml.safe_load((output / "config.yaml").read_text())["mixed_precision"] == "bf16"


def test_init_from_with_shape_preserving_override_keeps_weights(tiny_vae_dir):
    """Stage 2 of the shipped checkpoint: init_from + a regrouped GroupNorm loads every weight."""
    config = load_config(None, [f"--init_from={tiny_vae_dir}", "--model={norm_num_groups: 2}"])
    vae = build_vae(config)
    pretrained = NestedVAE.from_pretrained(tiny_vae_dir)
    assert vae.config.norm_num_groups == 2 and pretrained.config.norm_num_groups != 2
    assert vae.config.base_channels == pretrained.config.base_channels
    norms = [m for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 2 for m in norms)
    loaded, original = vae.state_dict(), pretrained.state_dict()
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[k], original[k]) for k in original)


def test_init_from_with_shape_changing_override_fails_naming_keys(tiny_vae_dir):
    config = load_config(None, [f"--init_from={tiny_vae_dir}", "--model={latent_channels: 8}"])
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_vae(config)


def test_ratio_resolution_crops_each_ratio_to_its_side(tmp_path, captions_file):
    overrides = _overrides(
        tmp_path / "run",
        captions_file,
        max_steps=2,
        ratio_sampling="all",
        ratio_resolution="{8: 32, 16: 64}",
        **{"data.resolution": 64, "loss.disc_start": 100, "loss.perceptual": "none"},
    )
    trainer = Trainer(load_config(None, overrides))
    batch = next(iter(trainer.loader))
    _, groups = trainer._forward(batch, micro_step=0)
    sides = {group.ratio: tuple(group.inputs.shape[-2:]) for group in groups}
    assert sides == {8: (32, 32), 16: (64, 64), 32: (64, 64)}  # 32x is not named: data.resolution
    for group in groups:
        assert group.reconstructions.shape == group.inputs.shape
        # Each crop is a window of the loaded image it came from.
        source = batch["pixel_values"][group.real_index[0]]
        windows = source.unfold(1, group.inputs.shape[-2], 1).unfold(2, group.inputs.shape[-1], 1)
        assert (windows - group.inputs[0][:, None, None]).abs().amax(dim=(0, 3, 4)).min() == 0
    assert trainer.train()["train/nll_loss"] > 0


def test_ratio_resolution_is_validated_and_refused_with_the_gan(tmp_path, captions_file):
    base = _overrides(tmp_path / "run", captions_file, max_steps=4, **{"data.resolution": 64})
    with pytest.raises(ValueError, match="GAN phase"):
        load_config(None, [*base, "--ratio_resolution={8: 32}", "--loss.disc_start=1"])
    with pytest.raises(ValueError, match="multiple of 32"):
        load_config(None, [*base, "--ratio_resolution={8: 48}", "--loss.disc_start=100"])
    with pytest.raises(ValueError, match="not a supported ratio"):
        load_config(None, [*base, "--ratio_resolution={4: 32}", "--loss.disc_start=100"])


def test_start_step_continues_the_schedule_from_exported_weights(tmp_path, captions_file):
    settings = {"lr_scheduler": "cosine", "lr_warmup_steps": 1, "loss.disc_start": 100}
    first = _run(_overrides(tmp_path / "first", captions_file, max_steps=4, time_limit_minutes=0, **settings))
    assert first.state.step == 1  # the time limit stopped it after one step: exported at step 1
    continued = Trainer(
        load_config(
            None,
            _overrides(
                tmp_path / "second",
                captions_file,
                max_steps=4,
                init_from=str(tmp_path / "first" / "export"),
                start_step=1,
                **settings,
            ),
        )
    )
    assert continued.state.step == 1
    assert continued.scheduler.get_last_lr() == first.scheduler.get_last_lr()  # same point of the cosine
    continued.train()
    assert continued.state.step == 4
    with pytest.raises(ValueError, match="set init_from"):
        load_config(None, _overrides(tmp_path / "x", captions_file, max_steps=4, start_step=2))


@pytest.mark.parametrize("channels_last", [False, True])
def test_export_checkpoint_writes_the_ema_weights_from_the_checkpoint(tmp_path, captions_file, channels_last):
    overrides = {"loss.perceptual": "none", "channels_last": channels_last}
    trainer = _run(_overrides(tmp_path / "run", captions_file, max_steps=2, **overrides))
    path = export_checkpoint(checkpoint_dirs(tmp_path / "run")[-1], tmp_path / "export", "float32")
    exported = NestedVAE.from_pretrained(path).state_dict()
    raw = trainer.accelerator.unwrap_model(trainer.vae).state_dict()
    for name, tensor in trainer.ema.module.state_dict().items():
        assert torch.equal(exported[name], tensor), name
    assert any(not torch.equal(raw[name], exported[name]) for name in raw)  # EMA, not the raw weights
    raw_path = export_checkpoint(
        checkpoint_dirs(tmp_path / "run")[-1], tmp_path / "raw", "float32", weights="raw"
    )
    exported_raw = NestedVAE.from_pretrained(raw_path).state_dict()
    assert all(torch.equal(exported_raw[name], raw[name].contiguous()) for name in raw)
