"""`vlmflow plan` for a training step: mixture counts, steps, parameters per module (the model
built on the meta device), peak memory per worker (`vlmflow.models.estimate`) against the memory
it may use, FLOPs and time per step; a step that does not fit gets the changes that would make it
fit, each with the memory it would need (the train component's `plan` hook)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import polars as pl
from tokenizers import Tokenizer

from vlmflow.artifacts import ArtifactStore
from vlmflow.components.tokenize import own_tokenizer
from vlmflow.components.train import data_inputs, mixture
from vlmflow.components.train.stage import vocab_of
from vlmflow.errors import UserError
from vlmflow.models.estimate import Trace, footprint, trace_stage
from vlmflow.models.vision import image_spec
from vlmflow.models.vlm import Vocab
from vlmflow.plan import GIB, PlanContext, PlanError, count_text, duration_text
from vlmflow.specs.recipe import PretrainedTokenizer, Recipe
from vlmflow.specs.train import LoraSpec, TrainStageSpec


def plan_step(step: object, ctx: PlanContext) -> TrainingPlan:
    """The plan of a training step (the train component's `plan` hook)."""
    return TrainingPlan(train_plan(ctx.recipe, step, ctx))


@dataclass(frozen=True)
class TrainingPlan:
    """A training step's plan (a `vlmflow.plan.StepPlan`): `details` is what `train_plan` found,
    as `vlmflow plan --json` prints it under `train`."""

    details: dict

    def as_json(self) -> dict:
        return self.details

    def problems(self, stage: str, device: dict) -> list[PlanError]:
        train, found = self.details, []
        if train["problem"]:
            found.append(PlanError(tuple(train["problem"]["field"]), train["problem"]["message"]))
        if train.get("fits") is False:
            found.append(PlanError((*train["field"], "micro_batch_size"), self.memory_message(stage, device)))
        return found

    def memory_message(self, stage: str, device: dict) -> str:
        need, limit = self.details["memory"], device["memory_per_worker_gb"]
        over = need["total_gb"] - limit
        parts = ", ".join(f"{k.removesuffix('_gb')} {v:.2f}" for k, v in need.items() if k != "total_gb")
        fixes = "; ".join(f"{f['change']} -> {f['need_gb']:.2f} GiB" for f in self.details["fixes"] if f["fits"])
        return (
            f"{stage} needs about {need['total_gb']:.2f} GiB per worker ({parts}), {over:.2f} GiB "
            f"({over / limit:.0%}) more than the {limit:.2f} GiB it may use ({device['memory_source']}). "
            + (f"Would fit: {fixes}." if fixes else "No single change fits; combine them or add workers with FSDP.")
        )

    def tracked(self) -> dict[str, float]:
        """The predicted memory and compute, logged beside the measured worker_rss_* (plan/...)."""
        if "memory" not in self.details:
            return {}
        return {
            "plan_memory_gb": self.details["memory"]["total_gb"],
            "plan_flops_per_step": float(self.details["flops_per_step"]),
        }

    def lines(self, stage: str) -> list[str]:
        train = self.details
        lines = [f"{stage}:"]
        if train["mixture"]:
            mix = train["mixture"]
            parts = ", ".join(
                f"{label} {count} of {available}"
                for label, count, available in zip(mix["labels"], mix["counts"], mix["available"], strict=True)
            )
            lines.append(f"  data: {parts} per epoch ({train['mixture_source']})")
        else:
            lines.append(f"  data: {train['mixture_source']}")
        if train["problem"]:
            field = ".".join(str(f) for f in train["problem"]["field"])
            lines.append(f"  PROBLEM {field}: {train['problem']['message']}")
        if "unknown" in train:
            return [*lines, f"  model: not estimated: {train['unknown']}"]
        trace = train["trace"]
        params = trace["params"]
        modules = [k.removesuffix("_total") for k in params if k.endswith("_total") and params[k]]
        steps = train["steps"] if train["steps"] is not None else "?"
        lines.append(
            f"  steps {steps}, micro-batch {trace['micro_batch']} x {train['accumulation']} accumulation, "
            f"{trace['sequence']} tokens per sample ({trace['image_tokens']} image)"
            + (", activation checkpointing" if train.get("activation_checkpointing") else "")
        )
        counts = ", ".join(
            f"{m} {count_text(params[f'{m}_total'])} ({count_text(params[f'{m}_trainable'])} trainable)"
            for m in modules
        )
        lines.append(
            f"  parameters: {counts}; total {count_text(params['total'])}, trainable {count_text(params['trainable'])}"
        )
        memory = train["memory"]
        parts = ", ".join(f"{k.removesuffix('_gb')} {v:.3f}" for k, v in memory.items() if k != "total_gb")
        verdict = {True: "fits", False: "DOES NOT FIT", None: "limit unknown"}[train["fits"]]
        lines.append(f"  memory per worker: {memory['total_gb']:.3f} GiB [{verdict}] = {parts}")
        hours = f", {duration_text(train['hours'] * 3600)} for the stage" if train["hours"] is not None else ""
        flops, seconds = train["flops_per_step"], train["seconds_per_step"]
        lines.append(f"  compute: {flops:.3g} FLOPs per step, {seconds:.3g} s per step{hours}")
        for fix in train.get("fixes", []):
            lines.append(f"  {'fix' if fix['fits'] else 'not enough'}: {fix['change']} -> {fix['need_gb']:.2f} GiB")
        return lines


def plan_vocab(tokenizer: object, store: ArtifactStore, digests: dict[str, str]) -> tuple[Vocab, str]:
    """The tokenizer's vocabulary: exact once its step (`tokenizer`, a Step) is cached, else from its config."""
    spec, name = tokenizer.config, tokenizer.name
    if store.is_complete(name, digests[name]):
        vocab = vocab_of(store.path(name, digests[name]))
        return Vocab(vocab["size"], vocab["special"]), "tokenizer stage"
    if isinstance(spec, PretrainedTokenizer) and spec.special_tokens is None:
        return own_vocab(spec)
    if isinstance(spec, PretrainedTokenizer):
        file = spec.path / "tokenizer.json" if spec.path.is_dir() else spec.path
        if file.is_file():
            size, source = Tokenizer.from_file(str(file)).get_vocab_size(with_added_tokens=True), str(file)
        else:
            config = (
                json.loads((spec.path / "config.json").read_text()) if (spec.path / "config.json").is_file() else {}
            )
            size, source = config.get("vocab_size", 32000), "language config" if config else "assumed 32000"
        size += len(spec.special_tokens)
    else:
        size, source = spec.vocab_size, "tokenizer.vocab_size"
    special = {token: size - len(spec.special_tokens) + i for i, token in enumerate(spec.special_tokens)}
    return Vocab(size, special), source


def own_vocab(spec: PretrainedTokenizer) -> tuple[Vocab, str]:
    """A language model's own tokenizer (and an image token): read when its folder is there, else
    the size in its config.json and Llama's ids (unk 0, bos 1, eos 2) plus `<image>`."""
    if spec.path.is_dir() and any(spec.path.glob("tokenizer*")):
        tokenizer, special, _ = own_tokenizer(spec.path)
        return Vocab(tokenizer.get_vocab_size(with_added_tokens=True), special), str(spec.path)
    config = json.loads((spec.path / "config.json").read_text()) if (spec.path / "config.json").is_file() else {}
    size, source = config.get("vocab_size", 32000), "language config" if config else "assumed 32000"
    return Vocab(size + 1, {"<unk>": 0, "<pad>": 0, "<bos>": 1, "<eos>": 2, "<image>": size}), source


def train_plan(recipe: Recipe, step: object, ctx: PlanContext) -> dict:
    """`step.field` (stages, N): where its settings are (a CapFilt round's stage inherits its stage's)."""
    train, spec, field, device = recipe.runtime.train, step.config, step.field, ctx.device
    out: dict = {"field": list(field)}
    out["mixture"], out["mixture_source"], out["problem"] = _mixture(step, ctx)
    try:
        vocab, out["vocab_source"] = plan_vocab(ctx.steps[step.inputs["tokenizer"]], ctx.store, ctx.digests)
        image = image_spec(recipe.model.vision)["size"]
        trace = trace_stage(recipe.model, vocab, spec, image, spec.micro_batch_size)
    except UserError as exc:  # a local model folder that is not there (yet): no shapes to go on
        out["unknown"] = str(exc)
        return out
    out["vocab"], out["trace"] = vocab.size, trace.as_dict()
    per_epoch = sum(out["mixture"]["counts"]) if out["mixture"] else None
    out["steps"] = spec.max_steps or (spec.epochs * (per_epoch // spec.batch_size) if per_epoch else None)
    accumulation = spec.batch_size // (train.num_workers * spec.micro_batch_size)
    out["accumulation"] = accumulation
    out["activation_checkpointing"] = spec.activation_checkpointing
    flops = trace.step_flops(spec.activation_checkpointing)  # the recomputed blocks' forward included
    out["flops_per_step"] = flops * accumulation * train.num_workers
    seconds = flops * accumulation / (device["tflops_per_worker"] * 1e12)
    out["seconds_per_step"] = seconds
    out["hours"] = seconds * out["steps"] / 3600 if out["steps"] else None
    need = memory_need(trace, spec, recipe, device)
    out["memory"] = need
    limit = device["memory_per_worker_gb"]
    out["fits"] = None if limit is None else need["total_gb"] <= limit
    if out["fits"] is False:
        out["fixes"] = fixes(recipe, spec, vocab, image, trace, device)
    return out


def memory_need(trace: Trace, spec: TrainStageSpec, recipe: Recipe, device: dict, **change) -> dict:
    train = recipe.runtime.train
    micro = change.get("micro", spec.micro_batch_size)
    parts = footprint(
        trace,
        change.get("precision", spec.precision),
        change.get("strategy", train.strategy),
        train.num_workers,
        micro,
        spec.batch_size // (train.num_workers * micro),
        checkpointing=change.get("checkpointing", spec.activation_checkpointing),
    ).as_dict()
    gb = {f"{k}_gb": v / GIB for k, v in parts.items() if k != "total"}
    gb["runtime_gb"] = device["runtime_overhead_gb"]
    gb["total_gb"] = parts["total"] / GIB + device["runtime_overhead_gb"]
    return gb


def fixes(recipe: Recipe, spec: TrainStageSpec, vocab: Vocab, image: int, trace: Trace, device: dict) -> list[dict]:
    """Changes that bring the stage under its memory, smallest need first, each with its need: only
    changes the target device runs (bf16 on a GPU only)."""
    train = recipe.runtime.train
    limit = device["memory_per_worker_gb"]
    found = []
    if not spec.activation_checkpointing:
        need = memory_need(trace, spec, recipe, device, checkpointing=True)["total_gb"]
        found.append({"change": "activation_checkpointing: true", "need_gb": need})
    # bf16 autocast halves activations; on a CPU it is not offered: its matmuls run in bf16 at speed only
    # on CPUs with bf16 instructions (AVX512-BF16, AMX), and the plan's time is measured in fp32.
    if spec.precision == "fp32" and device["kind"] == "gpu":
        need = memory_need(trace, spec, recipe, device, precision="bf16")["total_gb"]
        found.append({"change": "precision: bf16", "need_gb": need})
    per_worker = spec.batch_size // train.num_workers
    for micro in sorted((m for m in range(1, spec.micro_batch_size) if per_worker % m == 0), reverse=True):
        need = memory_need(trace, spec, recipe, device, micro=micro)["total_gb"]
        if need <= limit:
            found.append({"change": f"micro_batch_size: {micro} (accumulate {per_worker // micro})", "need_gb": need})
            break
    if train.strategy == "ddp" and train.num_workers > 1:
        need = memory_need(trace, spec, recipe, device, strategy="fsdp")["total_gb"]
        found.append({"change": "runtime.train.strategy: fsdp", "need_gb": need})
    variants = []
    if spec.lora is None and "language" in spec.trainable:
        trainable = [p for p in spec.trainable if p != "language"] or ["connector"]
        variants.append(("lora: {module: language} (language frozen)", {"lora": LoraSpec(), "trainable": trainable}))
    for part in spec.trainable if len(spec.trainable) > 1 else []:
        variants.append((f"trainable without {part}", {"trainable": [p for p in spec.trainable if p != part]}))
    for label, update in variants:
        variant = spec.model_copy(update=update)
        traced = trace_stage(recipe.model, vocab, variant, image, spec.micro_batch_size)
        found.append({"change": label, "need_gb": memory_need(traced, variant, recipe, device)["total_gb"]})
    for fix in found:
        fix["fits"] = fix["need_gb"] <= limit
    return sorted(found, key=lambda f: (not f["fits"], f["need_gb"]))


def _mixture(step: object, ctx: PlanContext) -> tuple:
    """(resolved counts, where they come from, a located problem or None)."""
    spec, name, store, digests, rows, by_source = step.config, step.name, ctx.store, ctx.digests, ctx.rows, ctx.sources
    resolved = store.path(name, digests[name]) / "mixture.json"
    if store.is_complete(name, digests[name]) and resolved.is_file():
        return json.loads(resolved.read_text()), "stage artifact", None
    available, source = [], "artifact manifests (train split)"
    ports = {artifact: port for port, artifact in data_inputs(spec).items()}
    for component in spec.components():
        artifact = step.inputs[ports[component.data]]
        if store.is_complete(artifact, digests[artifact]):
            manifest = pl.read_parquet(
                store.path(artifact, digests[artifact]) / "manifest.parquet", columns=["split", "source"]
            )
            train = manifest.filter(pl.col("split") == "train")
            if component.sources is not None:
                train = train.filter(pl.col("source").is_in(component.sources))
            available.append(train.height)
        elif rows.get(artifact) is not None:
            subset = sum(by_source.get(s, 0) for s in component.sources) if component.sources else None
            available.append(rows[artifact] if subset is None else min(subset, rows[artifact]))
            source = "estimated from the sources (all rows, before splits and filters)"
        else:
            return None, "unknown until the data stages run", None
    try:
        return mixture.resolve(spec, available).as_dict(), source, None
    except mixture.MixtureError as exc:
        return None, source, {"field": [*step.field, *exc.field], "message": exc.message}
