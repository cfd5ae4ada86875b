"""Where a stage's work runs: its context's `Executor` (`ctx.executor`), chosen by the recipe's
`runtime.executor`. A component says what to map (a function over units, batches over a model
held by an actor, JSON jobs over a pool); the executor says where:

- `ray` (the default, `vlmflow.runtime.ray.RayExecutor`): Ray tasks and actor pools, with
  retries; Ray starts on the first use (through the run's start-up callback), so a run whose
  stages are all cached never starts it;
- `local` (`LocalExecutor`): in this process, in input order, one model instance per map: for
  tests and debugging (a breakpoint in a component stops there).

A stage writes the same bytes either way (the same digest, the same files): the executor is
operational, in no cache key. Training is out of its scope: Ray Train runs on Ray whatever the
executor (`start_ray` starts it the run's way for a step that trains).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from vlmflow.errors import UserError
from vlmflow.progress import Progress

if TYPE_CHECKING:
    from vlmflow.component import Component

T = TypeVar("T")
ExecutorKind = Literal["ray", "local"]
BLOCKS_PER_ACTOR = 8  # map_jobs on Ray: consecutive jobs share a block, about this many blocks per actor


class Executor(Protocol):
    def map_units(
        self,
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
        """fn(unit, *args) for every unit; results in input order; on_result(index, result) as each arrives."""
        ...

    def map_on_actors(
        self,
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
        """`method(batch)` of an `actor_class(*init_args)` (built once per worker) for every batch;
        results in input order. keep=True keeps the instances for the next call with the same
        class and arguments."""
        ...

    def map_jobs(
        self,
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
        """`actor_class(*init_args)(job)` for every JSON-able job, answered as JSON-able dicts (both
        cross a JSON round trip); results in input order; on_result(index) as each arrives."""
        ...

    def require_gpus(self, per_actor: float, what: str) -> None:
        """A UserError naming `what` when a worker could never get `per_actor` GPUs."""
        ...

    def dask_scheduler(self) -> Any:
        """The scheduler a stage's dask graphs compute on (`compute(scheduler=...)`)."""
        ...

    def start_ray(self) -> None:
        """Start (or join) Ray the run's way for work that runs on it whatever the executor (Ray Train)."""
        ...


class LocalExecutor:
    """Every map in this process, in input order, with the same progress lines as on Ray.
    start_ray: how a step that trains starts Ray (the run's start-up; None: Ray Train's own)."""

    def __init__(self, start_ray: Callable[[], Any] | None = None):
        self._start_ray = start_ray
        self._kept: tuple[tuple, Any] | None = None  # (class and arguments, instance) of map_on_actors(keep=True)

    def map_units(
        self,
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
        results: list[T] = []
        if not units:
            return results
        with Progress(desc, len(units), mode=progress) as bar:
            for index, unit in enumerate(units):
                results.append(fn(unit, *args))
                if on_result is not None:
                    on_result(index, results[index])
                bar.update()
        return results

    def map_on_actors(
        self,
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
        if not batches:
            return []
        if keep:
            key = (actor_class, init_args)
            if self._kept is None or self._kept[0] != key:
                self._kept = (key, actor_class(*init_args))
            actor = self._kept[1]
        else:
            self._kept = None  # as on Ray: any other call releases the kept instance
            actor = actor_class(*init_args)
        call = getattr(actor, method)
        return self.map_units(lambda batch: call(batch), batches, desc=desc, progress=progress)

    def map_jobs(
        self,
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
        if not jobs:
            return []
        actor = actor_class(*init_args)

        def answer(job: dict) -> dict:  # the JSON round trips of Ray Data's rows: tuples arrive as lists
            return json.loads(json.dumps(actor(json.loads(json.dumps(job)))))

        done = None if on_result is None else (lambda index, _: on_result(index))
        return self.map_units(answer, jobs, desc=desc, progress=progress, on_result=done)

    def require_gpus(self, per_actor: float, what: str) -> None:
        if per_actor <= 0:
            return
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < per_actor:
            raise UserError(f"{what}: {per_actor:g} per actor, this machine has {have} GPUs (runtime.executor: local)")

    def dask_scheduler(self) -> Any:
        return "threads"

    def start_ray(self) -> None:
        if self._start_ray is not None:
            self._start_ray()


def executor_for(kind: ExecutorKind, start_ray: Callable[[], Any] | None = None) -> Executor:
    """The executor `runtime.executor` names; start_ray starts (or joins) Ray the run's way (None:
    Ray's own `ray.init()`): on first use under `ray`, for Ray Train only under `local`."""
    if kind == "local":
        return LocalExecutor(start_ray)
    from vlmflow.runtime.ray import RayExecutor  # Ray: imported when a stage runs on it

    return RayExecutor(start_ray)


def trains_on_ray(component: Component) -> bool:
    """A step that runs Ray Train, whatever the executor: its component's output depends on the
    training runtime (`runtime.train.*` among its recipe_fields)."""
    return any(name == "runtime.train" or name.startswith("runtime.train.") for name in component.recipe_fields)
