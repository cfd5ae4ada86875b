"""Ray, written once: start or join a cluster, map a function over units of work, and map
batches over a pool of actors that hold a model (evaluation; CapFilt through Ray Data).
`RayExecutor` is the default executor of a stage (vlmflow.runtime.executor).

One unit of work is one task (an ingest unit is one shard). Tasks retry when a worker
dies (`max_retries`), so a killed worker does not change a stage's output; results come
back in input order whatever order the tasks finish in.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import ray
from ray.util import ActorPool

from vlmflow.errors import UserError
from vlmflow.progress import Progress
from vlmflow.runtime.executor import BLOCKS_PER_ACTOR
from vlmflow.specs.recipe import RaySpec

log = logging.getLogger("vlmflow")
T = TypeVar("T")


def init_ray(spec: RaySpec, staging: Path | None = None) -> str:
    """Join `spec.address` / $RAY_ADDRESS, else start a local Ray. Returns a description.

    On a cluster the driver's own vlmflow code travels with the job (a Ray runtime_env
    `py_modules` entry staged under `staging`): the workers import this code, not whatever
    version they may have installed, so they need only the pinned third-party wheels."""
    if ray.is_initialized():
        return "ray: already initialised"
    address = spec.address or os.environ.get("RAY_ADDRESS")
    # The workers' own output (Ray Train's set-up and report lines, library chatter) stays in Ray's
    # log files (/tmp/ray/session_latest/logs); the driver shows each stage's progress, and a
    # worker's error reaches it as the stage's exception. `vlmflow -v` forwards it all.
    forward = bool(os.environ.get("VLMFLOW_LIBRARY_LOGS"))
    # Ray Train's print patch logs a worker's print and, where stdout is wrapped, prints it too:
    # every training progress line came out twice.
    quiet = {"PYTHONWARNINGS": "ignore::DeprecationWarning", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    env: dict[str, Any] = {"env_vars": quiet}
    if address:
        shipped = ""
        if spec.ship_code:
            package = stage_package(Path(staging or tempfile.mkdtemp(prefix="vlmflow-code-")))
            env["py_modules"] = [str(package)]
            shipped = f", vlmflow code shipped from {package}"
        ray.init(address=address, runtime_env=env, log_to_driver=forward)
        return f"ray: joined cluster at {address}{shipped}"
    ray.init(
        address="local",  # a new local Ray, even where `ray start` runs a cluster on this machine
        num_cpus=spec.num_cpus,
        include_dashboard=spec.include_dashboard,
        runtime_env=env,
        log_to_driver=forward,
        configure_logging=True,
        # Ray's start-up notes (token authentication, a driver thread without a SIGTERM handler)
        # are not the user's business; `vlmflow -v` shows them.
        logging_level=logging.WARNING if os.environ.get("VLMFLOW_LIBRARY_LOGS") else logging.ERROR,
    )
    return f"ray: local, {int(ray.cluster_resources().get('CPU', 0))} CPUs"


def stage_package(staging: Path) -> Path:
    """Copy the importable vlmflow package, with its `components` and `flows` sub-packages
    (separate folders in a source checkout), into `staging/vlmflow`; returns that folder."""
    import vlmflow
    import vlmflow.components
    import vlmflow.flows

    target = staging / "vlmflow"
    if target.exists():
        shutil.rmtree(target)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    root = Path(vlmflow.__path__[0])
    shutil.copytree(root, target, ignore=skip)
    for module in (vlmflow.components, vlmflow.flows):
        folder = Path(module.__path__[0])
        if not folder.is_relative_to(root):
            shutil.copytree(folder, target / module.__name__.split(".")[-1], ignore=skip)
    return target


def map_units(
    fn: Callable[..., T],
    units: Sequence[Any],
    *,
    desc: str,
    args: tuple = (),
    num_cpus: float = 1,
    max_retries: int = 3,
    progress: str = "auto",
    on_result: Callable[[int, T], None] | None = None,
) -> list[T]:
    """Run fn(unit, *args) for every unit as a Ray task; results in input order."""
    if not units:
        return []
    remote = ray.remote(num_cpus=num_cpus, max_retries=max_retries)(fn)
    shared = [ray.put(a) for a in args]
    pending = {remote.remote(unit, *shared): i for i, unit in enumerate(units)}
    results: list[Any] = [None] * len(units)
    with Progress(desc, len(units), mode=progress) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                results[index] = ray.get(ref)
                if on_result is not None:
                    on_result(index, results[index])
                bar.update()
    return results


_pool_lock = threading.Lock()
_pool: dict[str, Any] = {}  # the actors kept by the last map_on_actors(keep=True): key, actors


def map_on_actors(
    actor_class: type,
    init_args: tuple,
    method: str,
    batches: Sequence[Any],
    *,
    desc: str,
    num_actors: int = 1,
    num_cpus: float = 1,
    num_gpus: float = 0,
    progress: str = "auto",
    keep: bool = False,
) -> list[Any]:
    """Call `method(batch)` for every batch on a pool of actors that each build their state once
    (`actor_class(*init_args)`: a model, a tokenizer); results in input order.

    keep=True keeps the actors for the next call with the same class, arguments and resources
    (several evaluation tasks of one model load it once); any other call releases them first.
    """
    if not batches:
        return []
    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=1, max_task_retries=2)(actor_class)
    if keep:
        key = repr(
            (
                actor_class.__qualname__,
                init_args,
                num_actors,
                num_cpus,
                num_gpus,
                ray.get_runtime_context().get_job_id(),
            )
        )
        with _pool_lock:
            if _pool.get("key") != key:
                release_actors()
                _pool.update(key=key, actors=[remote.remote(*init_args) for _ in range(max(1, num_actors))])
            actors = list(_pool["actors"])
    else:  # this call's own actors: stages running at the same time never share or kill them
        actors = [remote.remote(*init_args) for _ in range(max(1, num_actors))]
    pool = ActorPool(list(actors))
    results: list[Any] = []
    try:
        with Progress(desc, len(batches), mode=progress) as bar:
            for result in pool.map(lambda actor, batch: getattr(actor, method).remote(batch), list(batches)):
                results.append(result)
                bar.update()
    finally:
        if not keep:
            for actor in actors:
                ray.kill(actor)
    return results


def release_actors() -> None:
    """Kill the actors a map_on_actors(keep=True) kept."""
    for actor in _pool.pop("actors", []):
        try:
            ray.kill(actor)
        except Exception:  # a Ray that was shut down took the actor with it
            log.debug("actor already gone")
    _pool.clear()


def require_gpus(per_actor: float, what: str) -> None:
    """Actors asking for GPUs the Ray cluster does not have would wait forever: say so instead."""
    if per_actor <= 0:
        return
    have = ray.cluster_resources().get("GPU", 0.0)
    if have < per_actor:
        raise UserError(f"{what}: {per_actor:g} per actor, the Ray cluster has {have:g} GPUs")


def map_jobs_on_ray_data(
    actor_class: type,
    init_args: tuple,
    jobs: Sequence[dict],
    *,
    desc: str,
    num_actors: int = 1,
    num_cpus: float = 1,
    num_gpus: float = 0,
    progress: str = "auto",
    on_result: Callable[[int], None] | None = None,
    blocks_per_actor: int | None = BLOCKS_PER_ACTOR,
) -> list[dict]:
    """Ray Data `map_batches` over an actor pool: every job (a JSON-able dict: one batch of work)
    is one row, answered by `actor_class(*init_args)(row)` as a JSON-able dict; results in input order.

    A job is self-contained (its images, texts and seeds), so a retried job, on a restarted
    actor after one was killed, computes the same answer: Ray Data restarts actors and retries
    their tasks by default.

    Consecutive jobs share a block (about `blocks_per_actor` blocks per actor; None: a block per
    job): each block costs Ray Data ~10 ms of scheduling, as much as a small job's work
    (benchmarks/capfilt.py measures both).
    """
    if not jobs:
        return []
    per_block = max(1, math.ceil(len(jobs) / (blocks_per_actor * max(1, num_actors)))) if blocks_per_actor else 1
    context = ray.data.DataContext.get_current()
    saved = context.execution_options.preserve_order, context.enable_progress_bars
    context.execution_options.preserve_order, context.enable_progress_bars = True, False
    try:
        blocks = math.ceil(len(jobs) / per_block)
        rows = ray.data.from_items([{"job": json.dumps(job)} for job in jobs], override_num_blocks=blocks)
        answered = rows.map_batches(
            _JsonRows,
            fn_constructor_args=(actor_class, init_args),
            batch_size=per_block,
            compute=ray.data.ActorPoolStrategy(size=max(1, num_actors)),
            num_cpus=num_cpus,
            num_gpus=num_gpus,
        )
        results: list[dict] = []
        with Progress(desc, len(jobs), mode=progress) as bar:
            for row in answered.iter_rows():
                results.append(json.loads(row["result"]))
                if on_result is not None:
                    on_result(len(results) - 1)
                bar.update()
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
    return results


class RayExecutor:
    """The executor on Ray (vlmflow.runtime.executor.Executor): the maps above, with Ray started by
    `start` (the run's start-up; None: Ray at $RAY_ADDRESS, else a new local one) before its first use, so that a stage
    with nothing to map, and a run whose stages are all cached, never starts it."""

    def __init__(self, start: Callable[[], Any] | None = None):
        self._start = start

    def start_ray(self) -> None:
        if self._start is not None:
            self._start()
        elif not ray.is_initialized():  # $RAY_ADDRESS, else a new local Ray: a plain ray.init() would
            ray.init(address=os.environ.get("RAY_ADDRESS") or "local")  # join a stale /tmp/ray cluster

    def map_units(self, fn: Callable[..., T], units: Sequence[Any], **options: Any) -> list[T]:
        if units:
            self.start_ray()
        return map_units(fn, units, **options)

    def map_on_actors(
        self, actor_class: type, init_args: tuple, method: str, batches: Sequence[Any], **options: Any
    ) -> list[Any]:
        if batches:
            self.start_ray()
        return map_on_actors(actor_class, init_args, method, batches, **options)

    def map_jobs(self, actor_class: type, init_args: tuple, jobs: Sequence[dict], **options: Any) -> list[dict]:
        if jobs:
            self.start_ray()
        return map_jobs_on_ray_data(actor_class, init_args, jobs, **options)

    def require_gpus(self, per_actor: float, what: str) -> None:
        if per_actor > 0:
            self.start_ray()
        require_gpus(per_actor, what)

    def dask_scheduler(self) -> Any:
        from ray.util.dask import ray_dask_get

        self.start_ray()
        return ray_dask_get


class _JsonRows:
    """Adapts a job-answering class to Ray Data's batch format (columns of JSON strings)."""

    def __init__(self, actor_class: type, init_args: tuple):
        self.actor = actor_class(*init_args)

    def __call__(self, batch: dict) -> dict:
        return {"result": [json.dumps(self.actor(json.loads(job))) for job in batch["job"]]}
