"""Packing: each image is attended to only by itself, and comes back out exactly as it went in."""

from __future__ import annotations

import pytest
import torch

from cat_generation.batching import bucket_batches, collate, packed_batches
from cat_generation.config import GeneratorConfig
from cat_generation.data import read_tokens
from cat_generation.generator import LatentGenerator
from cat_generation.packing import PAD_ID, first_fit, pack_latents, pad_latents, unpack
from cat_generation.stats import compute_stats

# Latents of a 64x96 image at 8x / 16x / 32x, a second 16x one and a 2x2 32x one: 96, 24, 6, 24, 4 tokens.
SHAPES = [(8, 12), (4, 6), (2, 3), (4, 6), (2, 2)]
RATIOS = [8, 16, 32, 16, 32]
LABELS = [0, 1, 1, 0, 1]


def _latents(channels: int = 4, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(channels, h, w, generator=generator) for h, w in SHAPES]


def _perturbed_model(objective: str, **overrides) -> LatentGenerator:
    """A model whose zero-initialised layers are made non-zero, so every path carries signal."""
    torch.manual_seed(0)
    config = GeneratorConfig(
        latent_channels=4, hidden_size=32, depth=2, num_heads=2, num_labels=2, objective=objective
    )
    model = LatentGenerator(GeneratorConfig(**{**config.to_dict(), **overrides}))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def test_first_fit_packs_cat_token_counts_tightly_and_refuses_oversized_images():
    lengths = [64, 1024, 256, 64, 256, 64, 64, 256, 64]  # 2112 tokens: at least three rows of 1024
    rows = first_fit(lengths, capacity=1024)
    used = [sum(n for n, r in zip(lengths, rows) if r == row) for row in sorted(set(rows))]
    assert sorted(used) == [64, 1024, 1024]
    with pytest.raises(ValueError, match="raise max_tokens"):
        first_fit([1025], capacity=1024)


def test_unpack_gives_every_image_back_in_input_order():
    latents = _latents()
    batch = pack_latents(latents, RATIOS, LABELS, max_tokens=100)
    assert batch.tokens.shape[0] == 2  # 154 tokens in rows of 100
    for original, restored in zip(latents, batch.latents()):
        assert torch.equal(original, restored)
    for patch_size, shapes in ((2, [(8, 12), (4, 6), (4, 6)]), (1, SHAPES)):
        chosen = [torch.randn(4, h, w) for h, w in shapes]
        packed = pack_latents(chosen, [8] * len(chosen), patch_size=patch_size)
        assert all(torch.equal(a, b) for a, b in zip(chosen, packed.latents()))


def test_layout_fields_per_token():
    batch = pack_latents(_latents(), RATIOS, LABELS, max_tokens=100)
    for index, placement in enumerate(batch.placements):
        span = slice(placement.start, placement.start + placement.length)
        assert (batch.sequence_ids[placement.row, span] == index).all()
        assert (batch.ratios[placement.row, span] == RATIOS[index]).all()
        rows, cols = SHAPES[index]
        assert batch.positions[placement.row, span].tolist()[-1] == [rows - 1, cols - 1]
    assert int((batch.sequence_ids == PAD_ID).sum()) == 2 * 100 - sum(h * w for h, w in SHAPES)
    mask = batch.attention_mask()
    assert mask.shape == (2, 1, 100, 100) and mask.diagonal(dim1=-2, dim2=-1).all()


def test_packing_saves_the_padding_a_padded_batch_spends():
    latents = _latents()
    packed = pack_latents(latents, RATIOS, max_tokens=96)
    padded = pad_latents(latents, RATIOS)
    assert padded.padding_fraction == pytest.approx(1 - 154 / (5 * 96))
    assert packed.padding_fraction == pytest.approx(1 - 154 / (2 * 96))


@pytest.mark.parametrize("objective", ["flow", "masked"])
def test_packed_attention_equals_per_image_attention(objective):
    model = _perturbed_model(objective, caption_dim=8)
    latents = _latents()
    captions = torch.randn(len(latents), 8)
    timesteps = torch.rand(len(latents)) if objective == "flow" else None
    packed = pack_latents(latents, RATIOS, LABELS, max_tokens=100, caption_embeddings=captions)
    with torch.no_grad():
        together = unpack(packed, model.backbone(packed, timesteps=timesteps).sample)
        for index, latent in enumerate(latents):
            alone = pad_latents(
                [latent], [RATIOS[index]], [LABELS[index]], caption_embeddings=captions[index : index + 1]
            )
            single_t = None if timesteps is None else timesteps[index : index + 1]
            expected = model.backbone(alone, timesteps=single_t).sample[0]
            assert (together[index] - expected).abs().max().item() <= 1e-5
            assert expected.abs().max().item() > 1e-3  # the comparison is not of two zeros


def test_no_leakage_between_images_in_one_pack():
    model = _perturbed_model("flow")
    batch = pack_latents(_latents(), RATIOS, LABELS)  # one row: every image shares the sequence
    assert batch.tokens.shape[0] == 1
    tokens = batch.tokens.clone().requires_grad_(True)
    output = model.backbone(batch, tokens, timesteps=torch.full((5,), 0.5)).sample
    for source in range(batch.num_images):
        (gradient,) = torch.autograd.grad(unpack(batch, output)[source].sum(), tokens, retain_graph=True)
        for other, placement in enumerate(batch.placements):
            block = gradient[placement.row, placement.start : placement.start + placement.length]
            if other == source:
                assert block.abs().sum() > 0
            else:
                assert torch.count_nonzero(block) == 0


def test_a_ratio_bucket_holds_one_ratio_and_a_packed_batch_fits_its_rows(tiny_tokens):
    items = read_tokens(tiny_tokens)
    stats = compute_stats(items)
    buckets = bucket_batches(items, batch_size=3, seed=1)
    seen = set()
    for _ in range(12):
        indices = next(buckets)
        ratios = {items[i].ratio for i in indices}
        assert len(ratios) == 1 and len(indices) <= 3
        seen |= ratios
        assert collate(items, indices, stats, mode="bucket").padding_fraction == 0.0  # equal shapes
    assert seen == {8, 16, 32}
    stream = packed_batches(items, max_tokens=96, rows=2, seed=1)
    epoch = [next(stream) for _ in range(4)]
    for indices in epoch:
        batch = collate(items, indices, stats, mode="pack", max_tokens=96)
        assert batch.tokens.shape[0] <= 2 and batch.tokens.shape[1] <= 96
    assert sum(len(indices) for indices in epoch[:2]) <= len(items)
