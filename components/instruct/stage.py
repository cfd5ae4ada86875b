"""The `instruct` stage: LLaVA-style instruction data over the recipe's images.

1. Plan: the rows of the data input (dedup's manifest when dedup runs, else ingest's). Rows
   of `instruct.splits` (at most `limit` of them) get generated data: each image one task
   type, drawn from `mix` by a hash of (seed, key), so an image keeps its task when the data
   grows. Rows of other splits (val/test) are carried through unchanged, so a training stage
   on this artifact evaluates on the same held-out images (their `qa`) as on ingest's.
2. Context: captions + boxes read from the ingest shards (one Ray task per shard).
3. Generate: offline, or through the OpenAI-compatible backend (the key, the server and the
   model are checked first, before anything is read or written; replies cached as they come).
   Items whose requests still fail after the retries fail the stage (nothing committed; a
   rerun asks for those items only); unusable replies after the re-asks are quarantined.
4. Write (`output.py`): llava_instruct.json, shards + manifest.parquet + shards.parquet laid
   out like ingest's, quarantine.parquet, sample_conversations.json, instruct_summary.json.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl

from vlmflow.components.instruct.backends import Item, OpenAIBackend, generate_offline, resolve_api_key
from vlmflow.components.instruct.cache import ResponseCache
from vlmflow.components.instruct.client import CallStats
from vlmflow.components.instruct.context import build_context
from vlmflow.components.instruct.output import shard_sha, write_outputs
from vlmflow.components.instruct.templates import load_templates
from vlmflow.errors import UserError
from vlmflow.samples import read_shard, sample_json
from vlmflow.specs.instruct import TASKS, InstructSpec, OpenAICompatibleGenerator
from vlmflow.stage import StageContext, StageResult

CACHE_PATH = ("_cache", "instruct", "responses.sqlite")  # under the artifact store root


def assign_task(seed: int, key: str, mix: dict[str, float]) -> str:
    """The image's task type: a stable hash of (seed, key) against the cumulative mix."""
    weights = [(t, mix.get(t, 0.0)) for t in TASKS if mix.get(t, 0.0) > 0]
    u = int(hashlib.sha256(f"{seed}:{key}:task".encode()).hexdigest()[:15], 16) / 16**15
    total, acc = sum(w for _, w in weights), 0.0
    for task, weight in weights:
        acc += weight / total
        if u < acc:
            return task
    return weights[-1][0]


def read_records(work: tuple[str, str, list[str]]) -> list[tuple[str, dict]]:
    """(key, {captions, objects}) of the wanted keys of one shard (a Ray task)."""
    path, sha256, keys = work
    wanted = set(keys)
    out = []
    for sample in read_shard(Path(path), sha256):
        if sample["__key__"] in wanted:
            record = sample_json(sample)
            out.append((sample["__key__"], {"captions": record.get("captions"), "objects": record.get("objects")}))
    return out


def plan(ctx: StageContext, spec: InstructSpec) -> tuple[pl.DataFrame, list[Item]]:
    """(rows the stage writes or quarantines, in manifest order; the items to generate)."""
    manifest = pl.read_parquet(ctx.inputs["data"].path / "manifest.parquet")
    selected = pl.col("split").is_in(spec.splits)
    keep = ~selected | (selected.cast(pl.Int64).cum_sum() <= (spec.limit or manifest.height))
    rows = manifest.filter(keep)
    generate = rows.filter(pl.col("split").is_in(spec.splits))
    sha = shard_sha(ctx)
    groups = generate.group_by("shard", maintain_order=True).agg("key")
    work = [(str(ctx.store.root / s), sha[s], keys) for s, keys in groups.iter_rows()]
    parts = ctx.executor.map_units(read_records, work, desc="instruct: read context", progress=ctx.progress)
    records = dict(r for part in parts for r in part)
    items = []
    for key, width, height in generate.select("key", "width", "height").iter_rows():
        task = assign_task(ctx.recipe.seed, key, spec.mix)
        context = build_context(records.get(key) or {}, (width, height) if width and height else None)
        items.append(Item(f"{key}-{task}", key, task, context))
    return rows, items


def run(ctx: StageContext) -> StageResult:
    spec = ctx.config
    templates = load_templates(spec.templates)
    backend = None
    if isinstance(spec.generator, OpenAICompatibleGenerator):
        api_key = resolve_api_key(spec.generator)  # user errors first: nothing is read or written yet
        cache = ResponseCache(ctx.store.root.joinpath(*CACHE_PATH))
        backend = OpenAIBackend(spec.generator, templates, cache, api_key, ctx.progress, ctx.recipe.seed)
        backend.preflight()
    rows, items = plan(ctx, spec)
    if backend is None:
        outcomes, stats = generate_offline(items, spec.generator, ctx.recipe.seed), CallStats()
    else:
        outcomes, stats = backend.generate(items), backend.stats
        backend.cache.close()
    failed = [i for i in items if outcomes[i.id].reason == "request-failed"]
    if failed:
        raise UserError(
            f"instruct: {len(failed)} of {len(items)} items still failed after {spec.generator.max_retries} retries "
            f"(e.g. {outcomes[failed[0].id].detail}); the other replies are cached: run again to resume"
        )
    return write_outputs(ctx, spec, templates, rows, items, outcomes, stats)
