"""A recipe run and its stages as Prefect tasks, written once.

`RecipeRun` owns what spans the whole run: the workdir, the artifact store, Ray, the MLflow
parent run and DIR/runs/RUN_ID/summary.json (rewritten after every stage, so a killed run
still shows how far it got). `RecipeRun.stage` runs one stage as a Prefect task: it
computes the stage's digest, reuses a finished artifact (`cached`) or builds it
(`computed`), and records it in MLflow and the summary.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ray
import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from vlmflow import __version__
from vlmflow.artifacts import ArtifactStore, atomic_write_text, digest_of, file_lock, stage_digest
from vlmflow.runtime.environment import environment
from vlmflow.runtime.ray import init_ray
from vlmflow.specs.recipe import Recipe
from vlmflow.stage import Stage, StageContext, StageOutput
from vlmflow.tracking import Tracker, flatten, tracking_uri

log = logging.getLogger("vlmflow")


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


class RecipeRun:
    def __init__(
        self,
        recipe: Recipe,
        workdir: Path,
        spec_path: str,
        plan: dict | None = None,
        flow: str = "recipe",
        tags: dict[str, str] | None = None,
    ):
        """flow: which flow runs (`recipe`, `data-refresh`); tags: extra MLflow tags of every run."""
        self.recipe = recipe
        self.flow = flow
        self.extra_tags = tags or {}
        self.plan = plan
        self.workdir = workdir.resolve()
        self.store = ArtifactStore(self.workdir / "artifacts")
        self.run_id = new_run_id()
        self.run_dir = self.workdir / "runs" / self.run_id
        self.resolved = recipe.model_dump(mode="json")
        self.summary: dict[str, Any] = {
            "run_id": self.run_id,
            "recipe": recipe.name,
            "flow": flow,
            "spec_path": spec_path,
            "spec_digest": digest_of(self.resolved),
            "workdir": str(self.workdir),
            "vlmflow_version": __version__,
            "status": "running",
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "stages": [],
        }
        self.tracker: Tracker | None = None
        self.parent_run: str | None = None

    def __enter__(self) -> RecipeRun:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "resolved_spec.yaml", yaml.safe_dump(self.resolved, sort_keys=False))
        atomic_write_text(self.run_dir / "environment.json", json.dumps(environment(), indent=2))
        if self.plan is None:
            from vlmflow.plan import build_plan

            self.plan = build_plan(self.recipe, self.workdir)
        atomic_write_text(self.run_dir / "plan.json", json.dumps(self.plan, indent=2))
        latest = self.workdir / "runs" / "latest"
        tmp_link = latest.with_name(f".latest-{self.run_id}")
        tmp_link.symlink_to(self.run_id)
        os.replace(tmp_link, latest)
        self.summary["prefect_flow_run_id"] = str(flow_run.id) if flow_run.id else None
        self.summary["ray"] = init_ray(self.recipe.runtime.ray, self.run_dir / "code")
        uri = tracking_uri(self.workdir, self.recipe.runtime.mlflow.tracking_uri)
        self.tracker = Tracker(
            uri, self.recipe.runtime.mlflow.experiment or self.recipe.name, self.workdir / "mlartifacts"
        )
        name = self.recipe.name if self.flow == "recipe" else f"{self.recipe.name} {self.flow}"
        self.parent_run = self.tracker.start(name, self._tags())
        self.tracker.log(
            self.parent_run, params={"seed": str(self.recipe.seed), "spec_path": self.summary["spec_path"]}
        )
        saved = ("resolved_spec.yaml", "environment.json", "plan.json")
        self.tracker.log_files(self.parent_run, [self.run_dir / name for name in saved])
        self.summary.update(mlflow_run_id=self.parent_run, mlflow_tracking_uri=uri)
        self._save()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        ok = exc_type is None
        self.summary["status"] = "succeeded" if ok else "failed"
        self.summary["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        if exc is not None:
            self.summary["error"] = str(exc)
        self._save()
        if self.tracker and self.parent_run:
            self.tracker.log(self.parent_run, metrics=self._totals())
            self.tracker.log_files(self.parent_run, [self.run_dir / "summary.json"])
            self.tracker.finish(self.parent_run, ok)
        if ray.is_initialized():
            ray.shutdown()

    def _tags(self) -> dict[str, str]:
        return {
            "vlmflow.run_id": self.run_id,
            "vlmflow.spec_digest": self.summary["spec_digest"],
            "prefect.flow_run_id": self.summary.get("prefect_flow_run_id") or "",
            "vlmflow.flow": self.flow,
            **self.extra_tags,
        }

    def _totals(self) -> dict[str, float]:
        stages = self.summary["stages"]
        return {
            "stages_computed": sum(s["status"] == "computed" for s in stages),
            "stages_cached": sum(s["status"] == "cached" for s in stages),
            "seconds": sum(s.get("seconds", 0.0) for s in stages),
        }

    def _save(self) -> None:
        atomic_write_text(self.run_dir / "summary.json", json.dumps(self.summary, indent=2))

    def stage(self, stage: Stage, **inputs: StageOutput) -> StageOutput:
        """Run (or reuse) one stage as a Prefect task named after it."""
        runner = stage_task.with_options(name=stage.name, task_run_name=stage.name)
        return runner(self, stage, inputs)

    def record(self, stage: Stage, digest: str, inputs: dict[str, StageOutput], status: str, stats: dict) -> str:
        assert self.tracker is not None and self.parent_run is not None
        path = self.store.path(stage.name, digest)
        entry = {
            "name": stage.name,
            "status": status,
            "artifact_digest": digest,
            "artifact_path": str(path),
            "input_digests": {k: v.digest for k, v in inputs.items()},
            **{k: stats.get(k) for k in ("rows_in", "rows_out", "rows_quarantined", "seconds")},
            "set_aside": stats.get("set_aside", "quarantined"),
        }
        headline = {k: v for k, v in stats["metrics"].items() if k.startswith(("eval_", "first_loss", "final_loss"))}
        if headline:
            entry["metrics"] = headline
        child = self.tracker.start(stage.name, {**self._tags(), "vlmflow.stage": stage.name}, parent=self.parent_run)
        tags = {
            "vlmflow.status": status,
            "vlmflow.artifact_digest": digest,
            "vlmflow.artifact_path": str(path),
            "vlmflow.input_digests": json.dumps(entry["input_digests"], sort_keys=True),
            "vlmflow.component_version": stage.version,
        }
        rows = {k: float(stats.get(k) or 0) for k in ("rows_in", "rows_out", "rows_quarantined", "seconds")}
        seconds = stats.get("seconds") or 0.0
        rows["rows_per_s"] = rows["rows_in"] / seconds if seconds else 0.0
        metrics = {**rows, **self._planned(stage.name), **stats["metrics"]}
        self.tracker.log(child, params=flatten(stage.spec(self.recipe)), tags=tags, metrics=metrics)
        self._log_outputs(child, path, stats, status)
        self.tracker.finish(child, status != "failed")
        entry["mlflow_run_id"] = child
        self.summary["stages"].append(entry)
        self._save()
        return child

    def _planned(self, name: str) -> dict[str, float]:
        """What the plan predicted for a training stage, beside what it measured (worker_rss_*)."""
        entry = next((e for e in (self.plan or {}).get("stages", []) if e["stage"] == name), {})
        train = entry.get("train") or {}
        if "memory" not in train:
            return {}
        return {"plan_memory_gb": train["memory"]["total_gb"], "plan_flops_per_step": float(train["flops_per_step"])}

    def _log_outputs(self, child: str, path: Path, stats: dict, status: str) -> None:
        """Artifacts (keeping their sub-folders), a per-step history, and a registered model."""
        assert self.tracker is not None
        for name in stats.get("artifacts", []):
            folder = Path(name).parent
            self.tracker.log_files(child, [path / name], None if folder == Path(".") else str(folder))
        details = stats.get("details") or {}
        if details.get("history") and (path / details["history"]).is_file():
            lines = (path / details["history"]).read_text().splitlines()
            self.tracker.log_history(child, [json.loads(line) for line in lines if line.strip()])
        model = details.get("register_model")
        if model and status == "computed":
            version = self.tracker.register_model(child, model["name"], model["artifact_path"], model["tags"])
            self.summary.setdefault("registered_models", []).append({"name": model["name"], "version": version})

    def record_failure(self, stage: Stage, digest: str, inputs: dict[str, StageOutput], error: BaseException) -> None:
        stats = {"metrics": {}, "artifacts": [], "seconds": 0.0}
        self.record(stage, digest, inputs, "failed", stats)
        self.summary["stages"][-1]["error"] = f"{type(error).__name__}: {error}"
        self._save()


@task(cache_policy=NO_CACHE, persist_result=False)
def stage_task(run: RecipeRun, stage: Stage, inputs: dict[str, StageOutput]) -> StageOutput:
    store = run.store
    digest = stage_digest(stage.name, stage.spec(run.recipe), [inputs[k].digest for k in sorted(inputs)], stage.version)
    with file_lock(store.root / stage.name / f"{digest}.lock"):  # a second run then finds it cached
        if store.is_complete(stage.name, digest):
            status, stats = "cached", store.stats(stage.name, digest)
            log.info("%s: cached (%s)", stage.name, digest)
        else:
            started = time.monotonic()
            ctx = StageContext(
                run.recipe, store, store.partial(stage.name, digest), digest, inputs, run.recipe.runtime.progress
            )
            try:
                result = stage.run(ctx)
            except BaseException as error:
                run.record_failure(stage, digest, inputs, error)
                raise
            stats = result.stats(time.monotonic() - started)
            store.commit(stage.name, digest, stats)
            status = "computed"
            log.info(
                "%s: computed %d -> %d rows (%d %s) in %.1fs",
                stage.name,
                stats["rows_in"],
                stats["rows_out"],
                stats["rows_quarantined"],
                stats["set_aside"],
                stats["seconds"],
            )
    run.record(stage, digest, inputs, status, stats)
    return StageOutput(stage.name, digest, store.path(stage.name, digest), stats)
