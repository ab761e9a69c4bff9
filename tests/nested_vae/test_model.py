"""Behaviour of the nested VAE on tiny real models (random weights, no mocks).

The tiny configuration keeps the real layout (five stages, three exits, 16 latent channels) at
base width 8, so every test runs in well under a second or two on 2 CPU cores.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import nested_vae.model as model_module
from nested_vae import (
    RATIOS,
    CheckpointError,
    DiagonalGaussianDistribution,
    NestedVAE,
    NestedVAEConfig,
    Padding,
)
from nested_vae.blocks import channel_repeat_to_space, space_to_channel_average

TINY = dict(base_channels=8, norm_num_groups=8)


def tiny_vae(seed: int = 0, **overrides) -> NestedVAE:
    torch.manual_seed(seed)
    return NestedVAE(**{**TINY, **overrides}).eval()


def images(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator) * 2 - 1


@pytest.fixture(scope="module")
def vae() -> NestedVAE:
    return tiny_vae()


# -- configuration ---------------------------------------------------------------------------------


def test_default_config_is_the_documented_one():
    config = NestedVAE().config
    assert config == NestedVAEConfig()
    assert config.widths == (32, 64, 128, 128, 256)
    assert (config.latent_channels, config.layers_per_block, config.norm_num_groups) == (16, 1, 8)
    assert config.attention_ratios == (16, 32)
    assert config.scaling_factor == 1.0
    assert RATIOS == (8, 16, 32)


def test_default_model_size_fits_the_shipping_budget():
    params = sum(p.numel() for p in NestedVAE().parameters())
    print(f"default NestedVAE parameters: {params:,} ({params * 2 / 1e6:.1f} MB in fp16)")
    assert params * 2 <= 40e6


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(channel_multipliers=(1, 2, 4, 4)), "5 entries"),
        (dict(base_channels=8, norm_num_groups=32), "must divide every stage width"),
        (dict(attention_ratios=(4,)), "not among the supported ratios"),
        (dict(base_channels=8, norm_num_groups=8, latent_channels=7), "latent_channels=7 must divide"),
        (dict(latent_channels=0), "latent_channels must be >= 1"),
        (
            dict(base_channels=8, norm_num_groups=8, latent_channels=128, pixel_shortcut="blocks"),
            "for the pixel shortcut",
        ),
        (dict(base_channels=8, norm_num_groups=8, latent_channels=2), "smooth pixel shortcut needs"),
        (dict(pixel_shortcut="mosaic"), "pixel_shortcut must be one of"),
    ],
)
def test_invalid_config_is_rejected_with_reason(overrides, message):
    with pytest.raises(ValueError, match=message):
        NestedVAEConfig(**overrides)


# -- pixel shortcut --------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", RATIOS)
def test_pixel_shortcut_adds_group_means_to_the_latent_and_repeats_them_back(ratio):
    x = images(2, 64, 96)
    with_shortcut, without = tiny_vae(seed=3, pixel_shortcut="blocks"), tiny_vae(seed=3, pixel_shortcut=False)
    without.load_state_dict(with_shortcut.state_dict())  # the same weights, only the shortcut differs
    with torch.no_grad():
        z = with_shortcut.encode(x, ratio).latent_dist.mean
        z_plain = without.encode(x, ratio).latent_dist.mean
        torch.testing.assert_close(z - z_plain, space_to_channel_average(x, 16, ratio), atol=1e-5, rtol=0)
        # The learned output layer starts at zero: a new model decodes to the exact projection.
        decoded = with_shortcut.decode(z, ratio).sample
        torch.testing.assert_close(decoded, channel_repeat_to_space(z, 3, ratio), atol=1e-6, rtol=0)


def test_a_new_smooth_shortcut_model_is_exactly_the_bicubic_thumbnail_codec():
    from nested_vae.shortcuts import PixelShortcut

    x = images(2, 64, 96)
    vae = tiny_vae(seed=4, pixel_shortcut="smooth")
    thumbnail = PixelShortcut("smooth", vae.config.latent_channels)
    with torch.no_grad():
        for ratio in RATIOS:
            torch.testing.assert_close(
                vae(x, ratio).sample, thumbnail.reconstruct(x, ratio), atol=1e-5, rtol=0
            )


def test_v2_checkpoint_config_loads_as_blocks_with_trunk_shortcuts(tmp_path):
    old = tiny_vae(seed=6, pixel_shortcut="blocks", trunk_shortcuts=True)
    old.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["trunk_shortcuts"]
    config["pixel_shortcut"] = True  # how v2 wrote it
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = NestedVAE.from_pretrained(tmp_path)
    assert (loaded.config.pixel_shortcut, loaded.config.trunk_shortcuts) == ("blocks", True)
    x = images(1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 32).sample, old(x, 32).sample, atol=0, rtol=0)


def test_checkpoint_saved_before_the_pixel_shortcut_loads_without_it(tmp_path):
    old = tiny_vae(seed=5, pixel_shortcut=False)
    old.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["pixel_shortcut"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = NestedVAE.from_pretrained(tmp_path)
    assert loaded.config.pixel_shortcut == "none"
    x = images(1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 16).sample, old(x, 16).sample, atol=0, rtol=0)


# -- shapes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(256, 256), (300, 200)])
def test_latent_shapes_and_decoded_size(vae, height, width):
    x = images(2, height, width)
    expected = {8: (16, 32, 32), 16: (16, 16, 16), 32: (16, 8, 8)}
    if (height, width) == (300, 200):  # padded to 320 x 224
        expected = {8: (16, 40, 28), 16: (16, 20, 14), 32: (16, 10, 7)}
    with torch.no_grad():
        for ratio in RATIOS:
            encoded = vae.encode(x, ratio)
            assert tuple(encoded.latent_dist.mean.shape) == (2, *expected[ratio])
            assert tuple(encoded.latent_dist.logvar.shape) == (2, *expected[ratio])
            assert NestedVAE.latent_size(height, width, ratio) == expected[ratio][1:]
            assert encoded.input_size == (height, width)
            assert encoded.padding == Padding(bottom=-height % 32, right=-width % 32)
            decoded = vae.decode(encoded.latent_dist.mode(), ratio, output_size=encoded.input_size)
            assert decoded.sample.shape == x.shape
            assert vae(x, ratio).sample.shape == x.shape


def test_token_counts_at_256(vae):
    with torch.no_grad():
        tokens = {r: vae.encode(images(1, 256, 256), r).latent_dist.mean[0, 0].numel() for r in RATIOS}
    assert tokens == {8: 1024, 16: 256, 32: 64}


def test_tiny_images_are_reflect_padded_in_rounds(vae):
    # 5 x 3 pixels need 27 and 29 rows/columns of padding: more than one reflection each.
    padded, padding = model_module.reflect_pad_to_multiple(images(1, 5, 3))
    assert padded.shape[-2:] == (32, 32) and padding == Padding(27, 29)
    with torch.no_grad():
        assert vae(images(1, 5, 3), 32).sample.shape == (1, 3, 5, 3)
        assert vae(images(1, 1, 40), 8).sample.shape == (1, 3, 1, 40)


def test_padding_reflects_the_image_edge():
    x = images(1, 30, 33)
    padded, _ = model_module.reflect_pad_to_multiple(x)
    assert torch.equal(padded[..., 30, :33], x[..., 28, :])  # row 30 mirrors row 28
    assert torch.equal(padded[..., :30, 33], x[..., :, 31])


# -- nesting ---------------------------------------------------------------------------------------


def _modules_run(vae: NestedVAE, ratio: int, x: torch.Tensor) -> set[str]:
    """Names of the leaf modules that run while reconstructing ``x`` at ``ratio``."""
    ran: set[str] = set()
    handles = [
        module.register_forward_hook(lambda _m, _i, _o, name=name: ran.add(name))
        for name, module in vae.named_modules()
        if not list(module.children())
    ]
    with torch.no_grad():
        vae(x, ratio)
    for handle in handles:
        handle.remove()
    return ran


def test_paths_are_nested_prefixes_of_one_trunk(vae):
    x = images(1, 64, 64)
    ran = {ratio: _modules_run(vae, ratio, x) for ratio in RATIOS}
    trunk = {
        r: {n for n in ran[r] if ".stages." in n or n.endswith(("conv_in", "conv_out", "norm_out"))}
        for r in RATIOS
    }
    trunk = {
        r: {n for n in names if ".exits." not in n and ".entries." not in n} for r, names in trunk.items()
    }
    assert trunk[8] < trunk[16] < trunk[32]
    stages_run = {r: {n.split(".")[2] for n in trunk[r] if n.startswith("encoder.stages.")} for r in RATIOS}
    assert stages_run == {8: {"0", "1", "2"}, 16: {"0", "1", "2", "3"}, 32: {"0", "1", "2", "3", "4"}}
    # Each ratio owns only its exit head and decoder entry.
    for ratio in RATIOS:
        own = {n.split(".")[2] for n in ran[ratio] if ".exits." in n or ".entries." in n}
        assert own == {str(ratio)}


def test_8x_exit_reads_exactly_the_16x_paths_stage3_features(vae):
    x = images(2, 64, 96)
    captured: dict[str, torch.Tensor] = {}
    exit8 = vae.encoder.exits["8"].register_forward_hook(
        lambda _m, inputs, _o: captured.__setitem__("exit8_input", inputs[1])
    )
    stage3 = vae.encoder.stages[2].register_forward_hook(
        lambda _m, _i, output: captured.__setitem__("stage3_output", output[1])
    )
    with torch.no_grad():
        vae.encode(x, 8)
        exit8_input = captured["exit8_input"]
        vae.encode(x, 16)
    exit8.remove()
    stage3.remove()
    assert torch.equal(exit8_input, captured["stage3_output"])


def test_no_duplicate_modules_and_far_fewer_parameters_than_three_vaes():
    vae = NestedVAE()  # the default widths
    tensors = list(vae.parameters())
    assert len({t.data_ptr() for t in tensors}) == len(tensors)
    named = dict(vae.named_modules())
    ran = {ratio: _modules_run(vae, ratio, images(1, 32, 32)) for ratio in RATIOS}

    def parameters_of(module_names: set[str]) -> int:
        return sum(p.numel() for name in module_names for p in named[name].parameters(recurse=False))

    # A separate VAE per ratio holds exactly the modules its path runs (trunk prefix + head + entry).
    separate = {ratio: parameters_of(names) for ratio, names in ran.items()}
    nested = sum(p.numel() for p in tensors)
    print(
        f"nested VAE: {nested:,} parameters; three separate VAEs of the same widths: "
        f"{sum(separate.values()):,} (8x {separate[8]:,}, 16x {separate[16]:,}, 32x {separate[32]:,})"
    )
    assert parameters_of(set().union(*ran.values())) == nested  # every parameter serves some path
    # Sharing saves the sum of the overlaps: default 13.46M vs 18.60M for three separate models.
    # The saving is bounded because the deepest (widest) stages only serve 32x; the 8x and 16x
    # heads and entries add ~23% to the 32x path alone.
    assert nested < 0.75 * sum(separate.values())
    assert nested < 1.25 * separate[32]


# -- gradients -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", RATIOS)
def test_each_ratios_loss_reaches_the_shared_trunk(ratio):
    vae = tiny_vae().train()
    # A new model's output layer is zero (pixel shortcut), which passes no gradient below it on
    # the very first step; give it the small non-zero weights any trained model has.
    torch.nn.init.normal_(vae.decoder.conv_out.weight, std=0.01)
    x = images(2, 64, 64)
    output = vae(x, ratio, sample_posterior=True, generator=torch.Generator().manual_seed(0))
    loss = (output.sample - x).pow(2).mean() + output.latent_dist.kl().mean() * 1e-6
    loss.backward()
    shared = {
        "encoder.conv_in": vae.encoder.conv_in.weight,
        "encoder.stages.0": vae.encoder.stages[0].blocks[0].conv1.weight,
        "encoder.stages.2": vae.encoder.stages[2].downsample.conv.weight,
        "decoder.stages.0": vae.decoder.stages[0].blocks[0].conv1.weight,
        "decoder.stages.2": vae.decoder.stages[2].upsample.conv.weight,
        "decoder.conv_out": vae.get_last_layer(),
    }
    for name, weight in shared.items():
        assert weight.grad is not None and weight.grad.abs().sum() > 0, name
    for other in RATIOS:
        head_grad = vae.encoder.exits[str(other)].conv_out.weight.grad
        assert (head_grad is not None) == (other == ratio)


def test_mixed_ratio_batch_trains_every_head_at_once():
    vae = tiny_vae().train()
    torch.nn.init.normal_(vae.decoder.conv_out.weight, std=0.01)  # as in a trained model (see above)
    output = vae(images(3, 64, 64), [16, 8, 32])
    output.sample.pow(2).mean().backward()
    for ratio in RATIOS:
        assert vae.encoder.exits[str(ratio)].conv_out.weight.grad.abs().sum() > 0
        assert vae.decoder.entries[str(ratio)].conv_in.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointed in (False, True):
        vae = tiny_vae().train()
        if checkpointed:
            vae.enable_gradient_checkpointing()
        vae(images(2, 64, 64), [8, 32]).sample.pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in vae.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


# -- per-sample ratios -----------------------------------------------------------------------------


def test_per_sample_ratio_list_returns_input_order(vae):
    x = images(4, 96, 64)
    ratios = [32, 8, 16, 8]
    with torch.no_grad():
        encoded = vae.encode(x, ratios)
        output = vae(x, ratios)
        assert isinstance(encoded.latent_dist, list) and encoded.ratio == ratios
        for index, ratio in enumerate(ratios):
            alone = vae.encode(x[index : index + 1], ratio).latent_dist
            assert encoded.latent_dist[index].mean.shape == (1, 16, 96 // ratio, 64 // ratio)
            torch.testing.assert_close(encoded.latent_dist[index].mean, alone.mean, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(encoded.latent_dist[index].logvar, alone.logvar, rtol=1e-4, atol=1e-5)
            reconstruction = vae(x[index : index + 1], ratio).sample
            torch.testing.assert_close(output.sample[index : index + 1], reconstruction, rtol=1e-4, atol=1e-4)
        # Decoding the per-sample latents puts each image back in its row.
        decoded = vae.decode(output.latents, ratios, output_size=(96, 64)).sample
        torch.testing.assert_close(decoded, output.sample)


def test_slicing_matches_the_batched_result(vae):
    x = images(3, 64, 64)
    with torch.no_grad():
        batched = vae(x, [8, 32, 8]).sample
        vae.enable_slicing()
        try:
            sliced = vae(x, [8, 32, 8]).sample
        finally:
            vae.disable_slicing()
    torch.testing.assert_close(sliced, batched, rtol=1e-4, atol=1e-4)


# -- input errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "ratio", "message"),
    [
        (torch.rand(1, 3, 32, 32) * 255, 8, r"must be in \[-1, 1\]"),
        (torch.zeros(3, 32, 32), 8, r"shape \(B, 3, H, W\)"),
        (torch.zeros(1, 4, 32, 32), 8, r"shape \(B, 3, H, W\)"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), 8, "floating-point"),
        (torch.full((1, 3, 32, 32), float("nan")), 8, "NaN"),
        (torch.zeros(1, 3, 32, 32), 4, "ratio must be one of"),
        (torch.zeros(2, 3, 32, 32), [8], "2 images"),
    ],
)
def test_bad_encode_input_is_named(vae, x, ratio, message):
    with pytest.raises(ValueError, match=message):
        vae.encode(x, ratio)


def test_bad_decode_input_is_named(vae):
    with pytest.raises(ValueError, match=r"latent 0: expected shape \(n, 16, h, w\)"):
        vae.decode(torch.zeros(1, 4, 8, 8), 8)
    with pytest.raises(ValueError, match="decode latents of different image sizes"):
        vae.decode([torch.zeros(1, 16, 8, 8), torch.zeros(1, 16, 8, 8)], [8, 16])
    with pytest.raises(ValueError, match="does not fit"):
        vae.decode(torch.zeros(1, 16, 2, 2), 32, output_size=(65, 10))
    with pytest.raises(ValueError, match="needs an int ratio"):
        vae.decode(torch.zeros(1, 16, 2, 2), [32])


# -- distribution ----------------------------------------------------------------------------------


def test_diagonal_gaussian_kl_and_sampling():
    mean, logvar = torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
    standard = DiagonalGaussianDistribution(mean, logvar)
    assert torch.equal(standard.kl(), torch.zeros(2))
    shifted = DiagonalGaussianDistribution(mean + 1, logvar)
    assert torch.allclose(shifted.kl(), torch.full((2,), 0.5 * 4 * 9))
    first = standard.sample(torch.Generator().manual_seed(3))
    assert torch.equal(first, standard.sample(torch.Generator().manual_seed(3)))
    assert not torch.equal(first, standard.mode())
    huge = DiagonalGaussianDistribution(mean, torch.full_like(logvar, 1e4))
    assert torch.isfinite(huge.std).all()


# -- save / load -----------------------------------------------------------------------------------


def test_save_load_round_trip_is_bit_exact(vae, tmp_path):
    vae.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["base_channels"] == 8
    loaded = NestedVAE.from_pretrained(tmp_path)
    assert loaded.config == vae.config and not loaded.training
    for name, tensor in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = images(2, 64, 64)
    with torch.no_grad():
        for ratio in RATIOS:
            assert torch.equal(loaded(x, ratio).sample, vae(x, ratio).sample)


def test_loading_names_missing_unexpected_and_misshaped_keys(vae, tmp_path):
    vae.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    del state["decoder.conv_out.bias"]
    state["encoder.extra.weight"] = torch.zeros(1)
    state["encoder.conv_in.weight"] = torch.zeros(1, 2, 3, 3)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError) as error:
        NestedVAE.from_pretrained(tmp_path)
    message = str(error.value)
    assert "missing keys ['decoder.conv_out.bias']" in message
    assert "unexpected keys ['encoder.extra.weight']" in message
    assert "encoder.conv_in.weight (1, 2, 3, 3) != (8, 3, 3, 3)" in message


def test_loading_rejects_bad_config_files(vae, tmp_path):
    vae.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "hidden_size": 3}))
    with pytest.raises(CheckpointError, match=r"unknown NestedVAEConfig keys \['hidden_size'\]"):
        NestedVAE.from_pretrained(tmp_path)
    config_path.write_text('{\n  "base_channels": 8,\n  oops\n}')
    with pytest.raises(CheckpointError, match="config.json: line 3: invalid JSON"):
        NestedVAE.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        NestedVAE.from_pretrained(tmp_path)


def test_default_name_resolves_to_the_shipped_directory(vae, tmp_path, monkeypatch):
    # Point the shipped-weights location at temporary directories: first empty, then populated.
    monkeypatch.setattr(model_module, "DEFAULT_WEIGHTS_DIR", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="missing/config.json.*cat-train"):
        NestedVAE.from_pretrained("default")
    vae.save_pretrained(tmp_path / "shipped")
    monkeypatch.setattr(model_module, "DEFAULT_WEIGHTS_DIR", tmp_path / "shipped")
    assert NestedVAE.from_pretrained("default").config == vae.config


def _chroma(images: torch.Tensor) -> torch.Tensor:
    return torch.stack([images[:, 0] - images[:, 1], images[:, 2] - images[:, 1]], dim=1)


def test_shipped_checkpoint_keeps_colour_and_orders_quality_by_ratio(devset_dir, devset_records):
    """On held-out devset images: 8x > 16x > 32x in PSNR, and colour survives at 8x.

    The first CPU checkpoint decoded nearly grey images (its chroma error equalled the images' own
    chroma); this guards against shipping such a model again.
    """
    from cat_tokenizer.images import center_crop_resize, load_image, pil_to_tensor

    split = json.loads((model_module.DEFAULT_WEIGHTS_DIR / "split.json").read_text())
    heldout = set(split["heldout"])
    photos = [
        r
        for r in devset_records
        if r["image"].rsplit("/", 1)[-1] in heldout and r["domain"] in ("photo", "face")
    ]
    assert len(photos) >= 8
    x = torch.stack(
        [pil_to_tensor(center_crop_resize(load_image(devset_dir / r["image"]), 128)) for r in photos[:8]]
    )
    vae = NestedVAE.from_pretrained("default").float().eval()
    psnr = {}
    with torch.no_grad():
        for ratio in RATIOS:
            out = vae(x, ratio, sample_posterior=False).sample.clamp(-1, 1)
            psnr[ratio] = float((10 * torch.log10(4 / (out - x).pow(2).mean(dim=(1, 2, 3)))).mean())
            if ratio == 8:
                chroma_error = (_chroma(out) - _chroma(x)).abs().mean()
                assert chroma_error < 0.5 * _chroma(x).abs().mean(), "colour lost at 8x"
    assert psnr[8] > psnr[16] > psnr[32], psnr


def test_shipped_checkpoint_loads_when_present():
    if not (model_module.DEFAULT_WEIGHTS_DIR / "model.safetensors").is_file():
        pytest.skip("no shipped checkpoint in nested_vae/weights/default yet")
    shipped = NestedVAE.from_pretrained("default")
    assert shipped.config == NestedVAEConfig(
        **{**NestedVAEConfig().to_dict(), "scaling_factor": shipped.config.scaling_factor}
    )
