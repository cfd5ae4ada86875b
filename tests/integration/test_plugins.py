"""A user's component, installed as a package with an entry point in the `vlmflow.components`
group or named as `package.module:NAME`: validated, wired and planned like a built-in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PLUGIN = '''
"""Quarantine the rows whose caption holds a word of a list."""
import polars as pl

from vlmflow.component import Component, Port
from vlmflow.specs.base import StrictModel
from vlmflow.stage import StageResult


class WordFilterSpec(StrictModel):
    words: list[str]


def run(ctx):
    source = ctx.inputs["data"].path
    manifest = pl.read_parquet(source / "manifest.parquet")
    bad = manifest["caption"].str.contains("|".join(ctx.config.words))
    manifest.filter(~bad).write_parquet(ctx.out / "manifest.parquet")
    quarantine = manifest.filter(bad).select("key", "source", reason=pl.lit("blocked-word"), detail=pl.col("caption"))
    quarantine.write_parquet(ctx.out / "quarantine.parquet")
    pl.read_parquet(source / "shards.parquet").write_parquet(ctx.out / "shards.parquet")
    return StageResult(manifest.height, int((~bad).sum()), int(bad.sum()))


COMPONENT = Component(
    name="wordfilter", config=WordFilterSpec, reads={"data": Port("samples")}, writes="samples", run=run
)
'''

SPEC = """\
name: plugged
pipeline:
  - name: ingest
    uses: ingest
    with: {sources: [{kind: synthetic-shapes, count: 8}]}
  - name: clean
    uses: wordfilter
    inputs: {data: ingest}
    with: {words: [red]}
  - name: clean-by-path
    uses: wordfilter_plugin.stages:COMPONENT
    inputs: {data: ingest}
    with: {words: [red]}
  - name: tokenizer
    uses: tokenizer
    inputs: {data: clean}
    with: {kind: bpe, vocab_size: 300}
"""


@pytest.fixture
def plugin_site(tmp_path: Path) -> Path:
    """The plugin as pip installs it: its package and a dist-info with the entry point."""
    site = tmp_path / "site"
    (site / "wordfilter_plugin").mkdir(parents=True)
    (site / "wordfilter_plugin" / "__init__.py").write_text("")
    (site / "wordfilter_plugin" / "stages.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "wordfilter_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: wordfilter-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[vlmflow.components]\nwordfilter = wordfilter_plugin.stages\n")
    return site


def vlmflow(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(site)}
    command = [sys.executable, "-c", "from vlmflow.cli import main; main()", *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_an_installed_plugin_is_wired_and_planned_like_a_builtin(plugin_site, tmp_path):
    spec = tmp_path / "plugged.yaml"
    spec.write_text(SPEC)
    checked = vlmflow(["validate", str(spec)], plugin_site, tmp_path)
    assert checked.returncode == 0, checked.stderr[-2000:]
    planned = vlmflow(["plan", str(spec), "--json", "--workdir", str(tmp_path / "w")], plugin_site, tmp_path)
    assert planned.returncode == 0, planned.stderr[-2000:]
    stages = {e["stage"]: e for e in json.loads(planned.stdout)["stages"]}
    assert stages["clean"]["component"] == stages["clean-by-path"]["component"] == "wordfilter"
    assert stages["clean"]["digest"] == stages["clean-by-path"]["digest"]  # one component, one config, one input
    assert stages["tokenizer"]["inputs"] == {"data": "clean"}


def test_a_plugin_step_with_a_bad_config_or_wiring_is_located(plugin_site, tmp_path):
    spec = tmp_path / "plugged.yaml"
    spec.write_text(SPEC.replace("words: [red]}", "wrods: [red]}", 1).replace("{data: clean}", "{data: clena}"))
    checked = vlmflow(["validate", str(spec)], plugin_site, tmp_path)
    assert checked.returncode != 0
    assert f"{spec}:9:19: pipeline.1.with.wrods: unknown field" in checked.stderr
    assert "pipeline.3.inputs.data: unknown step 'clena'; did you mean 'clean'?" in checked.stderr


def test_a_plugin_step_runs_is_tracked_and_cached_like_a_builtin(plugin_site, tmp_path):
    """Through `vlmflow run`: the plugin's steps compute, its quarantine is accounted for, MLflow
    tracks them under the component's name; the second run has nothing to compute."""
    from mlflow.tracking import MlflowClient

    spec, workdir = tmp_path / "plugged.yaml", tmp_path / "w"
    spec.write_text(SPEC)
    first = vlmflow(["run", str(spec), "--workdir", str(workdir)], plugin_site, tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    summary = json.loads((workdir / "runs" / "latest" / "summary.json").read_text())
    by = {s["name"]: s for s in summary["stages"]}
    assert [by[n]["status"] for n in ("ingest", "clean", "clean-by-path", "tokenizer")] == ["computed"] * 4
    clean = by["clean"]
    assert (
        clean["rows_in"] == 8 and clean["rows_out"] + clean["rows_quarantined"] == 8 and clean["rows_quarantined"] > 0
    )
    client = MlflowClient(tracking_uri=summary["mlflow_tracking_uri"])
    run = client.get_run(clean["mlflow_run_id"])
    assert run.data.tags["vlmflow.component"] == "wordfilter" and run.data.params["words"] == '["red"]'
    assert run.data.metrics["data/rows_quarantined"] == clean["rows_quarantined"]

    second = vlmflow(["run", str(spec), "--workdir", str(workdir)], plugin_site, tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    again = json.loads((workdir / "runs" / "latest" / "summary.json").read_text())
    assert {s["status"] for s in again["stages"]} == {"cached"}
    assert again["prefect_flow_run_id"] is None and again["ray"].startswith("ray: not started")
    rerun = client.get_run(next(s for s in again["stages"] if s["name"] == "clean")["mlflow_run_id"])
    assert rerun.data.tags["vlmflow.computed_in"] == run.info.run_id
