"""CapFilt's pure parts: the spec and its errors, the scene-graph check of a caption, the
filter's decisions, its precision/recall against known truth, the pairs it judges, and
where its stages sit in the recipe graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from vlmflow.components.capfilt.stage import (
    calibrated_threshold,
    candidate_pairs,
    decide,
    detection,
    given_thresholds,
    quality,
    ranking_auc,
)
from vlmflow.components.sources.synthetic import describes, parse_caption
from vlmflow.errors import SpecError
from vlmflow.pipeline import graph_digests, recipe_graph
from vlmflow.specs import load_recipe

REPO = Path(__file__).resolve().parents[2]
BLIP = REPO / "specs" / "recipes" / "blip-tiny.yaml"
ONE_ROUND = ["capfilt.rounds=1", "capfilt.round_steps=null"]  # models given by path or uri are not retrained
BOTH = "capfilt.retrain=[captioner, filter]"  # blip-tiny's rounds retrain the captioner only


def digests_of(recipe) -> dict[str, str]:
    return graph_digests(recipe_graph(recipe), recipe)


def problems(overrides: list[str], spec: Path = BLIP) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_recipe(spec, overrides)
    return [str(p) for p in info.value.problems]


def line_of(needle: str, spec: Path = BLIP) -> int:
    return next(i for i, line in enumerate(spec.read_text().splitlines(), 1) if needle in line)


# ------------------------------------------------------------------------------ spec


def test_blip_tiny_bootstraps_in_the_order_blip_does():
    recipe = load_recipe(BLIP)
    nodes = {s.name: s.inputs for s in recipe_graph(recipe)}
    order = list(nodes)
    assert order.index("train-filter") < order.index("capfilt-caption") < order.index("capfilt-filter")
    assert order.index("capfilt-filter-r3") == order.index("train-retrain") - 1  # its third round
    assert nodes["capfilt-caption"] == {"data": "dedup", "captioner": "train-captioner"}
    assert nodes["capfilt-filter"] == {"data": "dedup", "captions": "capfilt-caption", "filter": "train-filter"}
    assert nodes["train-retrain"]["data"] == "capfilt-filter-r3"
    # The rounds retrain the captioner; the round-1 filter judges every round.
    assert nodes["train-captioner-r3"]["init"] == "train-captioner-r2" and "train-filter-r2" not in nodes
    assert nodes["capfilt-filter-r3"]["filter"] == "train-filter"
    assert recipe.stages[1].data.mixture[0].sources == ["coco"]


def test_a_threshold_outside_zero_one_is_an_error_at_its_line(tmp_path):
    spec = tmp_path / "blip.yaml"
    spec.write_text(BLIP.read_text().replace("itm: 0.5", "itm: 1.5"))
    (problem,) = problems([], spec)
    line = line_of("itm: 1.5", spec)
    column = spec.read_text().splitlines()[line - 1].index("1.5") + 1  # at the value
    assert problem.startswith(f"{spec}:{line}:{column}: capfilt.filter.itm: ")
    assert "less than or equal to 1" in problem
    (override,) = problems(["capfilt.filter.itc=-0.2"])
    assert override.startswith("--set[0]:1:1: capfilt.filter.itc: ")


@pytest.mark.parametrize(
    ("override", "field", "message"),
    [
        ("capfilt.captioner.model.stage=nope", "capfilt.captioner.model.stage", "'nope' is not a training stage"),
        ("capfilt.filter.model.stage=retrain", "capfilt.filter.model.stage", "must come before 'retrain'"),
        ("capfilt.sources=[webb]", "capfilt.sources.0", "unknown source 'webb'"),
        ("capfilt.data=capfilt", "capfilt.data", "unknown data artifact 'capfilt'"),
        ("capfilt.captioner=null", "capfilt", "no captioner to write synthetic captions"),
        ("capfilt.filter.itm=null", "capfilt.filter", "give a threshold"),
        ("stages.1.data.mixture.0.sources=[cocoa]", "stages.1.data.mixture.0.sources.0", "unknown source 'cocoa'"),
        ("capfilt.filter.calibrate={source: cocoa}", "capfilt.filter.calibrate.source", "unknown source 'cocoa'"),
        ("capfilt.filter.calibrate={source: web}", "capfilt.filter.calibrate.source",
         "'web' is in capfilt.sources (judged as web data)"),
        ("data.sources.1.val_fraction=0", "capfilt.filter.calibrate.source",  # blip-tiny calibrates on coco
         "source 'coco' has no held-out rows (split val); give it val_fraction"),
        ("capfilt.filter.calibrate={source: coco, keep: 1}", "capfilt.filter.calibrate.keep", "less than 1"),
    ],
)  # fmt: skip
def test_capfilt_mistakes_are_located(override, field, message):
    found = problems([override])
    assert any(f": {field}: " in p and message in p for p in found), found


def test_a_model_folder_of_the_wrong_kind_is_refused_at_validate_time(tmp_path):
    hf = tmp_path / "hf-blip"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "clip", "architectures": ["CLIPModel"]}')
    found = problems([f"capfilt.filter.model={{path: {hf}}}", "runtime.allow_outside_paths=true", *ONE_ROUND])
    assert any(
        "capfilt.filter.model" in p
        and "not a vlmflow model folder (no vlmflow_model.json) nor a Hugging Face BLIP folder" in p
        for p in found
    ), found
    missing = problems([f"capfilt.filter.model={{path: {tmp_path / 'gone'}}}", "runtime.allow_outside_paths=true"])
    assert any("path does not exist" in p for p in missing), missing
    both = problems(["capfilt.filter.model={stage: filter, uri: models:/blip/1}"])
    assert any("exactly one of stage, uri, path" in p for p in both), both


def test_a_model_folder_without_the_part_its_role_needs_is_refused(tmp_path):
    folder = tmp_path / "lm-only"
    folder.mkdir()
    (folder / "vlmflow_model.json").write_text(json.dumps({"model": {"language": {"kind": "tiny-llama"}}}))
    found = problems([f"capfilt.filter.model={{path: {folder}}}", "runtime.allow_outside_paths=true", *ONE_ROUND])
    assert any("capfilt.filter.model.path" in p and "no text part" in p for p in found), found


# ------------------------------------------------------------------------------ scene-graph check


def test_caption_parsing_reads_counts_colors_and_shapes():
    assert parse_caption("an image with two red circles and a blue square.") == [
        ("red", "circle", 2),
        ("blue", "square", 1),
    ]
    assert parse_caption("An image with an orange   triangle") == [("orange", "triangle", 1)]
    for text in ("an image with a", "a red circle.", "an image with two red circle.", "an image with a red circles"):
        assert parse_caption(text) is None, text


def test_a_caption_describes_a_scene_only_when_every_group_matches():
    objects = [{"color": "red", "shape": "circle"}] * 2 + [{"color": "blue", "shape": "square"}]
    assert describes("an image with a blue square and two red circles.", objects)
    assert not describes("an image with two red circles.", objects)  # a group missing
    assert not describes("an image with a red circle and a blue square.", objects)  # wrong count
    assert not describes("an image with two green circles and a blue square.", objects)  # wrong color


# ------------------------------------------------------------------------------ decisions and quality


def spec_with(itm: str, itc: str):
    return load_recipe(BLIP, [f"capfilt.filter.itm={itm}", f"capfilt.filter.itc={itc}"]).capfilt


def test_decisions_need_every_given_threshold():
    both = given_thresholds(spec_with("0.5", "0.2").filter)
    assert both == {"itm": 0.5, "itc": 0.2}
    assert decide(0.7, 0.3, both) == (True, None)
    assert decide(0.5, 0.2, both) == (True, None)  # at the threshold: kept
    assert decide(0.49, 0.3, both) == (False, "capfilt:itm=0.49<0.50")
    assert decide(0.1, 0.1, both) == (False, "capfilt:itm=0.10<0.50,itc=0.10<0.20")
    assert decide(0.0, 0.9, given_thresholds(spec_with("null", "0.8").filter)) == (True, None)
    # A calibrated threshold can be tiny: its reason keeps two significant digits.
    assert decide(0.000213, 0.9, {"itm": 0.00127}) == (False, "capfilt:itm=2.1e-04<1.3e-03")


def test_a_calibrated_threshold_is_the_highest_that_keep_of_the_clean_pairs_pass():
    scores = [0.9, 0.1, 0.5, 0.7, 0.3, 0.2, 0.8, 0.4, 0.6, 1.0]
    assert calibrated_threshold(scores, 0.9) == 0.2  # 9 of 10 pass (0.1 does not); at 0.3 only 8
    assert calibrated_threshold(scores, 0.95) == 0.1  # 9.5 of 10: all must pass
    assert calibrated_threshold(scores, 0.5) == 0.6
    rng = np.random.default_rng(3)
    for n in (1, 7, 40, 333):
        values = rng.random(n).tolist()
        for keep in (0.05, 0.5, 0.8, 0.95, 0.999):
            t = calibrated_threshold(values, keep)
            passing = sum(v >= t for v in values)
            assert passing >= keep * n - 1e-9 and sum(v > t for v in values) < keep * n  # the next value fails


def test_detection_precision_recall_f1_by_hand():
    bad = np.array([True, True, True, False, False, False, False, False])
    removed = np.array([True, True, False, True, False, False, False, False])
    out = detection(bad, removed, "filter")
    assert out["filter_precision"] == pytest.approx(2 / 3)
    assert out["filter_recall"] == pytest.approx(2 / 3)
    assert out["filter_f1"] == pytest.approx(2 / 3)
    none = detection(np.zeros(3, bool), np.zeros(3, bool), "x")
    assert none == {"x_precision": 1.0, "x_recall": 1.0, "x_f1": 1.0}


def test_candidate_pairs_put_web_captions_first_and_truth_on_the_shown_one():
    rows = pl.DataFrame({"key": ["b", "a"]})
    manifest = pl.DataFrame(
        {
            "key": ["a", "b", "c"],
            "source": ["web"] * 3,
            "captions": [["a one", "a two"], ["b one"], ["c one"]],
            "caption_corrupted": [True, False, None],
        }
    )
    synthetic = pl.DataFrame(
        {"key": ["a", "b", "b"], "index": [0, 0, 1], "caption": ["sa", "sb0", "sb1"], "correct": [True, False, None]},
        schema_overrides={"index": pl.Int32},
    )
    pairs = candidate_pairs(rows, manifest, synthetic)
    assert pairs.select("key", "origin", "index", "caption").rows() == [
        ("b", "web", 0, "b one"),
        ("b", "synthetic", 0, "sb0"),
        ("b", "synthetic", 1, "sb1"),
        ("a", "web", 0, "a one"),
        ("a", "web", 1, "a two"),
        ("a", "synthetic", 0, "sa"),
    ]
    assert pairs["corrupted"].to_list() == [False, None, None, True, None, None]
    assert pairs["correct"].to_list() == [None, False, None, None, None, True]


def test_quality_counts_per_origin_and_scores_the_filter_on_known_truth():
    pairs = pl.DataFrame(
        {
            "origin": ["web"] * 4 + ["synthetic"] * 3,
            "judged": [True] * 7,
            "kept": [False, True, True, False, True, False, True],
            "corrupted": [True, True, False, False, None, None, None],
            "correct": [None] * 4 + [True, False, True],
        }
    )
    out = quality(pairs)
    assert (out["kept_web"], out["removed_web"], out["kept_synthetic"], out["removed_synthetic"]) == (2, 2, 2, 1)
    assert out["filter_precision"] == 0.5 and out["filter_recall"] == 0.5
    assert out["web_noise_before"] == 0.5 and out["web_noise_after"] == 0.5
    assert out["filter_synthetic_precision"] == 1.0 and out["filter_synthetic_recall"] == 1.0
    assert "filter_itm_auc" not in out  # no scores


def test_ranking_auc_of_the_filter_scores():
    bad = np.array([True, True, False, False])
    assert ranking_auc(bad, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert ranking_auc(bad, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert ranking_auc(bad, np.array([0.5, 0.1, 0.5, 0.9])) == 0.875  # one tie counts half
    assert ranking_auc(np.array([True, True]), np.array([0.1, 0.2])) is None
    pairs = pl.DataFrame(
        {
            "origin": ["web"] * 4,
            "judged": [True] * 4,
            "kept": [False, False, True, True],
            "corrupted": [True, True, False, False],
            "correct": [None] * 4,
            "itm": [0.1, 0.2, 0.8, 0.9],
            "itc": [0.9, 0.8, 0.2, 0.1],
        },
        schema_overrides={"correct": pl.Boolean},
    )
    out = quality(pairs)
    assert out["filter_itm_auc"] == 1.0 and out["filter_itc_auc"] == 0.0


# ------------------------------------------------------------------------------ bootstrap rounds


def test_rounds_retrain_the_models_on_the_previous_round_and_judge_the_input_again():
    one = load_recipe(BLIP, ONE_ROUND)
    three = load_recipe(BLIP, ["capfilt.rounds=3", "capfilt.round_steps=50", BOTH])
    nodes = {s.name: s for s in recipe_graph(three)}
    order = list(nodes)
    tail = order[order.index("capfilt-filter") + 1 : order.index("train-retrain")]
    assert tail == ["train-captioner-r2", "train-filter-r2", "capfilt-caption-r2", "capfilt-filter-r2",
                    "train-captioner-r3", "train-filter-r3", "capfilt-caption-r3", "capfilt-filter-r3"]  # fmt: skip
    assert nodes["train-filter-r3"].inputs == {"tokenizer": "tokenizer", "data": "capfilt-filter-r2",
                                               "init": "train-filter-r2"}  # fmt: skip
    assert nodes["capfilt-caption-r2"].inputs == {"data": "dedup", "captioner": "train-captioner-r2"}
    assert nodes["capfilt-filter-r3"].inputs["filter"] == "train-filter-r3"
    assert nodes["train-retrain"].inputs["data"] == "capfilt-filter-r3"  # the capfilt artifact: the last round
    retrained = nodes["train-captioner-r2"].config
    captioner = one.stages[1]
    assert (retrained.name, retrained.data, retrained.init_from, retrained.max_steps) == (
        "captioner-r2",
        "capfilt",
        "captioner",
        50,
    )
    assert retrained.objectives == captioner.objectives and retrained.trainable == captioner.trainable
    assert nodes["train-captioner-r2"].field == ("stages", 1)  # its settings are stages[1]'s
    # Round 1 does not depend on how many rounds follow: its artifacts stay cached.
    before, after = digests_of(one), digests_of(three)
    assert all(after[name] == before[name] for name in order[: order.index("capfilt-filter") + 1])
    assert len(set(after.values())) == len(after)


def test_one_stage_as_captioner_and_filter_is_retrained_once_per_round():
    recipe = load_recipe(BLIP, ["capfilt.rounds=2", "capfilt.captioner.model.stage=pretrain",
                                "capfilt.filter.model.stage=pretrain", BOTH])  # fmt: skip
    names = [s.name for s in recipe_graph(recipe)]
    assert [n for n in names if n.endswith("-r2")] == ["train-pretrain-r2", "capfilt-caption-r2", "capfilt-filter-r2"]


def test_rounds_retraining_only_the_captioner_judge_every_round_with_the_round_one_filter():
    both = load_recipe(BLIP, ["capfilt.rounds=3", "capfilt.round_steps=50", BOTH])
    only = load_recipe(BLIP, ["capfilt.rounds=3", "capfilt.round_steps=50", "capfilt.retrain=[captioner]"])
    nodes = {s.name: s for s in recipe_graph(only)}
    assert [n for n in nodes if n.endswith(("-r2", "-r3"))] == [
        "train-captioner-r2", "capfilt-caption-r2", "capfilt-filter-r2",
        "train-captioner-r3", "capfilt-caption-r3", "capfilt-filter-r3",
    ]  # fmt: skip
    assert nodes["train-captioner-r3"].inputs["data"] == "capfilt-filter-r2"
    for round_ in (2, 3):
        assert nodes[f"capfilt-filter-r{round_}"].inputs == {
            "data": "dedup", "captions": f"capfilt-caption-r{round_}", "filter": "train-filter"
        }  # fmt: skip
    # Up to round 2's captions the digests are those of retraining both: round 2's captioner trains
    # on round 1's output either way. From round 2's filter on, every artifact is another.
    mine, theirs = digests_of(only), digests_of(both)
    assert mine["train-captioner-r2"] == theirs["train-captioner-r2"]
    assert mine["capfilt-caption-r2"] == theirs["capfilt-caption-r2"]
    assert mine["capfilt-filter"] == theirs["capfilt-filter"]
    for name in ("capfilt-filter-r2", "train-captioner-r3", "capfilt-caption-r3", "capfilt-filter-r3", "train-retrain"):
        assert mine[name] != theirs[name], name
    # The filter alone: every round captions with the round-1 captioner.
    judge = {s.name: s.inputs for s in recipe_graph(load_recipe(BLIP, ["capfilt.retrain=[filter]"]))}
    assert "train-captioner-r2" not in judge and judge["train-filter-r3"]["init"] == "train-filter-r2"
    assert judge["capfilt-caption-r3"]["captioner"] == "train-captioner"
    assert judge["capfilt-filter-r3"]["filter"] == "train-filter-r3"
    # Without a captioner the rounds retrain the filter (retrain's default: every model used).
    alone = load_recipe(BLIP, ["capfilt.captioner=null", "capfilt.apply_to=[web]", "capfilt.retrain=null"])
    assert [s.name for s in recipe_graph(alone) if s.name.startswith("train-filter-")] == [
        "train-filter-r2", "train-filter-r3"
    ]  # fmt: skip


def test_a_filter_given_by_uri_is_fine_when_the_rounds_retrain_only_the_captioner():
    recipe = load_recipe(BLIP, ["capfilt.filter.model={uri: models:/blip/3}", "capfilt.retrain=[captioner]"])
    nodes = {s.name: s.inputs for s in recipe_graph(recipe)}
    assert "filter" not in nodes["capfilt-filter-r3"]
    assert nodes["capfilt-caption-r3"]["captioner"] == "train-captioner-r3"


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        (["capfilt.rounds=1"], "capfilt", "round_steps is for rounds >= 2"),
        (["capfilt.rounds=0"], "capfilt.rounds", "greater than or equal to 1"),
        (["capfilt.rounds=2", "stages.3.name=captioner-r2"], "capfilt.rounds",
         "round 2 trains a stage named 'captioner-r2', as a stage of stages: is"),
        (["capfilt.rounds=2", "capfilt.filter.model={uri: models:/blip/3}", "capfilt.retrain=null"], "capfilt",
         "retrains the filter model, but it is not a training stage of this recipe"),
        (["capfilt.retrain=[]"], "capfilt.retrain", "at least 1 item"),
        (["capfilt.retrain=[captioner, captioner]"], "capfilt", "retrain lists a model twice"),
        (["capfilt.retrain=[decoder]"], "capfilt.retrain.0", "'captioner' or 'filter'"),
        (["capfilt.captioner=null", "capfilt.apply_to=[web]", "capfilt.retrain=[captioner]"], "capfilt",
         "retrain has captioner, but there is no captioner"),
        (["capfilt.captioner.model.stage=pretrain", "capfilt.filter.model.stage=pretrain",
          "capfilt.retrain=[filter]"], "capfilt", "the captioner and filter are the same stage 'pretrain'"),
    ],
)  # fmt: skip
def test_round_mistakes_are_located(overrides, field, message):
    found = problems(overrides)
    assert any(f": {field}: " in p and message in p for p in found), found


def test_an_unnamed_source_is_named_by_its_kind_in_capfilt_sources(tmp_path):
    spec = tmp_path / "unnamed.yaml"
    body = """name: unnamed
data:
  sources:
    - {kind: synthetic-shapes, count: 10}
capfilt:
  sources: [SOURCE]
  filter: {model: {uri: models:/filter/1}}
  apply_to: [web]
"""
    spec.write_text(body.replace("SOURCE", "synthetic-shapes"))
    assert load_recipe(spec).capfilt.sources == ["synthetic-shapes"]
    spec.write_text(body.replace("SOURCE", "shapes"))
    (problem,) = problems([], spec)
    assert problem == f"{spec}:6:13: capfilt.sources.0: unknown source 'shapes'; data.sources has: synthetic-shapes"
