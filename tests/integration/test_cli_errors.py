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
