"""The image-text matching evaluation: balanced matched and mismatched pairs (never an identical
caption as the negative), accuracy and AUC against chance 0.5, the worker's P(match) batched as
one at a time, and the spec's check that the model has an ITM head."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from test_recipes import TRAINING
from test_specs import only_problem, write

from vlmflow.components.evaluate import matching
from vlmflow.components.evaluate.datasets import Item


def items(*captions: tuple[str, ...]) -> list[Item]:
    return [Item(f"k{i}", b"", refs) for i, refs in enumerate(captions)]


def test_each_item_gets_another_images_caption_that_differs_from_its_own():
    loaded = items(("a red circle.",), ("a red circle.",), ("a blue square.", "one blue square."), ("two dots.",))
    kept, lacking = matching.with_mismatched(loaded, seed=17)
    assert lacking == [] and [i.id for i in kept] == ["k0", "k1", "k2", "k3"]
    for item in kept:
        assert item.mismatched and item.mismatched not in item.references
    assert kept == matching.with_mismatched(loaded, seed=17)[0]


def test_an_item_whose_every_other_caption_is_its_own_has_no_negative():
    kept, lacking = matching.with_mismatched(items(("a red circle.",), ("a red circle.",), ("a star.",)), seed=1)
    assert [i.id for i in kept] == ["k0", "k1", "k2"]
    kept, lacking = matching.with_mismatched(items(("a red circle.",), ("a red circle.",)), seed=1)
    assert kept == [] and [i.id for i in lacking] == ["k0", "k1"]
    kept, lacking = matching.with_mismatched(items(("alone.",)), seed=1)
    assert kept == [] and [i.id for i in lacking] == ["k0"]


def test_pairs_alternate_matched_and_mismatched():
    kept, _ = matching.with_mismatched(items(("a.",), ("b.",)), seed=0)
    assert [(i.id, t, m) for i, t, m in matching.pairs(kept)] == [
        ("k0", "a.", True), ("k0", "b.", False), ("k1", "b.", True), ("k1", "a.", False)
    ]  # fmt: skip


def test_auc_by_hand_with_ties():
    labels = np.array([True, True, False, False])
    assert matching.auc(np.array([0.9, 0.8, 0.1, 0.2]), labels) == 1.0
    assert matching.auc(np.array([0.1, 0.2, 0.9, 0.8]), labels) == 0.0
    assert matching.auc(np.array([0.5, 0.5, 0.5, 0.5]), labels) == 0.5
    assert matching.auc(np.array([0.9, 0.3, 0.3, 0.1]), labels) == pytest.approx((2 + 1 + 0.5) / 4)


def test_scores_against_chance():
    kept, _ = matching.with_mismatched(items(("a.",), ("b.",), ("c.",)), seed=0)
    metrics, rows = matching.score(kept, [0.9, 0.2, 0.7, 0.4, 0.3, 0.1])
    assert metrics["itm_accuracy"] == pytest.approx(5 / 6) and metrics["itm_accuracy_chance"] == 0.5
    assert metrics["matched_accuracy"] == pytest.approx(2 / 3) and metrics["mismatched_accuracy"] == 1.0
    assert metrics["itm_auc"] == pytest.approx(8 / 9) and metrics["itm_auc_chance"] == 0.5
    assert [r["correct"] for r in rows] == [True, True, False] and rows[2]["p_match"] == 0.3
    blind, _ = matching.score(kept, [0.3] * 6)  # a head that ignores the image: chance on both
    assert blind["itm_accuracy"] == 0.5 and blind["itm_auc"] == 0.5
    with pytest.raises(ValueError, match="5 match probabilities for 6 pairs"):
        matching.score(kept, [0.5] * 5)


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_workers_match_probabilities_batched_equal_one_at_a_time(tmp_path):
    from tests.tiny_vlm import write_model
    from vlmflow.components.evaluate.worker import EvalWorker

    write_model(tmp_path / "model")
    worker = EvalWorker(str(tmp_path / "model"))
    images = [png((200, 10, 10)), png((10, 10, 200)), png((10, 200, 10))]
    texts = ["a red circle.", "two blue squares and a green triangle.", "a square."]  # padded to the longest
    batched = worker.run(("match", {"images": images, "texts": texts}))
    single = [worker.match({"images": [i], "texts": [t]})[0] for i, t in zip(images, texts, strict=True)]
    assert len(batched) == 3 and all(0 < p < 1 for p in batched)
    assert np.allclose(batched, single, atol=1e-5)


def test_matching_needs_a_model_with_a_text_tower(tmp_path):
    text = TRAINING + "evaluate:\n  - {kind: image-text-matching, name: itm}\n"
    problem = only_problem(write(tmp_path, text))
    assert problem.field.startswith("evaluate.0.kind") and "it needs model.text" in problem.message
