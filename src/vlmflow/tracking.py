"""MLflow, written once: one parent run per recipe run, one child run per stage.

Child runs carry the stage's params, metrics (rows, seconds, rows/s), tags (artifact
digest, input digests, Prefect flow-run id) and small artifacts: that is the lineage.
Default store: sqlite at DIR/mlflow.db with artifacts under DIR/mlartifacts.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from vlmflow.errors import UserError

MAX_PARAM = 500


def tracking_uri(workdir: Path, configured: str | None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir.resolve() / 'mlflow.db'}"


def download_model(uri: str, tracking: str, destination: Path) -> Path:
    """A registered model version (models:/NAME/VERSION) copied from the tracking server's
    artifact store into `destination`; a clear error when the registry does not have it.
    (No global MLflow state: the registry is asked for the version's source, which is fetched.)"""
    import mlflow.artifacts

    name, _, version = uri.removeprefix("models:/").rpartition("/")
    try:
        source = MlflowClient(tracking_uri=tracking, registry_uri=tracking).get_model_version_download_uri(
            name, version
        )
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(destination), tracking_uri=tracking
        )
    except Exception as exc:  # MlflowException (no such model or version), an unreachable server
        raise UserError(f"cannot load {uri} from {tracking}: {str(exc).splitlines()[0]}") from None
    return Path(local)


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested spec -> {"a.b.0.c": "value"} for MLflow params (values capped at 500 chars)."""
    out: dict[str, str] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out[prefix.rstrip(".")] = text[:MAX_PARAM]
    return out


class Tracker:
    def __init__(self, uri: str, experiment: str, artifact_root: Path | None):
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            location = (
                artifact_root.resolve().as_uri() if artifact_root is not None and uri.startswith("sqlite") else None
            )
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = found.experiment_id

    def start(self, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        if parent:
            tags = {**tags, "mlflow.parentRunId": parent}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def log(
        self,
        run_id: str,
        params: dict[str, str] | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
            params=[Param(k, v) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    def log_files(self, run_id: str, files: list[Path], artifact_path: str | None = None) -> None:
        for path in files:
            if path.is_file():
                self.client.log_artifact(run_id, str(path), artifact_path)

    def log_history(self, run_id: str, rows: list[dict], step_key: str = "step") -> None:
        """Per-step metrics (training curves): one MLflow metric series per numeric key."""
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, int(row[step_key]))
            for row in rows
            for k, v in row.items()
            if k != step_key and isinstance(v, int | float)
        ]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[start : start + 1000])

    def register_model(self, run_id: str, name: str, artifact_path: str, tags: dict[str, str]) -> str:
        """A new version of registered model `name` from a run's artifact folder; returns the version."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
        version = self.client.create_model_version(name, source, run_id=run_id, tags=tags)
        return str(version.version)

    def finish(self, run_id: str, ok: bool) -> None:
        status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
        self.client.set_terminated(run_id, status)
