"""Every way of naming a run finds the same run folder; anything else is one clear error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vlmflow.errors import UserError
from vlmflow.runs import load_summary, run_folder


def make_run(workdir: Path, run_id: str, mlflow: str, stages: list[str]) -> Path:
    folder = workdir / "runs" / run_id
    folder.mkdir(parents=True)
    summary = {"run_id": run_id, "mlflow_run_id": mlflow, "stages": [{"name": "s", "mlflow_run_id": s} for s in stages]}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_a_run_is_found_by_id_latest_folder_summary_and_mlflow_ids(tmp_path, monkeypatch):
    old = make_run(tmp_path, "20261201-100000-aaaaaa", "parent-old", ["stage-old"])
    new = make_run(tmp_path, "20261202-100000-bbbbbb", "parent-new", ["stage-new-1", "stage-new-2"])
    os.symlink(new.name, tmp_path / "runs" / "latest")
    monkeypatch.chdir(tmp_path)
    assert run_folder(None, tmp_path) == run_folder("latest", tmp_path) == tmp_path / "runs" / "latest"
    for ref in (old.name, str(old), str(old / "summary.json"), "parent-old", "stage-old", "runs/" + old.name):
        assert run_folder(ref, tmp_path).resolve() == old.resolve(), ref
    assert load_summary("stage-new-2", tmp_path)["run_id"] == new.name


def test_an_unknown_run_is_one_clear_error_naming_the_latest_runs(tmp_path):
    make_run(tmp_path, "20261202-100000-bbbbbb", "p", [])
    with pytest.raises(
        UserError, match=r"no run 'nope' in .*runs: give a vlmflow run id \(latest: 20261202-100000-bbbbbb\)"
    ):
        run_folder("nope", tmp_path)
    with pytest.raises(UserError, match="no run 'latest'"):
        run_folder(None, tmp_path / "empty")


def test_a_running_run_whose_driver_is_gone_is_dead(tmp_path):
    import socket
    import subprocess
    import sys

    import psutil

    from vlmflow.runs import status_of
    from vlmflow.runtime.prefect import driver_process

    assert status_of({"status": "running", "driver": driver_process()}) == "running"  # this process
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    created = psutil.Process(child.pid).create_time()
    child.wait()
    gone = {"host": socket.gethostname(), "pid": child.pid, "create_time": created}
    assert status_of({"status": "running", "driver": gone}) == "dead"
    assert status_of({"status": "succeeded", "driver": gone}) == "succeeded"
    elsewhere = {**gone, "host": "another-machine"}
    assert status_of({"status": "running", "driver": elsewhere}) == "running"  # cannot be checked from here
    assert status_of({"status": "running"}) == "running"  # summaries before 2026-12-03
