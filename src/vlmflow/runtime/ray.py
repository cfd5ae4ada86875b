"""Ray, written once: start or join a cluster, and map a function over units of work.

One unit of work is one task (an ingest unit is one shard). Tasks retry when a worker
dies (`max_retries`), so a killed worker does not change a stage's output; results come
back in input order whatever order the tasks finish in.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import ray

from vlmflow.progress import Progress
from vlmflow.specs.recipe import RaySpec

log = logging.getLogger("vlmflow")
T = TypeVar("T")


def init_ray(spec: RaySpec) -> str:
    """Join `spec.address` / $RAY_ADDRESS, else start a local Ray. Returns a description."""
    if ray.is_initialized():
        return "ray: already initialised"
    address = spec.address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return f"ray: joined cluster at {address}"
    ray.init(
        num_cpus=spec.num_cpus,
        include_dashboard=spec.include_dashboard,
        runtime_env=env,
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
    return f"ray: local, {int(ray.cluster_resources().get('CPU', 0))} CPUs"


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
