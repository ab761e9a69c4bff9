"""Which fitted router head a tokenizer routes with: ``router_head="auto" | "none" | DIR``.

A head (:mod:`router.head`) is fitted to ONE VAE checkpoint's measured gains and ships inside that
checkpoint's folder as ``router_head/``. ``"auto"`` uses it when the VAE has one (the shipped
checkpoint does) fitted with the router model in use, and the hand-made rule otherwise; ``"none"`` always uses the rule. A head used
with another VAE than the one it was fitted to still runs, with a warning: its predictions are
about the other VAE's gains.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cat_tokenizer.index import file_sha256
from nested_vae.model import DEFAULT_WEIGHTS_DIR, WEIGHTS_NAME
from router import RoutingPolicy
from router.head import META_FILE, RouterHead
from router.loading import DEFAULT_MODEL_ID

logger = logging.getLogger(__name__)

HEAD_DIR_NAME = "router_head"
HEAD_CHOICES = ("auto", "none")


def vae_folder(vae) -> Path | None:
    """The local folder of a VAE: a loaded ``NestedVAE`` (its weights' folder), ``"default"``, a
    directory; None for a Hub id not downloaded yet (``"auto"`` then finds no head)."""
    weights = getattr(vae, "weights_path", None)
    if weights is not None:
        return Path(weights).parent
    if isinstance(vae, (str, Path)):
        path = DEFAULT_WEIGHTS_DIR if str(vae) == "default" else Path(vae)
        return path if path.is_dir() else None
    return None


def resolve_router_head(
    spec: str | Path | None, vae, router_model: str | Path = "default", backend: str = "transformers"
) -> Path | None:
    """The head directory to use for ``vae`` (see :func:`vae_folder`) and ``router_model``, or None
    for the rule. ``"auto"`` takes the VAE's head only when it was fitted with that router model
    (a head reads one model's hidden states) and the backend is transformers (vLLM returns none).

    Raises:
        FileNotFoundError: ``spec`` is a directory without a head in it.
    """
    if spec is None or str(spec) == "none" or (str(spec) == "auto" and backend != "transformers"):
        return None
    if str(spec) == "auto":
        folder = vae_folder(vae)
        candidate = folder / HEAD_DIR_NAME if folder is not None else None
        if candidate is None or not (candidate / META_FILE).is_file():
            return None
        model_id = DEFAULT_MODEL_ID if str(router_model) == "default" else str(router_model)
        return candidate if RouterHead.load(candidate).fitted_to.get("router_model_id") == model_id else None
    path = Path(spec)
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(
            f"{path}: no {META_FILE} (fit a head with `python -m eval.fit_router_head`, or use 'auto'/'none')"
        )
    return path


def head_digest(head_dir: Path | None) -> str | None:
    """``kind:digest`` of the head in ``head_dir`` (what run.json and the index record), or None."""
    if head_dir is None:
        return None
    head = RouterHead.load(head_dir)
    return f"{head.kind}:{head.digest}"


def head_policy(head_dir: Path, vae) -> RoutingPolicy:
    """The thresholds fitted with the head; warns when the head belongs to another VAE."""
    head = RouterHead.load(head_dir)
    folder = vae_folder(vae)
    weights = folder / WEIGHTS_NAME if folder is not None else None
    fitted_to = head.fitted_to.get("vae_weights_sha256")
    if (
        weights is not None
        and weights.is_file()
        and fitted_to is not None
        and file_sha256(weights) != fitted_to
    ):
        logger.warning(
            "router head %s was fitted to VAE weights %s, not %s: its routes target the other VAE's "
            "gains; refit it (cat-bench route-targets, then python -m eval.fit_router_head)",
            head_dir, fitted_to[:12], file_sha256(weights)[:12],
        )  # fmt: skip
    return RoutingPolicy(low=head.policy["low"], high=head.policy["high"])
