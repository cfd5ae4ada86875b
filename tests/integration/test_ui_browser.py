"""`vlmflow ui` looked at in a real browser: headless Chromium renders the MLflow UI and the
Prefect UI (React and Vue apps that fetch from their servers) for a short run of the default
recipe, and must show what a user comes for: the recipe run with its stage runs, a training
stage's loss chart, and the flow run's stage table.

Needs Debian's Chromium (`apt-get install chromium`; `.ci/run` installs it where it can);
without it the test is skipped. Screenshots land in the test's folder (docs/ holds copies).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cdp import Browser
from live_servers import answers, clean_env, free_port, start, stop, wait
from test_recipe_cli import REPO, stages, summary_of, vlmflow

SPEC = REPO / "specs" / "recipes" / "shapes-tiny.yaml"
SHORT = ["--set", "stages.0.max_steps=4", "--set", "stages.0.eval_samples=4", "--set", "stages.1.max_steps=6",
         "--set", "stages.1.eval_samples=4", "--set", "evaluate=[]"]  # fmt: skip
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium)")]


def _chromium(url: str, *args: str) -> str:
    """The page after its scripts ran (30 s of virtual time): --dump-dom prints its DOM."""
    command = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--window-size=1500,1000", "--virtual-time-budget=30000", *args, url]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _screenshot(url: str, path: Path) -> None:
    _chromium(url, f"--screenshot={path}")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    print(f"screenshot: {path}")


@pytest.mark.timeout(1200)  # a recipe run, two UIs and a browser: over 10 min on a loaded machine
def test_the_uis_show_the_runs_a_loss_chart_and_the_stage_table(tmp_path):
    workdir = tmp_path / "work"
    # `vlmflow ui` shows the workdir's own Prefect database: the run writes there, as a user's does.
    result = vlmflow("run", str(SPEC), "--workdir", str(workdir), *SHORT, prefect="own")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of(workdir)
    by_name = stages(summary)
    port, prefect_port = free_port(), free_port()
    log = tmp_path / "ui.log"
    command = [sys.executable, "-m", "vlmflow.cli", "ui", "--workdir", str(workdir), "--port", str(port),
               "--prefect-port", str(prefect_port)]  # fmt: skip
    ui = start(command, clean_env(), log)
    try:
        base, prefect = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prefect_port}"
        wait("the MLflow UI", lambda: answers(f"{base}/health"), [(ui, log)], 180)
        wait("the Prefect UI", lambda: answers(f"{prefect}/api/health"), [(ui, log)], 60)
        experiments = httpx.post(f"{base}/ajax-api/2.0/mlflow/experiments/search", json={"max_results": 10}).json()
        experiment = next(e for e in experiments["experiments"] if e["name"] == "shapes-tiny")["experiment_id"]

        # The runs table lists the recipe run; its page lists every stage run.
        runs = _chromium(f"{base}/#/experiments/{experiment}/runs", "--dump-dom")
        assert f">{summary['recipe']}<" in runs, runs[-2000:]
        run_page = f"{base}/#/experiments/{experiment}/runs/{summary['mlflow_run_id']}"
        page = _chromium(run_page, "--dump-dom")
        assert "Child runs" in page and summary["run_id"] in page, page[-2000:]
        for name in by_name:
            assert f">{name}<" in page, name

        # A training stage's metrics page, searched for train/ as a user would: its `train` section
        # with the loss curve (a chart is drawn when in view, one request per metric: wait for it).
        charts = f"{base}/#/experiments/{experiment}/runs/{by_name['train-instruct']['mlflow_run_id']}/model-metrics"
        with Browser(CHROMIUM) as browser:
            shown = browser.visit(
                charts,
                type_into=('input[placeholder="Search metric charts"]', "train/"),
                until="[...document.querySelectorAll('.js-plotly-plot')].length >= 3"
                " && document.body.innerText.includes('grad_norm')",
                screenshot=tmp_path / "mlflow-metrics.png",
            )
        lines = shown.splitlines()
        assert "loss" in lines and "grad_norm" in lines and "lr" in lines, shown[-2000:]
        section = lines.index("train")  # the section, then its chart count: "(14)"
        assert re.fullmatch(r"\(\d+\)", lines[section + 1]), lines[section : section + 2]

        # The Prefect flow run's stage table, rendered from its markdown artifact.
        found = httpx.post(
            f"{prefect}/api/artifacts/filter",
            json={"artifacts": {"key": {"any_": ["shapes-tiny-stages"]}}, "limit": 1},
        ).json()
        assert found and found[0]["flow_run_id"] == summary["prefect_flow_run_id"], found
        artifact = f"{prefect}/artifacts/artifact/{found[0]['id']}"
        table = _chromium(artifact, "--dump-dom")
        assert "<table" in table, table[-2000:]
        for name, entry in by_name.items():
            assert f">{name}<" in table and entry["artifact_digest"] in table, name
        _screenshot(artifact, tmp_path / "prefect-stages.png")
    finally:
        stop(ui)
