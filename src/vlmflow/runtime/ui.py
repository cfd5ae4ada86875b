"""`vlmflow ui`: the MLflow UI and the Prefect UI on a workdir's stores, started as child
processes in their own process groups. The ports are checked before anything starts, the URLs
are given only once each server answers, and the servers (with the workers they spawn) stop
with the command: on Ctrl-C, on SIGTERM, or when either of them dies."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from vlmflow.errors import UserError

log = logging.getLogger("vlmflow")
LOCAL = ("127.0.0.1", "localhost", "::1")


@dataclass
class Server:
    name: str
    command: list[str]
    env: dict[str, str]
    health: str  # a URL that answers 200 once the server is up
    url: str
    log: Path
    proc: subprocess.Popen | None = None


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def choose_ports(host: str, wanted: dict[str, int], any_port: bool) -> dict[str, int]:
    """The ports to serve on: the wanted ones, each checked free; with `any_port`, a free one in
    place of a taken one. A taken port is an error naming it and the option that moves it."""
    chosen = {}
    for option, port in wanted.items():
        if port_free(host, port) and port not in chosen.values():
            chosen[option] = port
        elif any_port:
            chosen[option] = free_port(host)
        else:
            raise UserError(
                f"port {port} on {host} is taken (another `vlmflow ui` or server?): "
                f"stop it, pass {option} N, or --any-port to take free ports"
            )
    return chosen


def servers(workdir: Path, host: str, port: int, prefect_port: int) -> list[Server]:
    bin_dir = Path(sys.executable).parent
    logs = workdir / "ui"
    logs.mkdir(parents=True, exist_ok=True)
    mlflow = Server(
        "MLflow UI",
        [
            str(bin_dir / "mlflow"),
            "ui",
            "--backend-store-uri",
            f"sqlite:///{workdir / 'mlflow.db'}",
            "--host",
            host,
            "--port",
            str(port),
        ],
        dict(os.environ),
        f"http://{_connect(host)}:{port}/health",
        f"http://{host}:{port}",
        logs / "mlflow.log",
    )
    prefect_env = {
        **os.environ,
        "PREFECT_HOME": str(workdir / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Where the Prefect UI in the browser calls its API: this server, whatever its port (Prefect
        # derives it from its settings, 4200 or a PREFECT_API_URL in the environment, not from --port).
        "PREFECT_UI_API_URL": f"http://{host}:{prefect_port}/api",
    }
    prefect = Server(
        "Prefect UI",
        [str(bin_dir / "prefect"), "server", "start", "--host", host, "--port", str(prefect_port)],
        prefect_env,
        f"http://{_connect(host)}:{prefect_port}/api/health",
        f"http://{host}:{prefect_port}",
        logs / "prefect.log",
    )
    return [mlflow, prefect]


def _connect(host: str) -> str:
    """Where this machine reaches a server bound to `host` (0.0.0.0 and :: are reached locally)."""
    return {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)


def serve(group: list[Server], timeout_s: float = 300.0) -> int:
    """Start the servers, wait until each answers, then until a signal or a server's death; stop
    them all. Returns the exit code: 0 when stopped by a signal, 1 when a server died."""
    stopping = {"signal": None}

    def on_signal(number: int, _frame: object) -> None:
        stopping["signal"] = number

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for server in group:
            handle = open(server.log, "ab")  # noqa: SIM115 (the child holds it; closed when stopped)
            server.proc = subprocess.Popen(
                server.command, env=server.env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )
            handle.close()
        if not _ready(group, timeout_s, stopping):
            return 1 if stopping["signal"] is None else 0
        for server in group:
            log.info("%s: %s", server.name, server.url)
        log.info("Ctrl-C stops both (logs: %s)", group[0].log.parent)
        while stopping["signal"] is None:
            dead = next((s for s in group if s.proc.poll() is not None), None)
            if dead is not None:
                log.error("%s stopped (exit %s); its log: %s", dead.name, dead.proc.returncode, dead.log)
                return 1
            time.sleep(0.5)
        return 0
    finally:
        _stop(group)
        for number, handler in previous.items():
            signal.signal(number, handler)


def _ready(group: list[Server], timeout_s: float, stopping: dict) -> bool:
    deadline, started, waiting = time.monotonic() + timeout_s, time.monotonic(), {s.name for s in group}
    told = started  # the first "waiting" line after 10 s: a quick start says nothing
    while waiting and stopping["signal"] is None:
        for server in group:
            if server.name not in waiting:
                continue
            if server.proc.poll() is not None:
                tail = server.log.read_text(errors="replace").strip().splitlines()[-3:]
                log.error("%s did not start (exit %s): %s", server.name, server.proc.returncode, " | ".join(tail))
                return False
            try:
                if httpx.get(server.health, timeout=2).status_code == 200:
                    waiting.discard(server.name)
            except httpx.HTTPError:
                pass
        now = time.monotonic()
        if waiting and now - told >= 10:
            told = now
            log.info("waiting for %s to answer (%.0f s)", " and ".join(sorted(waiting)), now - started)
        if now > deadline:
            log.error("%s did not answer within %.0f s; logs in %s", " and ".join(sorted(waiting)), timeout_s,
                      group[0].log.parent)  # fmt: skip
            return False
        if waiting:
            time.sleep(0.5)
    return not waiting


def _stop(group: list[Server]) -> None:
    """SIGTERM to each server's process group (the server and its workers), SIGKILL after 10 s."""
    running = [s for s in group if s.proc is not None and s.proc.poll() is None]
    for server in running:
        _signal_group(server.proc, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for server in running:
        try:
            server.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(server.proc, signal.SIGKILL)
            server.proc.wait()
    for server in group:  # workers a server left behind in its group
        if server.proc is not None:
            _signal_group(server.proc, signal.SIGKILL)


def _signal_group(proc: subprocess.Popen, number: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, number)
