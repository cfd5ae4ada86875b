"""The CLI's answers to user mistakes: one line per problem, exit 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmflow.cli", *args], capture_output=True, text=True, cwd=REPO)


def test_validate_ok_prints_the_summary():
    result = run_cli("validate", "specs/recipes/shapes-tiny.yaml")
    assert result.returncode == 0, result.stderr
    assert "recipe 'shapes-tiny'" in result.stdout and "synthetic-shapes" in result.stdout


def test_validate_reports_each_problem_with_file_line_col(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "name: bad\ndata:\n  sources:\n    - kind: synthetic-shapes\n      count: many\n      colour: red\n"
    )
    result = run_cli("validate", str(spec), "--set", "seed=x")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert f"{spec}:5:14: data.sources.0.count: Input should be a valid integer" in lines[0]
    assert lines[1] == f"{spec}:6:7: data.sources.0.colour: unknown field"
    assert lines[2].startswith("--set[0]:1:1: seed:")
    assert "Traceback" not in result.stderr


def test_run_with_a_bad_spec_exits_2_before_starting_anything(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: [unclosed\n")
    result = run_cli("run", str(spec), "--workdir", str(tmp_path / "w"))
    assert result.returncode == 2
    assert result.stderr.startswith(f"{spec}:") and "YAML syntax error" in result.stderr
    assert not (tmp_path / "w").exists()


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_tracking_or_prefect_server_that_does_not_answer_is_one_line_before_anything_starts(tmp_path):
    import os
    import time

    down = f"http://127.0.0.1:{_closed_port()}"
    spec = str(REPO / "tests" / "integration" / "data-tiny.yaml")
    started = time.monotonic()
    result = run_cli("run", spec, "--workdir", str(tmp_path / "w"), "--set", f"runtime.mlflow.tracking_uri={down}")
    assert time.monotonic() - started < 60  # not the MLflow client's five minutes of retries
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"error: the MLflow tracking server at {down}/health does not answer ([Errno 111] "
        "Connection refused): start it, or set runtime.mlflow.tracking_uri or MLFLOW_TRACKING_URI to one that does"
    ]
    assert not (tmp_path / "w" / "runs").exists()  # no run was started

    env = {**os.environ, "PREFECT_API_URL": f"{down}/api"}
    result = subprocess.run(
        [sys.executable, "-m", "vlmflow.cli", "refresh", spec, "--workdir", str(tmp_path / "w")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: the Prefect server at {down}/api/health")
