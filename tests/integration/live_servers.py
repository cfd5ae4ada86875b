"""Real servers started by the integration tests on 127.0.0.1: processes in their own session,
stopped with their whole process group, waited for with their logs shown on failure."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env() -> dict[str, str]:
    """This environment without any server a developer's shell may point at."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "RAY_ADDRESS"))}


def prefect_env(home: Path, port: int, task_runs: bool = False) -> dict[str, str]:
    """A Prefect server's (and its clients') settings: its own PREFECT_HOME, the services the
    tests do not need turned off (task runs are recorded only with `task_runs`), schedules looked
    at every second."""
    unused = ["LATE_RUNS", "FOREMAN", "TRIGGERS", "CANCELLATION_CLEANUP", "PAUSE_EXPIRATIONS", "EVENT_PERSISTER"]
    unused += ["EVENT_LOGGER"] + ([] if task_runs else ["TASK_RUN_RECORDER"])
    quiet = {f"PREFECT_SERVER_SERVICES_{s}_ENABLED": "false" for s in unused}
    return {
        **clean_env(),
        **quiet,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",  # the server schedules runs within 1 s
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",  # a served process looks for due runs every second
    }


_SHARED_PREFECT: dict[str, str] = {}


def shared_prefect() -> dict[str, str]:
    """The settings that point a CLI run at this test process's own Prefect server, started on first
    use and stopped when the process exits. A `vlmflow run` without PREFECT_API_URL starts Prefect's
    temporary server and migrates a new database in its workdir: about 9 s of CPU a run on this
    machine, against about 1.5 s for a run sent to a running server. Tests of that default mode,
    and of what the workdir's own Prefect database shows, do not use it."""
    if not _SHARED_PREFECT:
        home, port = Path(tempfile.mkdtemp(prefix="vlmflow-tests-prefect-")), free_port()
        env = prefect_env(home, port, task_runs=True)
        log = home / "server.log"
        proc = start(prefect_server(port), env, log)
        atexit.register(stop, proc)
        wait("the tests' Prefect server", lambda: answers(f"http://127.0.0.1:{port}/api/health"), [(proc, log)], 180)
        _SHARED_PREFECT.update({k: v for k, v in env.items() if k.startswith("PREFECT_")})
    return dict(_SHARED_PREFECT)


def answers(url: str) -> bool:
    """The server at `url` is up (for `wait`: a refused connection counts as not yet)."""
    return httpx.get(url, timeout=5).status_code == 200


def prefect_server(port: int) -> list[str]:
    return [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGINT (a served process pauses its schedule, `ray start --block` stops its node), then
    the whole process group is killed."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait(what: str, check: Callable[[], object], procs: list[tuple[subprocess.Popen, Path]], timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, httpx.TransportError):  # a server not listening yet
            found = check()
            if found:
                return found
        for proc, log in procs:
            assert proc.poll() is None, f"{log.name} exited while waiting for {what}:\n{log.read_text()[-4000:]}"
        time.sleep(0.25)
    logs = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for _, log in procs)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")
