"""CapFilt through the CLI (real Ray Data actor pools, Prefect, MLflow) with models given by path
(a Hugging Face BLIP captioner, a vlmflow filter), then its stages again in process: a killed actor
mid-stage changes no byte of the output."""

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
from tests.hf_blip import write_blip
from tests.tiny_vlm import write_model
from vlmflow.artifacts import ArtifactStore, file_sha256
from vlmflow.components.capfilt.stage import calibrated_threshold
from vlmflow.pipeline import recipe_graph
from vlmflow.runtime.ray import init_ray
from vlmflow.samples import build_index
from vlmflow.specs.loader import load_recipe
from vlmflow.stage import StageContext, StageOutput

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict, Path]:
    root = tmp_path_factory.mktemp("capfilt")
    spec = root / "capfilt-tiny.yaml"
    spec.write_text(Path(__file__).with_name("capfilt-tiny.yaml").read_text())
    write_model(root / "model")
    write_blip(root / "blip", "BlipForConditionalGeneration")
    workdir = root / "work"
    result = vlmflow("run", str(spec), "--workdir", str(workdir))
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir, summary_of(workdir), spec


def test_capfilt_accounts_for_every_pair_and_logs_its_report(run):
    workdir, summary, _ = run
    by_name = stages(summary)
    caption, filtered = by_name["capfilt-caption"], by_name["capfilt-filter"]
    assert list(by_name) == ["ingest", "capfilt-caption", "capfilt-filter"]  # the models are a folder
    assert caption["input_digests"] == {"data": by_name["ingest"]["artifact_digest"]}
    folder = Path(filtered["artifact_path"])
    pairs = pl.read_parquet(folder / "pairs.parquet")
    ingest = pl.read_parquet(Path(by_name["ingest"]["artifact_path"]) / "manifest.parquet")
    web_train = ingest.filter((pl.col("source") == "web") & (pl.col("split") == "train"))
    # Every web training image has its web caption and k=2 synthetic ones, each judged.
    assert pairs.height == 3 * web_train.height == filtered["rows_in"]
    assert pairs.group_by("origin").len().sort("origin").rows() == [("synthetic", 2 * web_train.height),
                                                                    ("web", web_train.height)]  # fmt: skip
    # The random captioner writes some empty captions: removed unscored, with their reason.
    empty = pairs.filter(pl.col("reason") == "capfilt:empty-caption")
    assert empty.height and (empty["origin"] == "synthetic").all() and (empty["caption"].str.strip_chars() == "").all()
    scored = pairs.filter(pl.col("judged"))
    assert scored.height + empty.height == pairs.height and not empty["kept"].any()
    # The threshold is calibrated: the highest that 80% of the held-out clean pairs pass, not the 0.5 given.
    calibration = pl.read_parquet(folder / "calibration.parquet")
    held_out = ingest.filter((pl.col("source") == "clean") & (pl.col("split") == "val"))
    assert sorted(calibration["key"].to_list()) == sorted(held_out["key"].to_list()) and held_out.height >= 8
    threshold = calibrated_threshold(calibration["itm"].to_list(), 0.8)
    assert (
        threshold != 0.5 and (calibration["itm"] >= threshold).mean() >= 0.8 > (calibration["itm"] > threshold).mean()
    )
    assert calibration["passed"].to_list() == (calibration["itm"] >= threshold).to_list()
    assert scored["kept"].to_list() == (scored["itm"] >= threshold).to_list()
    quarantine = pl.read_parquet(folder / "quarantine.parquet")
    assert quarantine.filter(pl.col("reason") == "capfilt:empty-caption").height == empty.height
    removed = scored.filter(~pl.col("kept"))
    by_score = quarantine.filter(pl.col("reason").str.starts_with("capfilt:itm="))
    assert removed.height and by_score["reason"].to_list() == [
        f"capfilt:itm={itm:.2f}<{threshold:.2f}" for itm in removed["itm"]
    ]
    # Output: every image of the input is in the new manifest or quarantined as left without a caption.
    manifest = pl.read_parquet(folder / "manifest.parquet")
    emptied = quarantine.filter(pl.col("reason") == "capfilt:no-caption-kept")["key"].to_list()
    assert sorted(manifest["key"].to_list() + emptied) == sorted(ingest["key"].to_list())
    kept = pairs.filter(pl.col("kept")).group_by("key", maintain_order=True).agg("caption")
    index = build_index(folder, workdir / "artifacts")  # checks every output shard's sha256
    assert index.height == manifest.height
    expected = dict(zip(kept["key"].to_list(), kept["caption"].to_list(), strict=True))
    got = dict(zip(manifest["key"].to_list(), manifest["captions"].to_list(), strict=True))
    assert all(got[k] == v for k, v in expected.items())
    clean = manifest.filter(pl.col("source") == "clean")
    assert (
        clean.height == 48  # the held-out clean rows too
        and clean["captions"].to_list() == ingest.filter(pl.col("source") == "clean")["captions"].to_list()
    )  # other sources pass unchanged

    client = MlflowClient(tracking_uri=summary["mlflow_tracking_uri"])
    child = client.get_run(filtered["mlflow_run_id"])
    noise = web_train["caption_corrupted"].mean()
    assert child.data.metrics["capfilt-filter/web_noise_before"] == pytest.approx(noise)
    assert {
        f"capfilt-filter/{k}"
        for k in ("filter_precision", "filter_recall", "filter_f1", "kept_web", "removed_synthetic")
    } <= set(child.data.metrics)
    assert child.data.metrics["capfilt-filter/filter_itm_threshold"] == pytest.approx(threshold)
    assert child.data.metrics["capfilt-filter/calibration_pairs"] == calibration.height
    assert "capfilt-caption/synthetic_caption_accuracy" in client.get_run(caption["mlflow_run_id"]).data.metrics
    logged = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {
        "pairs.parquet",
        "quarantine.parquet",
        "scores.png",
        "examples.png",
        "report.json",
        "calibration.parquet",
    } <= logged


def _rerun(workdir: Path, summary: dict, name: str, recipe, out: Path, kill: bool) -> float | None:
    """Run one CapFilt stage in process into `out`; with `kill`, SIGKILL one of its Ray Data
    actors once it has answered a batch. Returns when the kill happened (None: no kill)."""
    by_name = stages(summary)
    inputs = {
        key: StageOutput(up, by_name[up]["artifact_digest"], Path(by_name[up]["artifact_path"]), {})
        for key, up in {"data": "ingest", "captions": "capfilt-caption"}.items()
    }
    out.mkdir(parents=True)
    step = {s.name: s for s in recipe_graph(recipe)}[name]
    inputs = {port: output for port, output in inputs.items() if port in step.inputs}
    store = ArtifactStore(workdir / "artifacts")
    ctx = StageContext(recipe, store, out, "rerun", inputs, "log", step.config, step.name, step.field)
    killed: list[float] = []
    done = threading.Event()

    def killer() -> None:
        while not done.is_set() and not killed:
            alive = processes_named("MapWorker", os.getpid())  # this test's Ray only
            if len(alive) == 2:
                time.sleep(1.0)  # let them answer a batch or two
                os.kill(alive[0].pid, signal.SIGKILL)
                killed.append(time.monotonic())
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    if kill:
        thread.start()
    try:
        step.component.call("run", ctx)
    finally:
        finished = time.monotonic()
        done.set()
    if kill:
        thread.join()
        assert killed and killed[0] < finished, "the actor was not killed while the stage ran"
    return killed[0] if killed else None


def test_a_killed_actor_changes_no_byte_of_captions_or_filtered_shards(run, tmp_path):
    """Each stage again, in process, with one of its two actors SIGKILLed mid-stage: Ray Data
    restarts it and retries its batch; the output equals the CLI run's."""
    workdir, summary, spec = run
    by_name = stages(summary)
    recipe = load_recipe(spec)
    init_ray(recipe.runtime.ray)
    try:
        _rerun(workdir, summary, "capfilt-caption", recipe, tmp_path / "caption", kill=True)
        _rerun(workdir, summary, "capfilt-filter", recipe, tmp_path / "filter", kill=True)
    finally:
        ray.shutdown()
    reference = Path(by_name["capfilt-caption"]["artifact_path"])
    assert pl.read_parquet(tmp_path / "caption" / "captions.parquet").equals(
        pl.read_parquet(reference / "captions.parquet")
    )
    plain, killed = Path(by_name["capfilt-filter"]["artifact_path"]), tmp_path / "filter"
    shards = sorted(p.name for p in (plain / "shards").iterdir())
    assert shards and shards == sorted(p.name for p in (killed / "shards").iterdir())
    assert [file_sha256(plain / "shards" / s) for s in shards] == [file_sha256(killed / "shards" / s) for s in shards]
    for name in ("pairs.parquet", "quarantine.parquet", "calibration.parquet"):
        assert pl.read_parquet(plain / name).equals(pl.read_parquet(killed / name)), name
    columns = [c for c in pl.read_parquet_schema(plain / "manifest.parquet") if c != "shard"]  # shard: under the digest
    assert pl.read_parquet(plain / "manifest.parquet", columns=columns).equals(
        pl.read_parquet(killed / "manifest.parquet", columns=columns)
    )
    decided = pl.read_parquet(killed / "pairs.parquet")
    assert 0 < decided["kept"].sum() < decided.height  # both decisions exercised
    report = json.loads((killed / "report.json").read_text())
    assert report["kept_web"] + report["removed_web"] + report["kept_synthetic"] + report["removed_synthetic"] == (
        decided.height
    )
