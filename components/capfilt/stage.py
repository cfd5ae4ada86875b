"""CapFilt as two stages of the recipe, each a Ray Data map over batches of the data artifact's
images on an actor pool (components/capfilt/worker.py):

- `capfilt-caption`: the captioner writes k synthetic captions per web image (nucleus
  sampling seeded per batch, so a retried batch writes the same captions).
  Output: `captions.parquet` (key, index, caption, correct: the scene-graph check where the
  data knows its scene).
- `capfilt-filter` (the `capfilt` data artifact): the filter scores every web and synthetic
  caption named in `apply_to` (ITM probability, ITC cosine) and keeps the pairs above the
  thresholds (given, or calibrated on a clean source's held-out pairs: `filter.calibrate`).
  Output: new shards where each image's JSON holds its kept captions (`captions`)
  and every pair judged (`capfilt`: caption, origin, scores, kept), `manifest.parquet`,
  `shards.parquet`, `pairs.parquet` (one row per pair: origin, scores, decision, reason,
  truth where known), `quarantine.parquet` (every removed pair, reason
  `capfilt:itm=0.12<0.50`, and every image left without a caption), `report.json`,
  `scores.png` (histograms), `examples.png` (kept and removed pairs) and, when calibrated,
  `calibration.parquet` (the held-out pairs, their scores, whether they pass).

Rows outside the scope (held-out splits, sources not listed in `capfilt.sources`) pass
through unchanged.

Bootstrap rounds (`capfilt.rounds`): round r >= 2 trains the model stages named in
`capfilt.retrain` further on round r-1's output (`train-NAME-rR`, the stage's own settings) and
runs `capfilt-caption-rR` and `capfilt-filter-rR` on the same input data, a model not retrained
being round 1's; the last round's filter writes the `capfilt` artifact.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl

from vlmflow.components.capfilt import (
    report,
)
from vlmflow.components.capfilt.worker import CapfiltWorker
from vlmflow.errors import UserError
from vlmflow.progress import Progress
from vlmflow.samples import QUARANTINE_SCHEMA, SHARDS_SCHEMA, build_index, read_member, write_shard, write_tables
from vlmflow.specs.capfilt import CapfiltSpec, FilterSpec, ModelRef
from vlmflow.stage import StageContext, StageResult
from vlmflow.tracking import download_model, tracking_uri

PAIR_SCHEMA = {
    "key": pl.String,
    "source": pl.String,
    "origin": pl.String,
    "index": pl.Int32,
    "caption": pl.String,
    "itm": pl.Float64,
    "itc": pl.Float64,
    "judged": pl.Boolean,
    "kept": pl.Boolean,
    "reason": pl.String,
    "corrupted": pl.Boolean,  # truth: a web caption the data corrupted on purpose (synthetic shapes)
    "correct": pl.Boolean,  # truth: a synthetic caption true of the scene graph
}


# ------------------------------------------------------------------------------ shared helpers


def model_folder(ref: ModelRef, ctx: StageContext, role: str) -> Path:
    """A local model folder for a reference: a stage's model/, a folder, or a registered version
    downloaded from the tracking server into the build folder (removed when the stage ends)."""
    if ref.stage is not None:
        return ctx.inputs[role].path / "model"
    if ref.path is not None:
        return ref.path
    tracking = tracking_uri(ctx.store.root.parent, ctx.recipe.runtime.mlflow.tracking_uri)
    try:
        return download_model(ref.uri, tracking, ctx.out / f"_{role}")
    except UserError as exc:
        raise UserError(f"capfilt.{role}.model.uri: {exc}") from None


def scope(index: pl.DataFrame, spec: CapfiltSpec) -> pl.DataFrame:
    """The rows CapFilt judges: the training split of the web sources."""
    rows = index.filter(pl.col("split") == "train")
    return rows.filter(pl.col("source").is_in(spec.sources)) if spec.sources is not None else rows


def batches(rows: pl.DataFrame, size: int) -> list[pl.DataFrame]:
    return [rows.slice(start, size) for start in range(0, rows.height, size)]


def _where(rows: pl.DataFrame, kind: str) -> list[list]:
    return [list(r) for r in rows.select("shard", f"{kind}_offset", f"{kind}_size").iter_rows()]


def run_jobs(jobs: list[dict], folder: Path, ctx: StageContext, desc: str) -> list[dict]:
    resources = ctx.config.resources
    ctx.executor.require_gpus(resources.gpus_per_actor, "capfilt.resources.gpus_per_actor")
    device = "cuda" if resources.gpus_per_actor > 0 else "cpu"
    return ctx.executor.map_jobs(
        CapfiltWorker,
        (str(folder), str(ctx.store.root), max(1, int(resources.cpus_per_actor)), device),
        jobs,
        desc=desc,
        num_actors=resources.actors,
        num_cpus=resources.cpus_per_actor,
        num_gpus=resources.gpus_per_actor,
        progress=ctx.progress,
    )


def _drop_download(ctx: StageContext) -> None:
    for role in ("captioner", "filter"):
        shutil.rmtree(ctx.out / f"_{role}", ignore_errors=True)


# ------------------------------------------------------------------------------ caption


def run_caption(ctx: StageContext) -> StageResult:
    recipe, spec = ctx.recipe, ctx.config
    captioner, round_ = spec.captioner, spec.round
    rows = scope(build_index(ctx.inputs["data"].path, ctx.store.root), spec)
    if rows.height == 0:
        raise UserError(f"capfilt: data artifact {spec.data!r} has no training rows to caption")
    decoding = captioner.model_dump(include={"strategy", "max_new_tokens", "num_beams", "temperature", "top_p"})
    jobs = [
        {"op": "caption", "images": _where(part, "image"), "records": _where(part, "json"), "prompt": spec.prompt,
         "k": captioner.k, "decoding": decoding | {"seed": recipe.seed * 1_000_003 + i}}
        for i, part in enumerate(batches(rows, spec.resources.batch_size))
    ]  # fmt: skip
    folder = model_folder(captioner.model, ctx, "captioner")
    try:
        answers = run_jobs(jobs, folder, ctx, "capfilt caption" + _round_label(round_))
    finally:
        _drop_download(ctx)
    keys = rows["key"].to_list()
    captions = [c for answer in answers for c in answer["captions"]]
    correct = [c for answer in answers for c in answer["correct"]]
    table = pl.DataFrame(
        {
            "key": [k for k, texts in zip(keys, captions, strict=True) for _ in texts],
            "index": [j for texts in captions for j in range(len(texts))],
            "caption": [t for texts in captions for t in texts],
            "correct": [c for flags in correct for c in flags],
        },
        schema={"key": pl.String, "index": pl.Int32, "caption": pl.String, "correct": pl.Boolean},
    )
    table.write_parquet(ctx.out / "captions.parquet")
    metrics = {"images": float(rows.height), "captions": float(table.height)}
    known = table["correct"].drop_nulls()
    if known.len():
        metrics["synthetic_caption_accuracy"] = float(known.mean())
    metrics["distinct_caption_rate"] = table["caption"].n_unique() / max(1, table.height)
    return StageResult(
        rows_in=rows.height,
        rows_out=rows.height,
        rows_quarantined=0,
        metrics=metrics,
        artifacts=["captions.parquet"],
        details={"captioner": str(folder), "prompt": spec.prompt},
    )


# ------------------------------------------------------------------------------ filter


def candidate_pairs(rows: pl.DataFrame, manifest: pl.DataFrame, captions: pl.DataFrame | None) -> pl.DataFrame:
    """Every (image, caption) pair of the scope: the web captions, then the synthetic ones."""
    web = (
        rows.select("key")
        .join(manifest.select("key", "source", "captions", "caption_corrupted"), on="key", how="left")
        .explode("captions")
        .filter(pl.col("captions").is_not_null() & (pl.col("captions") != ""))
        .with_columns(index=pl.int_range(pl.len()).over("key").cast(pl.Int32))
        .select(
            "key",
            "source",
            pl.lit("web").alias("origin"),
            "index",
            pl.col("captions").alias("caption"),
            pl.when(pl.col("index") == 0).then(pl.col("caption_corrupted")).alias("corrupted"),
            pl.lit(None, dtype=pl.Boolean).alias("correct"),
        )
    )
    frames = [web]
    if captions is not None:
        synthetic = captions.join(manifest.select("key", "source"), on="key", how="left").select(
            "key",
            "source",
            pl.lit("synthetic").alias("origin"),
            "index",
            "caption",
            pl.lit(None, dtype=pl.Boolean).alias("corrupted"),
            "correct",
        )
        frames.append(synthetic)
    order = rows.select("key").with_row_index("position")
    pairs = pl.concat(frames).join(order, on="key", how="left")
    return pairs.sort("position", pl.col("origin") == "synthetic", "index").drop("position")


def given_thresholds(spec: FilterSpec) -> dict[str, float]:
    """The thresholds the spec gives, by score (itm, itc)."""
    return {name: value for name in ("itm", "itc") if (value := getattr(spec, name)) is not None}


def calibrated_threshold(scores: list[float], keep: float) -> float:
    """The highest threshold that at least `keep` of the scores pass (a pair passes at score >= threshold)."""
    ordered = sorted(scores)
    return ordered[math.floor((1 - keep) * len(ordered) + 1e-9)]


def decide(itm: float | None, itc: float | None, thresholds: dict[str, float]) -> tuple[bool, str | None]:
    """Kept when every threshold passes; else the reason, e.g. capfilt:itm=0.12<0.50 (capfilt:itm=2.1e-04<1.3e-03
    where the threshold is below 0.01)."""
    failed = []
    for name, score in (("itm", itm), ("itc", itc)):
        limit = thresholds.get(name)
        if limit is not None and score < limit:
            form = ".2f" if abs(limit) >= 0.01 else ".1e"
            failed.append(f"{name}={score:{form}}<{limit:{form}}")
    return not failed, ("capfilt:" + ",".join(failed)) if failed else None


def held_out_pairs(index: pl.DataFrame, manifest: pl.DataFrame, spec: CapfiltSpec) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The calibration source's held-out (split val) rows and their (image, caption) pairs."""
    source = spec.filter.calibrate.source
    rows = index.filter((pl.col("split") == "val") & (pl.col("source") == source))
    if rows.height == 0:
        raise UserError(
            f"capfilt.filter.calibrate.source: data artifact {spec.data!r} has no held-out (split val) rows of "
            f"source {source!r} to calibrate the thresholds on"
        )
    return rows, candidate_pairs(rows, manifest, None).select("key", "source", "index", "caption")


def _score_jobs(pairs: pl.DataFrame, rows: pl.DataFrame, batch_size: int) -> list[dict]:
    """Score jobs for every caption of `pairs`, batched by image in the order of `rows`."""
    texts = pairs.group_by("key", maintain_order=True).agg("caption")
    by_key = dict(zip(texts["key"].to_list(), texts["caption"].to_list(), strict=True))
    wanted = rows.filter(pl.col("key").is_in(list(by_key)))
    return [
        {"op": "score", "images": _where(part, "image"), "texts": [by_key[k] for k in part["key"]]}
        for part in batches(wanted, batch_size)
    ]


def _flat(answers: list[dict], score: str) -> list[float]:
    return [v for a in answers for group in a[score] for v in group]


def judge(
    pairs: pl.DataFrame,
    rows: pl.DataFrame,
    ctx: StageContext,
    folder: Path,
    label: str,
    held: tuple[pl.DataFrame, pl.DataFrame] | None = None,
) -> tuple[pl.DataFrame, dict[str, float], pl.DataFrame | None]:
    """Scores and decisions for the pairs whose origin is in apply_to; the others are kept as they are,
    but for empty synthetic captions (removed, reason capfilt:empty-caption). held: the held-out
    clean rows and pairs that calibrate the thresholds (scored in the same actor pool).
    Returns the pairs, the thresholds in force and the held-out pairs with their scores."""
    spec = ctx.config
    empty = (pairs["origin"] == "synthetic") & (pairs["caption"].str.strip_chars() == "")
    judged = pairs["origin"].is_in(spec.apply_to) & ~empty
    jobs = _score_jobs(pairs.filter(judged), rows, spec.resources.batch_size)
    held_jobs = _score_jobs(held[1], held[0], spec.resources.batch_size) if held is not None else []
    answers = run_jobs(jobs + held_jobs, folder, ctx, "capfilt filter" + label)
    itm, itc = _flat(answers[: len(jobs)], "itm"), _flat(answers[: len(jobs)], "itc")
    thresholds, calibration = given_thresholds(spec.filter), None
    if held is not None:
        extra = answers[len(jobs) :]
        calibration = held[1].with_columns(
            itm=pl.Series(_flat(extra, "itm"), dtype=pl.Float64), itc=pl.Series(_flat(extra, "itc"), dtype=pl.Float64)
        )
        keep = spec.filter.calibrate.keep
        thresholds = {name: calibrated_threshold(calibration[name].to_list(), keep) for name in thresholds}
        calibration = calibration.with_columns(
            passed=pl.all_horizontal([pl.col(name) >= value for name, value in thresholds.items()])
        )
    scored = [decide(m, c, thresholds) for m, c in zip(itm, itc, strict=True)]
    scores = pl.DataFrame(
        {"itm": itm, "itc": itc, "kept": [s[0] for s in scored], "reason": [s[1] for s in scored]},
        schema={"itm": pl.Float64, "itc": pl.Float64, "kept": pl.Boolean, "reason": pl.String},
    )
    judged_rows = pairs.filter(judged).with_columns(scores).with_columns(judged=pl.lit(True))
    passed = pairs.filter(~judged).with_columns(
        itm=pl.lit(None, dtype=pl.Float64),
        itc=pl.lit(None, dtype=pl.Float64),
        kept=~empty.filter(~judged),  # a captioner that wrote nothing: removed unscored
        reason=pl.when(empty.filter(~judged)).then(pl.lit("capfilt:empty-caption")),
        judged=pl.lit(False),
    )
    order = pairs.select("key", "origin", "index").with_row_index("position")
    out = pl.concat([judged_rows, passed], how="diagonal").join(order, on=["key", "origin", "index"])
    return out.sort("position").select(list(PAIR_SCHEMA)).cast(PAIR_SCHEMA), thresholds, calibration


def quality(pairs: pl.DataFrame) -> dict[str, float]:
    """Counts per origin and, where the data knows the truth, how well the filter found the bad pairs."""
    metrics: dict[str, float] = {}
    for origin in ("web", "synthetic"):
        part = pairs.filter(pl.col("origin") == origin)
        metrics[f"kept_{origin}"] = float(part["kept"].sum())
        metrics[f"removed_{origin}"] = float((~part["kept"]).sum())
    web = pairs.filter((pl.col("origin") == "web") & pl.col("judged") & pl.col("corrupted").is_not_null())
    if web.height:
        metrics |= detection(web["corrupted"].to_numpy(), (~web["kept"]).to_numpy(), "filter")
        for score in ("itm", "itc"):
            if score in web.columns and web[score].null_count() == 0:
                auc = ranking_auc(web["corrupted"].to_numpy(), web[score].to_numpy())
                if auc is not None:
                    metrics[f"filter_{score}_auc"] = auc
        metrics["web_noise_before"] = float(web["corrupted"].mean())
        kept = web.filter(pl.col("kept"))
        metrics["web_noise_after"] = float(kept["corrupted"].mean()) if kept.height else 0.0
    synthetic = pairs.filter((pl.col("origin") == "synthetic") & pl.col("judged") & pl.col("correct").is_not_null())
    if synthetic.height:
        metrics |= detection((~synthetic["correct"]).to_numpy(), (~synthetic["kept"]).to_numpy(), "filter_synthetic")
    return metrics


def ranking_auc(bad: np.ndarray, score: np.ndarray) -> float | None:
    """P(a good pair scores above a bad one), ties counting half: how well the score ranks the pairs
    whatever the threshold (0.5 is chance). None when either class is empty."""
    good = ~bad.astype(bool)
    n_good, n_bad = int(good.sum()), int((~good).sum())
    if not n_good or not n_bad:
        return None
    ranks = pl.Series(score).rank("average").to_numpy()
    return float((ranks[good].sum() - n_good * (n_good + 1) / 2) / (n_good * n_bad))


def detection(bad: np.ndarray, removed: np.ndarray, prefix: str) -> dict[str, float]:
    """Precision, recall and F1 of `removed` as a detector of `bad` (both boolean arrays)."""
    hits = float(np.sum(bad & removed))
    precision = hits / removed.sum() if removed.sum() else 1.0
    recall = hits / bad.sum() if bad.sum() else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {f"{prefix}_precision": precision, f"{prefix}_recall": recall, f"{prefix}_f1": f1}


def _write_one_shard(unit: dict, root: Path, out: Path) -> tuple[str, str, int]:
    """Copy each sample's image and JSON from its input shard, with the JSON's captions replaced."""
    samples = []
    for s in unit["samples"]:
        record = json.loads(read_member(root / s["shard"], s["json_offset"], s["json_size"]))
        record.update(s["update"])
        image = read_member(root / s["shard"], s["image_offset"], s["image_size"])
        samples.append({"__key__": s["key"], s["ext"]: image, "json": record})
    sha, size = write_shard(out / "shards" / unit["name"], samples)
    return unit["name"], sha, size


def run_filter(ctx: StageContext) -> StageResult:
    spec, round_ = ctx.config, ctx.config.round
    data = ctx.inputs["data"].path
    index = build_index(data, ctx.store.root)
    manifest = pl.read_parquet(data / "manifest.parquet")
    rows = scope(index, spec)
    if rows.height == 0:
        raise UserError(f"capfilt: data artifact {spec.data!r} has no training rows to filter")
    captions = pl.read_parquet(ctx.inputs["captions"].path / "captions.parquet") if "captions" in ctx.inputs else None
    held = held_out_pairs(index, manifest, spec) if spec.filter.calibrate is not None else None
    folder = model_folder(spec.filter.model, ctx, "filter")
    try:
        candidates = candidate_pairs(rows, manifest, captions)
        pairs, thresholds, calibration = judge(candidates, rows, ctx, folder, _round_label(round_), held)
    finally:
        _drop_download(ctx)
    pairs.write_parquet(ctx.out / "pairs.parquet")
    artifacts = ["pairs.parquet", "quarantine.parquet", "shards.parquet", "report.json", "scores.png", "examples.png"]
    metrics = {f"filter_{name}_threshold": value for name, value in thresholds.items()}
    if calibration is not None:
        calibration.write_parquet(ctx.out / "calibration.parquet")
        artifacts.append("calibration.parquet")
        metrics |= {
            "calibration_pairs": float(calibration.height),
            "calibration_kept": float(calibration["passed"].mean()),
        }

    kept = (
        pairs.filter(pl.col("kept"))
        .group_by("key", maintain_order=True)
        .agg(
            pl.col("caption").alias("kept_captions"),
            (pl.col("origin") == "web").and_(pl.col("corrupted").fill_null(False)).any().alias("kept_corrupted"),
        )
    )
    judged_keys = set(rows["key"].to_list())
    out_index = index.filter(~pl.col("key").is_in(judged_keys) | pl.col("key").is_in(kept["key"].to_list()))
    prefix = ctx.store.relative(ctx.store.path(ctx.name, ctx.digest)) + "/shards/"
    out_manifest = _output_manifest(manifest, out_index, kept, ctx, prefix)
    shard_rows = _write_shards(out_index, out_manifest, pairs, ctx, prefix)

    removed = pairs.filter(~pl.col("kept")).select(
        pl.format("{}#{}{}", "key", "origin", "index").alias("key"),
        "source",
        "reason",
        pl.col("caption").alias("detail"),
    )
    emptied = rows.filter(~pl.col("key").is_in(kept["key"].to_list())).select(
        "key", "source", pl.lit("capfilt:no-caption-kept").alias("reason"), pl.lit("").alias("detail")
    )
    quarantine = pl.concat([removed, emptied]).cast(QUARANTINE_SCHEMA)
    write_tables(ctx.out, out_manifest, quarantine, shard_rows)

    metrics |= quality(pairs) | {"images_in": float(index.height), "images_out": float(out_manifest.height)}
    metrics["pairs_judged"] = float(pairs["judged"].sum())
    (ctx.out / "report.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    report.write_histograms(pairs, spec.apply_to, thresholds, ctx.out / "scores.png")
    report.write_examples(pairs, index, ctx.store.root, ctx.out / "examples.png")
    by_reason = Counter(r.split("=")[0] for r in quarantine["reason"].to_list())
    return StageResult(
        rows_in=pairs.height,
        rows_out=int(pairs["kept"].sum()),
        rows_quarantined=int((~pairs["kept"]).sum()),
        metrics=metrics,
        artifacts=artifacts,
        details={"filter": str(folder), "quarantine_by_reason": dict(by_reason), "images_out": out_manifest.height},
    )


def _output_manifest(
    manifest: pl.DataFrame, out_index: pl.DataFrame, kept: pl.DataFrame, ctx: StageContext, prefix: str
) -> pl.DataFrame:
    """The input's manifest rows of the output images, captions replaced where CapFilt judged them."""
    size = ctx.config.shard_size
    position = out_index.select("key").with_row_index("position")
    rows = manifest.join(position, on="key").sort("position").join(kept, on="key", how="left")
    captions = pl.coalesce("kept_captions", "captions")
    return rows.with_columns(
        shard=pl.format(prefix + "capfilt-{}.tar", (pl.col("position") // size).cast(pl.String).str.zfill(6)),
        captions=captions,
        caption=captions.list.first(),
        n_captions=captions.list.len().cast(pl.Int32),
        caption_chars=captions.list.first().str.len_chars().cast(pl.Int32),
        caption_corrupted=pl.when(pl.col("kept_captions").is_null())
        .then(pl.col("caption_corrupted"))
        .otherwise(pl.col("kept_corrupted")),
    ).select(manifest.columns)


def _write_shards(
    out_index: pl.DataFrame, out_manifest: pl.DataFrame, pairs: pl.DataFrame, ctx: StageContext, prefix: str
) -> pl.DataFrame:
    judged = pairs.group_by("key", maintain_order=True).agg(
        pl.struct("caption", "origin", "itm", "itc", "kept").alias("capfilt")
    )
    capfilt = dict(zip(judged["key"], judged["capfilt"].to_list(), strict=True))
    located = out_index.join(out_manifest.select("key", pl.col("shard").alias("out"), "captions", "ext"), on="key")
    units: dict[str, dict] = {}
    for r in located.iter_rows(named=True):
        name = Path(r["out"]).name
        update = {"captions": r["captions"]} | ({"capfilt": capfilt[r["key"]]} if r["key"] in capfilt else {})
        sample = {k: r[k] for k in ("key", "shard", "image_offset", "image_size", "json_offset", "json_size", "ext")}
        units.setdefault(name, {"name": name, "samples": []})["samples"].append(sample | {"update": update})
    written = []  # copying bytes: the driver does it (Ray workers would first import the model code)
    with Progress("capfilt shards", len(units), mode=ctx.progress) as bar:
        for unit in units.values():
            written.append(_write_one_shard(unit, ctx.store.root, ctx.out))
            bar.update()
    return pl.DataFrame(
        [{"shard": prefix + name, "sha256": sha, "bytes": size, "samples": len(units[name]["samples"])}
         for name, sha, size in written],
        schema=SHARDS_SCHEMA,
        orient="row",
    )  # fmt: skip


def _round_label(round_: int) -> str:
    return "" if round_ == 1 else f" (round {round_})"
