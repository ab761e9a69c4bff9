"""`CATTokenizer`: caption -> complexity -> ratio -> nested-VAE latent, and back to pixels.

```python
from cat_tokenizer import CATTokenizer
tok = CATTokenizer.from_pretrained()                  # shipped VAE + default router LLM
enc = tok.encode("cat.jpg", "a cat asleep on a plain grey sofa")
enc.ratio, enc.tokens, enc.score, enc.score_source    # e.g. 16, 256, 5.1, "caption_llm"
img = tok.decode(enc)                                 # PIL image, the encoded size
```

Images: a path, a PIL image, a numpy ``uint8`` HxWxC array, or a float tensor CxHxW in
``[0, 1]`` or ``[-1, 1]`` (a tensor with any negative value is read as ``[-1, 1]``). All go
through :func:`cat_foundations.images.load_image` (EXIF orientation applied, CMYK/16-bit/palette
converted, transparency composited on white). Images whose longest side exceeds ``max_side``
(default 2048) are downscaled with Lanczos first; ``Encoded.original_size`` keeps the size before.

Routing, in order of precedence (implemented once, in :meth:`router.RoutingPolicy.decide` and
:func:`router.routing_score`): ``ratio=`` (source ``"override"``), then the caption scored by the
router LLM (``"caption_llm"``), then, for a missing or empty caption, the JPEG bits-per-pixel
fallback (``"image_jpeg_bpp"``).

Quality-targeted routing: ``quality="psnr>=28"`` (or ``"lpips<=0.2"``, ``"ssim>=0.9"``; see
:class:`cat_tokenizer.quality.QualityTarget`) skips the router, encodes each image at every ratio,
decodes and measures each, and keeps the ratio with the fewest tokens that meets the target
(source ``"quality_measured"``; :mod:`cat_tokenizer.quality_routing`). It costs three decodes
and three measurements per image on top of one encode.

Encoding is deterministic by default: the latent is the posterior mean. ``sample=True`` draws
from the posterior instead (pass a ``torch.Generator`` for reproducible draws).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from cat_foundations import hub
from cat_foundations.atomic import atomic_write_json
from cat_foundations.captions import clean_caption
from cat_foundations.images import limit_max_side, load_image, pil_to_tensor, tensor_to_pil
from cat_tokenizer.encoded import Encoded
from cat_tokenizer.index import file_sha256
from cat_tokenizer.quality import QualityMeter, QualityTarget
from cat_tokenizer.quality_routing import encode_to_quality
from cat_tokenizer.router_heads import HEAD_DIR_NAME, head_policy, resolve_router_head
from nested_vae import NestedVAE
from nested_vae.model import CONFIG_NAME, WEIGHTS_NAME
from router import RoutingPolicy, load_scorer
from router.head import RouterHead

DEFAULT_MAX_SIDE = 2048
BUNDLE_CONFIG = "cat_tokenizer.json"
BUNDLE_FORMAT = "cat-tokenizer-bundle-v1"


class CATTokenizer:
    """Router + routing policy + nested VAE, bundled.

    Args:
        vae: a :class:`nested_vae.NestedVAE`.
        scorer: a router :class:`~router.scores.ComplexityScorer`, a name/path that
            :func:`router.load_scorer` understands (loaded on first use, so a tokenizer that is
            only ever given ``ratio=`` never loads the LLM), or None to route every image with the
            image-only fallback.
        policy: the :class:`router.RoutingPolicy` (default thresholds when None).
        router_backend: ``"transformers"`` or ``"vllm"``, used when ``scorer`` is a name.
        router_options: extra :func:`router.load_scorer` arguments when ``scorer`` is a name, e.g.
            ``{"cache_path": "scores.sqlite"}`` so captions scored once are never scored again.
        max_side: images with a longer side are downscaled (Lanczos) to it before encoding; None
            disables the limit (then consider ``vae.enable_tiling()`` for large images).
    """

    def __init__(
        self,
        vae,
        scorer=None,
        policy=None,
        router_backend: str = "transformers",
        max_side: int | None = DEFAULT_MAX_SIDE,
        router_options: dict | None = None,
    ):
        self.vae = vae.eval()
        self._scorer = scorer
        self.router_backend = router_backend
        self.router_options = dict(router_options or {})
        self.policy = policy if policy is not None else RoutingPolicy()
        self.max_side = max_side
        self._scorer_lock = threading.Lock()
        self._quality_meters: dict[QualityTarget, QualityMeter] = {}
        # Seconds spent routing (caption LLM + image fallback) and in the VAE encoder, summed over
        # every call: the CLI summary and eval/bench_cli.py read them; only this class writes them
        # (quality-targeted routing adds its own keys, see cat_tokenizer.quality_routing).
        self.timings = {"router_s": 0.0, "vae_encode_s": 0.0}

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        vae="default",
        router="default",
        policy=None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        router_backend: str = "transformers",
        max_side: int | None = DEFAULT_MAX_SIDE,
        router_options: dict | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        router_head: str | Path | None = "auto",
    ) -> CATTokenizer:
        """Build a tokenizer from named or saved parts.

        Args:
            path: a directory written by :meth:`save_pretrained`, or a Hugging Face Hub repo id
                ``org/name`` holding one (fetched into the HF cache; ``revision``/``token`` apply;
                with ``HF_HUB_OFFLINE=1`` read from the cache). Its VAE, router name and policy
                are used for any of ``vae`` / ``router`` / ``policy`` left at their defaults.
            vae: ``"default"`` (the checkpoint shipped in ``nested_vae/weights/default``), a
                directory written by ``NestedVAE.save_pretrained``, or a ``NestedVAE``.
            router: ``"default"`` (Qwen2.5-Coder-0.5B-Instruct from the ``router-model`` extra),
                an HF model id, a local model directory or ``.gguf`` file, a ``ComplexityScorer``,
                or None for image-only routing. Names are loaded lazily, on the first caption.
            policy: a ``RoutingPolicy``, a path to its JSON, or None for the default thresholds.
            device: where the VAE runs (default: CUDA when available, else CPU).
            dtype: VAE weight dtype (default float32; bfloat16 halves memory on GPUs/AMX CPUs).
            router_backend: ``"transformers"`` (default) or ``"vllm"``.
            router_options: extra ``router.load_scorer`` arguments (see the class docstring).
            max_side: see the class docstring.
            router_head: ``"auto"`` (the head fitted to this VAE when its folder has one, e.g. the
                shipped checkpoint; else the hand-made rule), ``"none"`` (the rule) or a head
                directory (:mod:`cat_tokenizer.router_heads`). Its fitted thresholds are the
                policy unless ``policy`` is given. Transformers backend only ("auto" skips it
                for vLLM).
        """
        if path is not None:
            path = _bundle_folder(path, revision, token)
            config_path = path / BUNDLE_CONFIG
            if not config_path.is_file():
                raise FileNotFoundError(
                    f"{path}: no {BUNDLE_CONFIG} (not written by CATTokenizer.save_pretrained)"
                )
            bundle = json.loads(config_path.read_text())
            if vae == "default":
                vae = path / bundle["vae"]
            if router == "default":
                router = bundle.get("router")
            if policy is None and bundle.get("policy"):
                policy = path / bundle["policy"]
            router_backend = bundle.get("router_backend", router_backend)
            max_side = bundle.get("max_side", max_side)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(vae, torch.nn.Module):
            vae = vae.to(device=device, dtype=dtype)
        else:
            vae = NestedVAE.from_pretrained(str(vae), device=device, dtype=dtype)
        if isinstance(policy, (str, Path)):
            policy = RoutingPolicy.load(policy)
        if isinstance(router, (str, Path)):
            head_dir = resolve_router_head(router_head, vae, router, router_backend)
            if head_dir is not None:
                router_options = {**(router_options or {}), "head": str(head_dir)}
                policy = policy if policy is not None else head_policy(head_dir, vae)
        return cls(
            vae,
            scorer=router,
            policy=policy,
            router_backend=router_backend,
            max_side=max_side,
            router_options=router_options,
        )

    def save_pretrained(
        self,
        directory: str | Path,
        *,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str = "Upload CATTokenizer",
    ) -> None:
        """Write ``vae/`` (NestedVAE.save_pretrained), ``policy.json`` and ``cat_tokenizer.json``.

        The router LLM is not copied: the bundle records its name or path (``model_id``). A fitted
        router head in use is copied to ``vae/router_head/``, where ``router_head="auto"`` finds it. With
        ``push_to_hub=True`` the folder is then uploaded to the Hub repo ``repo_id`` (default: the
        directory's name), created if needed.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.vae.save_pretrained(directory / "vae")
        if self.router_options.get("head"):
            head = RouterHead.load(self.router_options["head"])
            # The VAE was re-saved (maybe in another dtype): the head also belongs to that file.
            copies = head.fitted_to.setdefault("vae_weights_sha256_copies", [])
            copies.append(file_sha256(directory / "vae" / WEIGHTS_NAME))
            head.save(directory / "vae" / HEAD_DIR_NAME)
        self.policy.save(directory / "policy.json")
        bundle = {
            "format": BUNDLE_FORMAT,
            "vae": "vae",
            "policy": "policy.json",
            "router": self.router_name,
            "router_backend": self.router_backend,
            "max_side": self.max_side,
        }
        atomic_write_json(directory / BUNDLE_CONFIG, bundle)
        if push_to_hub:
            hub.upload_folder(
                directory,
                repo_id or directory.name,
                private=private,
                token=token,
                commit_message=commit_message,
            )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str = "Upload CATTokenizer",
    ) -> str:
        """Upload this bundle (see :meth:`save_pretrained`) to the Hub repo ``repo_id``."""
        return hub.push_saved(
            self.save_pretrained, repo_id, private=private, token=token, commit_message=commit_message
        )

    # ---- router ------------------------------------------------------------------------------

    @property
    def router_name(self) -> str | None:
        """The router's name or path (what save_pretrained records), or None without a router."""
        if self._scorer is None or isinstance(self._scorer, (str, Path)):
            return None if self._scorer is None else str(self._scorer)
        return getattr(self._scorer, "model_id", None)

    @property
    def loaded_scorer(self):
        """The router scorer if it is loaded (None before its first use, or without a router)."""
        return None if isinstance(self._scorer, (str, Path)) else self._scorer

    @property
    def scorer(self):
        """The router scorer, loaded on first access (None for image-only routing)."""
        if isinstance(self._scorer, (str, Path)):
            with self._scorer_lock:
                if isinstance(self._scorer, (str, Path)):
                    self._scorer = load_scorer(
                        str(self._scorer), backend=self.router_backend, **self.router_options
                    )
        return self._scorer

    def score_captions(self, captions: Sequence[str | None], images: Sequence | None = None) -> list:
        """Score every non-empty caption in ONE router call; None where there is no caption/router.

        ``images`` (one per caption: PIL images or zero-argument loaders) are what a hybrid router
        head also reads; other scorers ignore them. The time spent is added to ``timings["router_s"]``.
        """
        started = time.perf_counter()
        cleaned = [clean_caption(c) for c in captions]
        wanted = [i for i, c in enumerate(cleaned) if c is not None]
        scores = [None] * len(cleaned)
        if wanted and self._scorer is not None:
            texts = [cleaned[i] for i in wanted]
            if getattr(self.scorer, "needs_image", False):
                if images is None:
                    raise ValueError("the hybrid router head needs the images as well as the captions")
                found = self.scorer.score(texts, images=[images[i] for i in wanted])
            else:
                found = self.scorer.score(texts)
            for index, score in zip(wanted, found):
                scores[index] = score
        self.timings["router_s"] += time.perf_counter() - started
        return scores

    def route(self, images, captions=None, ratio: int | None = None, scores=None) -> list:
        """Routing decisions (``router.RoutingDecision``) for already-loaded RGB PIL images.

        Args:
            images: RGB PIL images (used by the fallback for images without a caption score).
            captions: one caption (or None) per image; scored in one router call.
            ratio: force this ratio for every image.
            scores: precomputed caption scores (``ComplexityScore`` or None per image), e.g. from a
                vLLM pass over a whole dataset; when given, ``captions`` are not scored again.
        """
        if ratio is not None:
            return [self.policy.decide(None, override_ratio=ratio) for _ in images]
        if scores is None:
            scores = self.score_captions(captions if captions is not None else [None] * len(images), images)
        if len(scores) != len(images):
            raise ValueError(f"got {len(images)} images but {len(scores)} scores/captions")
        started = time.perf_counter()  # the image fallback's share of routing time
        decisions = [self.policy.decide(score, image=image) for score, image in zip(scores, images)]
        self.timings["router_s"] += time.perf_counter() - started
        return decisions

    def quality_meter(self, quality: str | QualityTarget) -> QualityMeter:
        """The meter for a quality target, made once per target (LPIPS weights load here).

        Raises:
            cat_tokenizer.quality.QualityTargetError: ``quality`` is not a valid target.
            nested_vae.perceptual.LPIPSUnavailableError: an ``lpips`` target without its weights.
        """
        target = QualityTarget.parse(quality)
        if target not in self._quality_meters:
            self._quality_meters[target] = QualityMeter(target, device=self.device)
        return self._quality_meters[target]

    # ---- encode ------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.inference_mode()
    def encode_batch(
        self,
        images: Sequence,
        captions: Sequence[str | None] | None = None,
        ratio: int | None = None,
        *,
        scores: Sequence | None = None,
        batch_size: int = 8,
        sample: bool = False,
        generator: torch.Generator | None = None,
        quality: str | QualityTarget | None = None,
    ) -> list[Encoded]:
        """Tokenize many images; results come back in input order.

        All captions are scored in one router call. Images are then grouped by (ratio, size) so
        every VAE call gets a stack of equally shaped inputs, ``batch_size`` at a time. With
        ``quality`` the router is not used: see the module docstring.

        Args:
            images: paths, PIL images, arrays or tensors (see the module docstring).
            captions: one caption or None per image (None/empty -> image fallback).
            ratio: 8, 16 or 32 to skip the router.
            scores: precomputed caption scores, see :meth:`route`.
            batch_size: images per VAE call.
            sample: draw latents from the posterior instead of taking its mean.
            generator: random generator for ``sample=True``.
            quality: a quality target (``"psnr>=28"``, ``"lpips<=0.2"``, ``"ssim>=0.9"`` or a
                :class:`~cat_tokenizer.quality.QualityTarget`): each image gets the fewest tokens
                whose measured reconstruction meets it (8x and a recorded miss when none does).
                Not combinable with ``ratio``, ``scores`` or ``sample``.

        Raises:
            cat_foundations.images.ImageLoadError: an image cannot be read (names which).
            cat_tokenizer.quality.QualityTargetError: ``quality`` is not a valid target.
            nested_vae.perceptual.LPIPSUnavailableError: an ``lpips`` target without its weights.
        """
        if captions is not None and len(captions) != len(images):
            raise ValueError(f"got {len(images)} images but {len(captions)} captions")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if quality is not None:
            given = {"ratio": ratio is not None, "scores": scores is not None, "sample": sample}
            clashing = [name for name, used in given.items() if used]
            if clashing:
                raise ValueError(
                    f"quality= picks the ratio by measurement; it cannot be combined with {clashing[0]}="
                )
            meter = self.quality_meter(quality)  # parse + load the metric before any image is read
        loaded = [load_image(image) for image in images]
        original_sizes = [(image.height, image.width) for image in loaded]
        if quality is not None:
            resized = [limit_max_side(image, self.max_side) for image in loaded]
            return encode_to_quality(self.vae, meter, resized, original_sizes, batch_size, self.timings)
        # The image fallback sees the full image (it resizes to its own calibrated scale).
        decisions = self.route(loaded, captions, ratio, scores)  # adds its own time to timings["router_s"]
        resized = [limit_max_side(image, self.max_side) for image in loaded]

        groups: dict[tuple[int, int, int], list[int]] = {}
        for index, (image, decision) in enumerate(zip(resized, decisions)):
            groups.setdefault((decision.ratio, image.height, image.width), []).append(index)

        started = time.perf_counter()
        results: list[Encoded | None] = [None] * len(loaded)
        scaling_factor = float(getattr(self.vae.config, "scaling_factor", 1.0))
        for (group_ratio, height, width), indices in groups.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                pixels = torch.stack([pil_to_tensor(resized[i]) for i in chunk])
                output = self.vae.encode(pixels.to(self.device, self.dtype), group_ratio)
                dist = output.latent_dist
                latents = dist.sample(generator=generator) if sample else dist.mean
                padding = (int(output.padding.bottom), int(output.padding.right))
                for row, index in enumerate(chunk):
                    decision = decisions[index]
                    complexity = getattr(decision, "complexity", None)
                    results[index] = Encoded(
                        latent=latents[row].float().cpu(),
                        ratio=group_ratio,
                        score=decision.score,
                        score_source=decision.source,
                        original_size=original_sizes[index],
                        size=(height, width),
                        padding=padding,
                        scaling_factor=scaling_factor,
                        extra={"flags": dict(complexity.flags)}
                        if complexity is not None and complexity.flags
                        else {},
                    )
        self.timings["vae_encode_s"] += time.perf_counter() - started
        return results

    def encode(self, image, caption: str | None = None, ratio: int | None = None, **kwargs) -> Encoded:
        """Tokenize one image; see :meth:`encode_batch` for the arguments (``quality=`` included)."""
        return self.encode_batch([image], [caption], ratio, **kwargs)[0]

    # ---- decode ------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode_batch(self, encoded: Sequence[Encoded], output: str = "pil", batch_size: int = 8) -> list:
        """Reconstruct many images (grouped by ratio, latent shape and size); input order kept.

        Args:
            encoded: :class:`Encoded` objects.
            output: ``"pil"`` for RGB PIL images, ``"tensor"`` for float CxHxW tensors in [-1, 1].
            batch_size: latents per VAE call.
        """
        if output not in ("pil", "tensor"):
            raise ValueError(f"output must be 'pil' or 'tensor', got {output!r}")
        groups: dict[tuple, list[int]] = {}
        for index, item in enumerate(encoded):
            groups.setdefault((item.ratio, tuple(item.latent.shape), tuple(item.size)), []).append(index)
        results: list = [None] * len(encoded)
        for (group_ratio, _, size), indices in groups.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                latents = torch.stack([encoded[i].latent for i in chunk]).to(self.device, self.dtype)
                pixels = self.vae.decode(latents, group_ratio, output_size=size).sample.float().cpu()
                for row, index in enumerate(chunk):
                    results[index] = (
                        tensor_to_pil(pixels[row]) if output == "pil" else pixels[row].clamp(-1, 1)
                    )
        return results

    def decode(self, encoded: Encoded, output: str = "pil"):
        """Reconstruct one image: an RGB PIL image (or a CxHxW tensor in [-1, 1]) of ``encoded.size``."""
        return self.decode_batch([encoded], output=output)[0]


def _bundle_folder(path: str | Path, revision: str | None, token: str | bool | None) -> Path:
    """A bundle's local folder: ``path`` itself, or its Hub snapshot in the HF cache."""
    if not hub.is_hub_repo_id(path):
        return Path(path)
    folder = hub.download_files(str(path), [BUNDLE_CONFIG], revision=revision, token=token)
    bundle = json.loads((folder / BUNDLE_CONFIG).read_text())
    vae = bundle.get("vae", "vae")
    names = [f"{vae}/{CONFIG_NAME}", f"{vae}/{WEIGHTS_NAME}"] + (
        [bundle["policy"]] if bundle.get("policy") else []
    )
    return hub.download_files(str(path), names, revision=revision, token=token)


# ---- module-level convenience ----------------------------------------------------------------

_default_tokenizer: CATTokenizer | None = None
_default_lock = threading.Lock()


def default_tokenizer() -> CATTokenizer:
    """The tokenizer behind :func:`encode` / :func:`decode`: ``CATTokenizer.from_pretrained()``, made once."""
    global _default_tokenizer
    with _default_lock:
        if _default_tokenizer is None:
            _default_tokenizer = CATTokenizer.from_pretrained()
        return _default_tokenizer


def encode(image, caption: str | None = None, ratio: int | None = None, **kwargs) -> Encoded:
    """``default_tokenizer().encode(...)``: the shipped VAE and the default router (keyword
    arguments such as ``quality="psnr>=28"`` pass through, see :meth:`CATTokenizer.encode_batch`)."""
    return default_tokenizer().encode(image, caption, ratio, **kwargs)


def decode(encoded: Encoded, output: str = "pil"):
    """``default_tokenizer().decode(...)``."""
    return default_tokenizer().decode(encoded, output=output)
