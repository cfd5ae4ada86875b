"""Naming a run: every command that takes a run accepts the vlmflow run id, `latest`, a run
folder (or its summary.json), or an MLflow run id: the recipe run's own or any of its stages'
(what the MLflow UI shows). A run's driver, alive or `dead`; and what a dead driver left running
(Prefect's temporary server, the Ray it started), recorded in its run folder and stopped by the
next command that opens the workdir."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from vlmflow.errors import UserError

log = logging.getLogger("vlmflow")


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
    return "dead" if driver_alive(driver) is False else status


def driver_alive(driver: dict | None) -> bool | None:
    """Whether the driver process (`{"host", "pid", "create_time"}`) still runs: None where it
    cannot be told (another machine's driver, or none recorded)."""
    import socket

    import psutil

    if not driver or driver.get("host") != socket.gethostname():
        return None
    try:
        proc = psutil.Process(driver["pid"])
        return abs(proc.create_time() - driver["create_time"]) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, TypeError):
        return False


# ---------------------------------------------------------------------------------------------
# What a run started, and reaping what a dead run left

PROCESSES = "processes.json"  # in the run folder while the run's driver runs
REAPED = "processes.reaped.json"  # the same, once a later command stopped what a dead driver left


def started_processes(with_ray: bool) -> list[dict]:
    """The processes this driver started that would outlive it if it were killed: Prefect's
    temporary server (a child running prefect.server.api.server) and, `with_ray` (it started a
    local Ray itself), Ray's head processes and what they started (gcs_server, raylet, agents,
    workers). Never a Ray cluster it joined or a Prefect server it was given: those are not its
    children. Each with its pid, start time and command line, which must all match to stop it."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            command = child.cmdline()
            text = " ".join(command)
            if "prefect.server.api.server" in text:
                role = "prefect-server"
            elif with_ray and ("/ray/" in text or text.startswith("ray::")):
                role = "ray"
            else:
                continue
            found.append({"pid": child.pid, "create_time": child.create_time(), "cmdline": command, "role": role})
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def record_processes(run_dir: Path, driver: dict, processes: list[dict]) -> None:
    """Write the run's driver and the processes it started (`started_processes`) to its folder."""
    from vlmflow.artifacts import atomic_write_text

    atomic_write_text(run_dir / PROCESSES, json.dumps({"driver": driver, "processes": processes}, indent=1))


def _same_process(entry: dict) -> Any:
    """The psutil.Process of a recorded entry if that pid is still the very process recorded
    (start time and command line), else None: a pid reused since is never touched."""
    import psutil

    try:
        proc = psutil.Process(entry["pid"])
        if abs(proc.create_time() - entry["create_time"]) > 0.05 or proc.cmdline() != entry["cmdline"]:
            return None
        if proc.pid == os.getpid() or proc.pid in {p.pid for p in psutil.Process().parents()}:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, KeyError, TypeError):
        return None


RAY_SESSION = re.compile(r"/session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+/")


def _ray_session_workers(data: dict, known: set[int]) -> list[Any]:
    """Ray workers the run's Ray started after it recorded its processes: those whose command
    line names that Ray's own session folder (its name holds the start time and the driver's
    pid) and that started after the driver."""
    import psutil

    sessions = {m[0] for e in data.get("processes", []) if e.get("role") == "ray"
                for m in RAY_SESSION.finditer(" ".join(e.get("cmdline", [])))}  # fmt: skip
    started = data.get("driver", {}).get("create_time", 0.0)
    found = []
    for proc in psutil.process_iter(["cmdline", "create_time"]) if sessions else []:
        text = " ".join(proc.info["cmdline"] or [])
        if proc.pid not in known and proc.info["create_time"] >= started and any(s in text for s in sessions):
            found.append(proc)
    return found


def reap_dead_runs(workdir: Path, grace_s: float = 3.0) -> list[str]:
    """Stop what runs in `workdir` left behind when their driver died (SIGKILL, OOM, a lost
    machine): for each run folder still holding processes.json whose driver (on this host) is
    gone, every recorded process that is still that very process gets SIGTERM, and SIGKILL after
    `grace_s`. Returns the run ids reaped. Live runs and other hosts' runs are left alone."""
    import psutil

    runs = workdir / "runs"
    if not runs.is_dir():
        return []
    reaped = []
    for record in sorted(runs.glob(f"*/{PROCESSES}")):
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if driver_alive(data.get("driver")) is not False:
            continue
        procs = [p for p in (_same_process(e) for e in data.get("processes", [])) if p is not None]
        procs += _ray_session_workers(data, {p.pid for p in procs})
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=grace_s)
        if procs:
            roles = sorted({e["role"] for e in data["processes"] if e["pid"] in {p.pid for p in procs}})
            log.warning(
                "run %s: its driver died; stopped the %d processes it left (%s)",
                record.parent.name, len(procs), ", ".join(roles),
            )  # fmt: skip
        with contextlib.suppress(OSError):  # a read-only workdir: the next command looks again
            record.replace(record.with_name(REAPED))
        reaped.append(record.parent.name)
    return reaped
