"""The stage contract every component implements, the data a stage hands on, and `run_stage`:
the one place a step's artifact is reused or built (the Prefect task, tests and benchmarks
call it), on the executor it is given (vlmflow.runtime.executor: Ray by default)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmflow.artifacts import ArtifactStore, file_lock
from vlmflow.runtime.executor import Executor, executor_for, trains_on_ray

if TYPE_CHECKING:
    from vlmflow.pipeline import Step

log = logging.getLogger("vlmflow")
HISTORY = "history.jsonl"  # a stage's per-step metrics, one JSON row per step, streamed to MLflow as it grows


@dataclass(frozen=True)
class StageOutput:
    """A finished stage's artifact: what downstream stages read."""

    stage: str
    digest: str
    path: Path
    stats: dict


@dataclass
class StageContext:
    """What a component's run function gets: `config` is the step's typed config, `inputs` the
    upstream artifacts by port, `out` the build folder (DIGEST.partial, committed as DIGEST when
    run returns); `recipe` carries the settings every step shares (seed, model, runtime);
    `executor` runs the step's maps (Ray by default; a LocalExecutor runs them in process)."""

    recipe: Any
    store: ArtifactStore
    out: Path
    digest: str
    inputs: dict[str, StageOutput]
    progress: str = "auto"
    config: Any = None
    name: str = ""
    field: tuple = ()  # where the spec declares the step (or the settings it runs with)
    register: bool = False  # the run registers the model this step writes
    executor: Executor = dataclasses.field(default_factory=lambda: executor_for("ray"))  # `field` is taken


@dataclass(frozen=True)
class ModelRegistration:
    """A model folder under the stage's output that the run registers in MLflow's model registry
    (when the step registers: its recipe's last training stage)."""

    name: str  # the registered model's name
    artifact_path: str  # the MLflow model folder, relative to the stage's output
    tags: dict[str, str] = field(default_factory=dict)  # the version's tags


@dataclass(frozen=True)
class Outputs:
    """What the runtime does with a stage's files besides logging its artifacts: the per-step
    history it streams to MLflow (HISTORY), the tables MLflow shows as tables, the models it registers."""

    history: str | None = None
    tables: tuple[str, ...] = ()
    models: tuple[ModelRegistration, ...] = ()

    def as_json(self) -> dict:
        return {"history": self.history, "tables": list(self.tables), "models": [asdict(m) for m in self.models]}

    @classmethod
    def of(cls, stats: dict) -> Outputs:
        """The outputs a committed stage's stats record."""
        found = stats.get("outputs") or {}
        models = tuple(ModelRegistration(**m) for m in found.get("models") or [])
        return cls(found.get("history"), tuple(found.get("tables") or ()), models)


@dataclass
class StageResult:
    rows_in: int
    rows_out: int
    rows_quarantined: int
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)  # files under `out` to log to MLflow
    details: dict[str, Any] = field(default_factory=dict)  # JSON-able extras for people (stats, lineage)
    set_aside: str = "quarantined"  # what the rows_quarantined are, in logs and `vlmflow lineage`
    outputs: Outputs = field(default_factory=Outputs)

    def stats(self, seconds: float) -> dict:
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rows_quarantined": self.rows_quarantined,
            "set_aside": self.set_aside,
            "seconds": round(seconds, 3),
            "metrics": self.metrics,
            "artifacts": self.artifacts,
            "details": self.details,
            "outputs": self.outputs.as_json(),
        }


def run_stage(
    step: Step,
    digest: str,
    inputs: dict[str, StageOutput],
    recipe: Any,
    store: ArtifactStore,
    progress: str = "auto",
    executor: Executor | Callable[[], Executor] | None = None,
) -> tuple[str, dict]:
    """Reuse the step's artifact (`cached`) or build and commit it (`computed`): (status, stats).
    A lock per artifact makes a second run at the same time wait and then find it cached.
    executor: where the build's work runs (default: Ray, at $RAY_ADDRESS or a new local one, started on first
    use), or a function making it, called only when the step computes (a cached step imports no
    Ray); a step that trains starts Ray through it (Ray Train runs on Ray whatever the executor)."""
    with file_lock(store.root / step.name / f"{digest}.lock"):
        if store.is_complete(step.name, digest):
            log.info("%s: cached (%s)", step.name, digest)
            return "cached", store.stats(step.name, digest)
        if executor is None:
            executor = executor_for("ray")
        elif not hasattr(executor, "map_units"):  # a function making the executor
            executor = executor()
        if trains_on_ray(step.component):
            executor.start_ray()
        log.info("%s: computing (%s)", step.name, digest)
        started = time.monotonic()
        ctx = StageContext(
            recipe, store, store.partial(step.name, digest), digest, inputs, progress,
            step.config, step.name, step.field, step.register, executor,
        )  # fmt: skip
        result = step.component.call("run", ctx)
        stats = result.stats(time.monotonic() - started)
        store.commit(step.name, digest, stats)
    log.info(
        "%s: computed %d -> %d rows (%d %s) in %.1fs",
        step.name, stats["rows_in"], stats["rows_out"], stats["rows_quarantined"], stats["set_aside"], stats["seconds"],
    )  # fmt: skip
    return "computed", stats
