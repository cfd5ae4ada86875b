"""The instruct stage with the offline backend, in process (no Ray): LLaVA JSON, shards laid out
like ingest's, accounting, mix, splits, COCO boxes, and a round trip through the llava-json reader."""

from __future__ import annotations

import json
from collections import Counter

import polars as pl
import pytest

from tests.conftest import encode
from tests.instruct_helpers import make_recipe, run_ingest, run_instruct
from vlmflow.artifacts import ArtifactStore
from vlmflow.components.instruct.output import dedup_questions, internal_conversation
from vlmflow.components.instruct.stage import assign_task
from vlmflow.components.sources.base import SourceContext
from vlmflow.components.sources.llava_json import plan as llava_plan
from vlmflow.components.sources.llava_json import read as llava_read
from vlmflow.samples import read_shard, sample_json
from vlmflow.specs.data import LlavaJsonSource
from vlmflow.specs.instruct import LLAVA_MIX


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """One ingest of 60 synthetic scenes and the offline instruct stage over it."""
    tmp = tmp_path_factory.mktemp("instruct")
    recipe = make_recipe(tmp)
    store = ArtifactStore(tmp / "artifacts")
    ingest = run_ingest(store, recipe)
    out, result = run_instruct(store, recipe, {"ingest": ingest})
    return store, ingest, out, result


def test_every_train_image_gets_one_item_held_out_rows_are_carried_and_rows_add_up(shapes):
    _store, ingest, out, result = shapes
    manifest_in = pl.read_parquet(ingest.path / "manifest.parquet")
    train = manifest_in.filter(pl.col("split") == "train")
    held_out = manifest_in.filter(pl.col("split") != "train")
    assert train.height and held_out.height
    assert result.rows_in == manifest_in.height == result.rows_out + result.rows_quarantined
    assert result.rows_quarantined == 0 and result.metrics["rows_carried_through"] == held_out.height
    manifest = pl.read_parquet(out / "manifest.parquet")
    assert manifest["key"].is_unique().all()
    generated = manifest.filter(pl.col("task").is_not_null())
    assert sorted(generated["image_key"]) == sorted(train["key"])
    assert set(generated["task"]) == {"conversation", "detail", "complex_reasoning"}
    carried = manifest.filter(pl.col("task").is_null())
    assert sorted(carried["key"]) == sorted(carried["image_key"]) == sorted(held_out["key"])
    assert (carried["n_qa"] > 0).all()  # held-out images keep their VQA pairs for evaluation
    assert result.metrics["statements.false"] == 0 and result.metrics["statements.checked"] > 100
    entries = json.loads((out / "llava_instruct.json").read_text())
    assert len(entries) == train.height  # only generated items are LLaVA entries


def test_llava_json_format(shapes):
    _store, _ingest, out, _result = shapes
    entries = json.loads((out / "llava_instruct.json").read_text())
    assert len({e["id"] for e in entries}) == len(entries)
    assert entries
    for entry in entries:
        assert set(entry) == {"id", "image", "conversations"}
        assert entry["image"] == entry["id"].rsplit("-", 1)[0] + ".png"
        turns = entry["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in turns[1:])
        assert all(t["value"].strip() for t in turns)
    samples = json.loads((out / "sample_conversations.json").read_text())
    assert 0 < len(samples) <= 20 and {"id", "image", "conversations", "task"} == set(samples[0])


def test_shards_read_like_ingest_output(shapes):
    store, _ingest, out, _result = shapes
    manifest = pl.read_parquet(out / "manifest.parquet")
    shards = pl.read_parquet(out / "shards.parquet")
    sha = dict(zip(shards["shard"], shards["sha256"], strict=True))
    assert shards["samples"].sum() == manifest.height
    seen = {}
    for shard in shards["shard"]:
        relative = shard.split("/", 2)[2]  # instruct/DIGEST/shards/NAME: the folder is DIGEST.partial until commit
        for sample in read_shard(out / relative, sha[shard]):
            record = sample_json(sample)
            seen[sample["__key__"]] = record
            assert sample["png"][:4] == b"\x89PNG"
    assert set(seen) == set(manifest["key"])
    generated = [r for r in seen.values() if r["task"]]
    record = generated[0]
    expected = {"key", "image_key", "task", "conversations", "captions", "objects", "qa", "split", "source", "truth"}
    assert expected <= set(record)
    assert [t["role"] for t in record["conversations"]][:2] == ["user", "assistant"]
    assert record["objects"] and "shape" in record["objects"][0]  # the source sample's JSON, updated
    assert record["qa"]  # so this artifact also trains/evaluates in the qa format
    assert store.root.joinpath(shards["shard"][0]).parent.parent.name.startswith(out.name.split(".")[0])


def test_llava_json_round_trips_through_the_llava_json_source(shapes, tmp_path):
    _store, _ingest, out, _result = shapes
    entries = json.loads((out / "llava_instruct.json").read_text())
    images = tmp_path / "images"
    images.mkdir()
    for entry in entries:
        (images / entry["image"]).write_bytes(b"png")
    spec = LlavaJsonSource.model_validate(
        {"kind": "llava-json", "path": str(out / "llava_instruct.json"), "images": str(images)},
        context={"spec_dir": tmp_path, "allow_outside_paths": True},
    )
    ctx = SourceContext("llava", 0, 1000)
    rows = [row for unit in llava_plan(spec, ctx) for row in llava_read(spec, ctx, unit)]
    records = [json.loads(s["json"]) for shard in (out / "shards").glob("*.tar") for s in read_shard(shard)]
    ours = {r["key"]: r["conversations"] for r in records if r["task"]}
    assert {r.key: r.extra["conversations"] for r in rows} == ours


def test_mix_follows_llava_proportions_and_is_stable_per_key():
    keys = [f"img-{i}" for i in range(20_000)]
    counts = Counter(assign_task(3, k, LLAVA_MIX) for k in keys)
    total = sum(LLAVA_MIX.values())
    for task, share in LLAVA_MIX.items():
        assert abs(counts[task] / len(keys) - share / total) < 0.015
    assert assign_task(3, "img-7", LLAVA_MIX) == assign_task(3, "img-7", LLAVA_MIX)
    assert {assign_task(3, k, {"detail": 1.0}) for k in keys[:100]} == {"detail"}


def test_duplicate_questions_of_an_image_are_dropped():
    turns = [("What color is it?", "Red."), ("what  color is it", "Blue."), ("Where is it?", "Left.")]
    kept, dropped = dedup_questions(turns)
    assert kept == [("What color is it?", "Red."), ("Where is it?", "Left.")] and dropped == 1
    assert internal_conversation(kept)[0] == {"role": "user", "content": "<image>\nWhat color is it?"}


def test_coco_boxes_feed_the_offline_generator_and_images_without_boxes_are_quarantined(tmp_path, photos):
    (tmp_path / "imgs").mkdir()
    for name in ("astronaut", "coffee"):
        (tmp_path / "imgs" / f"{name}.png").write_bytes(encode(photos[name][:128, :128]))
    images = [
        {"id": i, "file_name": f"{n}.png", "width": 128, "height": 128} for i, n in enumerate(("astronaut", "coffee"))
    ]
    captions = [{"image_id": 0, "caption": "an astronaut with a flag"}, {"image_id": 1, "caption": "a cup of coffee"}]
    boxes = [
        {"image_id": 0, "category_id": 1, "bbox": [10, 10, 50, 100]},
        {"image_id": 0, "category_id": 2, "bbox": [80, 20, 30, 30]},
    ]
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": captions}))
    categories = [{"id": 1, "name": "person"}, {"id": 2, "name": "flag"}]
    (tmp_path / "instances.json").write_text(json.dumps({"annotations": boxes, "categories": categories}))
    source = {
        "kind": "coco",
        "name": "coco",
        "captions": "captions.json",
        "images": "imgs",
        "instances": "instances.json",
    }
    recipe = make_recipe(tmp_path, {"mix": {"conversation": 1}, "export_images": True}, sources=[source], dedup=None)
    store = ArtifactStore(tmp_path / "artifacts")
    out, result = run_instruct(store, recipe, {"ingest": run_ingest(store, recipe)})
    assert (result.rows_in, result.rows_out, result.rows_quarantined) == (2, 1, 1)
    quarantine = pl.read_parquet(out / "quarantine.parquet")
    assert quarantine.row(0, named=True)["reason"] == "no-objects" and quarantine["key"][0] == "coco-1-conversation"
    entry = json.loads((out / "llava_instruct.json").read_text())[0]
    assert entry["id"] == "coco-0-conversation"
    assert (out / "images" / entry["image"]).read_bytes() == (tmp_path / "imgs" / "astronaut.png").read_bytes()
    answers = " ".join(t["value"] for t in entry["conversations"][1::2])
    assert "person" in answers or "flag" in answers or "objects" in answers
