"""End to end through the CLI with a real local Ray, Prefect (ephemeral) and MLflow (sqlite).

One cold run of the tiny recipe is shared by the assertions below; then a second run must
find every stage cached; then a run killed in the middle of ingest is resumed and must give
byte-identical manifests, recomputing only what was unfinished.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from live_servers import clean_env, shared_prefect
from mlflow.tracking import MlflowClient

from tests.conftest import REPO
from vlmflow.plan import build_plan
from vlmflow.specs import load_recipe

SPEC = Path(__file__).with_name("data-tiny.yaml")
VLMFLOW = [sys.executable, "-m", "vlmflow.cli"]
pytestmark = pytest.mark.slow


def _env(prefect: str = "shared") -> dict[str, str]:
    """`shared`: runs report to the test process's Prefect server (live_servers.shared_prefect);
    `own`: a run starts Prefect's temporary server on its workdir's database, as a user's does."""
    own = {**clean_env(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return own if prefect == "own" else own | shared_prefect()


def vlmflow(*args: str, timeout: int = 600, prefect: str = "shared") -> subprocess.CompletedProcess:
    env = _env(prefect)
    return subprocess.run([*VLMFLOW, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def summary_of(workdir: Path) -> dict:
    return json.loads((workdir / "runs" / "latest" / "summary.json").read_text())


def stages(summary: dict) -> dict[str, dict]:
    return {s["name"]: s for s in summary["stages"]}


@pytest.fixture(scope="module")
def cold(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    workdir = tmp_path_factory.mktemp("cold")
    result = vlmflow("run", str(SPEC), "--workdir", str(workdir), prefect="own")  # a user's first run
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir, result


def test_cold_run_computes_every_stage_and_accounts_for_rows(cold):
    workdir, result = cold
    summary = summary_of(workdir)
    assert summary["status"] == "succeeded"
    by_name = stages(summary)
    assert list(by_name) == ["ingest", "dedup", "tokenizer"]
    assert all(s["status"] == "computed" for s in by_name.values())
    for s in by_name.values():
        assert s["rows_in"] == s["rows_out"] + s["rows_quarantined"]
    assert by_name["ingest"]["rows_in"] == 512
    assert by_name["dedup"]["input_digests"] == {"data": by_name["ingest"]["artifact_digest"]}
    ingest_dir = workdir / "artifacts" / "ingest" / by_name["ingest"]["artifact_digest"]
    manifest = pl.read_parquet(ingest_dir / "manifest.parquet")
    shards = pl.read_parquet(ingest_dir / "shards.parquet")
    assert manifest.height == 512 and shards["samples"].sum() == 512
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert 0.1 < manifest["caption_corrupted"].mean() < 0.3  # caption_noise 0.2
    assert (ingest_dir / "_SUCCESS").exists() and (ingest_dir / "sample_grid.png").exists()
    tokenizer = workdir / "artifacts" / "tokenizer" / by_name["tokenizer"]["artifact_digest"] / "tokenizer.json"
    assert "<image>" in tokenizer.read_text()
    assert (workdir / "runs" / summary["run_id"] / "resolved_spec.yaml").exists()
    saved = json.loads((workdir / "runs" / summary["run_id"] / "plan.json").read_text())
    assert [e["digest"] for e in saved["stages"]] == [s["artifact_digest"] for s in summary["stages"]]
    assert "ingest" in result.stdout and "computed" in result.stdout
    # A calm console: output to a file has no colour codes, no tracebacks, and about one line
    # per stage event beside the final table (no Prefect task-state or Ray start-up lines).
    console = result.stdout + result.stderr
    assert "\x1b[" not in console and "Traceback" not in console, console
    assert "Finished in state" not in console and "Starting temporary server" not in console, console
    assert len(console.splitlines()) <= 30, console


def test_mlflow_run_tree_has_a_child_per_stage_with_lineage(cold):
    workdir, _ = cold
    summary = summary_of(workdir)
    client = MlflowClient(tracking_uri=summary["mlflow_tracking_uri"])
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"] == summary["prefect_flow_run_id"] != ""
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_stage = {c.data.tags["vlmflow.stage"]: c for c in children}
    assert set(by_stage) == {"ingest", "dedup", "tokenizer"}
    for name, entry in stages(summary).items():
        child = by_stage[name]
        assert child.data.tags["vlmflow.artifact_digest"] == entry["artifact_digest"]
        assert json.loads(child.data.tags["vlmflow.input_digests"]) == entry["input_digests"]
        assert child.data.metrics["data/rows_out"] == entry["rows_out"]
        assert all("/" in key for key in child.data.metrics), sorted(child.data.metrics)  # one UI section each
    # Lineage in MLflow's own terms: each stage's data inputs are datasets of its run (the UI's
    # Datasets column), with the stage that wrote them, their digest, rows and columns.
    ingest, dedup = stages(summary)["ingest"], stages(summary)["dedup"]
    (read,) = by_stage["dedup"].inputs.dataset_inputs
    assert (read.dataset.name, read.dataset.digest) == ("ingest", ingest["artifact_digest"])
    assert json.loads(read.dataset.profile) == {"num_rows": ingest["rows_out"]}
    columns = {c["name"] for c in json.loads(read.dataset.schema)["mlflow_colspec"]}
    assert {"key", "shard", "caption", "split"} <= columns
    assert [t.value for t in read.tags if t.key == "mlflow.data.context"] == ["data"]
    assert not by_stage["ingest"].inputs.dataset_inputs
    listed = [(i.dataset.name, i.dataset.digest) for i in parent.inputs.dataset_inputs]
    assert sorted(listed) == [("dedup", dedup["artifact_digest"]), ("ingest", ingest["artifact_digest"])]
    assert by_stage["ingest"].data.params["sources.0.kind"] == "synthetic-shapes"
    artifacts = {a.path for a in client.list_artifacts(by_stage["ingest"].info.run_id)}
    assert {"sample_grid.png", "quarantine.parquet", "quarantine_summary.json"} <= artifacts
    assert {"resolved_spec.yaml", "environment.json", "plan.json"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }


def test_plan_knows_the_run_digests_and_what_is_cached(cold, tmp_path):
    workdir, _ = cold
    result = vlmflow("plan", str(SPEC), "--workdir", str(workdir), "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    ran = stages(summary_of(workdir))
    assert [(e["stage"], e["status"], e["digest"]) for e in plan["stages"]] == [
        (name, "cached", entry["artifact_digest"]) for name, entry in ran.items()
    ]
    assert [e["rows_out"] for e in plan["stages"]] == [entry["rows_out"] for entry in ran.values()]
    fresh = build_plan(load_recipe(SPEC), tmp_path).as_json()  # in process: the same code, no second start-up
    assert [e["status"] for e in fresh["stages"]] == ["runs"] * 3
    assert fresh["stages"][0]["rows_in"] == 512 and not fresh["stages"][0]["rows_exact"]  # from the source listing
    assert [e["digest"] for e in fresh["stages"]] == [e["digest"] for e in plan["stages"]]


def test_second_run_reports_every_stage_cached(cold):
    workdir, _ = cold
    first = summary_of(workdir)
    # `vlmflow run` as its entry point runs it, telling which heavy libraries the rerun imported:
    # with nothing to compute, no flow, no Ray, no model (MLflow records the run).
    code = (
        "import sys; from vlmflow.cli import main;"
        f"sys.argv = ['vlmflow', 'run', {str(SPEC)!r}, '--workdir', {str(workdir)!r}]\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "print('imported:', sorted(m for m in ('prefect', 'ray', 'torch', 'mlflow') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=600, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "imported: ['mlflow']", result.stdout
    second = summary_of(workdir)
    assert second["run_id"] != first["run_id"]
    assert [s["status"] for s in second["stages"]] == ["cached"] * 3
    assert [s["artifact_digest"] for s in second["stages"]] == [s["artifact_digest"] for s in first["stages"]]
    assert [s["rows_out"] for s in second["stages"]] == [s["rows_out"] for s in first["stages"]]
    # Each cached stage's MLflow run has its figures and links to the run that computed it, which
    # keeps the files and per-step curves (they are not copied into every rerun).
    client = MlflowClient(tracking_uri=second["mlflow_tracking_uri"])
    ingest, origin = stages(second)["ingest"], stages(first)["ingest"]["mlflow_run_id"]
    rerun = client.get_run(ingest["mlflow_run_id"])
    assert rerun.data.tags["vlmflow.computed_in"] == origin and origin in rerun.data.tags["mlflow.note.content"]
    assert rerun.data.metrics["data/rows_out"] == ingest["rows_out"]
    assert not client.list_artifacts(rerun.info.run_id)


def test_changing_a_field_recomputes_only_its_stage_and_descendants(cold):
    workdir, _ = cold
    result = vlmflow("run", str(SPEC), "--workdir", str(workdir), "--set", "tokenizer.vocab_size=600")
    assert result.returncode == 0, result.stderr
    assert [s["status"] for s in summary_of(workdir)["stages"]] == ["cached", "cached", "computed"]


def test_killed_run_resumes_unfinished_units_and_matches_the_clean_run(cold, tmp_path):
    reference, _ = cold
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(
        [*VLMFLOW, "run", str(SPEC), "--workdir", str(workdir)],
        env=_env(),
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not list(workdir.glob("artifacts/ingest/*.partial/units/*.manifest.parquet")):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "ingest never finished a unit"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(workdir.glob("artifacts/ingest/*/_SUCCESS")), "killed too late: ingest had finished"
    killed = summary_of(workdir)
    assert killed["status"] == "running" and killed["stages"] == []

    result = vlmflow("run", str(SPEC), "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr
    resumed = stages(summary_of(workdir))
    assert [s["status"] for s in resumed.values()] == ["computed"] * 3
    digest = resumed["ingest"]["artifact_digest"]
    stats = json.loads((workdir / "artifacts" / "ingest" / digest / "_SUCCESS").read_text())
    assert 1 <= stats["metrics"]["units_reused"] < stats["metrics"]["units"]
    for stage in ("ingest", "dedup"):
        d = resumed[stage]["artifact_digest"]
        mine = (workdir / "artifacts" / stage / d / "manifest.parquet").read_bytes()
        clean = (reference / "artifacts" / stage / d / "manifest.parquet").read_bytes()
        assert mine == clean, f"{stage} manifest differs from the uninterrupted run"
    for shard in (workdir / "artifacts" / "ingest" / digest / "shards").iterdir():
        assert shard.read_bytes() == (reference / "artifacts" / "ingest" / digest / "shards" / shard.name).read_bytes()


def test_lineage_and_status_commands(cold):
    workdir, _ = cold
    lineage = vlmflow("lineage", "--workdir", str(workdir))
    assert lineage.returncode == 0, lineage.stderr
    digests = [s["artifact_digest"] for s in summary_of(workdir)["stages"]]
    assert all(d in lineage.stdout for d in digests)
    assert "<- ingest/" in lineage.stdout
    status = vlmflow("status", "--workdir", str(workdir))
    assert status.returncode == 0 and "data-tiny" in status.stdout
    missing = vlmflow("lineage", "nope", "--workdir", str(workdir))
    assert missing.returncode == 2 and "no run 'nope'" in missing.stderr and "Traceback" not in missing.stderr
