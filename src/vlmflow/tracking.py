"""MLflow, written once: one parent run per recipe run, one child run per stage.

Child runs carry the stage's params, metrics (rows, seconds, rows/s), tags (artifact
digest, input digests, Prefect flow-run id) and small artifacts: that is the lineage.
Default store: sqlite at DIR/mlflow.db with artifacts under DIR/mlartifacts.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from vlmflow.errors import UserError
from vlmflow.progress import StepProgress

MAX_PARAM = 500
LOCAL_UI = "http://127.0.0.1:5000"  # `vlmflow ui`'s MLflow UI for a workdir's own store


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
    if (Path(local) / "MLmodel").is_file():  # an MLflow model: the vlmflow folder is its artifact `model`
        return Path(local) / "artifacts" / "model"
    return Path(local)  # versions registered before 2026-12-03: the folder itself


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

    def run_url(self, run_id: str) -> str:
        """Where the MLflow UI shows a run: the tracking server's, or `vlmflow ui`'s for a local store."""
        base = self.uri.rstrip("/") if self.uri.startswith(("http://", "https://")) else LOCAL_UI
        return f"{base}/#/experiments/{self.experiment_id}/runs/{run_id}"

    def computed_in(self, stage: str, digest: str) -> str | None:
        """The MLflow run (this experiment) in which stage `stage` computed artifact `digest`, if any."""
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.`vlmflow.stage` = '{stage}' and tags.`vlmflow.artifact_digest` = '{digest}'"
            " and tags.`vlmflow.status` = 'computed'",
            max_results=1,
        )
        return found[0].info.run_id if found else None

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
        """Per-step metrics (training curves): one MLflow metric series per numeric key (not the
        step, its time, or the bookkeeping keys NOT_METRICS), each point stamped with its row's
        `time` (unix seconds, when the step ended) where the row has one."""
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), int(row["time"] * 1000) if "time" in row else now, int(row[step_key]))
            for row in rows
            for k, v in row.items()
            if k not in (step_key, "time", *NOT_METRICS) and isinstance(v, int | float) and not isinstance(v, bool)
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


NOT_METRICS = ("total_steps", "resumed_from")  # history keys for the console's progress line, not curves


class HistoryTail:
    """Streams a stage's per-step history (`history.jsonl` in its build folder, one JSON row per
    step) into the stage's MLflow run while the stage runs: a thread reads the rows appended since
    its last look every `interval` seconds and logs them in one batch, under `lock` (the run's
    MLflow lock: sqlite takes one writer). `stop()` logs the rest and returns the rows logged.

    The driver tails the file rather than the workers logging to MLflow themselves: the file is
    already the training loop's record (rank 0 writes it, on the artifact store every worker
    shares), the workers need no tracking credentials, and a slow tracking server never slows a
    training step. A file that is replaced or shrinks (a resumed stage rewrites it up to its
    checkpoint) is read again from the start, and steps already logged are not logged twice."""

    def __init__(
        self,
        log: Callable[[list[dict]], None],
        paths: list[Path],
        lock: threading.RLock,
        interval: float = 2.0,
        progress: StepProgress | None = None,
    ):
        """paths: where the file is, in the order it moves (a build folder, then the committed one);
        progress: also shown each batch of new rows (the console's progress line)."""
        self._log, self.paths, self._lock, self.interval = log, paths, lock, interval
        self._progress = progress
        self._offset, self._last_step, self.logged = 0, 0, 0
        self._inode = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"mlflow-tail:{paths[0].parent.name}", daemon=True)

    def start(self) -> HistoryTail:
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self._drain()
        if self._progress is not None:
            self._progress.close()
        return self.logged

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._drain()
            except Exception:  # a tracking server that is briefly down: the next look retries
                continue

    def _drain(self) -> None:
        with self._lock:
            for path in self.paths:
                try:
                    handle = open(path, "rb")  # noqa: SIM115 (closed below, once found)
                    break
                except FileNotFoundError:
                    continue
            else:
                return
            with handle:
                stat = os.fstat(handle.fileno())
                size = stat.st_size
                if size < self._offset or stat.st_ino != self._inode:  # rewritten: read it from the start
                    self._offset, self._inode = 0, stat.st_ino
                handle.seek(self._offset)
                chunk = handle.read(size - self._offset)
            end = chunk.rfind(b"\n") + 1  # complete lines only: the last may be half-written
            rows = []
            for line in chunk[:end].splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                    continue
                if "resumed_from" in row and self._progress is not None:
                    self._progress.resumed(row)
                if row["step"] > self._last_step:
                    rows.append(row)
            if rows:
                if self._progress is not None:
                    self._progress(rows)
                self._log(rows)
                self._last_step = rows[-1]["step"]
                self.logged += len(rows)
            self._offset += end
