"""MLflow, written once: one parent run per recipe run, one child run per stage.

Child runs carry the stage's params, metrics (rows, seconds, rows/s), tags (artifact
digest, input digests, Prefect flow-run id) and small artifacts: that is the lineage.
Default store: sqlite at DIR/mlflow.db with artifacts under DIR/mlartifacts.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
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


def metric_name(key: str, group: str) -> str:
    """The name a metric has in MLflow, `section/name`: the MLflow UI draws one section per
    prefix, so a stage's loss sits under `train/`, not among dozens of ungrouped charts.
    Row counts go to `data/`, a stage's wall time to `stage/seconds`, evaluation scores to
    `eval/`, the plan's predictions to `plan/`, parameter counts to `model/`, workers' memory
    to `system/` (beside MLflow's own system metrics), anything else to the stage's own
    `group`, its component (`train/loss`, `dedup/near_duplicates`). A name that already has
    sections keeps its first one and joins the rest with dots (`mixture/dedup-qa/count` ->
    `mixture/dedup-qa.count`): one section.
    summary.json, metrics.json and the components keep the plain names."""
    head, slash, rest = key.partition("/")
    if slash:
        return f"{head}/{rest.replace('/', '.')}"
    if key.startswith("rows_"):
        return f"data/{key}"
    if key == "seconds":
        return "stage/seconds"
    for prefix, section in (("eval_", "eval"), ("plan_", "plan")):
        if key.startswith(prefix):
            return f"{section}/{key.removeprefix(prefix)}"
    if key.startswith("params_"):
        return f"model/{key}"
    if key.startswith("worker_"):
        return f"system/{key}"
    return f"{group}/{key}"


def dataset(name: str, digest: str, folder: Path, rows: int | None) -> Dataset:
    """A stage artifact as an MLflow dataset: its stage name, digest, folder, row count and,
    where it has a `manifest.parquet` (a samples artifact), that table's columns."""
    from mlflow.types import ColSpec, Schema

    schema = None
    manifest = folder / "manifest.parquet"
    if manifest.is_file():
        import polars as pl

        columns = [ColSpec(_mlflow_type(dtype), name) for name, dtype in pl.read_parquet_schema(manifest).items()]
        schema = json.dumps({"mlflow_colspec": Schema(columns).to_dict()})
    profile = json.dumps({"num_rows": rows}) if rows is not None else None
    source = json.dumps({"uri": folder.resolve().as_uri()})
    return Dataset(name=name, digest=digest, source_type="local", source=source, schema=schema, profile=profile)


def _mlflow_type(dtype: Any) -> Any:
    """A polars column type as MLflow's nearest column type (lists as arrays of their items)."""
    import polars as pl
    from mlflow.types import DataType
    from mlflow.types.schema import Array

    if isinstance(dtype, pl.List | pl.Array):
        return Array(_mlflow_type(dtype.inner))
    if dtype in (pl.Int8, pl.Int16, pl.Int32, pl.UInt8, pl.UInt16):
        return DataType.integer
    if dtype.is_integer():
        return DataType.long
    named = {pl.Float32: DataType.float, pl.Float64: DataType.double, pl.Boolean: DataType.boolean}
    named |= {pl.Binary: DataType.binary, pl.Datetime: DataType.datetime, pl.Date: DataType.datetime}
    return next((kind for polars_type, kind in named.items() if dtype == polars_type), DataType.string)


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
        group: str = "run",
    ) -> None:
        """Params, tags and metrics (named by `metric_name` under `group`) in one batch."""
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(metric_name(k, group), float(v), now, 0) for k, v in (metrics or {}).items()],
            params=[Param(k, v) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    def log_progress(self, run_id: str, desc: str, done: int, total: int) -> None:
        """A long stage's progress as a curve: `progress/<desc>`, the share done (0..1), with
        the units done as its step."""
        name = "progress/" + re.sub(r"[^A-Za-z0-9_.-]+", "_", desc).strip("_")
        self.client.log_batch(run_id, metrics=[Metric(name, done / max(total, 1), int(time.time() * 1000), done)])

    def log_files(self, run_id: str, files: list[Path], artifact_path: str | None = None) -> None:
        for path in files:
            if path.is_file():
                self.client.log_artifact(run_id, str(path), artifact_path)

    def log_history(self, run_id: str, rows: list[dict], group: str, step_key: str = "step") -> None:
        """Per-step metrics (training curves): one MLflow metric series per numeric key (not the
        step, its time, or the bookkeeping keys NOT_METRICS), named by `metric_name` under
        `group`, each point stamped with its row's `time` (unix seconds, when the step ended)
        where the row has one."""
        now = int(time.time() * 1000)
        metrics = [
            Metric(
                metric_name(k, group), float(v), int(row["time"] * 1000) if "time" in row else now, int(row[step_key])
            )
            for row in rows
            for k, v in row.items()
            if k not in (step_key, "time", *NOT_METRICS) and isinstance(v, int | float) and not isinstance(v, bool)
        ]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[start : start + 1000])

    def system_metrics(self, run_id: str, interval: float) -> Any:
        """MLflow's system-metrics monitor on run `run_id`, started: a thread that samples this
        machine every `interval` seconds and logs `system/...` metrics until `.finish()`."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=self.uri)
        monitor.start()
        return monitor

    def log_datasets(self, run_id: str, datasets: list[tuple[Dataset, str]]) -> None:
        """Inputs of a run as MLflow datasets (the UI's Datasets column), each with its context."""
        inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", context)]) for dataset, context in datasets]
        if inputs:
            self.client.log_inputs(run_id, datasets=inputs)

    def log_table(self, run_id: str, table: Path, artifact_file: str, max_rows: int = 1000) -> None:
        """A parquet table's first `max_rows` rows as an MLflow table (the UI shows it as one);
        binary columns are left out."""
        import polars as pl

        frame = pl.read_parquet(table, n_rows=max_rows)
        frame = frame.select([name for name, dtype in frame.schema.items() if dtype != pl.Binary])
        self.client.log_table(run_id, frame.to_pandas(), artifact_file)

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
