"""The built-in synthetic-shapes source: determinism, caption noise, scene-graph truth."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vlmflow.components.sources import synthetic
from vlmflow.components.sources.base import SOURCES, RawRow, SourceContext
from vlmflow.specs.data import SyntheticShapesSource


def make_spec(**overrides) -> SyntheticShapesSource:
    fields = {"kind": "synthetic-shapes", "count": 40, "image_size": 32, "max_objects": 4}
    fields.update(overrides)
    return SyntheticShapesSource(**fields)


def read_all(spec: SyntheticShapesSource, seed: int = 0, shard_size: int = 100) -> list[RawRow]:
    reader = SOURCES.get("synthetic-shapes")
    ctx = SourceContext(name="shapes", seed=seed, shard_size=shard_size)
    rows = []
    for unit in reader.plan(spec, ctx):
        produced = list(reader.read(spec, ctx, unit))
        assert len(produced) == unit.rows
        rows.extend(produced)
    assert all(isinstance(r, RawRow) for r in rows)
    return rows


def as_tuple(row: RawRow) -> tuple:
    return (row.key, row.image, tuple(row.captions), row.label, repr(row.extra), row.split)


@pytest.fixture(scope="module")
def noisy_rows() -> list[RawRow]:
    spec = make_spec(count=400, caption_noise=0.3, val_fraction=0.1, test_fraction=0.2, max_objects=6)
    return read_all(spec, seed=3)


def test_registered_under_its_kind():
    assert SOURCES.get("synthetic-shapes").read is synthetic.read


def test_plan_respects_count_limit_and_shard_size():
    ctx = SourceContext(name="s", seed=0, shard_size=3)
    units = synthetic.plan(make_spec(count=10), ctx)
    assert [u.rows for u in units] == [3, 3, 3, 1]
    assert [u.index for u in units] == [0, 1, 2, 3]
    assert [u.payload for u in units] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert sum(u.rows for u in synthetic.plan(make_spec(count=10, limit=4), ctx)) == 4


def test_deterministic_by_seed():
    spec = make_spec(count=12, caption_noise=0.5)
    first = [as_tuple(r) for r in read_all(spec, seed=5)]
    again = [as_tuple(r) for r in read_all(spec, seed=5)]
    other = [as_tuple(r) for r in read_all(spec, seed=6)]
    assert first == again
    assert [r[1] for r in first] != [r[1] for r in other]
    assert sum(a[1] != b[1] for a, b in zip(first, other, strict=True)) >= 10


def test_spec_seed_overrides_recipe_seed():
    rows_a = read_all(make_spec(count=5, seed=11), seed=0)
    rows_b = read_all(make_spec(count=5, seed=11), seed=99)
    rows_c = read_all(make_spec(count=5), seed=11)
    assert [as_tuple(r) for r in rows_a] == [as_tuple(r) for r in rows_b] == [as_tuple(r) for r in rows_c]


def test_independent_of_shard_size():
    spec = make_spec(count=23, caption_noise=0.4, val_fraction=0.2)
    small = [as_tuple(r) for r in read_all(spec, seed=2, shard_size=3)]
    large = [as_tuple(r) for r in read_all(spec, seed=2, shard_size=100)]
    assert small == large
    assert [r[0] for r in small] == [f"{i:08d}" for i in range(23)]


def test_caption_noise_fraction_close_to_target(noisy_rows):
    corrupted = sum(r.extra["truth"]["corrupted"] for r in noisy_rows)
    # binomial(400, 0.3): sd ~ 9.2; allow ~4 sd
    assert 0.3 * 400 - 37 <= corrupted <= 0.3 * 400 + 37


def test_no_noise_means_no_corruption():
    rows = read_all(make_spec(count=100, caption_noise=0.0))
    assert not any(r.extra["truth"]["corrupted"] for r in rows)
    assert all(r.captions == [r.extra["truth"]["caption"]] for r in rows)
    assert all(r.extra["truth"]["corruption"] is None for r in rows)


def test_full_noise_corrupts_every_caption():
    rows = read_all(make_spec(count=60, caption_noise=1.0))
    assert all(r.extra["truth"]["corrupted"] for r in rows)
    assert all(r.captions[0] != r.extra["truth"]["caption"] for r in rows)


def test_corrupted_captions_differ_and_clean_ones_match(noisy_rows):
    kinds = Counter()
    for row in noisy_rows:
        truth = row.extra["truth"]
        [shown] = row.captions
        assert truth["caption"] == synthetic.caption(synthetic.groups(scene_objects(row)))
        if truth["corrupted"]:
            assert shown != truth["caption"]
            assert truth["corruption"] in synthetic.CORRUPTIONS
            kinds[truth["corruption"]] += 1
        else:
            assert shown == truth["caption"]
            assert truth["corruption"] is None
    assert set(kinds) == set(synthetic.CORRUPTIONS)


def scene_objects(row: RawRow) -> list[synthetic.SceneObject]:
    return [synthetic.SceneObject(o["shape"], o["color"], o["size"], tuple(o["bbox"])) for o in row.extra["objects"]]


def test_caption_text():
    objects = [
        synthetic.SceneObject("circle", "red", "small", (0, 0, 0.2, 0.2)),
        synthetic.SceneObject("square", "orange", "large", (0.5, 0.5, 0.4, 0.4)),
        synthetic.SceneObject("circle", "red", "small", (0.3, 0, 0.2, 0.2)),
    ]
    groups = synthetic.groups(objects)
    assert groups == [("red", "circle", 2), ("orange", "square", 1)]
    assert synthetic.caption(groups) == "an image with two red circles and an orange square."


def recount_answer(question: str, objects: list[dict]) -> str:
    """The true answer to a generated question, computed independently from the scene graph."""
    shapes = Counter(o["shape"] for o in objects)
    colors = Counter(o["color"] for o in objects)
    words = question.rstrip("?").split()
    if question.startswith("How many"):
        return str(shapes[words[2].removesuffix("s")])
    if question.startswith("What color is the"):
        [match] = [o["color"] for o in objects if o["shape"] == words[-1]]
        return match
    if question.startswith("What shape is the"):
        [match] = [o["shape"] for o in objects if o["color"] == words[-2]]
        return match
    if question.startswith("Is there"):
        return "yes" if colors[words[-2]] else "no"
    raise AssertionError(f"unexpected question {question!r}")


def test_vqa_answers_are_true_of_the_scene(noisy_rows):
    seen = Counter()
    for row in noisy_rows:
        objects = row.extra["objects"]
        assert row.extra["qa"]
        for qa in row.extra["qa"]:
            assert qa["answer"] == recount_answer(qa["question"], objects), (row.key, qa)
            seen[" ".join(qa["question"].split()[:2])] += 1
            seen[qa["answer"]] += 1
    assert {"How many", "What color", "What shape", "Is there", "yes", "no"} <= set(seen)


def test_counts_cover_every_shape(noisy_rows):
    for row in noisy_rows[:50]:
        counts = {qa["question"]: int(qa["answer"]) for qa in row.extra["qa"] if qa["question"].startswith("How")}
        assert len(counts) == len(synthetic.SHAPES)
        assert sum(counts.values()) == len(row.extra["objects"])


def test_boxes_inside_unit_square(noisy_rows):
    for row in noisy_rows:
        assert 1 <= len(row.extra["objects"]) <= 6
        for obj in row.extra["objects"]:
            x, y, w, h = obj["bbox"]
            assert w > 0 and h > 0
            assert x >= 0 and y >= 0 and x + w <= 1 + 1e-3 and y + h <= 1 + 1e-3
            assert obj["shape"] in synthetic.SHAPES and obj["color"] in synthetic.COLORS
            assert w == pytest.approx(2 * synthetic.SIZES[obj["size"]], abs=1e-4)


def test_object_count_bounds():
    rows = read_all(make_spec(count=60, min_objects=2, max_objects=3))
    counts = Counter(len(r.extra["objects"]) for r in rows)
    assert set(counts) == {2, 3}


def test_split_fractions_roughly_respected(noisy_rows):
    splits = Counter(r.split for r in noisy_rows)
    assert set(splits) == {None, "val", "test"}
    assert 0.2 * 400 - 33 <= splits["test"] <= 0.2 * 400 + 33
    assert 0.1 * 400 - 25 <= splits["val"] <= 0.1 * 400 + 25


def test_no_split_fractions_keep_the_source_split():
    assert {r.split for r in read_all(make_spec(count=50))} == {None}


def test_label_is_shape_of_largest_object(noisy_rows):
    for row in noisy_rows:
        objects = row.extra["objects"]
        widest = max(o["bbox"][2] for o in objects)
        assert row.label in {o["shape"] for o in objects if o["bbox"][2] == widest}
        assert row.label == next(o["shape"] for o in objects if o["bbox"][2] == widest)


def test_label_can_be_the_color_of_the_largest_object():
    rows = read_all(make_spec(count=60, label="color"))
    for row in rows:
        objects = row.extra["objects"]
        widest = max(o["bbox"][2] for o in objects)
        assert row.label == next(o["color"] for o in objects if o["bbox"][2] == widest)
    assert len({row.label for row in rows}) > 3


@pytest.mark.parametrize("size", [16, 48])
def test_image_decodes_to_the_right_size(size):
    for row in read_all(make_spec(count=5, image_size=size)):
        image = Image.open(io.BytesIO(row.image))
        assert image.format == "PNG"
        assert image.size == (size, size)
        assert image.mode == "RGB"
        pixels = np.asarray(image)
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) >= 2  # background plus at least one shape


def test_shapes_drawn_in_their_colors():
    spec = make_spec(count=20, image_size=64, min_objects=1, max_objects=1)
    for row in read_all(spec):
        [obj] = row.extra["objects"]
        x, y, w, h = obj["bbox"]
        center = (int((x + w / 2) * 64), int((y + h * 0.6) * 64))  # inside circle, square and triangle
        pixel = Image.open(io.BytesIO(row.image)).convert("RGB").getpixel(center)
        assert pixel == synthetic.COLORS[obj["color"]]


def test_corrupt_when_every_color_of_a_shape_is_present():
    scene = [(color, "circle", 1) for color in synthetic.COLORS]
    for seed in range(40):
        _kind, changed = synthetic.corrupt(np.random.default_rng(seed), scene)
        assert synthetic.caption(changed) != synthetic.caption(scene)


def test_many_objects_with_full_noise_never_crash():
    spec = make_spec(count=600, image_size=16, min_objects=12, max_objects=12, caption_noise=1.0)
    for index in (436, 521):
        synthetic.make_row(spec, 0, index)


def test_choice_items_hold_the_true_answer_at_their_letter_among_answers_of_its_kind():
    rows = read_all(make_spec(count=60))
    seen_letters = set()
    for row in rows:
        assert [c["question"] for c in row.extra["choices"]] == [q["question"] for q in row.extra["qa"]]
        for item, qa in zip(row.extra["choices"], row.extra["qa"], strict=True):
            options = item["options"]
            assert len(set(options)) == len(options) >= 2
            assert options["ABCD".index(item["answer"])] == qa["answer"]
            assert set(options) <= set(synthetic.answer_vocabulary(qa["question"], 4))
            seen_letters.add(item["answer"])
    assert seen_letters == set("ABCD")  # the true option's place is shuffled
