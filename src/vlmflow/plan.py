"""`vlmflow plan`: what a recipe will do and cost, before anything heavy runs.

Walks the same step graph `vlmflow run` executes and computes every step's digest, so it
knows what the artifact store already holds (cached) and what would run. Row counts come from
cached artifacts, or are estimated (a component's `rows_estimate`: ingest from the sources'
listings). A component's `plan` hook adds its own details: a training step gets its mixture
counts, steps, parameters, peak memory per worker against the memory it may use, and FLOPs and
time per step (components/train/plan.py); a step that does not fit gets the changes that would
make it fit.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import psutil

from vlmflow.artifacts import ArtifactStore
from vlmflow.fingerprint import HashCache
from vlmflow.pipeline import Step, graph_digests, recipe_graph
from vlmflow.specs.recipe import Recipe

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


@runtime_checkable
class StepPlan(Protocol):
    """What a component's `plan` hook returns about its step (a training step: mixture, steps,
    parameters, memory, compute; components/train/plan.py)."""

    def as_json(self) -> dict:
        """The details as `vlmflow plan --json` prints them (under the component's name)."""

    def problems(self, stage: str, device: dict) -> list[PlanError]:
        """What keeps the step from running as declared, each at the spec field to change."""

    def lines(self, stage: str) -> list[str]:
        """The step's block in `vlmflow plan`'s text."""

    def tracked(self) -> dict[str, float]:
        """Predictions the run logs beside what the step measures (e.g. memory per worker)."""


@dataclass
class StagePlan:
    """One step of the plan: cached or to run, its rows (exact when cached, else estimated)."""

    stage: str
    component: str
    writes: str
    digest: str
    inputs: dict[str, str]  # input port -> upstream step
    status: str  # "cached" | "runs"
    rows_in: int | None
    rows_out: int | None
    rows_exact: bool
    detail: StepPlan | None = None  # the component's own plan of the step

    def as_json(self) -> dict:
        out = {
            "stage": self.stage,
            "component": self.component,
            "writes": self.writes,
            "digest": self.digest,
            "inputs": dict(self.inputs),
            "status": self.status,
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rows_exact": self.rows_exact,
        }
        return out | ({self.component: self.detail.as_json()} if self.detail is not None else {})


@dataclass
class Plan:
    """A recipe's plan: the device it was planned for and every step, in graph order."""

    recipe: str
    workdir: str
    device: dict
    stages: list[StagePlan]
    extra: dict = field(default_factory=dict)  # a flow's own plan (a data refresh: the units it builds)

    @classmethod
    def empty(cls, recipe: Recipe, workdir: Path, **extra: object) -> Plan:
        """The plan of a run that plans its steps itself (an evaluation, a data refresh)."""
        return cls(recipe.name, str(workdir.resolve()), {}, [], dict(extra))

    def as_json(self) -> dict:
        """What `vlmflow plan --json` prints and a run keeps as `plan.json`."""
        return {
            "recipe": self.recipe,
            "workdir": self.workdir,
            "device": self.device,
            "stages": [s.as_json() for s in self.stages],
            **self.extra,
        }

    def stage(self, name: str) -> StagePlan | None:
        return next((s for s in self.stages if s.stage == name), None)


@dataclass
class PlanContext:
    """What a component's plan hooks see: the steps by name, their digests, the rows known or
    estimated so far (by step), rows per data source (ingest fills it) and the device."""

    recipe: Recipe
    store: ArtifactStore
    steps: dict[str, Step]
    digests: dict[str, str]
    device: dict
    rows: dict[str, int | None] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)

    def input_rows(self, step: Step) -> dict[str, int | None]:
        """Rows of each input port, as known or estimated so far."""
        return {port: self.rows.get(upstream) for port, upstream in step.inputs.items()}


def file_hashes(store: ArtifactStore) -> HashCache:
    """The content hashes of input files, kept in the workdir (a file seen before is not read again)."""
    return HashCache(store.root / "_cache" / "file-hashes.sqlite")


def build_plan(recipe: Recipe, workdir: Path, cached_details: bool = True) -> Plan:
    """The plan of every step. cached_details=False (what `vlmflow run` asks): a component's own
    plan only for the steps that will run; a cached step has nothing left to estimate, so a rerun
    with nothing to compute builds no model on the meta device and imports no torch."""
    store = ArtifactStore(workdir.resolve() / "artifacts")
    steps = recipe_graph(recipe)
    with file_hashes(store) as hashes:
        digests = graph_digests(steps, recipe, hashes)
    detailed = [
        s
        for s in steps
        if s.component.plan is not None and (cached_details or not store.is_complete(s.name, digests[s.name]))
    ]
    device = device_of(recipe, measure=bool(detailed)) | {"workers": workers_of(recipe)}
    ctx = PlanContext(recipe, store, {s.name: s for s in steps}, digests, device)
    stages = []
    for step in steps:
        digest = digests[step.name]
        estimate = rows_estimate(step, ctx)  # also for a cached ingest: it fills the rows per source
        if store.is_complete(step.name, digest):
            stats = store.stats(step.name, digest)
            status, rows_in, rows_out, exact = "cached", stats["rows_in"], stats["rows_out"], True
            ctx.rows[step.name] = rows_out
        else:
            status, (rows_in, rows_out), exact = "runs", estimate, False
            ctx.rows[step.name] = rows_out if rows_out is not None else rows_in
        stages.append(
            StagePlan(
                step.name, step.component.name, step.writes, digest, dict(step.inputs), status, rows_in, rows_out, exact
            )
        )
    for step, entry in zip(steps, stages, strict=True):
        if step in detailed:
            entry.detail = step.component.call("plan", step, ctx)
    return Plan(recipe.name, str(workdir.resolve()), device, stages)


def rows_estimate(step: Step, ctx: PlanContext) -> tuple[int | None, int | None]:
    """(rows in, rows out) before the step runs: its component's estimate, else the rows of its
    sample inputs in and nothing said of what comes out."""
    if step.component.rows_estimate is not None:
        return step.component.call("rows_estimate", step, ctx)
    ports = step.component.ports(step.config)
    counts = [ctx.rows.get(up) for port, up in step.inputs.items() if ports[port].type == "samples"]
    return (sum(counts) if counts and None not in counts else None), None


def device_of(recipe: Recipe, measure: bool = True) -> dict:
    """What a training worker has: memory and FLOP/s (measured on this CPU when not given and
    `measure`; else None)."""
    train = recipe.runtime.train
    if train.use_gpu:
        import torch

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
        "tflops_per_worker": train.tflops_per_worker or (cpu_tflops(train.cpus_per_worker) if measure else None),
        "tflops_source": "runtime.train.tflops_per_worker"
        if train.tflops_per_worker
        else ("measured (fp32 matmul)" if measure else "not measured: no step to plan"),
    }


def workers_of(recipe: Recipe) -> dict:
    """What the training stages ask of Ray, and what a local Ray would have (None on a cluster:
    its resources are Ray's to schedule)."""
    train, ray_spec = recipe.runtime.train, recipe.runtime.ray
    needs = {"CPU": train.num_workers * train.cpus_per_worker, "GPU": train.num_workers if train.use_gpu else 0}
    if ray_spec.address or os.environ.get("RAY_ADDRESS"):
        return {"needs": needs, "local": None}
    cpus = ray_spec.num_cpus or os.cpu_count() or 1
    return {"needs": needs, "local": {"CPU": cpus, "GPU": local_gpus()}}


def local_gpus() -> int:
    """The GPUs a local Ray would see (CUDA_VISIBLE_DEVICES when set, else NVML's count), without
    importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and not d.strip().startswith("-")])
    import pynvml  # nvidia-ml-py

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no NVIDIA driver here
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


def cpu_tflops(threads: int, seconds: float = 0.2) -> float:
    """fp32 matmul throughput of `threads` CPU threads: the ceiling a training step approaches."""
    import torch

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


def check(plan: Plan, running: bool = False) -> list[PlanError]:
    """Stages that cannot run as declared (each component's own problems: memory, mixtures) as
    located errors; when `running`, also training workers a local Ray could never place (the
    stage would wait for ever)."""
    errors = []
    workers, has_training = plan.device["workers"], any(s.writes == "model" for s in plan.stages)
    if running and has_training and workers["local"] is not None:
        short = {k: v for k, v in workers["needs"].items() if v > workers["local"][k]}
        if short:
            wanted = ", ".join(f"{v} {k}" for k, v in short.items())
            have = ", ".join(f"{workers['local'][k]} {k}" for k in short)
            errors.append(PlanError(("runtime", "train", "num_workers"), (
                f"the training workers need {wanted}, but the local Ray has {have}: lower num_workers "
                "(or cpus_per_worker), or run on a cluster (runtime.ray.address or RAY_ADDRESS)"
            )))  # fmt: skip
    for entry in plan.stages:
        if entry.detail is not None:
            errors += entry.detail.problems(entry.stage, plan.device)
    return errors


def render(plan: Plan) -> str:
    """The plan as text: the stage DAG, then each component's block about its steps."""
    device = plan.device
    lines = [
        f"plan for {plan.recipe} (workdir {plan.workdir})",
        f"device: {device['kind']}, {_gib(device['memory_per_worker_gb'])} per worker ({device['memory_source']}), "
        f"{_tflops(device['tflops_per_worker'])} per worker ({device['tflops_source']})",
        _workers_line(device["workers"]),
        "",
        f"{'stage':<22} {'component':<16} {'status':<7} {'rows in':>10} {'rows out':>10}  digest            inputs",
    ]
    for entry in plan.stages:
        mark = "" if entry.rows_exact else "~"
        rows_in = "?" if entry.rows_in is None else f"{mark}{entry.rows_in}"
        rows_out = "-" if entry.rows_out is None else f"{mark}{entry.rows_out}"
        inputs = ", ".join(f"{k}<-{v}" if k != v else k for k, v in entry.inputs.items())
        lines.append(
            f"{entry.stage:<22} {entry.component:<16} {entry.status:<7} {rows_in:>10} {rows_out:>10}  "
            f"{entry.digest}  {inputs}"
        )
    for entry in plan.stages:
        if entry.detail is not None:
            lines += ["", *entry.detail.lines(entry.stage)]
    return "\n".join(lines)


def count_text(n: int) -> str:
    """A count as people read it: 1.2K, 3.4M, 7B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def duration_text(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _tflops(value: float | None) -> str:
    return "? TFLOP/s" if value is None else f"{value:.3g} TFLOP/s"


def _gib(value: float | None) -> str:
    return "? GiB" if value is None else f"{value:.1f} GiB"


def _workers_line(workers: dict) -> str:
    needs = ", ".join(f"{v} {k}" for k, v in workers["needs"].items() if v)
    if workers["local"] is None:
        return f"training workers: {needs} from the Ray cluster"
    have = ", ".join(f"{v} {k}" for k, v in workers["local"].items())
    return f"training workers: {needs}; a local Ray has {have}"
