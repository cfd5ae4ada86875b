"""Incremental refresh: units keep their rows across versions, are content-addressed by the files
they read, and a version references the unchanged units' shards (built by run_stage on a
LocalExecutor: in process, no Ray)."""

from __future__ import annotations

import os

import numpy as np
import polars as pl
import pytest

from tests.conftest import encode
from vlmflow.artifacts import ArtifactStore
from vlmflow.components.ingest import COMPONENT as INGEST
from vlmflow.components.refresh import Refresh, assign, plan_units
from vlmflow.fingerprint import HashCache
from vlmflow.pipeline import Step, graph_digests
from vlmflow.runtime.executor import LocalExecutor
from vlmflow.samples import read_shard
from vlmflow.specs.loader import Marked, validate
from vlmflow.stage import StageOutput, run_stage


def _recipe(tmp_path, data=None, **extra):
    data = {"sources": [{"kind": "image-folder", "name": "web", "path": "imgs"}], "shard_size": 4, **(data or {})}
    return validate(Marked({"name": "r", "data": data, **extra}), tmp_path / "spec.yaml")


def _images(folder, start, count):
    folder.mkdir(exist_ok=True)
    for i in range(start, start + count):
        pixels = np.random.default_rng(i).integers(0, 255, (24, 24, 3), dtype=np.uint8)
        (folder / f"img{i:03d}.png").write_bytes(encode(pixels))
        (folder / f"img{i:03d}.txt").write_text(f"picture {i}\n")


def _ingest_step(recipe):
    """The recipe's ingest step, as the concise `data:` section expands to."""
    return Step("ingest", INGEST, recipe.data.ingest(), {}, ("data",))


def _units(recipe, previous):
    return plan_units(recipe.data.ingest(), recipe.seed, previous, recipe.spec_dir(), HashCache(None))


def _refresh(store, recipe, previous):
    """One refresh's ingest, as the flow runs it: (Refresh, version digest, its folder)."""
    planned = Refresh.plan(recipe, _ingest_step(recipe), store, previous)
    step = planned.step(_ingest_step(recipe))
    digest = graph_digests([step], recipe)[step.name]
    run_stage(step, digest, {}, recipe, store, "log", LocalExecutor())
    return planned, digest, store.path("ingest", digest)


def _shards(version):
    manifest = pl.read_parquet(version / "manifest.parquet")
    return dict(zip(manifest["key"], manifest["shard"], strict=True))


# ---------------------------------------------------------------- assign (pure)


def test_assign_keeps_previous_units_and_appends_new_rows_in_new_units():
    keys = ["a", "b", "c", "d", "e", "f", "g", "h"]
    groups = assign(keys, [["a", "b", "c"], ["d", "e"]], shard_size=2)
    assert [[keys[i] for i in g] for g in groups] == [["a", "b", "c"], ["d", "e"], ["f", "g"], ["h"]]


def test_assign_drops_deleted_rows_and_empty_units():
    keys = ["b", "c", "x"]
    groups = assign(keys, [["a", "b"], ["d"], ["c"]], shard_size=4)
    assert [[keys[i] for i in g] for g in groups] == [["b"], ["c"], ["x"]]


def test_assign_without_history_is_plain_chunking():
    assert assign(list("abcde"), [], shard_size=2) == [[0, 1], [2, 3], [4]]


# ---------------------------------------------------------------- unit digests


def test_unit_digest_follows_the_files_its_rows_read(tmp_path):
    _images(tmp_path / "imgs", 0, 6)
    recipe = _recipe(tmp_path)
    first = _units(recipe, {})
    assert [len(u.keys) for u in first] == [4, 2]
    previous = {"web": [u.keys for u in first]}
    assert [u.digest for u in _units(recipe, previous)] == [u.digest for u in first]
    _images(tmp_path / "imgs", 6, 3)  # new files: the old units keep their digests
    grown = _units(recipe, previous)
    assert [u.digest for u in grown[:2]] == [u.digest for u in first] and len(grown) == 3
    sidecar = tmp_path / "imgs" / "img005.txt"
    sidecar.write_text("a new caption\n")  # a caption changed: only its unit changes
    os.utime(sidecar, ns=(1, 1))
    edited = _units(recipe, previous)
    assert edited[0].digest == first[0].digest and edited[1].digest != first[1].digest
    changed = _units(_recipe(tmp_path, data={"filters": [{"kind": "min-size", "width": 30, "height": 30}]}), previous)
    assert not {u.digest for u in changed} & {u.digest for u in first}  # other filters: other units


# ---------------------------------------------------------------- versions


def test_refresh_reads_only_new_files_and_references_the_old_shards(tmp_path):
    _images(tmp_path / "imgs", 0, 6)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not an image")  # quarantined, in its unit
    store, recipe = ArtifactStore(tmp_path / "artifacts"), _recipe(tmp_path)
    first, v1, v1_dir = _refresh(store, recipe, None)
    assert first.built == {"units_built": 2, "rows_ingested": 7}
    _images(tmp_path / "imgs", 6, 3)
    second, v2, v2_dir = _refresh(store, recipe, v1)
    assert second.previous == v1 and v2 != v1
    assert second.built == {"units_built": 1, "rows_ingested": 3}
    stats = store.stats("ingest", v2)
    assert (stats["rows_in"], stats["rows_out"], stats["rows_quarantined"]) == (10, 9, 1)
    assert {k: stats["metrics"][k] for k in ("rows_added", "rows_removed", "rows_moved", "units_reused")} == {
        "rows_added": 3, "rows_removed": 0, "rows_moved": 0, "units_reused": 2,
    }  # fmt: skip
    old, new = _shards(v1_dir), _shards(v2_dir)
    assert all(new[key] == shard for key, shard in old.items())
    assert pl.read_parquet(v2_dir / "quarantine.parquet")["reason"].to_list() == ["unreadable-image"]
    shards = pl.read_parquet(v2_dir / "shards.parquet")
    read = [s["__key__"] for rel, sha in shards.select("shard", "sha256").iter_rows()
            for s in read_shard(store.root / rel, sha)]  # fmt: skip
    assert sorted(read) == sorted(new)


def test_deleted_and_changed_files_leave_or_rebuild_their_unit_only(tmp_path):
    _images(tmp_path / "imgs", 0, 9)
    store, recipe = ArtifactStore(tmp_path / "artifacts"), _recipe(tmp_path)
    _, v1, v1_dir = _refresh(store, recipe, None)
    (tmp_path / "imgs" / "img001.png").unlink()
    (tmp_path / "imgs" / "img001.txt").unlink()
    (tmp_path / "imgs" / "img006.txt").write_text("a changed caption\n")
    os.utime(tmp_path / "imgs" / "img006.txt", ns=(2, 2))
    third, v2, v2_dir = _refresh(store, recipe, v1)
    assert third.built == {"units_built": 2, "rows_ingested": 3 + 4}  # units 0 and 1 rebuilt, unit 2 kept
    old, new = _shards(v1_dir), _shards(v2_dir)
    assert "web-img001" not in new and len(new) == 8
    assert new["web-img008"] == old["web-img008"] and new["web-img000"] != old["web-img000"]
    captions = pl.read_parquet(v2_dir / "manifest.parquet").filter(pl.col("key") == "web-img006")["caption"]
    assert captions.to_list() == ["a changed caption"]
    metrics = store.stats("ingest", v2)["metrics"]
    assert (metrics["rows_added"], metrics["rows_removed"], metrics["rows_moved"]) == (0, 1, 7)
    unchanged, v3, _ = _refresh(store, recipe, v2)
    assert v3 == v2 and unchanged.built == {}  # nothing new: the same version, cached


def test_a_version_is_byte_identical_however_it_is_built(tmp_path):
    _images(tmp_path / "imgs", 0, 6)
    recipe = _recipe(tmp_path)
    built = []
    for name in ("a", "b"):
        store = ArtifactStore(tmp_path / name)
        digest = _refresh(store, recipe, None)[1]
        files = sorted(p for p in store.root.rglob("*") if p.is_file() and p.name != "_SUCCESS" and p.suffix != ".lock")
        built.append((digest, {str(p.relative_to(store.root)): p.read_bytes() for p in files}))
    assert built[0] == built[1]  # _SUCCESS files hold timings; .lock files are empty


def test_downstream_stages_read_a_version_that_references_unit_shards(tmp_path):
    from vlmflow.components import dedup, tokenize

    _images(tmp_path / "imgs", 0, 5)
    (tmp_path / "imgs" / "copy.png").write_bytes((tmp_path / "imgs" / "img002.png").read_bytes())
    (tmp_path / "imgs" / "copy.txt").write_text("the same picture again\n")
    store = ArtifactStore(tmp_path / "artifacts")
    recipe = _recipe(tmp_path, data={"dedup": {"exact": True, "near": False}}, tokenizer={"kind": "bpe"})
    planned = Refresh.plan(recipe, _ingest_step(recipe), store, None)
    steps = [
        planned.step(_ingest_step(recipe)),
        Step("dedup", dedup.COMPONENT, recipe.data.dedup, {"data": "ingest"}),
        Step("tokenizer", tokenize.COMPONENT, recipe.tokenizer, {"data": "dedup"}),
    ]
    digests, outputs = graph_digests(steps, recipe), {}
    for step in steps:  # as the data-refresh flow runs them
        inputs = {port: outputs[up] for port, up in step.inputs.items()}
        digest = digests[step.name]
        assert run_stage(step, digest, inputs, recipe, store, "log", LocalExecutor())[0] == "computed"
        path, stats = store.path(step.name, digest), store.stats(step.name, digest)
        outputs[step.name] = StageOutput(step.name, digest, path, stats)
    assert outputs["dedup"].stats["rows_quarantined"] == 1  # copy or img002: one of them is a duplicate
    assert outputs["tokenizer"].stats["rows_in"] == 5  # texts read back from the units' shards


@pytest.mark.parametrize("sections", [{}, {"tokenizer": {"kind": "bpe"}}, {"instruct": {}}])
def test_data_stages_are_the_data_side_of_the_recipe_graph(tmp_path, sections):
    from vlmflow.flows.data_refresh import data_steps
    from vlmflow.pipeline import recipe_graph

    _images(tmp_path / "imgs", 0, 1)
    recipe = _recipe(tmp_path, **sections)
    steps = data_steps(recipe)
    (ingest,) = [s for s in steps if s.component is INGEST]
    planned = Refresh.plan(recipe, ingest, ArtifactStore(tmp_path / "artifacts"), None)
    run = [planned.step(s) if s is ingest else s for s in steps]  # what the flow runs
    ours = [(step.name, step.inputs) for step in run]
    names = dict(ours)
    data = [(s.name, s.inputs) for s in recipe_graph(recipe) if s.name in names]
    assert ours == data and len(ours) == 2 + len(sections)
