"""`vlmflow ui` looked at in a real browser: headless Chromium renders the MLflow UI (a React app
that fetches the runs from the server) and the recipe's run and its stage runs must be listed.

Needs Debian's Chromium (`apt-get install chromium`); without it the test is skipped (CI does
not install a browser). It takes a screenshot of the recipe run page like docs/mlflow-ui.png.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from live_servers import answers, clean_env, free_port, start, stop, wait
from test_recipe_cli import stages, summary_of, vlmflow

SPEC = Path(__file__).with_name("data-tiny.yaml")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium)")]


def _chromium(url: str, *args: str) -> str:
    command = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--window-size=1500,900", "--virtual-time-budget=20000", *args, url]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_mlflow_ui_lists_the_recipe_run_and_its_stage_runs(tmp_path):
    workdir = tmp_path / "work"
    result = vlmflow("run", str(SPEC), "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of(workdir)
    port, prefect_port = free_port(), free_port()
    log = tmp_path / "ui.log"
    command = [sys.executable, "-m", "vlmflow.cli", "ui", "--workdir", str(workdir), "--port", str(port),
               "--prefect-port", str(prefect_port)]  # fmt: skip
    ui = start(command, clean_env(), log)
    try:
        base = f"http://127.0.0.1:{port}"
        wait("the MLflow UI", lambda: answers(f"{base}/health"), [(ui, log)], 120)
        experiments = httpx.post(f"{base}/ajax-api/2.0/mlflow/experiments/search", json={"max_results": 10}).json()
        experiment = next(e for e in experiments["experiments"] if e["name"] == "data-tiny")["experiment_id"]
        runs = _chromium(f"{base}/#/experiments/{experiment}/runs", "--dump-dom")  # the runs table
        assert f">{summary['recipe']}<" in runs and ">4<" in runs, runs[-2000:]  # 1 parent run (+3 children)
        run_page = f"{base}/#/experiments/{experiment}/runs/{summary['mlflow_run_id']}"
        page = _chromium(run_page, "--dump-dom")
        assert "Child runs" in page and summary["run_id"] in page, page[-2000:]
        for name in stages(summary):
            assert f">{name}<" in page, name
        shot = tmp_path / "mlflow-ui.png"
        _chromium(run_page, f"--screenshot={shot}")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
        print(f"screenshot: {shot}")
    finally:
        stop(ui)
