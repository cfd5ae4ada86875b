"""Referring-expression grounding: the box text MiniGPT-v2 writes, the refer items of a sample, the
`refer` training format, the held-out `grounding` items and their scores against the blind baselines."""

from __future__ import annotations

import polars as pl
import pytest

from tests.conftest import REPO
from vlmflow.components.evaluate import datasets, grounding
from vlmflow.components.evaluate.datasets import Item
from vlmflow.components.sources.synthetic import make_row
from vlmflow.components.train.data import ShardSamples, sample_turns
from vlmflow.components.train.overflow import candidate_turns
from vlmflow.grounding import box_text, iou, parse_box, refer_items
from vlmflow.samples import build_index, write_shard
from vlmflow.specs import load_recipe
from vlmflow.specs.data import SyntheticShapesSource


def test_box_text_round_trips_on_the_0_100_grid():
    assert box_text((0.123, 0.5, 0.876, 1.2)) == "{<12><50><88><100>}"  # clipped to the image
    assert parse_box("it is at {<12><50><88><100>} here") == (0.12, 0.5, 0.88, 1.0)
    assert parse_box("{ <1> <2><3> <4> }") == (0.01, 0.02, 0.03, 0.04)


@pytest.mark.parametrize("text", ["", "red", "{<1><2><3>}", "{<10><10><5><20>}", "{<0><0><101><50>}", "<1><2><3><4>"])
def test_parse_box_refuses_what_is_not_a_box(text):
    assert parse_box(text) is None


def test_iou():
    assert iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert iou((0, 0, 0.5, 1), (0.5, 0, 1, 1)) == 0.0
    assert iou((0, 0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75)) == pytest.approx(0.0625 / 0.4375)
    assert iou((0.2, 0.2, 0.2, 0.2), (0.2, 0.2, 0.2, 0.2)) == 0.0  # empty boxes


def test_refer_items_ask_only_about_uniquely_named_objects():
    red = {"shape": "circle", "color": "red", "bbox": [0.1, 0.2, 0.3, 0.3]}
    blue = {"shape": "square", "color": "blue", "bbox": [0.5, 0.5, 0.2, 0.4]}
    [(question, answer, box)] = refer_items({"objects": [red, blue, dict(blue, bbox=[0, 0, 0.1, 0.1])]})
    assert question == "[refer] give me the location of the red circle"
    assert answer == "{<10><20><40><50>}" and box == pytest.approx((0.1, 0.2, 0.4, 0.5))
    coco = {"objects": [{"category": "dog", "bbox": [0, 0, 0.5, 0.5]}, {"category": "cat", "bbox": [0, 0, 0, 1]}]}
    assert [q for q, _, _ in refer_items(coco)] == ["[refer] give me the location of the dog"]  # cat: empty box
    assert refer_items({}) == [] and refer_items({"objects": [{"bbox": [0, 0, 1, 1]}]}) == []


def test_synthetic_scenes_train_the_refer_format():
    spec = SyntheticShapesSource(kind="synthetic-shapes", count=40, max_objects=2)
    records = [{"key": r.key, "captions": r.captions, **r.extra} for r in (make_row(spec, 3, i) for i in range(40))]
    for record in records:
        turns = sample_turns(record, "refer", "Describe the image.", epoch=0)
        every = candidate_turns(record, "refer", "Describe the image.", "{question} {options}")  # overflow checks all
        assert [[t["content"] for t in c] for c in every] == [[q, a] for q, a, _ in refer_items(record)]
        names = [f"{o['color']} {o['shape']}" for o in record["objects"]]
        unique = [n for n in names if names.count(n) == 1]
        if not unique:
            assert turns is None
            continue
        asked = turns[0]["content"].removeprefix("[refer] give me the location of the ")
        [obj] = [o for o in record["objects"] if f"{o['color']} {o['shape']}" == asked]
        x, y, w, h = obj["bbox"]
        assert parse_box(turns[1]["content"]) == pytest.approx((x, y, x + w, y + h), abs=0.005)


@pytest.fixture()
def held_out(tmp_path):
    """A one-shard data artifact of synthetic scenes and its index."""
    spec = SyntheticShapesSource(kind="synthetic-shapes", count=16, max_objects=2)
    rows = [make_row(spec, 9, i) for i in range(16)]
    data, rel = tmp_path / "store" / "dedup" / "abc", "dedup/abc/shards/0.tar"
    samples = [{"__key__": r.key, "png": r.image, "json": {"captions": r.captions, **r.extra}} for r in rows]
    sha, _ = write_shard(tmp_path / "store" / rel, samples)
    pl.DataFrame([{"shard": rel, "sha256": sha}]).write_parquet(data / "shards.parquet")
    manifest = [{"key": r.key, "shard": rel, "split": "test", "source": "shapes"} for r in rows]
    pl.DataFrame(manifest).write_parquet(data / "manifest.parquet")
    return build_index(data, tmp_path / "store"), tmp_path / "store", rows


def test_held_out_grounding_items_hold_every_uniquely_named_object(held_out):
    index, root, rows = held_out
    assert index["n_refs"].to_list() == [len(refer_items(r.extra)) for r in rows]
    loaded = datasets.held_out(ShardSamples(index.with_columns(format=pl.lit("caption")), root), "grounding", 99, "d")
    assert len(loaded.items) == sum(len(refer_items(r.extra)) for r in rows) > 0
    assert {q["id"] for q in loaded.quarantine} == {r.key for r in rows if not refer_items(r.extra)}
    assert all(q["reason"] == "no-unique-object-with-box" for q in loaded.quarantine)
    assert all(parse_box(item.references[0]) is not None for item in loaded.items)


def items_at(boxes: list[tuple[str, tuple[float, float, float, float]]]) -> list[Item]:
    return [Item(str(i), b"", (box_text(box),), f"[refer] give me the location of the {name}")
            for i, (name, box) in enumerate(boxes)]  # fmt: skip


ITEMS = items_at([("red circle", (0.0, 0.0, 0.3, 0.3)), ("red circle", (0.6, 0.6, 0.9, 0.9)),
                  ("blue square", (0.1, 0.5, 0.5, 0.9)), ("blue square", (0.5, 0.1, 0.9, 0.5))])  # fmt: skip


def test_grounding_scores_true_boxes_above_the_blind_baselines():
    metrics, rows = grounding.score(ITEMS, [f"at {item.references[0]}" for item in ITEMS])
    assert metrics["grounding_accuracy"] == 1.0 and metrics["mean_iou"] == pytest.approx(1.0)
    assert metrics["grounding_accuracy_baseline"] == 0.0  # the mean box per name misses every object here
    assert 0 < metrics["mean_iou_baseline"] < 0.3 and metrics["parse_failure_rate"] == 0.0
    assert metrics["items"] == 4 and all(r["correct"] for r in rows) and rows[0]["answer"] == "{<0><0><30><30>}"


def test_grounding_baseline_is_what_a_blind_guess_scores():
    # every item the same box: the mean box per name is that box, so a blind guess scores 1
    same = items_at([("red circle", (0.2, 0.2, 0.6, 0.6))] * 3)
    metrics, _ = grounding.score(same, ["no idea", "{<0><0><100><100>}", "{<20><20><60><60>}"])
    assert metrics["grounding_accuracy_baseline"] == 1.0 and metrics["mean_iou_baseline"] == pytest.approx(1.0)
    assert metrics["grounding_accuracy"] == pytest.approx(1 / 3) and metrics["parse_failure_rate"] == pytest.approx(
        1 / 3
    )
    # wide boxes at the top and at the bottom: the whole image overlaps them more than their mean box
    wide = items_at([("red circle", (0.0, 0.0, 1.0, 0.7)), ("red circle", (0.0, 0.3, 1.0, 1.0))])
    assert grounding.score(wide, ["", ""])[0]["mean_iou_baseline"] == pytest.approx(0.7)  # the mean box: 0.647


def test_a_reference_that_is_not_a_box_is_an_error():
    with pytest.raises(ValueError, match="grounding item 0: reference 'red' is not a box"):
        grounding.score([Item("0", b"", ("red",), "q")], ["{<0><0><1><1>}"])


def test_minigpt_v2_twin_trains_and_evaluates_grounding():
    recipe = load_recipe(REPO / "specs" / "recipes" / "minigpt-v2-tiny.yaml")
    assert [t.kind for t in recipe.evaluate] == ["grounding"]
    assert all("refer" in {c.format for c in stage.data.mixture} for stage in recipe.stages)
