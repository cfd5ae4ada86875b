"""Manifest versions made by the data-refresh flow: DIR/versions/RECIPE.jsonl, one line per refresh.

Each line names the manifest (the ingest artifact's digest), the version it follows, what changed
(rows added / removed, units built / reused, rows read) and the run that made it (vlmflow run id,
MLflow run id, Prefect flow-run id). The version number grows when the manifest changes; a
refresh that found nothing new repeats the number (its stages were cached).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from vlmflow.artifacts import atomic_write_text, file_lock

FIELDS = ("rows_added", "rows_removed", "rows_moved", "units", "units_built", "units_reused", "rows_ingested")


def log_path(workdir: Path, recipe: str) -> Path:
    return workdir / "versions" / f"{recipe}.jsonl"


def read_versions(workdir: Path, recipe: str) -> list[dict]:
    path = log_path(workdir, recipe)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def recipes(workdir: Path) -> list[str]:
    folder = workdir / "versions"
    return sorted(p.stem for p in folder.glob("*.jsonl")) if folder.is_dir() else []


def latest(workdir: Path, recipe: str) -> dict | None:
    found = read_versions(workdir, recipe)
    return found[-1] if found else None


def record(workdir: Path, summary: dict, outcome: dict) -> dict:
    """Append this refresh (its run summary and what its ingest changed) to the recipe's log."""
    ingest = next(s for s in summary["stages"] if s["name"] == "ingest")
    path = log_path(workdir, summary["recipe"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_suffix(".lock")):
        before = read_versions(workdir, summary["recipe"])
        last = before[-1] if before else None
        changed = last is None or last["manifest"] != ingest["artifact_digest"]
        entry = {
            "version": (last["version"] if last else 0) + (1 if changed else 0),
            "manifest": ingest["artifact_digest"],
            "previous": last["manifest"] if last else None,
            "changed": changed,
            "rows": ingest["rows_out"],
            "rows_quarantined": ingest["rows_quarantined"],
            **{k: outcome.get(k, 0) for k in FIELDS},
            "stages": {s["name"]: f"{s['status']} {s['artifact_digest']}" for s in summary["stages"]},
            "run_id": summary["run_id"],
            "mlflow_run_id": summary.get("mlflow_run_id"),
            "prefect_flow_run_id": summary.get("prefect_flow_run_id"),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in [*before, entry])
        atomic_write_text(path, text)
    return entry


def render(entries: list[dict]) -> list[str]:
    """One line per refresh, oldest first."""
    lines = []
    for e in entries:
        change = (
            f"+{e['rows_added']} -{e['rows_removed']} rows, {e['units_built']} units built, "
            f"{e['units_reused']} reused, {e['rows_ingested']} rows read"
            if e["changed"]
            else "unchanged (cached)"
        )
        lines.append(
            f"  v{e['version']}  manifest {e['manifest']}  <- {e['previous'] or 'none'}  "
            f"{e['rows']} rows (+{e['rows_quarantined']} quarantined)  {change}"
        )
        lines.append(f"      run {e['run_id']}  mlflow {e['mlflow_run_id']}  {e['finished']}")
    return lines
