"""``cat-tokenize --shards ... | --hf-dataset ...``: one output shard per input shard, resumable per shard.

Every rank lists the same input shards and the same committed outputs
(:func:`cat_tokenizer.shard_store.committed`), then takes its slice of the unfinished input shards
(``PartialState.split_between_processes``): no input shard is read by two ranks, a finished one is
never read again, a half-done one (killed before its marker) is redone whole. Each rank reads,
routes and encodes one input shard at a time and commits it (:mod:`cat_tokenizer.shard_store`);
rank 0 then rebuilds the run's manifest, errors, index, stats and summary from the markers.
Routing, encoding and error isolation are the folder run's (:mod:`cat_tokenizer.cli_tokenize`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from cat_foundations.cli import EXIT_OK, EXIT_PARTIAL, FatalError
from cat_tokenizer import shard_store, sources, store
from cat_tokenizer.cli_settings import TokenizeSettings
from cat_tokenizer.cli_tokenize import (
    ROUTER_CHUNK,
    check_resume_settings,
    encode_chunk,
    initial_policy,
    load_quality_meter_or_fail,
    load_scorer_or_fail,
    load_tokenizer,
    prepare_out_dir,
    prescore,
    run_info,
    use_cpu,
)
from cat_tokenizer.index import provenance
from cat_tokenizer.latent_stats import LatentStats
from cat_tokenizer.run_outputs import RunOutputs, write_run_outputs


class _Collector:
    """The ``writer`` that :func:`encode_chunk` fills: one input shard's results, in input order."""

    def __init__(self):
        self.entries = []

    def add(self, image_id, encoded, details) -> None:
        self.entries.append((details["sample_key"], encoded, details))


@dataclass
class _Input:
    """The run's input: its shards and how to read one."""

    shards: list[sources.InputShard]
    read: object  # InputShard -> ShardContents
    describe: object  # InputShard -> str (recorded as the output's ``source``)


def _open_input(settings: TokenizeSettings) -> _Input:
    if settings.shards is not None:
        return _Input(
            sources.expand_shard_pattern(settings.shards),
            lambda shard: sources.read_tar_shard(shard, settings.require_captions),
            lambda shard: shard.url,
        )
    source = sources.HFSource(
        settings.hf_dataset,
        settings.split,
        settings.image_column,
        settings.caption_column,
        settings.streaming,
        settings.shard_size,
    )
    dataset = sources.load_hf_dataset(source)
    return _Input(
        sources.hf_input_shards(source, dataset),
        lambda shard: sources.read_hf_shard(source, dataset, shard, settings.require_captions),
        lambda shard: f"{settings.hf_dataset}:{settings.split}[shard {shard.index} of {shard.count}]",
    )


def _sharded_run_info(settings: TokenizeSettings, policy) -> dict:
    info = run_info(settings, policy)
    info.update(input=settings.shards or settings.hf_dataset, output_format=settings.format)
    return info


def _check_out_dir(settings: TokenizeSettings, done: dict) -> None:
    if store.shard_paths(settings.out):
        raise FatalError(f"{settings.out} holds shards of a --images run; use an empty folder")
    if done and not settings.resume:
        raise FatalError(
            f"{settings.out} already holds {len(done)} finished shard(s) of an earlier run; pass --resume or use an empty folder"
        )


def _tokenize_shard(tokenizer, settings: TokenizeSettings, contents) -> tuple[list, list[dict]]:
    """Route and encode one input shard's items; returns (collected results, error records)."""
    errors = list(contents.errors)
    prescored = None
    if settings.uses_router and settings.router_backend == "vllm":
        prescored = prescore(tokenizer, contents.items)  # one vLLM pass per input shard
    collector = _Collector()
    step = max(ROUTER_CHUNK, settings.batch_size)
    for start in range(0, len(contents.items), step):
        encode_chunk(tokenizer, contents.items[start : start + step], settings, prescored, errors, collector)
    return collector.entries, errors


def _merge(settings: TokenizeSettings, scaling: float, process_stats: list[dict], wall_s: float) -> None:
    """Rank 0: the run's end-of-run files from every committed input shard."""
    metas = sorted(shard_store.committed(settings.out).values(), key=lambda meta: meta["name"])
    parts = sorted(settings.out.glob("errors.rank*.jsonl"))
    unopened = [error for part in parts for error in store.read_jsonl(part)]
    records = [record for meta in metas for record in meta["records"]]
    stats = LatentStats()
    for meta in metas:
        stats = stats.merge(LatentStats(meta["stats"]))
    run = RunOutputs(
        records=records,
        origins=[meta["provenance"] for meta in metas for _ in meta["records"]],
        errors=sorted(unopened, key=lambda e: e["shard"])
        + [error for meta in metas for error in meta["errors"]],
        stats=stats,
        skipped_without_caption=sum(len(meta["skipped_without_caption"]) for meta in metas),
        scaling_factor=scaling,
    )
    write_run_outputs(settings.out, run, process_stats, wall_s, settings.quiet)
    for part in parts:
        part.unlink()


def run_sharded(settings: TokenizeSettings) -> int:
    """One sharded-input ``cat-tokenize`` run on this rank; returns 0 (all done) or 2 (some items failed)."""
    started = time.perf_counter()
    state = PartialState(cpu=use_cpu(settings.device))
    if settings.device is None:
        settings = dataclasses.replace(settings, device=str(state.device))
    if settings.captions is not None:
        raise FatalError("--captions goes with --images; tar shards and datasets carry their own captions")
    if settings.target_mean_tokens is not None:
        raise FatalError(
            "--target-mean-tokens needs every caption before the first shard; with --shards/--hf-dataset "
            "calibrate on a sample first (cat-tokenize --images SAMPLE --target-mean-tokens N writes OUT/policy.json) "
            "and pass --policy"
        )
    prepare_out_dir(settings.out)  # every rank: a failure must not leave the others waiting at a barrier
    policy = initial_policy(settings)
    inputs = _open_input(settings)
    done = shard_store.committed(settings.out)
    _check_out_dir(settings, done)
    if settings.resume:
        check_resume_settings(settings.out, _sharded_run_info(settings, policy))
    if settings.resume and state.is_main_process:
        store.remove_temporary_files(settings.out)
    state.wait_for_everyone()  # every rank has listed the finished shards before any rank writes
    todo = [shard for shard in inputs.shards if shard.name not in done]

    tokenizer = load_tokenizer(settings, policy)
    if settings.uses_router:
        load_scorer_or_fail(tokenizer, settings.quiet)  # up front: a model that cannot load is fatal
    load_quality_meter_or_fail(tokenizer, settings)
    origin = provenance(tokenizer, run_info(settings, policy)["vae"], settings.uses_router)
    if state.is_main_process:
        store.atomic_write_json(settings.out / store.RUN_INFO, _sharded_run_info(settings, policy))
    setup_s = time.perf_counter() - started
    with state.split_between_processes(todo) as mine:
        my_shards = list(mine)

    kill_after, images_done, unopened, number = store.kill_after_shards(), 0, [], 0
    show = not settings.quiet and state.is_main_process
    for shard in tqdm(my_shards, unit="shard", disable=not show, desc="tokenize"):
        contents = inputs.read(shard)
        if contents.unopened:
            unopened.extend(contents.errors)
            continue
        entries, errors = _tokenize_shard(tokenizer, settings, contents)
        info = {
            "source": inputs.describe(shard),
            "rank": state.process_index,
            "provenance": origin,
            "skipped_without_caption": contents.skipped_without_caption,
        }
        shard_store.write_output_shard(settings.out, shard.name, settings.format, entries, errors, info)
        images_done += len(entries)
        number += 1
        store.die_if_fault_point(number, kill_after)
    store.write_jsonl(settings.out / f"errors.rank{state.process_index:02d}.jsonl", unopened)

    process_stats = [{"done": images_done, "setup_s": setup_s, "shards": len(my_shards), **tokenizer.timings}]
    if state.num_processes > 1:
        process_stats = gather_object(process_stats)
    state.wait_for_everyone()
    if state.is_main_process:
        scaling = float(tokenizer.vae.config.scaling_factor)
        _merge(settings, scaling, process_stats, time.perf_counter() - started)
    state.wait_for_everyone()
    failed = len(store.read_jsonl(settings.out / store.ERRORS))
    return EXIT_PARTIAL if failed else EXIT_OK
