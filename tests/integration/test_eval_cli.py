"""The evaluate section through the CLI (real Ray actors, Prefect, MLflow): every task kind of a
tiny recipe trained for two steps, then `vlmflow compare`."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from mlflow.tracking import MlflowClient
from test_recipe_cli import stages, summary_of, vlmflow

SPEC = Path(__file__).with_name("eval-tiny.yaml")
KINDS = ["shapes-zs", "shapes-zs-lm", "shapes-retrieval", "shapes-captions", "shapes-vqa", "shapes-mc"]
pytestmark = pytest.mark.slow


def test_evaluate_section_runs_every_task_and_compare_tables_the_runs(tmp_path):
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
    assert {"eval_accuracy", "eval_accuracy_chance", "eval_extraction_failure_rate"} <= set(child.data.metrics)
    logged = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"predictions.parquet", "examples.png", "quarantine.parquet", "metrics.json"} <= logged

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
