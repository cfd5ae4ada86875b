"""`vlmflow plan`: what a recipe will do and cost, before anything heavy runs.

Walks the same stage graph `vlmflow run` executes and computes every stage's digest, so
it knows what the artifact store already holds (cached) and what would run. Row counts
come from cached artifacts, or are estimated from the sources' listings. Each training
stage gets its mixture counts, steps, parameters per module (model built on the meta
device), peak memory per worker (`vlmflow.models.estimate`) against the memory it may use,
and FLOPs and time per step at a stated throughput. A stage that does not fit gets the
changes that would make it fit, each with the memory it would need.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import polars as pl
import psutil
import torch
from tokenizers import Tokenizer

from vlmflow.artifacts import ArtifactStore, stage_digest
from vlmflow.components.ingest import plan_units
from vlmflow.components.train import mixture
from vlmflow.components.train.stage import stage_name, vocab_of
from vlmflow.errors import UserError
from vlmflow.graph import artifact_stage, recipe_graph
from vlmflow.models.estimate import Trace, footprint, trace_stage
from vlmflow.models.vision import image_spec
from vlmflow.models.vlm import Vocab
from vlmflow.specs.recipe import PretrainedTokenizer, Recipe
from vlmflow.specs.train import LoraSpec, TrainStageSpec

GIB = float(1 << 30)
# What a Ray Train CPU worker holds besides tensors: about 0.55 GiB resident when its loop
# starts (Python, torch, transformers, Ray, gloo) and about 0.1 GiB more once the first
# steps ran (allocator, oneDNN, thread pools); measured on the tiny twins (worker_rss_* metrics).
CPU_WORKER_RUNTIME = int(0.65 * GIB)
GPU_WORKER_RUNTIME = int(1.0 * GIB)  # assumed: CUDA context and kernels (no GPU measured it yet)
GPU_TFLOPS = 100.0


class PlanError(Exception):
    """A stage that cannot run as declared; `field` is the spec path to change."""

    def __init__(self, field: tuple, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def stage_digests(recipe: Recipe) -> dict[str, str]:
    """Every stage's digest, in graph order (the artifact a run would reuse or build), computed
    as `vlmflow run` does: from the stage's spec, its inputs' digests and its version."""
    digests: dict[str, str] = {}
    for node in recipe_graph(recipe):
        stage = node.stage
        inputs = [digests[node.inputs[k]] for k in sorted(node.inputs)]
        digests[stage.name] = stage_digest(stage.name, stage.spec(recipe), inputs, stage.version)
    return digests


def build_plan(recipe: Recipe, workdir: Path) -> dict:
    store = ArtifactStore(workdir.resolve() / "artifacts")
    device = device_of(recipe) | {"workers": workers_of(recipe)}
    digests = stage_digests(recipe)
    rows: dict[str, int | None] = {}
    by_source = source_rows(recipe)
    stages = []
    graph = recipe_graph(recipe)
    for node in graph:
        stage = node.stage
        digest = digests[stage.name]
        entry: dict = {"stage": stage.name, "digest": digest, "inputs": dict(node.inputs)}
        if store.is_complete(stage.name, digest):
            stats = store.stats(stage.name, digest)
            entry.update(status="cached", rows_in=stats["rows_in"], rows_out=stats["rows_out"], rows_exact=True)
        else:
            estimate = _rows_in(recipe, stage.name, node.inputs, rows, by_source)
            entry.update(status="runs", rows_in=estimate, rows_exact=False)
            entry["rows_out"] = entry["rows_in"] if stage.name in ("ingest", "instruct") else None
        rows[stage.name] = entry["rows_out"] if entry["rows_out"] is not None else entry["rows_in"]
        if stage.name.startswith("capfilt-filter") and entry["status"] == "runs":
            rows[stage.name] = rows.get(node.inputs["data"])  # its images (at most its input's): pairs are rows_in
        stages.append(entry)
    for node, entry in zip(graph, stages, strict=True):
        if node.train is not None:
            entry["train"] = train_plan(recipe, node.train, node.field, store, digests, rows, device, by_source)
    return {"recipe": recipe.name, "workdir": str(workdir.resolve()), "device": device, "stages": stages}


def source_rows(recipe: Recipe) -> dict[str, int]:
    """Rows per data source from the sources' listings (before splits and filters)."""
    found: dict[str, int] = {}
    for _, ctx, unit in plan_units(recipe):
        found[ctx.name] = found.get(ctx.name, 0) + unit.rows
    return found


def _rows_in(recipe: Recipe, name: str, inputs: dict[str, str], rows: dict, by_source: dict) -> int | None:
    """A stage's input rows, estimated: what `rows_in` of its run counts (CapFilt: the images of
    its sources it captions; the pairs, web and k synthetic per image, it judges)."""
    if name == "ingest":
        return sum(by_source.values())
    if name == "tokenizer":
        return None  # texts, known once listed
    if name.startswith("capfilt-"):
        spec = recipe.capfilt
        scope = sum(by_source.get(s, 0) for s in spec.sources) if spec.sources else rows.get(inputs["data"])
        per_image = 1 + (spec.captioner.k if spec.captioner and "captions" in inputs else 0)
        return None if scope is None else scope * (1 if name.startswith("capfilt-caption") else per_image)
    data = [rows.get(up) for key, up in inputs.items() if key not in ("tokenizer", "init")]
    if not name.startswith("train-"):
        data = [rows.get(inputs["data"])] if "data" in inputs else data[-1:]  # the most processed artifact
    return sum(data) if data and None not in data else None


def device_of(recipe: Recipe) -> dict:
    train = recipe.runtime.train
    if train.use_gpu:
        local = torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else None
        memory = train.memory_per_worker_gb or local
        return {
            "kind": "gpu",
            "memory_per_worker_gb": memory,
            "memory_source": "runtime.train.memory_per_worker_gb"
            if train.memory_per_worker_gb
            else ("local GPU" if local else "unknown: set runtime.train.memory_per_worker_gb"),
            "runtime_overhead_gb": GPU_WORKER_RUNTIME / GIB,
            "tflops_per_worker": train.tflops_per_worker or GPU_TFLOPS,
            "tflops_source": "runtime.train.tflops_per_worker" if train.tflops_per_worker else "assumed",
        }
    memory = train.memory_per_worker_gb or psutil.virtual_memory().total / GIB / train.num_workers
    return {
        "kind": "cpu",
        "memory_per_worker_gb": memory,
        "memory_source": "runtime.train.memory_per_worker_gb" if train.memory_per_worker_gb else "host RAM / workers",
        "runtime_overhead_gb": CPU_WORKER_RUNTIME / GIB,
        "tflops_per_worker": train.tflops_per_worker or cpu_tflops(train.cpus_per_worker),
        "tflops_source": "runtime.train.tflops_per_worker" if train.tflops_per_worker else "measured (fp32 matmul)",
    }


def workers_of(recipe: Recipe) -> dict:
    """What the training stages ask of Ray, and what a local Ray would have (None on a cluster:
    its resources are Ray's to schedule)."""
    train, ray_spec = recipe.runtime.train, recipe.runtime.ray
    needs = {"CPU": train.num_workers * train.cpus_per_worker, "GPU": train.num_workers if train.use_gpu else 0}
    if ray_spec.address or os.environ.get("RAY_ADDRESS"):
        return {"needs": needs, "local": None}
    cpus = ray_spec.num_cpus or os.cpu_count() or 1
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"needs": needs, "local": {"CPU": cpus, "GPU": gpus}}


def cpu_tflops(threads: int, seconds: float = 0.2) -> float:
    """fp32 matmul throughput of `threads` CPU threads: the ceiling a training step approaches."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(512, 512)
        a @ a
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            a @ a
            runs += 1
        return 2 * 512**3 * runs / (time.perf_counter() - started) / 1e12
    finally:
        torch.set_num_threads(before)


def plan_vocab(recipe: Recipe, store: ArtifactStore, digests: dict[str, str]) -> tuple[Vocab, str]:
    """The tokenizer's vocabulary: exact once the tokenizer stage is cached, else from the spec."""
    spec = recipe.tokenizer
    if store.is_complete("tokenizer", digests["tokenizer"]):
        vocab = vocab_of(store.path("tokenizer", digests["tokenizer"]))
        return Vocab(vocab["size"], vocab["special"]), "tokenizer stage"
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


def train_plan(
    recipe: Recipe,
    spec: TrainStageSpec,
    field: tuple,
    store: ArtifactStore,
    digests: dict,
    rows: dict,
    device: dict,
    by_source: dict,
) -> dict:
    """`field` (stages, N): where the stage's settings are (a CapFilt round's stage inherits its stage's)."""
    train = recipe.runtime.train
    out: dict = {"field": list(field)}
    mixed = _mixture(recipe, spec, field, store, digests, rows, by_source)
    out["mixture"], out["mixture_source"], out["problem"] = mixed
    try:
        vocab, out["vocab_source"] = plan_vocab(recipe, store, digests)
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
    out["flops_per_step"] = trace.flops * accumulation * train.num_workers
    seconds = trace.flops * accumulation / (device["tflops_per_worker"] * 1e12)
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
    ).as_dict()
    gb = {f"{k}_gb": v / GIB for k, v in parts.items() if k != "total"}
    gb["runtime_gb"] = device["runtime_overhead_gb"]
    gb["total_gb"] = parts["total"] / GIB + device["runtime_overhead_gb"]
    return gb


def fixes(recipe: Recipe, spec: TrainStageSpec, vocab: Vocab, image: int, trace: Trace, device: dict) -> list[dict]:
    """Changes that bring the stage under its memory, smallest change first, each with its need."""
    train = recipe.runtime.train
    limit = device["memory_per_worker_gb"]
    found = []
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


def _mixture(
    recipe: Recipe, spec: TrainStageSpec, field: tuple, store: ArtifactStore, digests: dict, rows: dict, by_source: dict
):
    """(resolved counts, where they come from, a located problem or None)."""
    name = stage_name(spec)
    resolved = store.path(name, digests[name]) / "mixture.json"
    if store.is_complete(name, digests[name]) and resolved.is_file():
        return json.loads(resolved.read_text()), "stage artifact", None
    available, source = [], "artifact manifests (train split)"
    for component in spec.components():
        artifact = artifact_stage(component.data, recipe)
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
        return None, source, {"field": [*field, *exc.field], "message": exc.message}


def check(plan: dict, running: bool = False) -> list[PlanError]:
    """Stages that cannot run as declared (memory, mixtures) as located errors; when `running`,
    also training workers a local Ray could never place (the stage would wait for ever)."""
    errors = []
    workers, has_training = plan["device"]["workers"], any("train" in e for e in plan["stages"])
    if running and has_training and workers["local"] is not None:
        short = {k: v for k, v in workers["needs"].items() if v > workers["local"][k]}
        if short:
            wanted = ", ".join(f"{v} {k}" for k, v in short.items())
            have = ", ".join(f"{workers['local'][k]} {k}" for k in short)
            errors.append(PlanError(("runtime", "train", "num_workers"), (
                f"the training workers need {wanted}, but the local Ray has {have}: lower num_workers "
                "(or cpus_per_worker), or run on a cluster (runtime.ray.address or RAY_ADDRESS)"
            )))  # fmt: skip
    for entry in (e for e in plan["stages"] if "train" in e):
        train = entry["train"]
        if train["problem"]:
            errors.append(PlanError(tuple(train["problem"]["field"]), train["problem"]["message"]))
        if train.get("fits") is False:
            errors.append(PlanError((*train["field"], "micro_batch_size"), memory_message(entry, plan["device"])))
    return errors


def memory_message(entry: dict, device: dict) -> str:
    need, limit = entry["train"]["memory"], device["memory_per_worker_gb"]
    over = need["total_gb"] - limit
    parts = ", ".join(f"{k.removesuffix('_gb')} {v:.2f}" for k, v in need.items() if k != "total_gb")
    fixes = "; ".join(f"{f['change']} -> {f['need_gb']:.2f} GiB" for f in entry["train"]["fixes"] if f["fits"])
    return (
        f"{entry['stage']} needs about {need['total_gb']:.2f} GiB per worker ({parts}), {over:.2f} GiB "
        f"({over / limit:.0%}) more than the {limit:.2f} GiB it may use ({device['memory_source']}). "
        + (f"Would fit: {fixes}." if fixes else "No single change fits; combine them or add workers with FSDP.")
    )


def render(plan: dict) -> str:
    """The plan as text: the stage DAG, then one block per training stage."""
    device = plan["device"]
    lines = [
        f"plan for {plan['recipe']} (workdir {plan['workdir']})",
        f"device: {device['kind']}, {_gib(device['memory_per_worker_gb'])} per worker ({device['memory_source']}), "
        f"{device['tflops_per_worker']:.3g} TFLOP/s per worker ({device['tflops_source']})",
        _workers_line(device["workers"]),
        "",
        f"{'stage':<22} {'status':<7} {'rows in':>10} {'rows out':>10}  digest            inputs",
    ]
    for entry in plan["stages"]:
        mark = "" if entry["rows_exact"] else "~"
        rows_in = "?" if entry["rows_in"] is None else f"{mark}{entry['rows_in']}"
        rows_out = "-" if entry["rows_out"] is None else f"{mark}{entry['rows_out']}"
        inputs = ", ".join(f"{k}<-{v}" if k != v else k for k, v in entry["inputs"].items())
        lines.append(
            f"{entry['stage']:<22} {entry['status']:<7} {rows_in:>10} {rows_out:>10}  {entry['digest']}  {inputs}"
        )
    for entry in plan["stages"]:
        if "train" in entry:
            lines += ["", *render_training(entry)]
    return "\n".join(lines)


def render_training(entry: dict) -> list[str]:
    train = entry["train"]
    lines = [f"{entry['stage']}:"]
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
    )
    lines.append(
        "  parameters: "
        + ", ".join(
            f"{m} {_count(params[f'{m}_total'])} ({_count(params[f'{m}_trainable'])} trainable)" for m in modules
        )
        + f"; total {_count(params['total'])}, trainable {_count(params['trainable'])}"
    )
    memory = train["memory"]
    parts = ", ".join(f"{k.removesuffix('_gb')} {v:.3f}" for k, v in memory.items() if k != "total_gb")
    verdict = {True: "fits", False: "DOES NOT FIT", None: "limit unknown"}[train["fits"]]
    lines.append(f"  memory per worker: {memory['total_gb']:.3f} GiB [{verdict}] = {parts}")
    hours = f", {_duration(train['hours'] * 3600)} for the stage" if train["hours"] is not None else ""
    lines.append(
        f"  compute: {train['flops_per_step']:.3g} FLOPs per step, {train['seconds_per_step']:.3g} s per step{hours}"
    )
    for fix in train.get("fixes", []):
        lines.append(f"  {'fix' if fix['fits'] else 'not enough'}: {fix['change']} -> {fix['need_gb']:.2f} GiB")
    return lines


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _gib(value: float | None) -> str:
    return "? GiB" if value is None else f"{value:.1f} GiB"


def _workers_line(workers: dict) -> str:
    needs = ", ".join(f"{v} {k}" for k, v in workers["needs"].items() if v)
    if workers["local"] is None:
        return f"training workers: {needs} from the Ray cluster"
    have = ", ".join(f"{v} {k}" for k, v in workers["local"].items())
    return f"training workers: {needs}; a local Ray has {have}"
