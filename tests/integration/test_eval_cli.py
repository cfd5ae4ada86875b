"""The evaluate section through the CLI (real Ray actors, Prefect, MLflow): every task kind of a
tiny recipe trained for two steps, then `vlmflow compare`."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import polars as pl
import pytest
import ray
from mlflow.tracking import MlflowClient
from test_recipe_cli import stages, summary_of, vlmflow

from tests.conftest import processes_named
from vlmflow.artifacts import ArtifactStore
from vlmflow.pipeline import recipe_graph
from vlmflow.runtime.ray import init_ray
from vlmflow.specs import load_recipe
from vlmflow.stage import StageContext, StageOutput

SPEC = Path(__file__).with_name("eval-tiny.yaml")
KINDS = ["shapes-zs", "shapes-zs-lm", "shapes-retrieval", "shapes-captions", "shapes-vqa", "shapes-mc"]
pytestmark = pytest.mark.slow


def test_evaluate_section_runs_every_task_and_compare_tables_the_runs(tmp_path):
    """One run of every task kind, `vlmflow compare`, `vlmflow evaluate --model`, and a task rerun
    with its Ray actor killed mid-stage (the same predictions)."""
    first = vlmflow("run", str(SPEC), "--workdir", str(tmp_path), "--set", "stages.0.max_steps=2")
    assert first.returncode == 0, first.stdout + first.stderr
    summary = summary_of(tmp_path)
    by_name = stages(summary)
    assert [n for n in by_name if n.startswith("eval-")] == [f"eval-{k}" for k in KINDS]
    for name in KINDS:
        entry = by_name[f"eval-{name}"]
        assert entry["status"] == "computed" and entry["rows_in"] == entry["rows_out"] + entry["rows_quarantined"]
        assert entry["input_digests"]["model"] == by_name["train-pretrain"]["artifact_digest"]
        folder = Path(entry["artifact_path"])
        predictions = pl.read_parquet(folder / "predictions.parquet")
        assert predictions.height == entry["rows_out"] > 0
        assert (folder / "examples.png").stat().st_size > 0
    vqa = json.loads((Path(by_name["eval-shapes-vqa"]["artifact_path"]) / "metrics.json").read_text())
    assert {"vqa_accuracy", "vqa_accuracy_baseline", "exact_match", "exact_match_baseline"} <= set(vqa)
    assert "shapes-vqa: exact_match" in first.stdout.replace("eval-shapes-vqa", "shapes-vqa")
    client = MlflowClient(tracking_uri=summary["mlflow_tracking_uri"])
    child = client.get_run(by_name["eval-shapes-mc"]["mlflow_run_id"])
    assert {"eval/accuracy", "eval/accuracy_chance", "eval/extraction_failure_rate"} <= set(child.data.metrics)
    note = client.get_run(summary["mlflow_run_id"]).data.tags["mlflow.note.content"]  # the run's description
    assert "| eval-shapes-mc | accuracy |" in note and "| eval-shapes-vqa | exact_match |" in note
    logged = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"predictions.parquet", "examples.png", "quarantine.parquet", "metrics.json"} <= logged
    # The predictions as an MLflow table (the UI shows it as one): a row per evaluated item.
    (tmp_path / "download").mkdir()
    table = Path(client.download_artifacts(child.info.run_id, "predictions.json", str(tmp_path / "download")))
    table = json.loads(table.read_text())
    assert len(table["data"]) == by_name["eval-shapes-mc"]["rows_out"] and "prediction" in table["columns"]

    csv = tmp_path / "table.csv"
    # Two references to runs (an id and the latest folder) give two columns; one CLI run keeps
    # the test short (caching across runs is tested in test_recipe_cli).
    table = vlmflow("compare", summary["run_id"], "latest", "--workdir", str(tmp_path), "--csv", str(csv))
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith(f"| task | metric | {summary['run_id']} |")
    assert "| shapes-retrieval | i2t_r1 |" in table.stdout
    frame = pl.read_csv(csv)
    assert frame.columns[:2] == ["task", "metric"] and frame.width == 4
    assert set(frame["task"]) == set(KINDS)

    # The same task on the registered model (models:/NAME/VERSION: the last stage registers the
    # recipe's model), through `vlmflow evaluate`: the same numbers as inside the recipe run.
    task = "evaluate=[{kind: retrieval, name: shapes-retrieval, samples: 32}]"
    again = vlmflow("evaluate", str(SPEC), "--workdir", str(tmp_path), "--model", "models:/eval-tiny/1", "--set", task)
    assert again.returncode == 0, again.stdout + again.stderr
    imported = stages(summary_of(tmp_path))
    assert imported["model"]["status"] == "computed" and "train-pretrain" not in imported
    retrieval = by_name["eval-shapes-retrieval"]
    assert imported["eval-shapes-retrieval"]["input_digests"]["model"] == imported["model"]["artifact_digest"]
    ours = json.loads((Path(imported["eval-shapes-retrieval"]["artifact_path"]) / "metrics.json").read_text())
    assert ours == json.loads((Path(retrieval["artifact_path"]) / "metrics.json").read_text())

    _check_a_killed_actor_changes_no_prediction(tmp_path, summary)


def _check_a_killed_actor_changes_no_prediction(workdir: Path, summary: dict) -> None:
    """The captioning task again, in process, its actor SIGKILLed as soon as it exists: Ray
    restarts it and retries its batches; predictions and metrics equal the CLI run's."""
    by_name = stages(summary)
    recipe = load_recipe(SPEC, ["stages.0.max_steps=2"])
    index = next(i for i, t in enumerate(recipe.evaluate) if t.kind == "captioning")
    reference = Path(by_name[f"eval-{recipe.evaluate[index].name}"]["artifact_path"])
    inputs = {
        key: StageOutput(name, by_name[name]["artifact_digest"], Path(by_name[name]["artifact_path"]), {})
        for key, name in {"model": "train-pretrain", "data": "dedup"}.items()
    }
    out = workdir / "killed-eval"
    out.mkdir()
    step = {s.name: s for s in recipe_graph(recipe)}[f"eval-{recipe.evaluate[index].name}"]
    store = ArtifactStore(workdir / "artifacts")
    ctx = StageContext(recipe, store, out, "rerun", inputs, "log", step.config, step.name, step.field)
    killed: list[float] = []
    done = threading.Event()

    def killer() -> None:
        while not done.is_set() and not killed:
            for proc in processes_named("EvalWorker", os.getpid()):  # this test's Ray only
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(time.monotonic())
                break
            time.sleep(0.05)

    init_ray(recipe.runtime.ray)
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        step.component.call("run", ctx)
    finally:
        finished = time.monotonic()
        done.set()
        thread.join()
        ray.shutdown()
    assert killed and killed[0] < finished, "the actor was not killed while the stage ran"
    assert pl.read_parquet(out / "predictions.parquet").equals(pl.read_parquet(reference / "predictions.parquet"))
    assert json.loads((out / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())
