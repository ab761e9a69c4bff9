"""Tiled encode/decode and the fp16/bf16 autocast upcast guard, on tiny real models."""

from __future__ import annotations

import math

import pytest
import torch

from nested_vae import RATIOS, NestedVAE
from nested_vae.tiling import run_tiled, tile_starts

TINY = dict(base_channels=8, norm_num_groups=8)


def tiny_vae(seed: int = 0) -> NestedVAE:
    torch.manual_seed(seed)
    return NestedVAE(**TINY).eval()


def smooth_image(size: int) -> torch.Tensor:
    """A photo-like test image: low-frequency colour waves plus mild noise, in [-1, 1]."""
    coords = torch.linspace(0, 1, size)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    channels = [
        torch.sin(2 * math.pi * (1.5 * x + 0.5 * y)),
        torch.cos(2 * math.pi * (0.7 * x - 1.3 * y)),
        torch.sin(2 * math.pi * 2.0 * x * y),
    ]
    noise = torch.randn(3, size, size, generator=torch.Generator().manual_seed(0)) * 0.1
    return (0.8 * torch.stack(channels) + noise).clamp(-1, 1).unsqueeze(0)


# -- tiling ----------------------------------------------------------------------------------------


def test_tile_starts_cover_the_length_with_full_tiles():
    assert tile_starts(512, 256, 64) == [0, 192, 256]
    assert tile_starts(256, 256, 64) == [0]
    assert tile_starts(100, 256, 64) == [0]
    starts = tile_starts(1000, 256, 64)
    assert starts[-1] + 256 == 1000 and all(b - a <= 192 for a, b in zip(starts, starts[1:]))


def test_run_tiled_is_exact_for_a_pointwise_function():
    x = torch.randn(2, 3, 96, 160)
    result = run_tiled(x, lambda tile: tile.repeat_interleave(2, -1).repeat_interleave(2, -2) * 3, 64, 32, 2)
    torch.testing.assert_close(result, x.repeat_interleave(2, -1).repeat_interleave(2, -2) * 3)


# GroupNorm statistics differ between a tile and the whole image, so tiling is never exact. On
# this random tiny model the mean deviation is ~17% of the output's std at 8x (diffusers'
# AutoencoderKL tiling, same widths and tiles: ~34%); a trained model varies less.
TILED_DECODE_TOLERANCE = {8: 0.25, 16: 0.4}


def test_blending_hides_per_tile_offsets():
    # Each tile subtracts its own mean, like a per-tile normalisation statistic: neighbouring
    # tiles of a horizontal ramp then disagree by ~0.375. Cut and pasted, that is a visible step;
    # blended over the 64-pixel overlap it becomes a gentle slope.
    ramp = torch.linspace(0, 1, 512).expand(1, 1, 512, 512)
    blended = run_tiled(ramp, lambda tile: tile - tile.mean(), 256, 64, 1)
    natural_step = 1 / 511
    tile_offset = 192 / 511
    assert blended.diff(dim=-1).abs().max() < natural_step + tile_offset / 32
    assert blended.diff(dim=-2).abs().max() < 1e-6  # rows: tiles agree, nothing to blend


@pytest.mark.parametrize("ratio", [8, 16])
def test_tiled_decode_is_close_to_untiled_at_512(ratio):
    vae = tiny_vae()
    with torch.no_grad():
        latents = vae.encode(smooth_image(512), ratio).latent_dist.mode()
        untiled = vae.decode(latents, ratio).sample
        calls = []
        hook = vae.decoder.register_forward_hook(lambda *_: calls.append(1))
        vae.enable_tiling(tile_sample_size=256, tile_overlap=64)
        tiled = vae.decode(latents, ratio).sample
        hook.remove()
    assert len(calls) == 9  # 3 x 3 overlapping tiles
    assert tiled.shape == untiled.shape == (1, 3, 512, 512)
    deviation = (tiled - untiled).abs().mean() / untiled.std()
    print(f"ratio {ratio}: mean |tiled - untiled| / std = {deviation:.3f}")
    assert deviation < TILED_DECODE_TOLERANCE[ratio]


def test_tiled_encode_is_close_to_untiled_at_512():
    vae = tiny_vae()
    x = smooth_image(512)
    with torch.no_grad():
        untiled = vae.encode(x, 8).latent_dist
        vae.enable_tiling(tile_sample_size=256, tile_overlap=64)
        tiled = vae.encode(x, 8).latent_dist
    assert tiled.mean.shape == untiled.mean.shape == (1, 16, 64, 64)
    deviation = (tiled.mean - untiled.mean).abs().mean() / untiled.mean.std()
    print(f"encode 8x: mean |tiled - untiled| / std = {deviation:.3f}")
    assert deviation < 0.5  # diffusers' AutoencoderKL, same setting: ~0.41


def test_tiling_settings_are_validated():
    vae = tiny_vae()
    with pytest.raises(ValueError, match="multiples of 32"):
        vae.enable_tiling(tile_sample_size=250)
    with pytest.raises(ValueError, match="smaller than tile_sample_size"):
        vae.enable_tiling(tile_sample_size=256, tile_overlap=256)


def test_small_images_are_not_tiled():
    vae = tiny_vae()
    x = smooth_image(128)
    with torch.no_grad():
        plain = vae(x, 16).sample
        vae.enable_tiling()
        assert torch.equal(vae(x, 16).sample, plain)


# -- autocast upcast guard -------------------------------------------------------------------------


def _decode_under_fp16(vae: NestedVAE, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        return vae.decode(latents, 8).sample


def test_fp16_overflowing_latent_decodes_finite_with_the_guard():
    vae = tiny_vae()
    with torch.no_grad():
        latents = vae.encode(smooth_image(64), 8).latent_dist.mode()
    # Latent values beyond the fp16 range (65504): fp16 turns them into inf, then NaN.
    huge = latents / latents.abs().max() * 1e5
    reference = vae.decode(huge, 8).sample.detach()
    assert torch.isfinite(reference).all()

    vae.upcast_on_overflow = False
    assert not torch.isfinite(_decode_under_fp16(vae, huge)).all()

    vae.upcast_on_overflow = True
    guarded = _decode_under_fp16(vae, huge)
    assert torch.isfinite(guarded).all() and vae.upcast_fallbacks == 1
    torch.testing.assert_close(guarded.float(), reference, rtol=1e-4, atol=1e-4)


def test_fp16_overflowing_activations_encode_finite_with_the_guard():
    vae = tiny_vae()
    with torch.no_grad():
        # Activations ~1e5 after conv_in (a checkpoint with large activations): fp16 overflows.
        vae.encoder.conv_in.weight.mul_(1e5)
    x = smooth_image(64)
    with torch.no_grad():
        reference = vae.encode(x, 8).latent_dist.mean
        vae.upcast_on_overflow = False
        with torch.autocast("cpu", dtype=torch.float16):
            unguarded = vae.encode(x, 8).latent_dist.mean
        vae.upcast_on_overflow = True
        with torch.autocast("cpu", dtype=torch.float16):
            guarded = vae.encode(x, 8).latent_dist.mean
    assert torch.isfinite(reference).all()
    assert not torch.isfinite(unguarded).all()
    assert torch.isfinite(guarded).all() and vae.upcast_fallbacks == 1
    torch.testing.assert_close(guarded.float(), reference, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_autocast_on_normal_input_stays_low_precision(dtype):
    vae = tiny_vae()
    x = smooth_image(64)
    with torch.no_grad():
        reference = {ratio: vae(x, ratio).sample for ratio in RATIOS}
        with torch.autocast("cpu", dtype=dtype):
            low = {ratio: vae(x, ratio).sample for ratio in RATIOS}
    assert vae.upcast_fallbacks == 0
    for ratio in RATIOS:
        assert low[ratio].dtype == dtype
        assert (low[ratio].float() - reference[ratio]).abs().mean() < 0.05
