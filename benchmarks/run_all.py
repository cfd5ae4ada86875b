"""Every benchmark in one run, each beside its baseline, in one table and benchmarks/results.json.

- overhead: `vlmflow run` of the default tiny recipe (shapes-tiny; with --quick a smaller --set
  variant) in a fresh workdir (cold), then again (every stage cached), then three times more as a
  user types it (`noop`: no timers, nothing imported ahead; wall clock and CPU seconds). The run's wall clock is
  split into interpreter start-up, imports, the plan, Prefect (flow and task engine, its
  ephemeral server: the flow's time minus what ran inside it), MLflow (every tracking call),
  Ray (start and shutdown), stage work (the `seconds` of each computed stage in summary.json)
  and the rest. It runs in a child process (a user's cold start), timed by wrapping those
  functions in that process. Its workdir feeds the tokenizer, eval and train benchmarks.
- ingest (benchmarks/ingest.py), eval (benchmarks/eval.py), train (benchmarks/train_step.py),
  instruct (benchmarks/instruct.py), plan memory (benchmarks/plan_accuracy.py): their own
  functions, called here, each beside its baseline; outputs checked equal as those scripts do.
- dedup: the dedup stage's join (dask on Ray) vs a plain single-process numpy loop over the same
  manifest (exact: first key per pixel hash; near: all-pairs pHash distance + colour check, then
  clusters); both must find the same duplicates.
- tokenizer: the tokenizer stage's run (texts read from the shards by Ray tasks, BPE trained with
  HF `tokenizers`, checks) vs a plain loop (tarfile + json in one process, the same `tokenizers`
  training call); both must give the same vocabulary.

Peak memory: the largest sum of PSS (proportional set size: shared pages split between the
processes that map them; RSS where PSS is unreadable) of this process and all its descendants
(Ray's processes, child processes), sampled every 0.5 s during each side.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only NAME ...] [--workdir DIR] [--out FILE]

Ratios: vlmflow / baseline throughput (above 1: vlmflow is faster); instruct: achieved / ideal
requests per second; plan memory: planned / measured bytes; overhead: stage work / wall clock
(cold), cached wall / cold wall (cached).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SPEC = REPO / "specs" / "recipes" / "shapes-tiny.yaml"
DEFAULT_OUT = BENCH / "results.json"
NAMES = ["overhead", "ingest", "dedup", "tokenizer", "capfilt", "eval", "train", "instruct", "plan"]
# --quick: the tiny recipe made smaller still (a few minutes in all on 2 cores)
QUICK_SET = [
    "data.sources.0.count=256",
    "data.shard_size=64",
    "stages.0.max_steps=10",
    "stages.1.max_steps=10",
    "evaluate.0.samples=16",
    "evaluate.1.samples=8",
    "evaluate.2.samples=8",
]
SIZES = {
    False: {
        "ingest": 4000,
        "ingest_shard": 500,
        "questions": 256,
        "capfilt_images": 2048,
        "steps": 40,
        "warmup": 5,
        "workers": [1, 2],
        "items": 3000,
        "repeats": 3,
        "twins": None,
    },
    True: {
        "ingest": 600,
        "ingest_shard": 150,
        "questions": 64,
        "capfilt_images": 256,
        "steps": 12,
        "warmup": 3,
        "workers": [1],
        "items": 300,
        "repeats": 1,
        "twins": ["llava-tiny"],
    },
}
MIB = float(1 << 20)


# ------------------------------------------------------------------------------ measuring


class PeakMemory:
    """Peak summed PSS of this process (and with `tree`, all its descendants) while the block runs."""

    def __init__(self, interval: float = 0.5, tree: bool = True):
        self.interval, self.tree, self.peak = interval, tree, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        total = 0
        for proc in [me, *(me.children(recursive=True) if self.tree else [])]:
            try:
                info = proc.memory_full_info()
                total += getattr(info, "pss", 0) or info.rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self.peak = max(self.peak, total)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def mib(self) -> float:
        return round(self.peak / MIB, 1)


def measure(fn: Callable, *args: Any, **kwargs: Any) -> tuple[Any, float, float]:
    """(result, seconds, peak MiB of this process and Ray's processes) of one call."""
    with PeakMemory() as memory:
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - started
    return result, seconds, memory.mib


def measure_here(fn: Callable, *args: Any, **kwargs: Any) -> tuple[Any, float, float]:
    """(result, seconds, peak MiB of this process alone) of one call: a baseline in this process."""
    with PeakMemory(tree=False) as memory:
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - started
    return result, seconds, memory.mib


def entry(name: str, unit: str, ours: float, base: float, peak: float, base_peak: float | None, **extra: Any) -> dict:
    return {
        "name": name,
        "unit": unit,
        "throughput": round(ours, 2),
        "baseline": round(base, 2),
        "ratio": round(ours / base, 4) if base else None,
        "peak_mib": peak,
        "baseline_peak_mib": base_peak,
        **extra,
    }


def machine() -> dict:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    import psutil

    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_1min_before": round(os.getloadavg()[0], 2),
    }


# ------------------------------------------------------------------ orchestration overhead


class Timers:
    """Seconds spent inside wrapped functions, by category (nested calls of one category count once)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._depth: dict[str, int] = {}

    def wrap(self, owner: Any, attr: str, category: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            depth = self._depth.get(category, 0)
            self._depth[category] = depth + 1
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._depth[category] = depth
                if depth == 0:
                    self.seconds[category] = self.seconds.get(category, 0.0) + time.perf_counter() - started

        setattr(owner, attr, timed)


def overhead_child(spec: str, workdir: str, report: str, overrides: list[str]) -> None:
    """In a fresh process: `vlmflow run` with the orchestration layers' calls timed."""
    started = time.perf_counter()
    timers = Timers()
    imports = time.perf_counter()
    from vlmflow import cli

    cli._prefect_env(Path(workdir))  # as `run` does before it imports Prefect: its settings are read on import
    import ray

    from vlmflow import plan as plan_module
    from vlmflow import tracking
    from vlmflow.flows import recipe as recipe_module
    from vlmflow.runtime import prefect as runtime_prefect
    from vlmflow.runtime import ray as runtime_ray

    imports = time.perf_counter() - imports
    timers.wrap(runtime_ray, "init_ray", "ray")
    timers.wrap(ray, "shutdown", "ray")
    for method in ("__init__", "start", "log", "log_files", "log_history", "register_model", "finish"):
        if hasattr(tracking.Tracker, method):
            timers.wrap(tracking.Tracker, method, "mlflow")
    timers.wrap(plan_module, "build_plan", "plan")
    timers.wrap(plan_module, "check", "plan")
    for method in ("__enter__", "__exit__"):
        timers.wrap(runtime_prefect.RecipeRun, method, "inside_flow")
    timers.wrap(runtime_prefect, "run_stage_task", "inside_flow")  # a stage, as the flow's task runs it
    timers.wrap(recipe_module, "recipe_flow", "flow")
    sys.argv = ["vlmflow", "run", spec, "--workdir", workdir, *[a for o in overrides for a in ("--set", o)]]
    code: object = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code
    result = {"exit": code, "imports_s": imports, "elapsed_s": time.perf_counter() - started, **timers.seconds}
    Path(report).write_text(json.dumps(result))


def user_env() -> dict[str, str]:
    """This environment without any server a developer's shell points at: a user's first `vlmflow run`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "RAY_ADDRESS"))}
    return env | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def run_recipe(workdir: Path, overrides: list[str], label: str) -> dict:
    """One timed `vlmflow run` in a child process; the wall clock split by layer."""
    report = workdir / f"overhead-{label}.json"
    env = user_env()
    command = [sys.executable, __file__, "--overhead-child", str(SPEC), str(workdir), str(report), *overrides]
    with PeakMemory() as memory:
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
        wall = time.perf_counter() - started
    timing = json.loads(report.read_text()) if report.is_file() else {}
    if result.returncode != 0 or timing.get("exit") not in (0, None):
        raise RuntimeError(f"vlmflow run failed ({label}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    summary = json.loads((workdir / "runs" / "latest" / "summary.json").read_text())
    stage_work = sum(s.get("seconds") or 0.0 for s in summary["stages"] if s["status"] == "computed")
    parts = {
        "startup": wall - timing["elapsed_s"],  # interpreter, this script's import, process exit
        "imports": timing["imports_s"],  # vlmflow, Prefect, MLflow, Ray, torch
        "plan": timing.get("plan", 0.0),
        # A run with nothing to compute has no flow (and starts no Prefect): 0.
        "prefect": timing["flow"] - timing.get("inside_flow", 0.0) if "flow" in timing else 0.0,
        "mlflow": timing.get("mlflow", 0.0),
        "ray": timing.get("ray", 0.0),
        "stage_work": stage_work,
    }
    parts["other"] = wall - sum(parts.values())  # CLI, digests, summaries, locks, printing
    statuses = [s["status"] for s in summary["stages"]]
    return {
        "wall_s": round(wall, 2),
        "parts_s": {k: round(v, 2) for k, v in parts.items()},
        "peak_mib": memory.mib,
        "stages": len(statuses),
        "computed": statuses.count("computed"),
        "cached": statuses.count("cached"),
        "summary": str(workdir / "runs" / summary["run_id"] / "summary.json"),
    }


def plain_noop(workdir: Path, overrides: list[str], repeats: int = 3) -> dict:
    """`vlmflow -q run` as a user types it (no timers, nothing imported ahead) on a workdir where every
    stage is cached: wall clock and CPU seconds (user + system, of the process and its children) of each
    repeat, and their medians."""
    import resource

    env = user_env()
    command = [str(Path(sys.executable).with_name("vlmflow")), "-q", "run", str(SPEC), "--workdir", str(workdir)]
    command += [a for o in overrides for a in ("--set", o)]
    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
        walls.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if result.returncode != 0:
            raise RuntimeError(f"vlmflow run failed (no-op):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        summary = json.loads((workdir / "runs" / "latest" / "summary.json").read_text())
        statuses = [stage["status"] for stage in summary["stages"]]
        if set(statuses) != {"cached"}:
            raise RuntimeError(f"the no-op run computed stages: {statuses}")
    return {
        "wall_s": round(statistics.median(walls), 2),
        "cpu_s": round(statistics.median(cpus), 2),
        "walls_s": [round(w, 2) for w in walls],
        "cpus_s": [round(c, 2) for c in cpus],
        "load_average": os.getloadavg(),
    }


def bench_overhead(workdir: Path, overrides: list[str]) -> dict:
    cold = run_recipe(workdir, overrides, "cold")
    cached = run_recipe(workdir, overrides, "cached")
    if cached["computed"]:
        raise RuntimeError(f"the second run computed {cached['computed']} stages; all should be cached")
    share = cold["parts_s"]["stage_work"] / cold["wall_s"]
    return {
        "name": "overhead",
        "ratio": round(share, 4),
        "ratio_means": "stage work / wall clock of the cold run",
        "cached_over_cold": round(cached["wall_s"] / cold["wall_s"], 4),
        "cold": cold,
        "cached": cached,
        "noop": plain_noop(workdir, overrides),
        "spec": str(SPEC),
        "overrides": overrides,
    }


# ----------------------------------------------------------------------------- benchmarks


def _warm_worker() -> int:
    """Start a Ray worker and import what the stages import there (untimed)."""
    from vlmflow.components import dedup, ingest, tokenize  # noqa: F401

    time.sleep(0.5)  # hold it, so each warm-up task starts its own worker
    return os.getpid()


def bench_ingest(size: dict, root: Path, ray_cpus: int) -> tuple[dict, Path]:
    import ingest

    recipe = ingest.build_recipe(size["ingest"], 64, size["ingest_shard"], None, root)
    spec = recipe.data.sources[0]
    warm = ingest.warm_up(spec, ray_cpus)
    (count, seconds), _, peak = measure(ingest.run_vlmflow, recipe, root / "ingest-vlmflow")
    (plain_count, plain_seconds), _, plain_peak = measure_here(
        ingest.run_plain, spec, size["ingest_shard"], root / "ingest-plain"
    )
    ingest.verify(root / "ingest-vlmflow", root / "ingest-plain", size["ingest"], count, plain_count)
    shutil.rmtree(root / "ingest-plain")
    result = entry(
        "ingest (Ray tasks vs PIL loop)",
        "images/s",
        count / seconds,
        plain_count / plain_seconds,
        peak,
        plain_peak,
        images=count,
        warmup_s=round(warm, 2),
        verified=True,
    )
    return result, root / "ingest-vlmflow"


def plain_dedup(manifest: Path, threshold: int, max_color: float) -> dict[str, str]:
    """key -> duplicate-of:KEY, in one process: exact by pixel hash, near by all-pairs pHash distance."""
    import numpy as np
    import polars as pl

    frame = pl.read_parquet(manifest, columns=["key", "pixel_sha256", "phash", "thumb"]).sort("key")
    keys = frame["key"].to_list()
    found, first = {}, {}
    for key, pixels in zip(keys, frame["pixel_sha256"].to_list(), strict=True):
        if pixels in first:
            found[key] = first[pixels]  # keys are sorted: the first is the smallest
        else:
            first[pixels] = key
    rest = [i for i, key in enumerate(keys) if key not in found]
    hashes = frame["phash"].to_numpy().astype(np.uint64)[rest]
    thumbs = np.stack([np.frombuffer(t, np.uint8) for t in frame["thumb"].to_list()])[rest].astype(np.int16)
    parent = list(range(len(rest)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, len(rest), 256):
        distance = np.bitwise_count(hashes[start : start + 256, None] ^ hashes[None, :])
        a, b = np.nonzero(distance <= threshold)
        a += start
        a, b = a[a < b], b[a < b]
        close = np.abs(thumbs[a] - thumbs[b]).mean(axis=1) <= max_color
        for i, j in zip(a[close].tolist(), b[close].tolist(), strict=True):
            ri, rj = root(i), root(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)  # indexes follow key order: a cluster keeps its smallest key
    for i in range(len(rest)):
        if root(i) != i:
            found[keys[rest[i]]] = keys[rest[root(i)]]
    return {key: f"duplicate-of:{canonical}" for key, canonical in found.items()}


def bench_dedup(ingest_dir: Path) -> dict:
    import polars as pl

    from vlmflow.components.dedup import find_duplicates
    from vlmflow.specs.data import DedupSpec

    manifest = ingest_dir / "manifest.parquet"
    frame = pl.concat([pl.read_parquet(p) for p in sorted((ingest_dir / "units").glob("*.manifest.parquet"))])
    # known duplicates on top of the images: an exact copy of every 10th row (same pixels) and a near copy
    # of every 10th row from the 5th (other pixels, pHash 2 bits away, same colours)
    exact = frame[::10].with_columns(key=pl.col("key") + "-copy")
    near = frame[5::10].with_columns(
        key=pl.col("key") + "-near",
        pixel_sha256=pl.col("pixel_sha256") + "-near",
        phash=pl.col("phash").xor(pl.lit(0b101, dtype=pl.UInt64)),
    )
    pl.concat([frame, exact, near]).write_parquet(manifest)
    rows, injected = frame.height + exact.height + near.height, exact.height + near.height
    spec = DedupSpec()
    found, seconds, peak = measure(find_duplicates, manifest, spec)
    plain, plain_seconds, plain_peak = measure_here(
        plain_dedup, manifest, spec.hamming_threshold, spec.max_color_difference
    )
    ours = dict(zip(found["key"], found["reason"], strict=True))
    if ours != plain or len(ours) < injected:
        raise AssertionError(f"dedup: vlmflow {len(ours)} duplicates, plain loop {len(plain)}, {injected} injected")
    return entry(
        "dedup (dask on Ray vs numpy loop)",
        "rows/s",
        rows / seconds,
        rows / plain_seconds,
        peak,
        plain_peak,
        rows=rows,
        duplicates=len(ours),
        injected=injected,
        partitions=spec.partitions,
        verified=True,
    )


def _stage_output(summary: dict, name: str) -> Any:
    from vlmflow.stage import StageOutput

    stage = next(s for s in summary["stages"] if s["name"] == name)
    path = Path(stage["artifact_path"])
    stats = json.loads((path / "_SUCCESS").read_text())
    return StageOutput(name, stage["artifact_digest"], path, stats)


def plain_tokenizer(ingest_path: Path, data_path: Path, spec: Any, store_root: Path) -> tuple[Any, int]:
    """The same corpus read with tarfile + json in one process, then `tokenizers`' BPE training."""
    import polars as pl
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from vlmflow.components.tokenize import sample_texts

    manifest = pl.read_parquet(data_path / "manifest.parquet", columns=["key", "shard"])
    texts: list[str] = []
    for shard, keys in manifest.group_by("shard", maintain_order=True).agg("key").iter_rows():
        wanted = set(keys)
        with tarfile.open(store_root / shard) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext == "json" and key in wanted:
                    texts += sample_texts(json.loads(tar.extractfile(member).read()))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=spec.min_frequency,
        special_tokens=spec.special_tokens,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer, len(texts)


def bench_tokenizer(recipe: Any, summary: dict, root: Path) -> dict:
    from tokenizers import Tokenizer

    from vlmflow.artifacts import ArtifactStore
    from vlmflow.components import tokenize
    from vlmflow.stage import StageContext

    store = ArtifactStore(Path(summary["workdir"]) / "artifacts")
    inputs = {name: _stage_output(summary, name) for name in ("ingest", "dedup")}
    out = root / "tokenizer-vlmflow"
    out.mkdir()
    ctx = StageContext(recipe, store, out, "bench", {"data": inputs["dedup"]}, "log", recipe.tokenizer, "tokenizer")
    result, seconds, peak = measure(tokenize.run, ctx)
    (plain, texts), plain_seconds, plain_peak = measure_here(
        plain_tokenizer, inputs["ingest"].path, inputs["dedup"].path, recipe.tokenizer, store.root
    )
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    if texts != result.rows_in or ours.get_vocab() != plain.get_vocab():
        raise AssertionError(f"tokenizers differ: {result.rows_in} vs {texts} texts, or a different vocabulary")
    return entry(
        "tokenizer (stage vs tarfile + tokenizers)",
        "texts/s",
        texts / seconds,
        texts / plain_seconds,
        peak,
        plain_peak,
        texts=texts,
        vocab_size=ours.get_vocab_size(),
        verified=True,
    )


def bench_eval(size: dict, workdir: Path) -> dict:
    import torch

    bench = importlib.import_module("eval")  # benchmarks/eval.py
    from vlmflow.components.export import resolve_model

    items = bench.questions(size["questions"])
    threads = torch.get_num_threads()
    with resolve_model("latest", workdir) as folder:
        (batched, seconds), _, peak = measure(bench.ray_pool, folder, items, 8, 32, 2)
        (plain, plain_seconds), _, plain_peak = measure_here(bench.plain_loop, folder, items, 8, 1)
    torch.set_num_threads(threads)
    if batched != plain:
        differ = sum(a != b for a, b in zip(batched, plain, strict=True))
        raise AssertionError(f"batched and per-sample answers differ on {differ} of {len(items)} questions")
    return entry(
        "eval generation (2 actors, batch 32 vs 1-sample loop)",
        "samples/s",
        len(items) / seconds,
        len(items) / plain_seconds,
        peak,
        plain_peak,
        questions=len(items),
        verified=True,
    )


def bench_capfilt(size: dict, root: Path) -> list[dict]:
    """benchmarks/capfilt.py's jobs: the caption and filter actor pools (2 actors, Ray Data) vs a
    plain loop over the same jobs; both must answer the same."""
    bench = importlib.import_module("capfilt")  # benchmarks/capfilt.py
    images = size.get("capfilt_images", 256)
    (root / "capfilt").mkdir()
    folder, index = bench.build(root / "capfilt", images)
    rows = []
    for op, label in (("caption", "CapFilt caption"), ("score", "CapFilt filter")):
        jobs = bench.jobs_of(index, 32, 1, op)
        run, _, peak = measure(bench.pooled, folder, root / "capfilt", jobs, 2, bench.BLOCKS_PER_ACTOR)
        (reference, plain_seconds, plain_steady_s), _, plain_peak = measure_here(
            bench.plain, folder, root / "capfilt", jobs
        )
        if run["answers"] != reference:
            raise AssertionError(f"{label}: the actor pool answered differently from the plain loop")
        name = f"{label} (Ray Data, 2 actors, actor start included, vs plain loop)"
        ours, base = images / run["seconds"], images / plain_seconds
        ratio = round(run["jobs_per_s"] * plain_steady_s / len(jobs), 3) if run["jobs_per_s"] else None
        rows.append(entry(name, "images/s", ours, base, peak, plain_peak, images=images, verified=True,
                          steady_ratio=ratio, start_s=round(run["start_s"], 2)))  # fmt: skip
    return rows


def bench_train(size: dict, recipe: Any, summary: dict, root: Path) -> list[dict]:
    import torch
    import train_step

    threads = torch.get_num_threads()
    artifacts = {s["name"]: Path(s["artifact_path"]) for s in summary["stages"]}
    store = Path(summary["workdir"]) / "artifacts"
    first = recipe.model_copy(update={"stages": recipe.stages[:1]})  # align: one data artifact (dedup)
    rows = []
    for workers in size["workers"]:
        bench = train_step.bench_recipe(first, size["steps"], workers)
        config = train_step.stage_config(bench, artifacts, store, root / f"train-{workers}")
        ours, _, peak = measure(train_step.vlmflow_rate, bench, config, size["warmup"])
        bare, _, bare_peak = measure_here(train_step.bare_rate, bench, config, size["steps"], size["warmup"], workers)
        torch.set_num_threads(threads)
        rows.append(
            entry(
                f"train loop, {workers} worker(s) (Ray Train vs bare torch)",
                "samples/s",
                ours,
                bare,
                peak,
                bare_peak,
                stage=bench.stages[-1].name,
                steps=size["steps"],
            )
        )
    return rows


def bench_instruct(size: dict) -> dict:
    import instruct

    options = argparse.Namespace(items=size["items"], concurrency=32, latency_ms=50.0, repeats=size["repeats"])
    row, _, peak = measure(instruct.bench, options, 0.0)
    median = row["median"]
    return entry(
        "instruct client (vs ideal C/L of mock-llm)",
        "requests/s",
        median["requests_per_s"],
        row["ideal_requests_per_s"],
        peak,
        None,
        completed=median["completed"],
        items=median["items"],
        latency_p50_ms=round(1000 * median["latency_p50_s"], 1),
    )


def bench_plan(size: dict) -> list[dict]:
    import plan_accuracy

    rows = []
    for twin in size["twins"] or plan_accuracy.TWINS:
        for index in range(plan_accuracy.stage_count(twin)):
            stage = plan_accuracy.setup(twin, index)[1]
            command = [sys.executable, plan_accuracy.__file__, "--measure", twin, str(index)]
            done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)  # a fresh process
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            planned = plan_accuracy.estimate(twin, index)["total"]
            rows.append(
                entry(
                    f"plan memory {twin}/{stage.name} (plan vs measured)",
                    "MiB",
                    planned / MIB,
                    measured["tensor_peak"] / MIB,
                    None,
                    None,
                )
            )
    return rows


# ---------------------------------------------------------------------------------- report


def table(entries: list[dict]) -> str:
    lines = ["| benchmark | vlmflow | baseline | ratio | peak MiB (vlmflow / baseline) |", "|---|---:|---:|---:|---:|"]
    for e in entries:
        if "error" in e:
            lines.append(f"| {e['name']} | failed: {e['error'][:80]} | | | |")
        elif e["name"] == "overhead":
            cold, cached = e["cold"], e["cached"]
            parts = cold["parts_s"]
            lines.append(
                f"| tiny recipe, cold: stage work / wall | {cold['wall_s']:.1f} s wall | "
                f"{parts['stage_work']:.1f} s stage work | {e['ratio']:.2f} | {cold['peak_mib']:.0f} |"
            )
            lines.append(
                f"| tiny recipe, all {cached['cached']} stages cached: cached / cold wall | "
                f"{cached['wall_s']:.1f} s wall | {cold['wall_s']:.1f} s cold | {e['cached_over_cold']:.2f} | "
                f"{cached['peak_mib']:.0f} |"
            )
            noop = e["noop"]
            lines.append(
                f"| tiny recipe, nothing to compute: plain `vlmflow -q run`, median of {len(noop['walls_s'])} | "
                f"{noop['wall_s']:.1f} s wall | {noop['cpu_s']:.1f} s CPU | | |"
            )
        else:
            peaks = " / ".join("-" if p is None else f"{p:.0f}" for p in (e["peak_mib"], e["baseline_peak_mib"]))
            lines.append(
                f"| {e['name']} | {e['throughput']:.1f} {e['unit']} | {e['baseline']:.1f} {e['unit']} | "
                f"{e['ratio']:.3g} | {peaks} |"
            )
    return "\n".join(lines)


def overhead_lines(e: dict) -> list[str]:
    out = []
    for label in ("cold", "cached"):
        run = e[label]
        parts = ", ".join(f"{k} {v:.1f}" for k, v in run["parts_s"].items())
        counts = f"{run['computed']} computed, {run['cached']} cached"
        out.append(f"{label} run, {run['wall_s']:.1f} s wall ({counts}): {parts}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a few minutes on 2 cores)")
    parser.add_argument("--only", nargs="+", choices=NAMES, help="run only these benchmarks")
    parser.add_argument("--workdir", type=Path, help="keep the recipe runs here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--overhead-child"]:
        spec, workdir, report, *overrides = sys.argv[2:]
        overhead_child(spec, workdir, report, overrides)
        return 0
    args = parse_args(argv)
    wanted = args.only or NAMES
    size = SIZES[args.quick]
    overrides = QUICK_SET if args.quick else []
    report: dict = {"quick": args.quick, "machine": machine(), "sizes": size, "recipe_overrides": overrides}
    entries: list[dict] = []
    failed = False

    def attempt(name: str, fn: Callable[[], Any]) -> Any:
        nonlocal failed
        print(f"[run_all] {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:  # report and go on with the others
            traceback.print_exc()
            failed = True
            entries.append({"name": name, "error": f"{type(exc).__name__}: {exc}", "ratio": None})
            return None
        print(f"[run_all] {name} done in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        for item in result if isinstance(result, list) else [result]:
            entries.append(item[0] if isinstance(item, tuple) else item)
        return result

    with tempfile.TemporaryDirectory(prefix="vlmflow-bench-all-") as tmp:
        root = Path(tmp)
        workdir = (args.workdir or root / "work").resolve()
        needs_run = {"overhead", "tokenizer", "eval", "train"} & set(wanted)
        have_run = (workdir / "runs" / "latest" / "summary.json").is_file()
        if "overhead" in wanted or (needs_run and not have_run):
            attempt("overhead", lambda: bench_overhead(workdir, overrides))
        latest = workdir / "runs" / "latest" / "summary.json"
        summary = json.loads(latest.read_text()) if needs_run and latest.is_file() else None

        in_ray = {"ingest", "dedup", "tokenizer", "capfilt", "eval", "train"} & set(wanted)
        if in_ray:
            import ray

            from vlmflow.runtime.ray import init_ray
            from vlmflow.specs import load_recipe
            from vlmflow.specs.recipe import RaySpec

            def start_ray() -> list:
                init_ray(RaySpec(num_cpus=max(2, os.cpu_count() or 1)))
                return []  # no table row

            started = time.perf_counter()
            if attempt("ray start", start_ray) is None:
                in_ray = set()  # Ray could not start (an overloaded machine): the others still run
            report["ray_startup_s"] = round(time.perf_counter() - started, 2)
        if in_ray:
            ray_cpus = int(ray.cluster_resources().get("CPU", 0))
            started = time.perf_counter()
            ray.get([ray.remote(num_cpus=1)(_warm_worker).remote() for _ in range(ray_cpus)])
            report["ray_warmup_s"] = round(time.perf_counter() - started, 2)  # not in any figure
            recipe = load_recipe(SPEC, overrides)
            try:
                if {"ingest", "dedup"} & set(wanted):
                    done = attempt("ingest", lambda: bench_ingest(size, root, ray_cpus))
                    if done and "ingest" not in wanted:
                        entries.pop()
                    if done and "dedup" in wanted:
                        attempt("dedup", lambda: bench_dedup(done[1]))
                if summary and "tokenizer" in wanted:
                    attempt("tokenizer", lambda: bench_tokenizer(recipe, summary, root))
                if "capfilt" in wanted:
                    attempt("capfilt", lambda: bench_capfilt(size, root))
                if summary and "eval" in wanted:
                    attempt("eval", lambda: bench_eval(size, workdir))
                if summary and "train" in wanted:
                    attempt("train", lambda: bench_train(size, recipe, summary, root))
            finally:
                ray.shutdown()
        if "instruct" in wanted:
            attempt("instruct", lambda: bench_instruct(size))
        if "plan" in wanted:
            attempt("plan", lambda: bench_plan(size))

    report["entries"] = entries
    overhead = next((e for e in entries if e["name"] == "overhead" and "error" not in e), None)
    report["overhead"] = overhead
    print()
    print(table(entries))
    if overhead:
        print()
        print("\n".join(overhead_lines(overhead)))
    ratios = [e["ratio"] for e in entries if e.get("ratio") and e["name"] != "overhead"]
    if ratios:
        report["median_ratio"] = round(statistics.median(ratios), 4)
    m = report["machine"]
    load = m["load_average_1min_before"]
    sizes = "quick" if args.quick else "full"
    print(f"\nmachine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, load {load} before; {sizes} sizes")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
