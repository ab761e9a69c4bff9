"""``cat-tokenize`` orchestration: checks, resume, router calibration, the encode loop, the merge.

Works on a :class:`~cat_tokenizer.cli_settings.TokenizeSettings` (never an argparse Namespace).
Under ``accelerate launch`` every rank runs :func:`run_tokenize`; the barriers
(``state.wait_for_everyone()``) are marked where the order between ranks matters.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from cat_foundations import hub
from cat_foundations.cli import EXIT_OK, EXIT_PARTIAL, FatalError
from cat_foundations.images import ImageLoadError, limit_max_side
from cat_tokenizer import shard_store, store
from cat_tokenizer.cli_settings import TokenizeSettings
from cat_tokenizer.index import provenance
from cat_tokenizer.jobs import WorkItem, plan_work
from cat_tokenizer.router_heads import head_digest, head_policy, resolve_router_head
from cat_tokenizer.run_outputs import RunOutputs, write_run_outputs
from cat_tokenizer.tokenizer import CATTokenizer
from nested_vae import NestedVAE
from nested_vae.perceptual import LPIPSUnavailableError, LPIPSWeightsError
from router import RoutingPolicy, routing_score

RUN_FORMAT = "cat-tokenize-run-v1"
ROUTER_CHUNK = 32  # captions per router call in the main loop (the vLLM path scores all up front)
PRESCORE_CHUNK = 64
RESUME_KEYS = ("vae", "router_model", "router_dtype", "router_head", "ratio", "quality", "max_side", "policy")
SHARDED_RESUME_KEYS = ("output_format",)  # sharded-input runs only; more input shards may be added


def prepare_out_dir(out_dir: Path) -> None:
    """Create the output folder and prove it is writable (fatal otherwise)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        store.atomic_write_text(probe, "ok")
        probe.unlink()
    except OSError as error:
        raise FatalError(f"output folder {out_dir} is not writable: {error.strerror or error}") from None


def use_cpu(device: str | None) -> bool:
    """Whether the accelerate state should be CPU-only (gloo between processes when launched).

    accelerate only forms a multi-process CPU group when asked to (``PartialState(cpu=True)``),
    so ask whenever there is no GPU, ``--device cpu`` was given, or the launcher set
    ``ACCELERATE_USE_CPU``.
    """
    wanted = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    return wanted or (device is not None and device.startswith("cpu")) or not torch.cuda.is_available()


def run_info(settings: TokenizeSettings, policy: RoutingPolicy) -> dict:
    # Hub ids and "default" stay names; a local folder is recorded absolute so decode finds it anywhere.
    keep = settings.vae == "default" or hub.is_hub_repo_id(settings.vae)
    vae = settings.vae if keep else str(Path(settings.vae).resolve())
    return {
        "format": RUN_FORMAT,
        "vae": vae,
        "router_model": settings.router_model,
        "router_backend": settings.router_backend,
        "router_dtype": str(settings.router_dtype).removeprefix("torch.") if settings.router_dtype else None,
        "router_head": head_digest(router_head_dir(settings)),
        "ratio": settings.ratio,
        "quality": str(settings.quality) if settings.quality is not None else None,
        "max_side": settings.max_side,
        "policy": {"low": policy.low, "high": policy.high},
    }


def check_resume_settings(out_dir: Path, run_info: dict) -> None:
    previous_path = out_dir / store.RUN_INFO
    if not previous_path.exists():
        return
    previous = json.loads(previous_path.read_text())
    keys = RESUME_KEYS + tuple(k for k in SHARDED_RESUME_KEYS if k in run_info)
    changed = [k for k in keys if previous.get(k) != run_info[k]]
    if changed:
        raise FatalError(
            f"--resume with different settings than the run in {out_dir} ({', '.join(changed)} changed)"
        )


def _check_inputs(settings: TokenizeSettings) -> None:
    if settings.format != "safetensors" or settings.streaming:
        raise FatalError("--format webdataset and --streaming apply to --shards / --hf-dataset input only")
    if not settings.images.is_dir():
        raise FatalError(f"--images {settings.images} is not a folder")
    if settings.captions is not None and not settings.captions.is_file():
        raise FatalError(f"--captions {settings.captions} is not a readable file")
    if settings.target_mean_tokens is not None and settings.ratio is not None:
        raise FatalError("--target-mean-tokens needs --ratio auto")
    # --quality with --ratio N / --target-mean-tokens is refused by cli_args._check_routing_choice


def router_head_dir(settings: TokenizeSettings) -> Path | None:
    """The fitted head this run routes with (``--router-head``), or None for the rule."""
    if not settings.uses_router:
        return None
    try:
        return resolve_router_head(
            settings.router_head, settings.vae, settings.router_model, settings.router_backend
        )
    except FileNotFoundError as error:
        raise FatalError(f"--router-head: {error}") from None


def initial_policy(settings: TokenizeSettings) -> RoutingPolicy:
    """``--policy``, else the router head's fitted thresholds, else the defaults; on ``--resume``
    with a budget, the first run's calibration."""
    head_dir = router_head_dir(settings)
    try:
        if settings.policy:
            policy = RoutingPolicy.load(settings.policy)
        else:
            policy = head_policy(head_dir, settings.vae) if head_dir is not None else RoutingPolicy()
    except ValueError as error:
        raise FatalError(str(error)) from None
    saved = settings.out / "policy.json"
    if settings.resume and settings.target_mean_tokens is not None and saved.exists():
        policy = RoutingPolicy.load(saved)
    return policy


def load_tokenizer(settings: TokenizeSettings, policy: RoutingPolicy) -> CATTokenizer:
    try:
        vae = NestedVAE.from_pretrained(settings.vae, device=settings.device, dtype=settings.dtype)
    except (OSError, ValueError) as error:
        raise FatalError(f"cannot load the VAE {settings.vae!r}: {error}") from None
    if settings.tiling:
        vae.enable_tiling()
    options = {"cache_path": str(settings.score_cache)} if settings.score_cache else {}
    head_dir = router_head_dir(settings)
    if head_dir is not None:
        options["head"] = str(head_dir)
    if settings.router_dtype is not None:  # vLLM takes the dtype's name
        name = str(settings.router_dtype).removeprefix("torch.")
        options["dtype"] = name if settings.router_backend == "vllm" else settings.router_dtype
    return CATTokenizer(
        vae,
        scorer=settings.router_model if settings.uses_router else None,
        policy=policy,
        router_backend=settings.router_backend,
        max_side=settings.max_side,
        router_options=options,
    )


def load_quality_meter_or_fail(tokenizer: CATTokenizer, settings: TokenizeSettings) -> None:
    """With ``--quality``: build its metric up front (LPIPS weights), so a missing one is fatal once."""
    if settings.quality is None:
        return
    try:
        tokenizer.quality_meter(settings.quality)
    except (LPIPSUnavailableError, LPIPSWeightsError) as error:
        raise FatalError(f"--quality {settings.quality}: cannot load LPIPS: {error}") from None


def load_scorer_or_fail(tokenizer: CATTokenizer, quiet: bool):
    if quiet:
        transformers_logging.disable_progress_bar()
    try:
        return tokenizer.scorer
    except Exception as error:  # any loader failure (missing files, bad id, no vllm) is fatal here
        raise FatalError(f"cannot load the router model {tokenizer.router_name!r}: {error}") from None


def prescore(tokenizer: CATTokenizer, items: list[WorkItem]) -> dict:
    """Caption scores for ``items`` (vLLM path, calibration): id -> score.

    One router call for all captions; with a hybrid head (which reads pixels too) one call per
    chunk of :data:`PRESCORE_CHUNK` images, so a large run never holds every image at once. The
    head sees the image as loaded, before ``--max-side``, as :meth:`CATTokenizer.route` does. An
    unreadable image is left unscored here; encoding records it.
    """
    captioned = [item for item in items if item.caption]
    if not getattr(tokenizer.scorer, "needs_image", False):
        scores = tokenizer.score_captions([item.caption for item in captioned])  # timed by the tokenizer
        return {item.id: score for item, score in zip(captioned, scores)}
    found = {}
    for start in range(0, len(captioned), PRESCORE_CHUNK):
        loaded = []
        for item in captioned[start : start + PRESCORE_CHUNK]:
            try:
                loaded.append((item, item.load()))
            except ImageLoadError:
                continue
        scores = tokenizer.score_captions(
            [item.caption for item, _ in loaded], [image for _, image in loaded]
        )
        found.update({item.id: score for (item, _), score in zip(loaded, scores)})
    return found


def _routing_scores(
    items: list[WorkItem], prescored: dict, max_side: int
) -> list[tuple[float, tuple[int, int]]]:
    """Every item's routing score (caption first, else image fallback) and the ``(H, W)`` it will
    be encoded at; unreadable images left out."""
    values = []
    for item in items:
        try:
            image = limit_max_side(item.load(), max_side)
        except ImageLoadError:
            continue
        values.append((routing_score(prescored.get(item.id), image).score, (image.height, image.width)))
    return values


def _calibrated_policy(state, base: RoutingPolicy, my_items, prescored: dict, settings) -> RoutingPolicy:
    """Thresholds fitted on the scores of the whole run (gathered from every process), with the
    budget counted at the sizes the images will be encoded at."""
    values = _routing_scores(my_items, prescored, settings.max_side)
    if state.num_processes > 1:
        values = gather_object(values)
    if not values:
        raise FatalError("--target-mean-tokens: no image could be scored for calibration")
    scores = [score for score, _ in values]
    sizes = [tuple(size) for _, size in values]
    try:
        return RoutingPolicy.calibrate(
            scores,
            target_mean_tokens=settings.target_mean_tokens.mean_tokens(sizes),
            image_size=sizes,
            base=base,
        )
    except ValueError as error:
        raise FatalError(f"--target-mean-tokens {settings.target_mean_tokens}: {error}") from None


@dataclass
class _Plan:
    """What this rank does: the work plan, its share, and the prepared tokenizer."""

    plan: object
    my_items: list[WorkItem]
    tokenizer: CATTokenizer
    prescored: dict | None
    setup_s: float


def _plan_run(state, settings: TokenizeSettings, started: float) -> _Plan:
    """Checks, resume bookkeeping, model loading, routing calibration; writes run.json."""
    out_dir = settings.out
    _check_inputs(settings)
    prepare_out_dir(out_dir)  # every rank: a failure must not leave the others waiting at a barrier
    policy = initial_policy(settings)
    existing = store.shard_paths(out_dir)
    if shard_store.committed(out_dir):
        raise FatalError(f"{out_dir} holds shards of a --shards/--hf-dataset run; use an empty folder")
    if existing and not settings.resume:
        raise FatalError(
            f"{out_dir} already holds {len(existing)} shard(s) of an earlier run; pass --resume or use an empty folder"
        )
    if settings.resume:
        check_resume_settings(out_dir, run_info(settings, policy))
    try:
        plan = plan_work(settings.images, settings.captions, settings.require_captions)
    except OSError as error:
        raise FatalError(f"cannot read --captions {settings.captions}: {error.strerror or error}") from None

    if settings.resume and state.is_main_process:
        store.remove_temporary_files(out_dir)
    state.wait_for_everyone()
    done_ids = {record["id"] for record in store.read_shard_records(out_dir)} if settings.resume else set()
    state.wait_for_everyone()  # every rank has read the shards before any rank writes new ones
    todo = [item for item in plan.items if item.id not in done_ids]

    tokenizer = load_tokenizer(settings, policy)
    if settings.uses_router and any(item.caption for item in todo):
        load_scorer_or_fail(tokenizer, settings.quiet)  # up front: a model that cannot load is fatal
    load_quality_meter_or_fail(tokenizer, settings)
    setup_s = time.perf_counter() - started
    with state.split_between_processes(todo) as mine:
        my_items = list(mine)
    prescored = None
    if settings.uses_router and (
        settings.router_backend == "vllm" or settings.target_mean_tokens is not None
    ):
        prescored = prescore(tokenizer, my_items)
    saved_policy = out_dir / "policy.json"
    if settings.target_mean_tokens is not None and not (settings.resume and saved_policy.exists()):
        tokenizer.policy = _calibrated_policy(state, tokenizer.policy, my_items, prescored, settings)
        if state.is_main_process:
            tokenizer.policy.save(saved_policy)
    if state.is_main_process:
        store.atomic_write_json(out_dir / store.RUN_INFO, run_info(settings, tokenizer.policy))
    return _Plan(plan, my_items, tokenizer, prescored, setup_s)


def _details(item: WorkItem) -> dict:
    """The manifest fields of an item beside its :meth:`Encoded.record`."""
    details = {"path": item.id, "caption": item.caption, "caption_line": item.line}
    if item.shard is not None:
        details.update(source_shard=item.shard, sample_key=item.key)
    return details


def encode_chunk(
    tokenizer, chunk: list[WorkItem], settings, prescored: dict | None, errors: list, writer
) -> int:
    """Load, route, encode and queue one chunk; bad images become error records. Returns #done."""
    loaded: list[tuple[WorkItem, object]] = []
    for item in chunk:
        try:
            loaded.append((item, item.load()))
        except ImageLoadError as error:
            errors.append(item.error(error.reason))

    def encode(pairs):
        scores = None if prescored is None else [prescored.get(item.id) for item, _ in pairs]
        return tokenizer.encode_batch(
            [image for _, image in pairs],
            [item.caption for item, _ in pairs],
            settings.ratio,
            scores=scores,
            batch_size=settings.batch_size,
            quality=settings.quality,
        )

    try:
        encoded = list(zip(loaded, encode(loaded)))
    except Exception:  # isolate the image that broke the batch: retry one by one
        encoded = []
        for pair in loaded:
            try:
                encoded.append((pair, encode([pair])[0]))
            except Exception as error:
                errors.append(pair[0].error(f"encoding failed: {type(error).__name__}: {error}"))
    for (item, _), result in encoded:
        writer.add(item.id, result, _details(item))
    return len(encoded)


def _encode_all(state, settings: TokenizeSettings, work: _Plan) -> int:
    """The main loop of one rank: shards of encoded images and this rank's error part. Returns #done."""
    writer = store.ShardWriter(settings.out, rank=state.process_index, shard_size=settings.shard_size)
    errors: list[dict] = []
    done = 0
    chunk_size = max(ROUTER_CHUNK, settings.batch_size)
    show = not settings.quiet and state.is_main_process
    items = work.my_items
    with tqdm(total=len(items), unit="img", disable=not show, desc="tokenize", dynamic_ncols=True) as bar:
        for start in range(0, len(items), chunk_size):
            chunk = items[start : start + chunk_size]
            done += encode_chunk(work.tokenizer, chunk, settings, work.prescored, errors, writer)
            bar.update(len(chunk))
        writer.flush()
    store.write_jsonl(settings.out / f"errors.rank{state.process_index:02d}.jsonl", errors)
    return done


def _merge_outputs(
    out_dir: Path, plan, origin: dict, scaling: float, process_stats: list[dict], wall_s: float, quiet: bool
) -> None:
    """Rank 0: manifest, index, stats and summary from the shards, errors from the rank parts."""
    records = store.read_shard_records(out_dir)
    parts = sorted(out_dir.glob("errors.rank*.jsonl"))
    image_errors = [e for part in parts for e in store.read_jsonl(part)]
    run = RunOutputs(
        records=records,
        origins=[origin] * len(records),
        errors=plan.errors + sorted(image_errors, key=lambda e: e["path"]),
        stats=store.read_shard_stats(out_dir),
        skipped_without_caption=len(plan.skipped_without_caption),
        scaling_factor=scaling,
    )
    write_run_outputs(out_dir, run, process_stats, wall_s, quiet)
    for part in parts:
        part.unlink()


def run_tokenize(settings: TokenizeSettings) -> int:
    """One ``cat-tokenize`` run on this rank; returns 0 (all done) or 2 (some items failed)."""
    started = time.perf_counter()
    state = PartialState(cpu=use_cpu(settings.device))
    if settings.device is None:
        settings = dataclasses.replace(settings, device=str(state.device))
    work = _plan_run(state, settings, started)
    done = _encode_all(state, settings, work)

    process_stats = [{"done": done, "setup_s": work.setup_s, **work.tokenizer.timings}]
    if state.num_processes > 1:
        process_stats = gather_object(process_stats)
    state.wait_for_everyone()
    if state.is_main_process:
        origin = provenance(
            work.tokenizer, run_info(settings, work.tokenizer.policy)["vae"], settings.uses_router
        )
        scaling = float(work.tokenizer.vae.config.scaling_factor)
        wall_s = time.perf_counter() - started
        _merge_outputs(settings.out, work.plan, origin, scaling, process_stats, wall_s, settings.quiet)
    state.wait_for_everyone()
    failed = len(store.read_jsonl(settings.out / store.ERRORS))
    return EXIT_PARTIAL if failed else EXIT_OK
