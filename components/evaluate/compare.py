"""Compare evaluation results across runs: one row per (task, metric), one column per run.

A run is named as every command names one (`vlmflow.runs`): its id, `latest`, its folder, its
summary.json or an MLflow run id. A task's metrics
come from its stage artifact's metrics.json, else the summary's headline metrics, else the
stage's MLflow child run.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from vlmflow.errors import UserError
from vlmflow.runs import run_folder

PREFIX = "eval-"


def summary_file(run: str, workdir: Path) -> Path:
    return run_folder(run, workdir) / "summary.json"


def is_evaluation(entry: dict) -> bool:
    """An evaluation stage's entry (summaries before 2026-12-03 name no component: by its name)."""
    return entry.get("component", "evaluate" if entry["name"].startswith(PREFIX) else None) == "evaluate"


def task_metrics(entry: dict, summary: dict) -> dict[str, float]:
    """One eval stage's metrics (names without the eval_ prefix)."""
    stored = Path(entry.get("artifact_path") or "") / "metrics.json"
    if entry.get("artifact_path") and stored.is_file():
        return {k: float(v) for k, v in json.loads(stored.read_text()).items()}
    if entry.get("metrics"):
        return {k.removeprefix("eval_"): float(v) for k, v in entry["metrics"].items()}
    if entry.get("mlflow_run_id") and summary.get("mlflow_tracking_uri"):
        from mlflow.tracking import MlflowClient

        logged = MlflowClient(tracking_uri=summary["mlflow_tracking_uri"]).get_run(entry["mlflow_run_id"])
        return {k.removeprefix("eval/"): v for k, v in logged.data.metrics.items() if k.startswith("eval/")}
    return {}


def run_metrics(summary: dict) -> dict[tuple[str, str], float]:
    """(task, metric) -> value for every finished eval stage of a run."""
    found: dict[tuple[str, str], float] = {}
    for entry in summary["stages"]:
        if is_evaluation(entry) and entry["status"] not in ("failed", "skipped"):
            task = entry["name"].removeprefix(PREFIX)
            found |= {(task, name): value for name, value in task_metrics(entry, summary).items()}
    return found


def compare(runs: list[str], workdir: Path) -> pl.DataFrame:
    """Columns: task, metric, then one column per run (its run id; null where a run lacks it)."""
    columns: dict[str, dict[tuple[str, str], float]] = {}
    for run in runs:
        summary = json.loads(summary_file(run, workdir).read_text())
        label = summary["run_id"] if summary["run_id"] not in columns else f"{summary['run_id']} ({run})"
        columns[label] = run_metrics(summary)
    keys = list(dict.fromkeys(key for metrics in columns.values() for key in metrics))
    if not keys:
        raise UserError(f"no evaluation results in {', '.join(runs)} (the recipe has no evaluate: section?)")
    data = {"task": [k[0] for k in keys], "metric": [k[1] for k in keys]}
    data |= {label: [metrics.get(k) for k in keys] for label, metrics in columns.items()}
    schema = {"task": pl.String, "metric": pl.String} | dict.fromkeys(columns, pl.Float64)
    return pl.DataFrame(data, schema=schema)


def markdown(table: pl.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" if c in ("task", "metric") else "---:" for c in table.columns) + "|"
    lines = [header, rule]
    for row in table.iter_rows():
        cells = [str(v) if i < 2 else ("" if v is None else f"{v:.4g}") for i, v in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
