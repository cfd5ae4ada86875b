"""Naming a run: every command that takes a run accepts the vlmflow run id, `latest`, a run
folder (or its summary.json), or an MLflow run id: the recipe run's own or any of its stages'
(what the MLflow UI shows)."""

from __future__ import annotations

import json
from pathlib import Path

from vlmflow.errors import UserError


def run_folder(ref: str | None, workdir: Path) -> Path:
    """The folder (DIR/runs/RUN_ID, holding summary.json) of the run `ref` names (None: latest)."""
    runs = workdir / "runs"
    ref = ref or "latest"
    path = Path(ref)
    if path.name == "summary.json" and path.is_file():
        return path.parent
    if (path / "summary.json").is_file():
        return path
    if (runs / ref / "summary.json").is_file():
        return runs / ref
    if runs.is_dir():
        for summary_file in sorted(runs.glob("*/summary.json"), reverse=True):
            try:
                summary = json.loads(summary_file.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            ids = {summary.get("mlflow_run_id"), *(s.get("mlflow_run_id") for s in summary.get("stages", []))}
            if ref in ids:
                return summary_file.parent
    known = sorted((p.name for p in runs.glob("*") if p.name != "latest"), reverse=True)[:3] if runs.is_dir() else []
    hint = f" (latest: {', '.join(known)})" if known else ""
    raise UserError(
        f"no run {ref!r} in {runs}: give a vlmflow run id{hint}, `latest`, a run folder or an MLflow run id"
    )


def load_summary(ref: str | None, workdir: Path) -> dict:
    return json.loads((run_folder(ref, workdir) / "summary.json").read_text())


def status_of(summary: dict) -> str:
    """The run's status; `dead` for a run still `running` whose driver process (on this host) is gone."""
    status = summary.get("status", "?")
    driver = summary.get("driver")
    if status != "running" or not driver:
        return status
    import socket

    import psutil

    if driver.get("host") != socket.gethostname():
        return status  # another machine's driver: it cannot be checked from here
    try:
        alive = abs(psutil.Process(driver["pid"]).create_time() - driver["create_time"]) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
        alive = False
    return status if alive else "dead"
