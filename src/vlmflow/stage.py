"""The stage contract every component implements, and the data a stage hands on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmflow.artifacts import ArtifactStore
from vlmflow.specs.recipe import Recipe


@dataclass(frozen=True)
class StageOutput:
    """A finished stage's artifact: what downstream stages read."""

    stage: str
    digest: str
    path: Path
    stats: dict


@dataclass
class StageContext:
    recipe: Recipe
    store: ArtifactStore
    out: Path  # the build folder (DIGEST.partial); committed as DIGEST when run returns
    digest: str
    inputs: dict[str, StageOutput]
    progress: str = "auto"


@dataclass
class StageResult:
    rows_in: int
    rows_out: int
    rows_quarantined: int
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)  # files under `out` to log to MLflow
    details: dict[str, Any] = field(default_factory=dict)  # JSON-able extras for stats
    set_aside: str = "quarantined"  # what the rows_quarantined are, in logs and `vlmflow lineage`

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
        }


@dataclass(frozen=True)
class Stage:
    """name: artifact folder and MLflow child-run name; version: bump when output changes;
    spec: the part of the recipe the output depends on (JSON-able); run: does the work."""

    name: str
    version: str
    spec: Callable[[Recipe], Any]
    run: Callable[[StageContext], StageResult]
