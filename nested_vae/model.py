"""The nested VAE: one model that compresses an image 8x, 16x or 32x per side with shared weights.

Layout (``w_j = base_channels * channel_multipliers[j-1]``; default widths 32, 64, 128, 128, 256)::

    x (3, H, W), H and W reflect-padded to multiples of 32
    encoder.conv_in                                    -> (w1, H, W)
    encoder.stages[j-1], j = 1..5: ResNet blocks at (H/2^(j-1)) with width w_j, then a stride-2
        downsample                                     -> (w_j, H/2^j, W/2^j)
    exits after stage 3 (8x), 4 (16x), 5 (32x): encoder.exits["r"]
        learned:  ResNet block (+ self-attention at 16x/32x), GroupNorm, SiLU, conv
                  (w_j, H/r, W/r) -> mean and log-variance, each (latent_channels, H/r, W/r)
        shortcut: the stage's features *before* its downsample (w_j, 2H/r, 2W/r)
                  -> pixel-unshuffle 2 -> (4 w_j, H/r, W/r) -> mean of consecutive groups of
                  4 w_j / latent_channels channels -> (latent_channels, H/r, W/r), added to the mean

    decoder.entries["r"] for the latent z (latent_channels, H/r, W/r), r = 2^j:
        learned:  conv latent_channels -> d_j, ResNet block (+ self-attention at 16x/32x)
                  -> (d_j, H/r, W/r), where d_j = w_(j+1) (d_5 = w_5) is what decoder stage j takes
        shortcut: repeat each latent channel 4 d_j / latent_channels times -> pixel-shuffle 2
                  -> (d_j, 2H/r, 2W/r), added right after decoder stage j's upsample
    decoder.stages[j-1], run for j = 5..1 (a latent at 2^j enters at stage j):
        nearest 2x upsample + conv (d_j channels), then layers_per_block + 1 ResNet blocks
        d_j -> w_j                                     -> (w_j, H/2^(j-1), W/2^(j-1))
    decoder.norm_out, SiLU, decoder.conv_out (shared)  -> (3, H, W), cropped back to the input size

So the 8x path is a prefix of the 16x path, which is a prefix of the 32x path, on both sides: the
three ratios share every trunk module and own only their small exit head and entry. The shortcuts
are DC-AE's residual autoencoding (Chen et al. 2024): parameter-free space<->channel moves around
the resolution change next to each latent, so the learned heads only add a residual
(``trunk_shortcuts``). Around the whole network, a parameter-free pixel shortcut
(``pixel_shortcut``, :mod:`nested_vae.shortcuts`: the smooth colour thumbnail in recipe v3) puts
an image into the latent and back, so the network learns only what the thumbnail misses.

Files: :mod:`.config` (the config), :mod:`.encoder`, :mod:`.decoder`, :mod:`.outputs` (typed
results, the posterior), :mod:`.inputs` (argument checks, padding); this module is the public
model (encode/decode/forward, memory toggles, precision guard, checkpoint I/O).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cat_foundations import hub
from cat_foundations.ratios import PAD_MULTIPLE, RATIOS
from cat_foundations.ratios import latent_size as _latent_size

from . import checkpoint
from .checkpoint import CONFIG_NAME, DEFAULT_WEIGHTS_DIR, WEIGHTS_NAME
from .config import NestedVAEConfig
from .decoder import Decoder
from .encoder import Encoder
from .inputs import (
    RatioArg,
    all_finite,
    check_images,
    check_ratio,
    is_low_precision,
    per_sample_ratios,
    reflect_pad_to_multiple,
)
from .outputs import (
    CheckpointError,
    DecoderOutput,
    DiagonalGaussianDistribution,
    EncoderOutput,
    NestedVAEOutput,
    Padding,
)
from .tiling import run_tiled

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_WEIGHTS_DIR",
    "PAD_MULTIPLE",
    "RATIOS",
    "WEIGHTS_NAME",
    "CheckpointError",
    "DecoderOutput",
    "DiagonalGaussianDistribution",
    "EncoderOutput",
    "NestedVAE",
    "NestedVAEConfig",
    "NestedVAEOutput",
    "Padding",
    "reflect_pad_to_multiple",
]

logger = logging.getLogger(__name__)


class NestedVAE(nn.Module):
    """One VAE, three compression ratios (8x, 16x, 32x per side) sharing one encoder/decoder trunk.

    See the module docstring for the exact layout and shapes. ``NestedVAE()`` builds the default
    configuration (the shipped checkpoint's); pass a :class:`NestedVAEConfig` or its fields as
    keyword arguments for another.

    Memory and precision toggles (runtime settings, not saved with the weights):

    * :meth:`enable_tiling` -- encode/decode large images in overlapping tiles with blended seams.
    * :meth:`enable_slicing` -- run a batch one image at a time.
    * :meth:`enable_gradient_checkpointing` -- recompute stage activations in the backward pass.
    * ``upcast_on_overflow`` (default True) -- under fp16/bf16 autocast, a result with a NaN/inf
      (an fp16 overflow) is recomputed in float32; ``upcast_fallbacks`` counts how often.
    """

    def __init__(self, config: NestedVAEConfig | None = None, **config_overrides: Any):
        super().__init__()
        if config is not None and config_overrides:
            raise ValueError("pass either a NestedVAEConfig or keyword overrides, not both")
        self.config = config if config is not None else NestedVAEConfig(**config_overrides)
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.use_tiling = False
        self.tile_sample_size = 256
        self.tile_overlap = 64
        self.use_slicing = False
        self.upcast_on_overflow = True
        self.upcast_fallbacks = 0
        # Set by from_pretrained: provenance for outputs that record which weights made them.
        self.name_or_path: str | None = None
        self.weights_path: Path | None = None

    # -- toggles ---------------------------------------------------------------------------------

    def enable_tiling(self, tile_sample_size: int = 256, tile_overlap: int = 64) -> None:
        """Encode/decode images larger than ``tile_sample_size`` pixels in overlapping tiles.

        Args:
            tile_sample_size: tile side in pixels, a multiple of 32.
            tile_overlap: overlap of neighbouring tiles in pixels (also the blend width), a multiple
                of 32 smaller than the tile, so tiles align with the latent grid at every ratio.
        """
        if tile_sample_size % PAD_MULTIPLE or tile_overlap % PAD_MULTIPLE:
            raise ValueError(f"tile size and overlap must be multiples of {PAD_MULTIPLE}")
        if not 0 < tile_overlap < tile_sample_size:
            raise ValueError("tile_overlap must be positive and smaller than tile_sample_size")
        self.use_tiling = True
        self.tile_sample_size = tile_sample_size
        self.tile_overlap = tile_overlap

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Encode/decode one image at a time (lower peak memory for large batches)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_gradient_checkpointing(self) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = False

    def get_last_layer(self) -> torch.Tensor:
        """Weight of the shared ``conv_out``, for the adaptive GAN loss weight."""
        return self.decoder.conv_out.weight

    @staticmethod
    def latent_size(height: int, width: int, ratio: int) -> tuple[int, int]:
        """Latent ``(h, w)`` for an image of ``height x width`` (padded up to multiples of 32)."""
        check_ratio(ratio)
        return _latent_size(height, width, ratio)

    # -- precision guard -------------------------------------------------------------------------

    def _upcast_guarded(self, fn: Callable[[Any], Any], inputs: Any, reference: torch.Tensor) -> Any:
        """Run ``fn(inputs)``; under low precision, redo it in float32 if the result is not finite."""
        result = fn(inputs)
        if self.upcast_on_overflow and is_low_precision(reference) and not all_finite(result):
            self.upcast_fallbacks += 1
            logger.info("NestedVAE: non-finite result in low precision, recomputing in float32")
            as_float = (
                {k: v.float() for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.float()
            )
            with torch.autocast(reference.device.type, enabled=False):
                result = fn(as_float)
        return result

    # -- encode ----------------------------------------------------------------------------------

    def _encode_sorted(self, x: torch.Tensor, counts: dict[int, int]) -> dict[int, torch.Tensor]:
        """Moments per ratio for a padded batch sorted by ratio, honouring slicing and tiling."""
        if self.use_slicing and x.shape[0] > 1:
            parts: dict[int, list[torch.Tensor]] = {}
            ratios = [r for r in RATIOS for _ in range(counts.get(r, 0))]
            for image, ratio in zip(x.split(1), ratios):
                parts.setdefault(ratio, []).append(self._encode_sorted_unsliced(image, {ratio: 1})[ratio])
            return {ratio: torch.cat(chunks) for ratio, chunks in parts.items()}
        return self._encode_sorted_unsliced(x, counts)

    def _encode_sorted_unsliced(self, x: torch.Tensor, counts: dict[int, int]) -> dict[int, torch.Tensor]:
        if not (self.use_tiling and max(x.shape[-2:]) > self.tile_sample_size):
            return self.encoder(x, counts)
        moments, start = {}, 0
        for ratio in RATIOS:
            count = counts.get(ratio, 0)
            if count:
                moments[ratio] = run_tiled(
                    x[start : start + count],
                    lambda tile, ratio=ratio: self.encoder(tile, {ratio: tile.shape[0]})[ratio],
                    self.tile_sample_size,
                    self.tile_overlap,
                    Fraction(1, ratio),
                )
                start += count
        return moments

    def encode(self, x: torch.Tensor, ratio: RatioArg) -> EncoderOutput:
        """Encode images to latent distributions.

        Args:
            x: ``(B, 3, H, W)`` in [-1, 1], any H and W (reflect-padded to multiples of 32).
            ratio: 8, 16 or 32 for the whole batch, or one ratio per image.

        Returns:
            :class:`EncoderOutput`; for a ratio list ``latent_dist`` is a per-image list in input order.
        """
        check_images(x, self.config.in_channels)
        ratios, per_sample = per_sample_ratios(ratio, x.shape[0])
        padded, padding = reflect_pad_to_multiple(x)
        # Sort by ratio so each group leaves the shared trunk at its exit as one contiguous slice.
        order = sorted(range(len(ratios)), key=lambda i: ratios[i])
        counts = {r: ratios.count(r) for r in RATIOS if r in ratios}
        sorted_x = padded if order == list(range(len(order))) else padded[order]
        moments = self._upcast_guarded(lambda inp: self._encode_sorted(inp, counts), sorted_x, x)
        input_size = (x.shape[-2], x.shape[-1])
        if not per_sample:
            return EncoderOutput(
                DiagonalGaussianDistribution.from_moments(moments[ratio]), ratio, padding, input_size
            )
        rows_in_group = {r: 0 for r in RATIOS}
        dists: list[DiagonalGaussianDistribution | None] = [None] * len(ratios)
        for index in order:
            r = ratios[index]
            row = rows_in_group[r]
            dists[index] = DiagonalGaussianDistribution.from_moments(moments[r][row : row + 1])
            rows_in_group[r] = row + 1
        return EncoderOutput(dists, list(ratios), padding, input_size)

    # -- decode ----------------------------------------------------------------------------------

    def _decode_grouped(self, latents: dict[int, torch.Tensor]) -> torch.Tensor:
        """Images for latents grouped by ratio, deepest ratio first; honours slicing and tiling."""
        if self.use_slicing and sum(z.shape[0] for z in latents.values()) > 1:
            return torch.cat(
                [
                    self._decode_grouped_unsliced({ratio: z})
                    for ratio in sorted(latents, reverse=True)
                    for z in latents[ratio].split(1)
                ]
            )
        return self._decode_grouped_unsliced(latents)

    def _decode_grouped_unsliced(self, latents: dict[int, torch.Tensor]) -> torch.Tensor:
        ratio, z = next(iter(latents.items()))
        if not (self.use_tiling and max(z.shape[-2:]) * ratio > self.tile_sample_size):
            return self.decoder(latents)
        return torch.cat(
            [
                run_tiled(
                    latents[r],
                    lambda tile, r=r: self.decoder({r: tile}),
                    self.tile_sample_size // r,
                    self.tile_overlap // r,
                    Fraction(r),
                )
                for r in sorted(latents, reverse=True)
            ]
        )

    def decode(
        self,
        z: torch.Tensor | Sequence[torch.Tensor],
        ratio: RatioArg,
        output_size: tuple[int, int] | None = None,
    ) -> DecoderOutput:
        """Decode latents to images.

        Args:
            z: ``(B, latent_channels, h, w)`` with an ``int`` ratio, or a list of latents (each
                ``(n_i, latent_channels, h_i, w_i)``, e.g. from a per-sample encode) with one
                ratio per list entry. All must decode to the same image size ``h_i * ratio_i``.
            ratio: the ratio the latents were encoded at (explicit: a latent's size alone cannot
                tell a 16x latent of a 512 image from an 8x latent of a 256 image).
            output_size: ``(H, W)`` to crop the decoded (padded) image back to; default no crop.

        Returns:
            :class:`DecoderOutput` with ``sample`` ``(B, 3, H, W)``, rows in the order of ``z``.
        """
        if isinstance(z, torch.Tensor):
            if not (isinstance(ratio, int) and not isinstance(ratio, bool)):
                raise ValueError(
                    "a latent tensor needs an int ratio; pass a list of latents for per-sample ratios"
                )
            items, ratios = [z], [check_ratio(ratio)]
        else:
            items = list(z)
            ratios, _ = per_sample_ratios(ratio, len(items))
        if not items:
            raise ValueError("decode got no latents")
        decoded_size = None
        for index, (item, r) in enumerate(zip(items, ratios)):
            if (
                not isinstance(item, torch.Tensor)
                or item.dim() != 4
                or item.shape[1] != self.config.latent_channels
            ):
                shape = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
                raise ValueError(
                    f"latent {index}: expected shape (n, {self.config.latent_channels}, h, w), got {shape}"
                )
            size = (item.shape[2] * r, item.shape[3] * r)
            if decoded_size is not None and size != decoded_size:
                raise ValueError(
                    f"latent {index} (ratio {r}) decodes to {size}, latent 0 to {decoded_size}: "
                    "decode latents of different image sizes in separate calls"
                )
            decoded_size = size
        if output_size is not None:
            output_size = (int(output_size[0]), int(output_size[1]))
            if not (0 < output_size[0] <= decoded_size[0] and 0 < output_size[1] <= decoded_size[1]):
                raise ValueError(f"output_size {output_size} does not fit the decoded size {decoded_size}")

        # Group by ratio; the decoder returns the groups deepest first, so remember each row's origin.
        grouped: dict[int, list[torch.Tensor]] = {}
        origins: dict[int, list[int]] = {}
        row = 0
        for item, r in zip(items, ratios):
            grouped.setdefault(r, []).append(item)
            origins.setdefault(r, []).extend(range(row, row + item.shape[0]))
            row += item.shape[0]
        latents = {r: torch.cat(grouped[r]) if len(grouped[r]) > 1 else grouped[r][0] for r in grouped}
        images = self._upcast_guarded(self._decode_grouped, latents, items[0])
        decoder_order = [origin for r in sorted(latents, reverse=True) for origin in origins[r]]
        if decoder_order != list(range(row)):
            inverse = torch.empty(row, dtype=torch.long)
            inverse[torch.tensor(decoder_order)] = torch.arange(row)
            images = images[inverse.to(images.device)]
        if output_size is not None:
            images = images[..., : output_size[0], : output_size[1]]
        return DecoderOutput(images)

    # -- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        ratio: RatioArg,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
    ) -> NestedVAEOutput:
        """Encode, take the posterior mean (or a sample), decode and crop back to the input size.

        Args:
            x: ``(B, 3, H, W)`` in [-1, 1].
            ratio: 8, 16 or 32, or one per image.
            sample_posterior: decode a sample of the posterior instead of its mean (training).
            generator: random generator for the sample.
        """
        encoded = self.encode(x, ratio)
        if isinstance(encoded.latent_dist, list):
            latents = [d.sample(generator) if sample_posterior else d.mode() for d in encoded.latent_dist]
        else:
            dist = encoded.latent_dist
            latents = dist.sample(generator) if sample_posterior else dist.mode()
        decoded = self.decode(latents, encoded.ratio, output_size=encoded.input_size)
        return NestedVAEOutput(decoded.sample, encoded.latent_dist, latents, encoded.ratio, encoded.padding)

    # -- save / load -----------------------------------------------------------------------------

    def save_pretrained(
        self,
        directory: str | Path,
        *,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str = "Upload NestedVAE",
    ) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed).

        Each file is written atomically (:func:`cat_foundations.atomic.atomic_write_bytes`): a
        reader sees the old file or the whole new one. The weights go last, so a directory whose
        weights are complete also has its config. With ``push_to_hub=True`` the folder is then
        uploaded to the Hub repo ``repo_id`` (default: the directory's name), created if needed.
        """
        directory = checkpoint.write_checkpoint(self, directory)
        if push_to_hub:
            hub.upload_folder(
                directory,
                repo_id or directory.name,
                private=private,
                token=token,
                commit_message=commit_message,
            )
        return directory

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str = "Upload NestedVAE",
    ) -> str:
        """Upload this model (``config.json`` + ``model.safetensors``) to the Hub repo ``repo_id``."""
        return hub.push_saved(
            self.save_pretrained, repo_id, private=private, token=token, commit_message=commit_message
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = "default",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
    ) -> NestedVAE:
        """Load a model saved by :meth:`save_pretrained`, in eval mode.

        Args:
            name_or_path: ``"default"`` for the checkpoint shipped in ``nested_vae/weights/default/``,
                a directory holding ``config.json`` and ``model.safetensors``, or a Hugging Face
                Hub repo id ``org/name`` holding the same two files (downloaded into the HF cache;
                with ``HF_HUB_OFFLINE=1`` read from it).
            device: where to put the model (default CPU).
            dtype: parameter dtype (default as saved, float32).
            revision, cache_dir, token: Hub options (branch/tag/commit, HF cache folder, token).

        The loaded model remembers where its files came from: ``model.name_or_path`` (what was
        asked for) and ``model.weights_path`` (the ``model.safetensors`` read).

        Raises:
            FileNotFoundError: the directory, the Hub repo or one of its files is missing.
            CheckpointError: the config is invalid or the weights have missing, unexpected or
                mis-shaped tensors (all named).
        """

        if str(name_or_path) == "default":
            directory = DEFAULT_WEIGHTS_DIR
        else:
            directory = checkpoint.checkpoint_directory(
                name_or_path, revision=revision, cache_dir=cache_dir, token=token
            )
        config, config_path, weights_path = checkpoint.read_config(directory, name_or_path)
        model = cls(config)
        checkpoint.load_weights(model, config_path, weights_path)
        model.name_or_path, model.weights_path = str(name_or_path), weights_path
        return model.to(device=device or "cpu", dtype=dtype).eval()
