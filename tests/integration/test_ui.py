"""`vlmflow ui`: a taken port is a clear error before anything starts (or, with --any-port, a free
one is taken), the URLs come only once both servers answer, and SIGTERM stops both servers with
every process they started."""

from __future__ import annotations

import signal
import socket
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from live_servers import clean_env, free_port, start, stop
from test_recipe_cli import vlmflow

from vlmflow.tracking import Tracker

pytestmark = pytest.mark.slow


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    tracker = Tracker(f"sqlite:///{work / 'mlflow.db'}", "ui-test", work / "mlflow-artifacts")
    tracker.finish(tracker.start("a run", {}), ok=True)
    return work


def test_a_taken_port_is_an_error_before_anything_starts(workdir: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = ["--port", str(port), "--prefect-port", str(free_port())]
        result = vlmflow("ui", "--workdir", str(workdir), *ports, prefect="own")
    assert result.returncode != 0
    assert f"port {port} on 127.0.0.1 is taken" in result.stderr and "--any-port" in result.stderr
    assert "Traceback" not in result.stderr and not (workdir / "ui").exists()  # nothing was started


def test_urls_come_when_both_answer_and_sigterm_stops_every_server_process(workdir: Path, tmp_path: Path):
    with socket.socket() as taken:  # the Prefect port is taken: --any-port takes a free one
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = free_port()
        command = [sys.executable, "-m", "vlmflow.cli", "ui", "--workdir", str(workdir), "--port", str(port),
                   "--prefect-port", str(taken.getsockname()[1]), "--any-port"]  # fmt: skip
        log = tmp_path / "ui.log"
        ui = start(command, clean_env(), log)
        try:
            deadline = time.monotonic() + 240
            while "Prefect UI: http" not in log.read_text() or "MLflow UI: http" not in log.read_text():
                assert ui.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            text = log.read_text()
            prefect_url = next(line for line in text.splitlines() if "Prefect UI: http" in line).split()[-1]
            assert not prefect_url.endswith(f":{taken.getsockname()[1]}")
            # Said only once they answer: both answer at once.
            assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
            assert httpx.get(f"{prefect_url}/api/health", timeout=5).status_code == 200
            # The Prefect UI in a browser calls this server's API, not the default port's.
            assert httpx.get(f"{prefect_url}/ui-settings", timeout=5).json()["api_url"] == f"{prefect_url}/api"
            servers = psutil.Process(ui.pid).children(recursive=True)
            assert len(servers) >= 2
            ui.send_signal(signal.SIGTERM)
            assert ui.wait(60) == 0
            _, alive = psutil.wait_procs(servers, timeout=20)
            assert not alive, [p.cmdline()[:3] for p in alive]
            with pytest.raises(httpx.TransportError):
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        finally:
            stop(ui)
