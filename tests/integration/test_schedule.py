"""A scheduled, incremental data refresh against a real Prefect server, Ray and MLflow.

`prefect server start` on a free port of 127.0.0.1 (its own PREFECT_HOME), then
`vlmflow schedule` serves the data-refresh flow of refresh-tiny.yaml every 10 s over an image
folder. After the first refresh, three images are added (a sub-folder); a later refresh must read
only those three (one new unit and shard) and its manifest must reference the first version's
shards.
`vlmflow deploy` then creates a deployment of the same schedule on a process work pool.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from live_servers import BIN, free_port, prefect_env, prefect_server, start, stop, wait
from mlflow.tracking import MlflowClient
from PIL import Image

from vlmflow.cli import cli

SPEC = Path(__file__).with_name("refresh-tiny.yaml")
pytestmark = pytest.mark.slow


def _images(folder: Path, first: int, count: int) -> None:
    folder.mkdir(exist_ok=True)
    for i in range(first, first + count):
        pixels = np.random.default_rng(i).integers(0, 255, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"a random picture number {i}\n")


def _versions(workdir: Path) -> list[dict]:
    path = workdir / "versions" / "refresh-tiny.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_scheduled_refresh_ingests_only_new_files(tmp_path):
    spec = tmp_path / "refresh-tiny.yaml"
    shutil.copy(SPEC, spec)
    _images(tmp_path / "imgs", 0, 6)
    workdir, port = tmp_path / "work", free_port()
    env = prefect_env(tmp_path / "prefect-home", port)
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    server = start(prefect_server(port), env, server_log)
    command = [str(BIN / "vlmflow"), "schedule", str(spec), "--workdir", str(workdir)]
    serving = start(command, env, serve_log)  # it waits for the server to answer
    pool = None
    try:
        procs = [(server, server_log), (serving, serve_log)]
        first = wait("the first refresh", lambda: _versions(workdir), procs, 300)[0]
        _images(tmp_path / "new", 6, 3)  # appear at once: a refresh never lists part of them
        (tmp_path / "new").rename(tmp_path / "imgs" / "new")
        command = [str(BIN / "prefect"), "work-pool", "create", "refresh-pool", "--type", "process"]
        pool = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        later = wait("a refresh with the new files", lambda: _with_rows(workdir, 9), procs, 240)
        finished = f"http://127.0.0.1:{port}/api/flow_runs/{later['prefect_flow_run_id']}"
        wait("that flow run to complete", lambda: _completed(finished), procs, 60)
        stop(serving)  # Ctrl-C: the served schedule is paused (a refresh in flight is interrupted)
        assert pool.wait(120) == 0, pool.stdout.read()
        _check_deploy(env, spec, workdir, port)
    finally:
        if pool is not None and pool.poll() is None:
            pool.kill()
        stop(serving)
        stop(server)

    assert (first["version"], first["rows"], first["units_built"], first["rows_ingested"]) == (1, 6, 2, 6)
    assert (later["version"], later["previous"]) == (2, first["manifest"])
    assert (later["rows_added"], later["rows_removed"], later["rows_moved"]) == (3, 0, 0)
    assert (later["units_built"], later["units_reused"], later["rows_ingested"]) == (1, 2, 3)
    assert later["stages"]["tokenizer"].startswith("computed")  # its input changed

    store = workdir / "artifacts"
    old = pl.read_parquet(store / "ingest" / first["manifest"] / "manifest.parquet")
    new = pl.read_parquet(store / "ingest" / later["manifest"] / "manifest.parquet")
    kept = new.join(old.select("key", pl.col("shard").alias("old_shard")), on="key")
    assert kept.height == 6 and (kept["shard"] == kept["old_shard"]).all(), "unchanged rows must keep their shards"
    assert all(s.startswith("ingest-units/") for s in new["shard"])
    assert len(list((store / "ingest-units").glob("*/_SUCCESS"))) == 3  # 2 units + 1: nothing copied

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.get_run(later["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["vlmflow.flow"] == "data-refresh"
    assert run.data.tags["vlmflow.previous_manifest"] == first["manifest"]
    assert run.data.tags["vlmflow.previous_run"] == first["mlflow_run_id"]
    assert run.data.tags["vlmflow.manifest"] == later["manifest"]
    assert run.data.metrics["data/rows_ingested"] == 3

    shown = CliRunner().invoke(cli, ["lineage", "--versions", "--workdir", str(workdir)])
    assert shown.exit_code == 0, shown.output
    assert f"v2  manifest {later['manifest']}  <- {first['manifest']}" in shown.output
    assert "+3 -0 rows, 1 units built, 2 reused, 3 rows read" in shown.output


def _completed(flow_run_url: str) -> bool:
    return httpx.get(flow_run_url, timeout=10).json()["state_type"] == "COMPLETED"


def _with_rows(workdir: Path, rows: int) -> dict | None:
    return next((v for v in _versions(workdir) if v["rows"] == rows), None)


def _check_deploy(env: dict[str, str], spec: Path, workdir: Path, port: int) -> None:
    """The served deployment was paused by Ctrl-C; `vlmflow deploy` puts the same schedule on the
    process work pool (no worker is started) and unpauses it."""
    url = f"http://127.0.0.1:{port}/api/deployments/name/vlmflow-data-refresh/refresh-tiny-data-refresh"
    served = httpx.get(url, timeout=10).json()
    assert served["paused"] and served["work_pool_name"] is None
    command = [str(BIN / "vlmflow"), "deploy", str(spec), "--pool", "refresh-pool", "--workdir", str(workdir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    found = httpx.get(url, timeout=10).json()
    assert found["id"] == served["id"]
    assert found["work_pool_name"] == "refresh-pool" and not found["paused"]
    assert found["entrypoint"] == "vlmflow.flows.data_refresh.data_refresh_flow"
    assert found["parameters"] == {"spec_path": str(spec), "workdir": str(workdir), "overrides": []}
    assert [s["schedule"]["interval"] for s in found["schedules"]] == [10.0]
    assert found["global_concurrency_limit"]["limit"] == 1  # a worker never runs two refreshes at once
