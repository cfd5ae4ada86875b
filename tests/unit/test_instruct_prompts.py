"""Context builder, prompt templates (digest, few-shot examples) and reply validation."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.instruct_helpers import instruct_digest, make_recipe
from vlmflow.component import digest_view
from vlmflow.components.instruct import templates_of
from vlmflow.components.instruct.context import build_context, context_text, parse_context_text
from vlmflow.components.instruct.replies import Rejected, parse_reply, reply_of
from vlmflow.components.instruct.scene import Obj
from vlmflow.components.instruct.templates import DEFAULT_TEMPLATES, load_templates
from vlmflow.components.sources.synthetic import make_row
from vlmflow.errors import UserError
from vlmflow.specs.data import SyntheticShapesSource
from vlmflow.specs.instruct import TASKS
from vlmflow.specs.loader import apply_override, parse_yaml
from vlmflow.specs.recipe import Recipe

# --- context ---------------------------------------------------------------------------------


def test_context_from_a_synthetic_scene_graph():
    row = make_row(SyntheticShapesSource(kind="synthetic-shapes", min_objects=3, max_objects=3), 0, 7)
    context = build_context({"captions": row.captions, **row.extra})
    assert context.captions == tuple(row.captions)
    assert [(o.color, o.noun, o.size) for o in context.objects] == [
        (o["color"], o["shape"], o["size"]) for o in row.extra["objects"]
    ]
    text = context_text(context)
    assert text.startswith("Captions:\n" + row.captions[0])
    first = row.extra["objects"][0]
    x, y, w, h = first["bbox"]
    assert f"{first['color']} {first['shape']} ({first['size']}): [{x:.3f}, {y:.3f}, {x + w:.3f}, {y + h:.3f}]" in text


def test_context_from_coco_instances_and_user_json():
    record = {
        "captions": ["A man  riding a bike.\n", "  "],
        "objects": [
            {"category": "person", "bbox": [0.41, 0.23, 0.15, 0.57]},
            {"name": "Bicycle", "bbox": [80, 104, 40, 80]},  # absolute pixels: normalised with the size
            {"label": "dog"},  # no box: left out
            {"category": "car", "bbox": [0.1, 0.1, -0.2, 0.1]},  # negative size: left out
            "junk",
        ],
    }
    context = build_context(record, image_size=(200, 200))
    assert context.captions == ("A man riding a bike.",)
    assert [(o.noun, o.box) for o in context.objects] == [
        ("person", (0.41, 0.23, 0.15, 0.57)),
        ("bicycle", (0.4, 0.52, 0.2, 0.4)),
    ]
    assert build_context({}).empty


def test_context_text_round_trips():
    objects = (Obj("circle", (0.1, 0.2, 0.3, 0.3), "red", "large"), Obj("traffic light", (0.5, 0.5, 0.1, 0.2)))
    context = build_context({"captions": ["two things."]})
    text = context_text(type(context)(context.captions, objects))
    parsed = parse_context_text(text + "\n\nTask: detail. Reply with JSON.")
    assert parsed.captions == ("two things.",)
    assert [(o.noun, o.color, o.size) for o in parsed.objects] == [
        ("circle", "red", "large"),
        ("traffic light", None, None),
    ]
    assert context_text(parsed) == text
    assert parse_context_text("no context here") is None


# --- templates --------------------------------------------------------------------------------


def test_default_templates_build_few_shot_chats():
    templates = load_templates()
    for task in TASKS:
        messages = templates.messages(task, "CONTEXT-BLOCK")
        assert messages[0]["role"] == "system"
        assert [m["role"] for m in messages[1:]] == ["user", "assistant"] * ((len(messages) - 2) // 2) + ["user"]
        assert len(messages) >= 4  # at least one few-shot example
        assert messages[-1]["content"].startswith("CONTEXT-BLOCK")
        assert f"Task: {task}." in messages[-1]["content"]
    assert templates.detail_question(0, "k") == templates.detail_question(0, "k")
    assert len({templates.detail_question(0, f"k{i}") for i in range(200)}) > 10


def test_shipped_examples_are_valid_replies_with_parseable_contexts():
    templates = load_templates()
    for task, template in templates.tasks.items():
        for context, reply in template.examples:
            assert parse_reply(task, reply)
            parsed = parse_context_text(context)
            assert parsed is not None and parsed.objects and context_text(parsed) == context


def test_template_digest_follows_content_and_missing_files_are_named(tmp_path):
    folder = tmp_path / "templates"
    shutil.copytree(DEFAULT_TEMPLATES, folder)
    assert load_templates(folder).digest == load_templates().digest  # content, not location
    (folder / "README.md").write_text("notes are not part of the prompts")
    assert load_templates(folder).digest == load_templates().digest
    system = folder / "detail" / "system.txt"
    system.write_text(system.read_text() + "\nBe brief.")
    assert load_templates(folder).digest != load_templates().digest
    example = folder / "conversation" / "examples" / "01.response.json"
    example.unlink()
    with pytest.raises(UserError, match=r"01.context.txt: no matching 01.response.json"):
        load_templates(folder)
    (folder / "conversation" / "examples" / "01.context.txt").unlink()
    (folder / "reask.txt").unlink()
    (folder / "complex_reasoning" / "query.txt").unlink()
    with pytest.raises(UserError, match=r"missing template files: complex_reasoning/query.txt, reask.txt"):
        load_templates(folder)


def test_stage_digest_includes_templates_but_not_operational_knobs_or_the_key(tmp_path, monkeypatch):
    folder = tmp_path / "templates"
    shutil.copytree(DEFAULT_TEMPLATES, folder)
    generator = {"kind": "openai-compatible", "base_url": "http://127.0.0.1:9/v1", "model": "m"}
    base = make_recipe(tmp_path, {"generator": generator, "templates": str(folder)})
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value")
    faster = make_recipe(
        tmp_path, {"generator": {**generator, "concurrency": 64, "timeout_s": 5}, "templates": "templates"}
    )
    assert instruct_digest(base) == instruct_digest(faster)
    hotter = make_recipe(tmp_path, {"generator": {**generator, "temperature": 0.9}, "templates": "templates"})
    assert instruct_digest(base) != instruct_digest(hotter)
    before = instruct_digest(base)
    (folder / "conversation" / "system.txt").write_text("Be different.")
    assert instruct_digest(base) != before  # the templates' content is part of the key
    extra = templates_of(base.instruct)
    assert extra["templates_digest"] == load_templates(folder).digest != load_templates().digest
    keyed = {"config": digest_view(base.instruct), "extra": extra}  # what the key is made of
    assert "sk-secret-value" not in json.dumps(keyed, default=str)
    assert keyed["config"]["generator"]["api_key_env"] == "OPENAI_API_KEY"


def test_spec_defaults_and_errors(tmp_path):
    recipe = make_recipe(tmp_path)
    spec = recipe.instruct
    assert spec.generator.kind == "offline"
    assert spec.mix == {"conversation": 58.0, "detail": 23.0, "complex_reasoning": 77.0}
    assert spec.splits == ["train"]
    with pytest.raises(ValueError, match="base_url must start with http"):
        make_recipe(tmp_path, {"generator": {"kind": "openai-compatible", "base_url": "localhost:8000"}})
    with pytest.raises(ValueError, match="at least one task type"):
        make_recipe(tmp_path, {"mix": {"conversation": 0}})
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        make_recipe(tmp_path, {"generator": {"kind": "offline", "api_key": "sk-in-the-spec"}})


# --- replies ----------------------------------------------------------------------------------


GOOD = {
    "conversation": '{"turns": [{"question": "What color is the circle?", "answer": "The circle is red."}]}',
    "detail": '{"description": "A large red circle sits in the top left part of the image, beside a square."}',
    "complex_reasoning": '{"question": "Why?", "answer": "Because there are two circles and one square."}',
}


@pytest.mark.parametrize("task", TASKS)
def test_valid_replies_parse_into_turns(task):
    turns = parse_reply(task, GOOD[task])
    assert turns and all(isinstance(q, str) and a for q, a in turns)
    assert parse_reply(task, f"```json\n{GOOD[task]}\n```") == turns  # fenced
    assert parse_reply(task, f"Here you go:\n{GOOD[task]}") == turns  # leading prose
    assert parse_reply(task, reply_of(task, turns)) == turns


@pytest.mark.parametrize(
    ("task", "content", "finish", "reason"),
    [
        ("conversation", GOOD["conversation"], "length", "truncated"),
        ("conversation", "   ", "stop", "empty"),
        ("conversation", None, "stop", "empty"),
        ("conversation", '{"turns": [{"question": "What', "stop", "malformed-json"),
        ("conversation", "Sure! The circle is red.", "stop", "malformed-json"),
        ("conversation", '{"turns": []}', "stop", "wrong-format"),
        ("conversation", '{"turns": [{"question": "Q?"}]}', "stop", "wrong-format"),
        ("conversation", '[{"question": "Q?", "answer": "A."}]', "stop", "wrong-format"),
        (
            "conversation",
            '{"turns": [{"question": "Q?", "answer": "I\'m sorry, I cannot see images."}]}',
            "stop",
            "off-task",
        ),
        (
            "conversation",
            '{"turns": [{"question": "Q?", "answer": "The bounding box is at 0.2."}]}',
            "stop",
            "off-task",
        ),
        ("detail", '{"description": "A circle."}', "stop", "off-task"),
        ("detail", '{"turns": []}', "stop", "wrong-format"),
        ("complex_reasoning", '{"question": "Why?", "answer": "Red."}', "stop", "off-task"),
    ],
)
def test_unusable_replies_are_rejected_with_a_reason(task, content, finish, reason):
    with pytest.raises(Rejected) as caught:
        parse_reply(task, content, finish)
    assert caught.value.reason == reason


def test_set_switches_a_twin_to_a_server(tmp_path):
    """`--set instruct.generator.kind=openai-compatible --set instruct.generator.base_url=URL` on a twin."""
    text = "name: t\ndata:\n  sources:\n    - kind: synthetic-shapes\ninstruct:\n  generator:\n    kind: offline\n"
    marked = parse_yaml(text, "twin.yaml")
    for index, assignment in enumerate(
        [
            "instruct.generator.kind=openai-compatible",
            "instruct.generator.base_url=http://127.0.0.1:8000/v1",
            "instruct.generator.api_key_env=null",
        ]
    ):
        apply_override(marked, assignment, index)
    generator = Recipe.model_validate(marked.data, context={"spec_dir": tmp_path}).instruct.generator
    assert generator.kind == "openai-compatible" and generator.base_url == "http://127.0.0.1:8000/v1"
    assert generator.model == "gpt-4o-mini" and generator.api_key_env is None  # mock-llm serves this name too
