"""A training stage of the recipe: Ray Train TorchTrainer over the stage's data, then held-out checks.

Inputs: `tokenizer`, the data (`data` for one artifact; `data.NAME` for each artifact of a
mixture) and, unless the stage starts fresh, `init` (the stage it starts from). Output
folder: `model/` (plain safetensors + vlmflow_model.json, LoRA merged), `checkpoints/step-N/`
(resumable state), `history.jsonl` (per-step metrics), `train_rows.parquet` (the mixture's
components stacked: what positions index), `mixture.json` (resolved counts),
`unused.parquet` (data, key, reason for every input row never trained on) and `eval.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from tokenizers import Tokenizer

from vlmflow.chat import ChatFormat
from vlmflow.components.train import data_inputs, evaluate, mixture
from vlmflow.components.train.data import Collator, ImageSpec, ShardSamples, TextCodec, split_rows
from vlmflow.components.train.interleaved import InterleavedCodec, is_flamingo
from vlmflow.components.train.loop import WorkerConfig, memory_of, train_worker
from vlmflow.components.train.overflow import split_too_long, stage_chat, with_too_long
from vlmflow.components.train.setup import read_model_folder
from vlmflow.errors import StageError, UserError
from vlmflow.models.vision import image_spec
from vlmflow.samples import build_index
from vlmflow.specs.recipe import Recipe
from vlmflow.specs.train import TrainStageSpec
from vlmflow.stage import HISTORY, ModelRegistration, Outputs, StageContext, StageResult

EVAL_SPLITS = ("val", "test")


def mixture_rows(indexes: dict[str, pl.DataFrame], spec: TrainStageSpec) -> list[pl.DataFrame]:
    """Each component's training rows (split train, usable in its format), tagged with it."""
    parts = []
    for j, c in enumerate(spec.components()):
        rows = split_rows(indexes[c.data], "train", c.format or spec.format)
        if c.sources is not None:
            rows = rows.filter(pl.col("source").is_in(c.sources))
        parts.append(rows.with_columns(data=pl.lit(c.data), component=pl.lit(j)))
    return parts


def sources_read(spec: TrainStageSpec) -> dict[str, list[str] | None]:
    """Data artifact -> the sources its components read (None: all)."""
    read: dict[str, list[str] | None] = {}
    for c in spec.components():
        if c.data in read and (read[c.data] is None or c.sources is None):
            read[c.data] = None
        else:
            read[c.data] = sorted(set(read.get(c.data) or []) | set(c.sources)) if c.sources else None
    return read


def accounting(
    indexes: dict[str, pl.DataFrame], table: pl.DataFrame, used: np.ndarray, sources: dict[str, list[str] | None]
) -> pl.DataFrame:
    """Every input row no optimizer step trains on (data, key, reason)."""
    drawn = table[used].select("data", "key").unique()
    usable = table.select("data", "key", "format").group_by("data", "key").agg(pl.col("format").unique())
    frames = []
    for name, index in indexes.items():
        wanted = sources.get(name)
        rows = (
            index.select("key", "split", "source")
            .with_columns(data=pl.lit(name))
            .join(drawn, on=["data", "key"], how="anti")
            .join(usable, on=["data", "key"], how="left")
        )
        formats = ", ".join(sorted(table.filter(pl.col("data") == name)["format"].unique().to_list()))
        frames.append(
            rows.select(
                "data",
                "key",
                pl.when(pl.col("split") != "train")
                .then(pl.format("held out: split {}", pl.col("split")))
                .when(pl.lit(wanted is not None) & ~pl.col("source").is_in(wanted or []))
                .then(pl.format("source {} is not among the stage's sources", pl.col("source")))
                .when(pl.col("format").is_null())
                .then(pl.lit(f"nothing to train on for format {formats}"))
                .otherwise(pl.lit("not drawn by the mixture in any step"))
                .alias("reason"),
            )
        )
    return pl.concat(frames)


def run(ctx: StageContext) -> StageResult:
    recipe, spec, field, register = ctx.recipe, ctx.config, ctx.field, ctx.register
    where = f"{field[0]}[{field[1]}] ({spec.name})"  # stages[1] (captioner), stages[1] (captioner-r2)
    indexes = {name: build_index(ctx.inputs[key].path, ctx.store.root) for key, name in data_inputs(spec).items()}
    parts = mixture_rows(indexes, spec)
    chat = stage_chat(ctx.inputs["tokenizer"].path, spec)
    too_long = pl.DataFrame(schema={"data": pl.String, "key": pl.String, "reason": pl.String})
    if spec.overflow == "quarantine" and "lm" in {o.kind for o in spec.objectives}:
        tokenizer = ctx.inputs["tokenizer"].path
        special = vocab_of(tokenizer)["special"]
        codec = TextCodec(tokenizer / "tokenizer.json", special, 1, spec.max_text_tokens, chat)
        parts, too_long = split_too_long(parts, ctx.store.root, codec, spec)
    try:
        resolved = mixture.resolve(spec, [p.height for p in parts])
    except mixture.MixtureError as exc:
        located = ".".join(str(f) for f in (*field, *exc.field))
        raise UserError(f"{located}: {exc.message}") from None
    if resolved.total < spec.batch_size:
        raise UserError(
            f"{where}: batch_size {spec.batch_size} is larger than the {resolved.total} training samples "
            f"per epoch of {', '.join(resolved.labels)}"
        )
    table = pl.concat(parts)
    table.write_parquet(ctx.out / "train_rows.parquet")
    (ctx.out / "mixture.json").write_text(json.dumps(resolved.as_dict(), indent=2))
    config = worker_config(
        recipe,
        spec,
        ctx.inputs["tokenizer"].path,
        ctx.out / "train_rows.parquet",
        ctx.store.root,
        ctx.out,
        init.path / "model" if (init := ctx.inputs.get("init")) else None,
        resolved,
    )
    used = mixture.used_positions(resolved, recipe.seed, spec.batch_size, config.total_steps)
    unused = accounting(indexes, table, used, sources_read(spec))
    unused = with_too_long(unused, too_long)
    unused.write_parquet(ctx.out / "unused.parquet")
    fit(config, recipe, f"{ctx.name}-{ctx.digest[:12]}", ctx.out / "ray")
    metrics = summarise(ctx.out) | mixture_metrics(resolved) | memory_of(ctx.out)
    metrics["rows_too_long"] = float(too_long.height)
    held_out = pl.concat(list(indexes.values())).unique("key", keep="first", maintain_order=True)
    metrics.update(held_out_checks(ctx.out, held_out, spec, config, ctx.store.root))
    (ctx.out / "eval.json").write_text(json.dumps(metrics, indent=2))
    details: dict = {
        "checkpoints": str(ctx.out / "checkpoints"),
        "steps": config.total_steps,
        "mixture": resolved.as_dict(),
    }
    artifacts = [
        "model/model.safetensors",
        "model/vlmflow_model.json",
        "model/tokenizer.json",
        HISTORY,
        "parameters.json",
        "eval.json",
        "mixture.json",
        "unused.parquet",
    ]
    models: tuple[ModelRegistration, ...] = ()  # what the run registers (its last training stage)
    if register:
        data_digest = ",".join(f"{name}={ctx.inputs[key].digest}" for key, name in data_inputs(spec).items())
        from vlmflow.components.mlflow_model import save as save_mlflow_model
        from vlmflow.components.mlflow_model import save_transformers

        tags = {
            "vlmflow.stage": spec.name,
            "vlmflow.data_digest": data_digest if len(indexes) > 1 else ctx.inputs["data"].digest,
            "vlmflow.tokenizer_digest": ctx.inputs["tokenizer"].digest,
            **{f"vlmflow.{k}": f"{v:.4g}" for k, v in metrics.items() if k.startswith("eval_")},
        }
        # What the registry serves: a pyfunc of vlmflow's own model (every model), and MLflow's
        # transformers flavor of the Hugging Face LLaVA export (a model that exports) as NAME-hf.
        save_mlflow_model(ctx.out / "model", ctx.out / "mlflow-model")
        registered = {"mlflow-model": recipe.name}
        if not save_transformers(ctx.out / "model", ctx.out / "mlflow-transformers"):
            registered["mlflow-transformers"] = f"{recipe.name}-hf"
        for folder in registered:
            artifacts += sorted(str(p.relative_to(ctx.out)) for p in (ctx.out / folder).rglob("*") if p.is_file())
        models = tuple(ModelRegistration(name, folder, tags) for folder, name in registered.items())
    rows_in = sum(index.height for index in indexes.values())
    return StageResult(
        rows_in=rows_in,
        rows_out=rows_in - unused.height,
        rows_quarantined=unused.height,
        set_aside="not trained on: unused.parquet",
        metrics=metrics,
        artifacts=artifacts,
        details=details,
        outputs=Outputs(history=HISTORY, models=models),
    )


def mixture_metrics(resolved: mixture.Resolved) -> dict[str, float]:
    metrics = {}
    for label, count, available in zip(resolved.labels, resolved.counts, resolved.available, strict=True):
        name = label.replace("/", "-")
        metrics[f"mixture/{name}/count"] = float(count)
        metrics[f"mixture/{name}/available"] = float(available)
    return metrics


def worker_config(
    recipe: Recipe,
    spec: TrainStageSpec,
    tokenizer: Path,
    index_file: Path,
    store_root: Path,
    out: Path,
    init: Path | None,
    resolved: mixture.Resolved,
) -> WorkerConfig:
    """What every Ray Train worker of a stage needs (JSON-able, sent to each worker)."""
    steps_per_epoch = resolved.total // spec.batch_size
    return WorkerConfig(
        model=recipe.model.model_dump(mode="json"),
        stage=spec.model_dump(mode="json"),
        vocab=vocab_of(tokenizer),
        image=image_spec(recipe.model.vision),
        seed=recipe.seed,
        tokenizer=str(tokenizer / "tokenizer.json"),
        index=str(index_file),
        store_root=str(store_root),
        out=str(out),
        init=str(init) if init else None,
        strategy=recipe.runtime.train.strategy,
        threads=recipe.runtime.train.cpus_per_worker,
        total_steps=spec.max_steps or spec.epochs * steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
        mixture=resolved.as_dict(),
        chat=chat.as_dict() if (chat := stage_chat(tokenizer, spec)) else None,
    )


def vocab_of(tokenizer: Path) -> dict:
    """Vocabulary size and special-token ids of a tokenizer stage's folder."""
    special = json.loads((tokenizer / "special_tokens.json").read_text())
    size = Tokenizer.from_file(str(tokenizer / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    return {"size": max(size, max(special.values()) + 1), "special": special}


def without_placement_group_cleaner(callbacks: list) -> list:
    """Ray Train's default callbacks less its PlacementGroupCleanerCallback: the one place vlmflow
    reaches into Ray's internals (tests/unit/test_train_trainer.py fails when they change).

    Ray Train 2.60 starts, for every run, a detached PlacementGroupCleaner actor that removes the
    workers' placement group should the Train controller die while the driver lives on. When the run
    ends the controller stops it and waits: the actor's monitor thread is inside a state-API call
    (`get_actor`, through the dashboard, up to GET_ACTOR_TIMEOUT_S = 10 s) and the stop waits up to
    12 s for it, logging a traceback when that runs out. On a 2-core machine that cost every training
    stage 13-18 s (benchmarks/train_overhead.py). Ray 2.60 has no public setting for it: the callback
    is added unconditionally in DataParallelTrainer._create_default_callbacks (not behind an env var
    like its metrics and state-tracking callbacks), its timeouts are module constants, and
    RunConfig(callbacks=...) and RAY_TRAIN_CALLBACKS can only add callbacks. Turning the dashboard off
    would make the state-API call fail fast, but takes the dashboard from users. In vlmflow the driver
    does not live on without its controller: a controller that dies fails its stage and the run, and
    every recipe run is one Ray job (`ray.shutdown()` when it ends), whose placement groups Ray removes
    then."""
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]


class Trainer(TorchTrainer):
    """Ray Train's TorchTrainer without its PlacementGroupCleaner (`without_placement_group_cleaner`)."""

    def _create_default_callbacks(self) -> list:
        return without_placement_group_cleaner(super()._create_default_callbacks())


def fit(config: WorkerConfig, recipe: Recipe, name: str, storage: Path) -> None:
    train_rt = recipe.runtime.train
    resources = {"CPU": train_rt.cpus_per_worker, **({"GPU": 1} if train_rt.use_gpu else {})}
    trainer = Trainer(
        train_worker,
        train_loop_config=config.__dict__,
        torch_config=TorchConfig(backend="nccl" if train_rt.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=train_rt.num_workers, use_gpu=train_rt.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=train_rt.max_failures),
        ),
    )
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    try:
        trainer.fit()
    except Exception as exc:  # Ray wraps worker errors in its own exception types
        raise StageError(name, f"training failed after {train_rt.max_failures} restarts: {exc}") from exc


def summarise(out: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (out / HISTORY).read_text().splitlines() if line.strip()]
    tail = rows[-min(10, len(rows)) :]
    metrics = {f"final_{k}": sum(r[k] for r in tail) / len(tail) for k in tail[0] if k.startswith("loss")}
    metrics["first_loss"] = rows[0]["loss"]
    metrics["mean_samples_per_s"] = sum(r["samples_per_s"] for r in rows) / len(rows)
    metrics["mean_tokens_per_s"] = sum(r["tokens_per_s"] for r in rows) / len(rows)
    counts = json.loads((out / "parameters.json").read_text())
    metrics.update({f"params_{k}": float(v) for k, v in counts.items()})
    return metrics


def held_out_checks(out: Path, index: pl.DataFrame, spec: TrainStageSpec, config: WorkerConfig, root: Path) -> dict:
    split = next((s for s in EVAL_SPLITS if index.filter(pl.col("split") == s).height), None)
    if split is None or spec.eval_samples == 0:
        return {}
    model, saved = read_model_folder(out / "model")
    model.eval()
    image = ImageSpec.of(saved["image"])
    chat = ChatFormat.of(config.chat) if config.chat else None  # held-out samples are scored: a long one is cut
    special, tokens = saved["vocab"]["special"], model.num_image_tokens
    codec = TextCodec(Path(config.tokenizer), special, tokens, spec.max_text_tokens, chat, "truncate")
    if is_flamingo(model.spec):  # interleaved samples, as the stage trained on them
        codec = InterleavedCodec(Path(config.tokenizer), special, spec.max_text_tokens)
    kinds = {o.kind for o in spec.objectives}
    metrics: dict[str, float] = {}
    if kinds & {"itc", "siglip", "itm"}:
        samples = ShardSamples.split(index, root, split, "caption")
        collate = Collator(samples, image, codec, spec.prompt, model.spec.text.max_length)
        positions = evaluate.held_out(samples, spec.eval_samples)
        metrics.update(evaluate.contrastive_metrics(model, collate, positions, "itm" in kinds))
    if "lm" in kinds:
        qa = ShardSamples.split(index, root, split, "qa")
        metrics.update(evaluate.vqa_metrics(model, qa, list(range(len(qa))), codec, image, spec.eval_samples))
        if "caption" in {c.format or spec.format for c in spec.components()}:
            caps = ShardSamples.split(index, root, split, "caption")
            positions = evaluate.held_out(caps, min(spec.eval_samples, 32))
            metrics.update(evaluate.caption_metrics(model, caps, positions, codec, image, spec.prompt))
    return metrics
