"""A tiny twin run end to end through the CLI for a learning proof (in-process executor, Ray Train
for the training stages), and an evaluation stage's own metrics.json from its summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from live_servers import clean_env

from tests.conftest import REPO


def run_twin(recipe: str, workdir: Path, *overrides: str) -> dict:
    """The run's summary.json after `vlmflow run RECIPE --set runtime.executor=local --set OVERRIDE ...`."""
    command = [sys.executable, "-m", "vlmflow.cli", "-q", "run", recipe, "--workdir", str(workdir)]
    command += [a for o in ("runtime.executor=local", *overrides) for a in ("--set", o)]
    env = {**clean_env(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=REPO, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((workdir / "runs" / "latest" / "summary.json").read_text())


def metrics_of(summary: dict, stage: str, name: str = "metrics.json") -> dict[str, float]:
    """An evaluation stage's metrics.json (a training stage's held-out checks: name eval.json)."""
    [entry] = [s for s in summary["stages"] if s["name"] == stage]
    assert entry["status"] == "computed", entry
    return json.loads((Path(entry["artifact_path"]) / name).read_text())


def beats(metrics: dict[str, float], metric: str, baseline: str, margin: float) -> str:
    """The line a learning proof prints; asserts METRIC > BASELINE + MARGIN."""
    value, base = metrics[metric], metrics[baseline]
    assert value > base + margin, f"{metric} {value:.3f} is not above {baseline} {base:.3f} + {margin}: {metrics}"
    return f"{metric} {value:.3f} vs {baseline} {base:.3f}"
