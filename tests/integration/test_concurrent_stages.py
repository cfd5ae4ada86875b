"""`RecipeRun.run_graph` in a real Prefect flow (a temporary Prefect server) and MLflow on sqlite,
over graphs of hand-made stages whose work is a short sleep: independent stages overlap, a stage
starts only after the stages it reads, and a failure stops its descendants only (skipped, never
started) while the other branch finishes and is reused by the next run. Three recipe runs share
one workdir (one MLflow database, one artifact store). The stages run in process
(`runtime.executor: local`): their work needs no Ray, and no run starts it (a local Ray costs
about 10 s per run on 2 cores).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

from tests.conftest import REPO
from vlmflow.artifacts import ArtifactStore
from vlmflow.component import Component
from vlmflow.pipeline import Step
from vlmflow.plan import Plan
from vlmflow.runtime.prefect import RecipeRun
from vlmflow.specs import load_recipe
from vlmflow.specs.base import StrictModel
from vlmflow.stage import StageContext, StageResult

pytestmark = pytest.mark.slow


class Sleep(StrictModel):
    """A hand-made step's config: how long it sleeps; `fail`: it raises instead."""

    seconds: float = 1.5
    fail: bool = False


class StageBroke(RuntimeError):
    pass


class Work:
    """A component whose steps sleep, then write a file (or, with `fail`, raise);
    `calls` lists the steps whose run started."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._lock = threading.Lock()
        self.component = Component(name="test-sleep", config=Sleep, writes="samples", run=self.run)

    def run(self, ctx: StageContext) -> StageResult:
        with self._lock:
            self.calls.append(ctx.name)
        if ctx.config.fail:
            time.sleep(0.2)
            raise StageBroke(f"{ctx.name} broke")
        time.sleep(ctx.config.seconds)
        (ctx.out / "out.txt").write_text(f"{ctx.name} <- {sorted(ctx.inputs)}")
        return StageResult(rows_in=1, rows_out=1, rows_quarantined=0)

    def step(self, name: str, seconds: float, inputs: dict[str, str] | None = None, fail: bool = False) -> Step:
        return Step(name, self.component, Sleep(seconds=seconds, fail=fail), inputs or {})


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
            patch.delenv(name, raising=False)
        patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        patch.setattr(logging.getLogger("vlmflow"), "level", logging.INFO)  # as the CLI sets it
        recipe = load_recipe(REPO / "specs/recipes/shapes-tiny.yaml", ["runtime.executor=local"])
        with prefect_test_harness(server_startup_timeout=180):
            yield recipe, tmp_path_factory.mktemp("concurrent")


def run_flow(setting, nodes: list[Step]) -> tuple[dict, float]:
    """The graph run by RecipeRun in a Prefect flow; the run's summary and run_graph's wall clock."""
    recipe, workdir = setting
    elapsed: list[float] = []

    @flow(name="concurrent-stages-test", validate_parameters=False)
    def graph_flow() -> None:
        with RecipeRun(recipe, workdir, "specs/recipes/shapes-tiny.yaml", Plan.empty(recipe, workdir)) as run:
            started = time.monotonic()
            try:
                run.run_graph(nodes)
            finally:
                elapsed.append(time.monotonic() - started)

    try:
        graph_flow()
    finally:
        summary = json.loads((workdir / "runs" / "latest" / "summary.json").read_text())
    assert summary["ray"].startswith("ray: not started")  # in process: no Ray for a sleep
    return summary, elapsed[0]


def at(entry: dict, key: str) -> datetime:
    return datetime.fromisoformat(entry[key])


def test_independent_stages_overlap_and_dependencies_hold(setting):
    work = Work()
    sleepers = [work.step(f"sleep-{i}", 1.5) for i in range(3)]
    diamond = [
        work.step("diamond-top", 0.3),
        work.step("diamond-left", 1.0, {"top": "diamond-top"}),
        work.step("diamond-right", 1.0, {"top": "diamond-top"}),
        work.step("diamond-bottom", 0.3, {"left": "diamond-left", "right": "diamond-right"}),
    ]
    nodes = [*sleepers, *diamond]
    summary, elapsed = run_flow(setting, nodes)

    assert summary["status"] == "succeeded"
    assert [s["name"] for s in summary["stages"]] == [n.name for n in nodes]  # graph order
    by = {s["name"]: s for s in summary["stages"]}
    assert all(s["status"] == "computed" for s in by.values())
    assert all(at(s, "started") < at(s, "finished") for s in by.values())
    slept = [by[n.name] for n in sleepers]
    assert max(at(s, "started") for s in slept) < min(at(s, "finished") for s in slept)
    assert at(by["diamond-left"], "started") >= at(by["diamond-top"], "finished")
    assert at(by["diamond-right"], "started") >= at(by["diamond-top"], "finished")
    assert at(by["diamond-left"], "started") < at(by["diamond-right"], "finished")  # side by side
    assert at(by["diamond-right"], "started") < at(by["diamond-left"], "finished")
    last_parent = max(at(by["diamond-left"], "finished"), at(by["diamond-right"], "finished"))
    assert at(by["diamond-bottom"], "started") >= last_parent
    assert by["diamond-bottom"]["input_digests"] == {
        "left": by["diamond-left"]["artifact_digest"],
        "right": by["diamond-right"]["artifact_digest"],
    }
    total = sum(s["seconds"] for s in by.values())  # 7.1 s of sleeping; the longest chain is 1.6 s
    # First start to last finish (run_graph's own wall clock also holds the digests, computed first).
    span = (max(at(s, "finished") for s in by.values()) - min(at(s, "started") for s in by.values())).total_seconds()
    print(f"graph of {len(nodes)} stages: {span:.2f} s from first start to last finish, run_graph {elapsed:.2f} s")
    assert span < 0.6 * total, (span, elapsed, total)


def test_a_failure_skips_its_descendants_only_and_the_next_run_reuses_the_rest(setting):
    work = Work()
    rest = [work.step("after", 0.1, {"flaky": "flaky"}), work.step("later", 0.1, {"after": "after"})]
    solo = work.step("solo", 1.0)
    nodes = [work.step("flaky", 0.1, fail=True), *rest, solo]
    with pytest.raises(StageBroke, match="flaky broke"):
        run_flow(setting, nodes)
    summary = json.loads((setting[1] / "runs" / "latest" / "summary.json").read_text())
    assert summary["status"] == "failed" and "flaky broke" in summary["error"]
    by = {s["name"]: s for s in summary["stages"]}
    assert list(by) == ["flaky", "after", "later", "solo"]
    assert by["flaky"]["status"] == "failed" and by["flaky"]["error"] == "StageBroke: flaky broke"
    for name in ("after", "later"):
        assert by[name]["status"] == "skipped" and by[name]["reason"] == "upstream flaky failed"
        assert by[name]["artifact_digest"] is None and by[name]["started"] == by[name]["finished"]
    assert sorted(work.calls) == ["flaky", "solo"]  # the skipped stages never started
    assert by["solo"]["status"] == "computed"  # it was still sleeping when flaky failed
    assert at(by["solo"], "finished") > at(by["flaky"], "finished")
    store = ArtifactStore(Path(summary["workdir"]) / "artifacts")
    assert store.is_complete("solo", by["solo"]["artifact_digest"])
    assert (Path(by["solo"]["artifact_path"]) / "out.txt").read_text() == "solo <- []"

    work.calls.clear()
    nodes = [work.step("flaky", 0.1), *rest, solo]  # fixed: a new config, so a new digest for it and after
    again, _ = run_flow(setting, nodes)
    assert again["status"] == "succeeded"
    status = {s["name"]: s["status"] for s in again["stages"]}
    assert status == {"flaky": "computed", "after": "computed", "later": "computed", "solo": "cached"}
    assert sorted(work.calls) == ["after", "flaky", "later"]
    cached = next(s for s in again["stages"] if s["name"] == "solo")
    assert cached["started"] == cached["finished"] and cached["artifact_digest"] == by["solo"]["artifact_digest"]


def test_prefect_and_mlflow_tell_each_stages_story(setting):
    """Each task run's logs hold vlmflow's lines and its artifact the stage's row (with a link to
    its MLflow run); the flow run's artifact is the stage table; each stage's MLflow run opened
    when the stage started and closed when it ended; a cached stage's run names the computing one."""
    from uuid import UUID

    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    work = Work()
    nodes = [work.step("story-a", 1.2), work.step("story-b", 0.2, {"a": "story-a"})]
    summary, _ = run_flow(setting, nodes)
    flow_run = UUID(summary["prefect_flow_run_id"])
    in_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run]))
    deadline = time.monotonic() + 30  # logs reach the server in batches, a moment after the run
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=in_run)
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run])))
            lines = [log.message for log in logs if log.task_run_id is not None]
            if any(line.startswith("story-a: computed") for line in lines) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    by_key = {a.key: a for a in artifacts}
    assert {"stage-story-a", "stage-story-b", "shapes-tiny-stages"} <= set(by_key)
    by = {s["name"]: s for s in summary["stages"]}
    row = by_key["stage-story-a"]
    assert row.task_run_id is not None and by["story-a"]["artifact_digest"] in row.data
    assert f"/runs/{by['story-a']['mlflow_run_id']}" in row.data and "| computed |" in row.data
    assert by_key["shapes-tiny-stages"].task_run_id is None  # the flow run's own: the whole table
    assert all(name in by_key["shapes-tiny-stages"].data for name in ("story-a", "story-b"))
    assert any(line.startswith("story-a: computed") for line in lines), lines

    mlflow = MlflowClient(tracking_uri=summary["mlflow_tracking_uri"])
    run = mlflow.get_run(by["story-a"]["mlflow_run_id"])
    duration = (run.info.end_time - run.info.start_time) / 1000
    assert by["story-a"]["seconds"] >= 1.2 and abs(duration - by["story-a"]["seconds"]) < 2.0, duration
    again, _ = run_flow(setting, nodes)
    cached = mlflow.get_run(next(s for s in again["stages"] if s["name"] == "story-a")["mlflow_run_id"])
    assert cached.data.tags["vlmflow.status"] == "cached"
    assert cached.data.tags["vlmflow.computed_in"] == run.info.run_id
