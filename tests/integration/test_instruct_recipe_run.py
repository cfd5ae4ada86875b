"""The instruct stage inside a real recipe run (Prefect task, Ray tasks, MLflow child run) against the
mock server: metrics and the sample artifact land in MLflow (a rerun making no request is the stage test's).
The API key is nowhere: not in any file under the test's folder (workdir: MLflow's sqlite and
artifacts, Prefect's database, summaries, logs), not in the params, tags or metric names of any
MLflow run, not in any run's artifacts, not in what the CLI printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO
from vlmflow.components.instruct.mock_server import MockConfig, running_mock

pytestmark = pytest.mark.slow
SECRET = "sk-recipe-run-secret-42"


def _run(workdir: Path, recipe: dict) -> tuple[dict, str]:
    """`vlmflow run` on the recipe (written as YAML), as a user runs it: (summary, what it printed)."""
    spec = workdir / "recipe.yaml"
    spec.write_text(yaml.safe_dump(recipe))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "RAY_ADDRESS"))}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", LLM_KEY=SECRET)
    command = [sys.executable, "-m", "vlmflow.cli", "run", str(spec), "--workdir", str(workdir / "work")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((workdir / "work" / "runs" / "latest" / "summary.json").read_text())
    return summary, result.stdout + result.stderr


def _files_holding(root: Path, secret: bytes, chunk: int = 1 << 20) -> list[Path]:
    """Every file under `root` whose bytes contain `secret` (read in overlapping chunks: any size)."""
    found = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        tail = b""
        with path.open("rb") as handle:
            while block := handle.read(chunk):
                if secret in tail + block:
                    found.append(path)
                    break
                tail = block[-len(secret) :]
    return found


def test_instruct_in_a_recipe_run_is_tracked_and_leaks_no_key(tmp_path):
    with running_mock(MockConfig(fault_rate=0.05, retry_after_s=0.1, slow_s=2.0, api_key=SECRET)) as mock:
        generator = {"kind": "openai-compatible", "base_url": mock.base_url, "model": "mock-llm"}
        generator.update(api_key_env="LLM_KEY", concurrency=8, timeout_s=1.0, backoff_base_s=0.05)
        recipe = {
            "name": "instruct-run",
            "data": {"sources": [{"kind": "synthetic-shapes", "count": 80}], "shard_size": 40},
            "instruct": {"generator": generator, "sample_conversations": 5},
            "runtime": {"ray": {"num_cpus": 2}, "progress": "log"},
        }
        # One run: a rerun making no request is tested on the stage itself (test_instruct_mock.py).
        first, printed_first = _run(tmp_path, recipe)

    stages = {s["name"]: s for s in first["stages"]}
    assert stages["instruct"]["status"] == "computed"
    assert stages["instruct"]["rows_in"] == stages["instruct"]["rows_out"] == stages["dedup"]["rows_out"]

    client = MlflowClient(first["mlflow_tracking_uri"])
    run = client.get_run(stages["instruct"]["mlflow_run_id"])
    metrics = run.data.metrics
    for name in ("calls.made", "calls.cached", "calls.failed", "calls.reasked", "tokens.in", "tokens.out",
                 "cost.estimated_usd", "latency.p50_s", "latency.p95_s", "items.conversation", "items.detail",
                 "items.complex_reasoning"):  # fmt: skip
        assert f"instruct/{name}" in metrics
    assert metrics["instruct/calls.made"] >= stages["instruct"]["rows_out"] > 0
    assert run.data.params["generator.api_key_env"] == "LLM_KEY"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"sample_conversations.json", "instruct_summary.json", "quarantine.parquet"} <= artifacts
    downloaded = client.download_artifacts(run.info.run_id, "sample_conversations.json", str(tmp_path / "dl"))
    samples = json.loads(Path(downloaded).read_text())
    assert len(samples) == 5 and samples[0]["conversations"][0]["from"] == "human"
    assert SECRET not in json.dumps(samples)

    # the key is nowhere: every MLflow run (parent and children), their artifacts,
    # every file under the test's folder (workdir included) and the CLI's output
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {first["mlflow_run_id"], run.info.run_id} <= {r.info.run_id for r in runs}
    for found in runs:
        recorded = [found.data.params, found.data.tags, sorted(found.data.metrics), found.info.run_name]
        assert SECRET not in json.dumps(recorded), found.info.run_id
        client.download_artifacts(found.info.run_id, "", str(tmp_path / "artifacts" / found.info.run_id))
    scanned = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in scanned}
    assert {"summary.json", "mlflow.db", "sample_conversations.json"} <= names, sorted(names)[:50]
    assert any("prefect" in p.relative_to(tmp_path).parts for p in scanned)  # Prefect's database is scanned too
    control = tmp_path / "control.bin"  # the scan finds a key even across its read chunks
    control.write_bytes(b"x" * ((1 << 20) - 5) + SECRET.encode())
    assert _files_holding(tmp_path, SECRET.encode()) == [control]
    assert SECRET not in printed_first
