"""What the instruct stage writes, in its artifact folder:

- `llava_instruct.json`: LLaVA format, one entry per generated item: `id`, `image`
  (IMAGE_KEY.EXT; with `export_images` the files are in `images/`), `conversations` of
  `{"from": "human"|"gpt", "value"}` with `<image>\\n` opening the first human turn.
- `shards/instruct-NNNNNN.tar` (one per input shard) + `manifest.parquet` (the input's
  columns, `key` = IMAGE_KEY-TASK, plus `image_key`, `task`) + `shards.parquet` (shard,
  sha256, bytes, samples): the same layout as ingest's, so a training stage reads it the same
  way. A sample's JSON is the source sample's (captions, qa, objects, label...) with
  `conversations` (internal role/content turns, `<image>` in the first user turn), `task`,
  `image_key` and `generator`. Carried-through rows (other splits) keep their key and JSON.
- `quarantine.parquet` (key, source, reason, detail) for items without usable turns,
  `sample_conversations.json` and `instruct_summary.json` (metrics; logged to MLflow).
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from pathlib import Path

import polars as pl

from vlmflow.artifacts import atomic_path, atomic_write_text
from vlmflow.components.instruct import verify
from vlmflow.components.instruct.backends import Item, Outcome
from vlmflow.components.instruct.client import CallStats
from vlmflow.components.instruct.replies import Turn
from vlmflow.components.instruct.templates import Templates
from vlmflow.components.sources.synthetic import SHAPES
from vlmflow.samples import QUARANTINE_SCHEMA, SHARDS_SCHEMA, read_shard, sample_json, write_shard, write_tables
from vlmflow.specs.instruct import OPERATIONAL, TASKS, InstructSpec, OpenAICompatibleGenerator
from vlmflow.stage import StageContext, StageResult

IMAGE_TOKEN = "<image>"
VERIFY_AT_MOST = 2000  # offline answers re-checked against their scene graph (a metric)


def shard_sha(ctx: StageContext) -> dict[str, str]:
    shards = pl.read_parquet(ctx.inputs["data"].path / "shards.parquet")
    return dict(zip(shards["shard"], shards["sha256"], strict=True))


def dedup_questions(turns: list[Turn]) -> tuple[list[Turn], int]:
    """Drop turns whose question repeats an earlier one of the same image (case, spacing, punctuation)."""
    seen: set[str] = set()
    kept = []
    for question, answer in turns:
        norm = re.sub(r"[^a-z0-9 ]+", "", " ".join(question.lower().split()))
        if norm in seen:
            continue
        seen.add(norm)
        kept.append((question, answer))
    return kept, len(turns) - len(kept)


def internal_conversation(turns: list[Turn]) -> list[dict[str, str]]:
    out = []
    for i, (question, answer) in enumerate(turns):
        content = f"{IMAGE_TOKEN}\n{question}" if i == 0 else question
        out += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return out


def llava_conversation(turns: list[Turn]) -> list[dict[str, str]]:
    roles = {"user": "human", "assistant": "gpt"}
    return [{"from": roles[t["role"]], "value": t["content"]} for t in internal_conversation(turns)]


def write_unit(unit: tuple[str, str, str, str | None, list[tuple[str, str, str, dict, bool]]]) -> dict:
    """One output shard (a Ray task): each sample = the input sample's image and JSON, updated.
    samples: (image key, output key, image ext, JSON updates, export the image?)."""
    in_path, in_sha, out_path, images_dir, samples = unit
    wanted = {s[0] for s in samples}
    originals = {s["__key__"]: s for s in read_shard(Path(in_path), in_sha) if s["__key__"] in wanted}
    rows = []
    for image_key, key, ext, updates, export in samples:
        original = originals[image_key]
        rows.append({"__key__": key, ext: original[ext], "json": {**sample_json(original), **updates}})
        if export and images_dir is not None:
            with atomic_path(Path(images_dir) / f"{image_key}.{ext}") as tmp:
                tmp.write_bytes(original[ext])
    sha, size = write_shard(Path(out_path), rows)
    return {"sha256": sha, "bytes": size, "samples": len(rows)}


def write_outputs(
    ctx: StageContext,
    spec: InstructSpec,
    templates: Templates,
    rows: pl.DataFrame,
    items: list[Item],
    outcomes: dict[str, Outcome],
    stats: CallStats,
) -> StageResult:
    generator = spec.generator.kind
    if isinstance(spec.generator, OpenAICompatibleGenerator):
        generator = f"{generator}:{spec.generator.model}"
    by_image = {item.image_key: item for item in items}
    entries: list[tuple[dict, str, dict, bool]] = []  # (manifest row, output key, JSON updates, generated?)
    written: list[tuple[Item, list[Turn]]] = []
    quarantine, llava, deduplicated = [], [], 0
    for row in rows.iter_rows(named=True):
        item = by_image.get(row["key"])
        if item is None:  # a held-out split: carried through unchanged
            entries.append((row, row["key"], {"image_key": row["key"], "task": None}, False))
            continue
        outcome = outcomes[item.id]
        if outcome.turns is None:
            quarantine.append(
                {"key": item.id, "source": row["source"], "reason": outcome.reason, "detail": outcome.detail}
            )
            continue
        turns = list(outcome.turns)
        if item.task == "detail":
            turns = [(templates.detail_question(ctx.recipe.seed, item.image_key), turns[0][1])]
        turns, dropped = dedup_questions(turns)
        deduplicated += dropped
        conversation = internal_conversation(turns)
        updates = {"key": item.id, "image_key": item.image_key, "task": item.task, "generator": generator}
        entries.append((row, item.id, {**updates, "conversations": conversation}, True))
        written.append((item, turns))
        image = f"{item.image_key}.{row['ext']}"
        llava.append({"id": item.id, "image": image, "conversations": llava_conversation(turns), "task": item.task})
    shard_rows, manifest = _write_shards(ctx, spec, entries, dict(rows.schema))
    quarantine_df = pl.DataFrame(quarantine, schema=QUARANTINE_SCHEMA, orient="row")
    write_tables(ctx.out, manifest, quarantine_df, shard_rows)
    entries_json = [{k: v for k, v in e.items() if k != "task"} for e in llava]
    atomic_write_text(ctx.out / "llava_instruct.json", json.dumps(entries_json, ensure_ascii=False, indent=1))
    samples = json.dumps(llava[: spec.sample_conversations], indent=2, ensure_ascii=False)
    atomic_write_text(ctx.out / "sample_conversations.json", samples)
    metrics = _metrics(spec, items, written, stats, deduplicated)
    metrics["rows_carried_through"] = sum(not e[3] for e in entries)
    summary = {"metrics": metrics, "quarantine_by_reason": dict(Counter(q["reason"] for q in quarantine))}
    atomic_write_text(ctx.out / "instruct_summary.json", json.dumps(summary, indent=2, sort_keys=True))
    return StageResult(
        rows_in=rows.height,
        rows_out=len(entries),
        rows_quarantined=quarantine_df.height,
        metrics=metrics,
        artifacts=["sample_conversations.json", "instruct_summary.json", "quarantine.parquet", "shards.parquet"],
        details={"generator": generator, "templates": str(templates.folder), "templates_digest": templates.digest},
    )


def _write_shards(
    ctx: StageContext, spec: InstructSpec, entries: list[tuple[dict, str, dict, bool]], schema: dict
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One output shard per input shard, in input order; one manifest row per sample."""
    sha = shard_sha(ctx)
    prefix = ctx.store.relative(ctx.store.path("instruct", ctx.digest)) + "/shards"
    by_shard: dict[str, list[tuple[dict, str, dict, bool]]] = {}
    for entry in entries:
        by_shard.setdefault(entry[0]["shard"], []).append(entry)
    images_dir = str(ctx.out / "images") if spec.export_images else None
    units, names = [], []
    for index, (in_shard, group) in enumerate(by_shard.items()):
        name = f"instruct-{index:06d}.tar"
        samples = [(row["key"], key, row["ext"], updates, generated) for row, key, updates, generated in group]
        units.append(
            (str(ctx.store.root / in_shard), sha[in_shard], str(ctx.out / "shards" / name), images_dir, samples)
        )
        names.append(f"{prefix}/{name}")
    results = ctx.executor.map_units(write_unit, units, desc="instruct: write shards", progress=ctx.progress)
    shard_rows = pl.DataFrame([{"shard": n, **r} for n, r in zip(names, results, strict=True)], schema=SHARDS_SCHEMA)
    manifest_rows = []
    for name, group in zip(names, by_shard.values(), strict=True):
        for row, key, updates, generated in group:
            turns = len(updates["conversations"]) if generated else row.get("n_turns")
            manifest_rows.append({**row, "key": key, "shard": name, "n_turns": turns, **_columns(updates)})
    schema = {**schema, "image_key": pl.String, "task": pl.String}
    return shard_rows, pl.DataFrame(manifest_rows, schema=schema, orient="row")


def _columns(updates: dict) -> dict:
    return {"image_key": updates["image_key"], "task": updates["task"]}


def _percentile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _metrics(
    spec: InstructSpec, items: list[Item], written: list[tuple[Item, list[Turn]]], stats: CallStats, deduplicated: int
) -> dict[str, float]:
    planned = Counter(i.task for i in items)
    done = Counter(item.task for item, _ in written)
    metrics: dict[str, float] = {}
    for task in TASKS:
        metrics[f"items.{task}"] = done.get(task, 0)
        metrics[f"items_planned.{task}"] = planned.get(task, 0)
    turns = [len(t) for _, t in written]
    metrics["turns.mean"] = sum(turns) / len(turns) if turns else 0.0
    metrics["questions_deduplicated"] = deduplicated
    for name in ("made", "succeeded", "cached", "failed", "retried", "reasked", "rate_limited", "timeouts"):
        metrics[f"calls.{name}"] = getattr(stats, name)
    metrics["calls.server_errors"] = stats.server_errors
    metrics["calls.bad_bodies"] = stats.bad_bodies
    metrics["tokens.in"], metrics["tokens.out"] = stats.tokens_in, stats.tokens_out
    metrics["latency.p50_s"] = _percentile(stats.latencies, 50)
    metrics["latency.p95_s"] = _percentile(stats.latencies, 95)
    generator = spec.generator
    if isinstance(generator, OpenAICompatibleGenerator):
        cost_in = stats.tokens_in / 1000 * generator.price_per_1k_input
        metrics["cost.estimated_usd"] = cost_in + stats.tokens_out / 1000 * generator.price_per_1k_output
        metrics.update({f"generator.{k}": float(getattr(generator, k) or 0) for k in OPERATIONAL if "price" not in k})
    else:
        metrics["cost.estimated_usd"] = 0.0
        metrics.update(_offline_check(written))
    return metrics


def _offline_check(written: list[tuple[Item, list[Turn]]]) -> dict[str, float]:
    """Re-check offline answers about shapes scenes against their scene graph: statements.false must be 0."""
    checked = false = 0
    for item, turns in written[:VERIFY_AT_MOST]:
        objects = item.context.objects
        if not objects or not all(o.noun in SHAPES for o in objects):
            continue
        checker = verify.Checker(objects)
        for _, answer in turns:
            for sentence in verify.sentences(answer):
                checked += 1
                false += checker.check_sentence(sentence) is not None
    return {"statements.checked": checked, "statements.false": false}
