"""Every exit of the nested VAE from ONE trunk pass: the 8x, 16x and 32x latents of a batch at once.

``NestedVAE.encode`` sends each image only as deep as its own ratio, so asking it for all three
ratios of a batch (one image per ratio in a per-sample list) runs stages 1-3 three times, stage 4
twice and stage 5 once. The 8x path is a prefix of the 16x path, which is a prefix of the 32x
path, so one pass through all five stages can read every exit head on the way: the same work as
one 32x encode. Quality-targeted routing (:mod:`cat_tokenizer.quality_routing`) needs all three.

This reads the encoder's modules in the order ``nested_vae.encoder.Encoder.forward`` runs them
(it lives here, not in ``nested_vae``, which another package owns); ``tests`` check it against
``NestedVAE.encode`` at every ratio. Where the VAE's own encode does more than that loop (tiling,
slicing, the fp16/bf16 overflow guard), it falls back to one ``NestedVAE.encode`` call with a
per-sample ratio list, which is exact but runs the shallow stages more than once.
"""

from __future__ import annotations

import torch

from cat_foundations.ratios import RATIOS
from nested_vae.inputs import check_images, reflect_pad_to_multiple


def one_pass_supported(vae) -> bool:
    """Whether :func:`encode_all_exits` can read all exits in one trunk pass for this VAE now."""
    dtype = next(vae.parameters()).dtype
    return not vae.use_tiling and not vae.use_slicing and dtype == torch.float32


@torch.inference_mode()
def encode_all_exits(vae, pixels: torch.Tensor) -> tuple[dict[int, torch.Tensor], tuple[int, int]]:
    """Posterior means of ``pixels`` at every ratio.

    Args:
        vae: a :class:`nested_vae.NestedVAE`.
        pixels: ``(B, 3, H, W)`` in [-1, 1] on the VAE's device and dtype (any H, W: reflect-padded
            to multiples of 32 as ``NestedVAE.encode`` pads them).

    Returns:
        ``({ratio: mean latent (B, C, Hp/ratio, Wp/ratio)}, (bottom, right) padding)``.
    """
    if not one_pass_supported(vae):
        return _encode_by_ratio_list(vae, pixels)
    check_images(pixels, vae.config.in_channels)
    padded, padding = reflect_pad_to_multiple(pixels)
    encoder = vae.encoder
    features, means = encoder.conv_in(padded), {}
    for index, stage in enumerate(encoder.stages, start=1):
        before_downsample, features = stage(features)
        ratio = 2**index
        if ratio not in RATIOS:
            continue
        moments = encoder.exits[str(ratio)](before_downsample, features)
        mean = moments[:, : encoder.latent_channels]
        if encoder.pixel_shortcut is not None:
            mean = mean + encoder.pixel_shortcut.encode(padded, ratio).to(mean.dtype)
        means[ratio] = mean
    return means, (int(padding.bottom), int(padding.right))


def _encode_by_ratio_list(vae, pixels: torch.Tensor) -> tuple[dict[int, torch.Tensor], tuple[int, int]]:
    """The exact fallback: the batch repeated once per ratio in one ``NestedVAE.encode`` call."""
    count = pixels.shape[0]
    output = vae.encode(pixels.repeat(len(RATIOS), 1, 1, 1), [r for r in RATIOS for _ in range(count)])
    dists = output.latent_dist
    means = {
        ratio: torch.cat([d.mean for d in dists[position * count : (position + 1) * count]])
        for position, ratio in enumerate(RATIOS)
    }
    return means, (int(output.padding.bottom), int(output.padding.right))
