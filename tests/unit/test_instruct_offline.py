"""The offline generator says only true things: every sentence it writes over 1,000 scenes is
parsed back by the checker and verified against the scene graph; the checker itself catches
false and unparseable statements."""

from __future__ import annotations

import random

import numpy as np
import pytest

from vlmflow.components.instruct.offline import generate
from vlmflow.components.instruct.scene import Obj, plural
from vlmflow.components.instruct.verify import Checker, check_answer, sentences
from vlmflow.components.sources.synthetic import COLORS, sample_scene
from vlmflow.specs.instruct import TASKS


def scene(index: int, max_objects: int = 8) -> list[Obj]:
    rng = np.random.default_rng([123, index])
    return [Obj(noun=o.shape, color=o.color, size=o.size, box=o.box) for o in sample_scene(rng, 1, max_objects)]


def test_every_statement_over_1000_scenes_is_true_of_the_scene():
    statements = 0
    problems = []
    kinds = set()
    for index in range(1000):
        objects = scene(index)
        for task in TASKS:
            for _question, answer in generate(task, objects, random.Random(f"{index}:{task}")):
                found = sentences(answer)
                statements += len(found)
                kinds.update(s.split(" ")[0] for s in found)
                problems += [(index, task, *p) for p in check_answer(answer, objects)]
    assert problems == []
    assert statements > 15_000  # the check is not vacuous: thousands of statements were verified
    assert {"There", "The", "Yes,", "No,", "So"} <= kinds  # counts, attributes, yes/no, reasoning steps


def test_the_checker_finds_false_statements_when_the_scene_changes():
    """Answers written for one scene, checked against a recoloured copy: contradictions are found."""
    caught = 0
    for index in range(200):
        objects = scene(index)
        other = [c for c in COLORS if c != objects[0].color][index % 5]
        changed = [Obj(objects[0].noun, objects[0].box, other, objects[0].size), *objects[1:]]
        answer = generate("detail", objects, random.Random(index))[0][1]
        caught += bool(check_answer(answer, changed))
    assert caught == 200  # a detail description always names every colour group


@pytest.mark.parametrize(
    ("sentence", "problem"),
    [
        ("There are two red circles in the image.", "1 in the scene"),
        ("There is one blue square in the image.", "0 in the scene"),
        ("The circle is blue.", "is red, not blue"),
        ("The red circle is to the right of the green square.", "not to the right of"),
        ("The green square is at the bottom of the image.", "is in the top right"),
        ("The red circle is small.", "is large, not small"),
        ("Yes, there are no red circles in the image.", "Yes/No"),
        ("So there are more squares than circles.", "1 squares vs 1 circles"),
        ("The circle looks happy.", "unparsed"),
        ("There is one purple dragon in the image.", "unknown noun phrase"),
    ],
)
def test_checker_rejects(sentence, problem):
    objects = [
        Obj("circle", (0.05, 0.05, 0.3, 0.3), "red", "large"),
        Obj("square", (0.7, 0.05, 0.2, 0.2), "green", "small"),
    ]
    found = Checker(objects).check_sentence(sentence)
    assert found is not None and problem in found


def test_generation_is_deterministic_and_questions_do_not_repeat():
    for index in range(100):
        objects = scene(index)
        first = generate("conversation", objects, random.Random(index), 3, 8)
        assert first == generate("conversation", objects, random.Random(index), 3, 8)
        questions = [q for q, _ in first]
        assert len(questions) == len(set(questions))
        assert 1 <= len(first) <= 8


def test_categories_without_colours_coco_style():
    objects = [
        Obj("person", (0.41, 0.23, 0.15, 0.57)),
        Obj("bicycle", (0.40, 0.52, 0.20, 0.40)),
        Obj("person", (0.80, 0.20, 0.10, 0.50)),
        Obj("bus", (0.01, 0.10, 0.37, 0.68)),
    ]
    for seed in range(30):
        for task in TASKS:
            for _q, answer in generate(task, objects, random.Random(seed), nouns=()):
                assert check_answer(answer, objects, nouns=()) == []
    answers = " ".join(a for s in range(30) for _, a in generate("conversation", objects, random.Random(s), nouns=()))
    assert "There are two people in the image." in answers


def test_plurals():
    assert [plural(n) for n in ("circle", "bus", "person", "traffic light", "skis", "baby")] == [
        "circles",
        "buses",
        "people",
        "traffic lights",
        "skis",
        "babies",
    ]


def test_a_scene_without_objects_is_refused():
    with pytest.raises(ValueError, match="at least one object"):
        generate("conversation", [], random.Random(0))
