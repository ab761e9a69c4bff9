"""The generator's config checks, ratio-scaled 2-D RoPE, caption embedding and checkpoint I/O."""

from __future__ import annotations

import pytest
import torch

from cat_generation.config import GeneratorConfig
from cat_generation.generator import LatentGenerator
from cat_generation.packing import pack_latents
from cat_generation.rope import apply_rope, rope_angles, scaled_positions
from cat_generation.text import embed_captions


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 30, "num_heads": 4}, "not divisible by num_heads"),
        ({"hidden_size": 24, "num_heads": 4}, "divisible by 4 for 2-D RoPE"),
        ({"objective": "gan"}, "objective must be one of"),
        ({"depth": 0}, "depth must be >= 1"),
        ({"caption_dim": -1}, "caption_dim must be >= 0"),
    ],
)
def test_bad_configs_say_how_to_fix_them(overrides, message):
    with pytest.raises(ValueError, match=message):
        GeneratorConfig(**overrides)
    with pytest.raises(ValueError, match="unknown generator config keys"):
        GeneratorConfig.from_dict({"hidden_sise": 64})


def test_a_coarse_token_sits_at_the_centre_of_the_fine_tokens_of_its_area():
    # One 32x token covers the same pixels as a 4x4 block of 8x tokens: same centre.
    coarse = scaled_positions(torch.tensor([[[0, 0]]]), torch.tensor([[32]]), patch_size=1)
    fine_grid = torch.tensor([[[r, c] for r in range(4) for c in range(4)]])
    fine = scaled_positions(fine_grid, torch.full((1, 16), 8), patch_size=1)
    assert torch.allclose(coarse[0, 0], fine[0].mean(dim=0))
    # 16x with patch size 2 covers the same area as 32x with patch size 1.
    assert torch.equal(
        scaled_positions(torch.tensor([[[3, 1]]]), torch.tensor([[16]]), 2),
        scaled_positions(torch.tensor([[[3, 1]]]), torch.tensor([[32]]), 1),
    )


def test_rope_scores_depend_only_on_the_offset_between_positions():
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 16, generator=generator)
    positions = torch.tensor([[[1.0, 2.0], [4.0, 7.0], [11.0, 3.0], [14.0, 8.0]]])
    cos, sin = rope_angles(positions, head_dim=16, theta=100.0)
    rq = apply_rope(q.expand(1, 1, 4, 16), cos, sin)
    rk = apply_rope(k.expand(1, 1, 4, 16), cos, sin)
    # (1,2)->(4,7) and (11,3)->(14,8) have the same offset (3, 5): the same score.
    assert torch.allclose((rq[0, 0, 0] * rk[0, 0, 1]).sum(), (rq[0, 0, 2] * rk[0, 0, 3]).sum(), atol=1e-5)
    assert not torch.allclose((rq[0, 0, 0] * rk[0, 0, 1]).sum(), (rq[0, 0, 0] * rk[0, 0, 2]).sum(), atol=1e-3)


def test_caption_embedding_is_deterministic_normalised_and_zero_without_a_caption():
    vectors = embed_captions(["a plain blue sky", "A plain BLUE sky!", "a bar chart", None], 32)
    assert torch.equal(vectors[0], vectors[1])
    assert torch.allclose(vectors[:3].norm(dim=1), torch.ones(3))
    assert not torch.equal(vectors[0], vectors[2])
    assert torch.count_nonzero(vectors[3]) == 0


@pytest.mark.parametrize("objective", ["flow", "masked"])
def test_a_saved_generator_loads_and_samples_identically(objective, tmp_path):
    torch.manual_seed(0)
    config = GeneratorConfig(latent_channels=4, hidden_size=32, depth=1, num_heads=2, objective=objective)
    model = LatentGenerator(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path)
    loaded = LatentGenerator.from_pretrained(tmp_path)
    layout = pack_latents([torch.zeros(4, 4, 6), torch.zeros(4, 2, 3)], [16, 32])
    first = model.sample(layout, steps=3, head_steps=2, generator=torch.Generator().manual_seed(1))
    second = loaded.sample(layout, steps=3, head_steps=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, second)
    assert torch.isfinite(first).all() and first[layout.real_tokens].abs().sum() > 0
