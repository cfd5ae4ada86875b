"""The literature recipes and the training sections of the spec (cross-section checks located)."""

from __future__ import annotations

import pytest
from test_specs import MINIMAL, REPO, only_problem, position, write

from vlmflow.errors import SpecError
from vlmflow.specs import load_recipe

RECIPES = REPO / "specs" / "recipes"
LITERATURE = ["clip", "siglip", "blip", "blip2", "llava", "llava-1.5", "minigpt4", "minigpt-v2", "fuyu", "llava-lora"]


@pytest.mark.parametrize("name", LITERATURE)
def test_every_literature_recipe_has_a_tiny_twin_with_the_same_stages(name):
    full = load_recipe(RECIPES / f"{name}.yaml")
    tiny = load_recipe(RECIPES / f"{name}-tiny.yaml")
    assert full.name == name and tiny.name == f"{name}-tiny"
    assert [s.name for s in full.stages] == [s.name for s in tiny.stages]
    assert [[o.kind for o in s.objectives] for s in full.stages] == [
        [o.kind for o in s.objectives] for s in tiny.stages
    ]
    assert [s.lora is None for s in full.stages] == [s.lora is None for s in tiny.stages]
    assert [s.artifacts() for s in full.stages] == [s.artifacts() for s in tiny.stages]
    assert (full.capfilt is None) == (tiny.capfilt is None)
    full_parts = {k: getattr(v, "kind", None) for k, v in full.model}
    tiny_parts = {k: getattr(v, "kind", None) for k, v in tiny.model}
    assert full_parts["connector"] == tiny_parts["connector"]
    assert all(not str(kind).startswith("hf-") for kind in tiny_parts.values())  # no weights needed
    assert tiny.runtime.train.num_workers == 2 and not tiny.runtime.train.use_gpu


def test_llava_pattern_projector_then_projector_and_llm():
    llava = load_recipe(RECIPES / "llava.yaml")
    align, instruct = llava.stages
    assert align.trainable == ["connector"] and align.format == "caption"
    assert instruct.trainable == ["connector", "language"] and instruct.init_from == "previous"
    lora = load_recipe(RECIPES / "llava-lora.yaml").stages[1]
    assert lora.trainable == ["connector"] and lora.lora is not None and lora.lora.module == "language"
    blip2 = load_recipe(RECIPES / "blip2.yaml")
    pretrain, generate = blip2.stages
    assert blip2.model.connector.kind == "qformer" and blip2.model.text.kind == "qformer"
    assert pretrain.trainable == ["connector", "text", "heads"] and generate.trainable == ["connector"]
    assert [o.kind for o in pretrain.objectives] == ["itc", "itm", "itg"] and generate.init_from == pretrain.name
    assert load_recipe(RECIPES / "blip.yaml").stages[0].objectives[1].kind == "itm"


def test_default_recipe_is_the_tiny_llava_15():
    default = load_recipe(RECIPES / "shapes-tiny.yaml")
    twin = load_recipe(RECIPES / "llava-1.5-tiny.yaml")
    assert default.model == twin.model and default.stages == twin.stages and default.data == twin.data
    assert default.evaluate == twin.evaluate and {t.kind for t in default.evaluate} >= {"vqa", "captioning"}


TRAINING = (
    MINIMAL
    + """\
tokenizer: {kind: bpe, vocab_size: 400}
model:
  vision: {kind: tiny-vit}
  connector: {kind: mlp}
  language: {kind: tiny-llama}
stages:
  - name: align
    data: dedup
    trainable: [connector]
    objectives: [{kind: lm}]
"""
)


def test_training_section_loads(tmp_path):
    text = TRAINING.replace("data: dedup", "data: ingest")
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.stages[0].batch_size == 32 and recipe.runtime.train.num_workers == 2


@pytest.mark.parametrize(
    ("old", "new", "needle", "message"),
    [
        (
            "data: dedup",
            "data: capfilt",
            "capfilt",
            "unknown data artifact 'capfilt'; this recipe produces: ingest, dedup",
        ),
        ("objectives: [{kind: lm}]", "objectives: [{kind: itc}]", "itc", "itc needs model.text"),
        ("trainable: [connector]", "trainable: [text]", "text", "the model has no text part"),
        ("    trainable", "    batch_size: 30\n    trainable", "30", "batch_size 30 is not a multiple"),
        ("    trainable", "    init_from: later\n    trainable", "later", "'later' is not an earlier stage"),
    ],
)
def test_cross_section_problems_point_at_the_field(tmp_path, old, new, needle, message):
    text = TRAINING.replace(old, new)
    path = write(tmp_path, text)
    problem = only_problem(path)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if needle in row and ":" in row and i > 10)
    assert (problem.line, problem.col) == (line, position(text, line, needle))
    assert message in problem.message


def test_field_level_training_problems(tmp_path):
    text = TRAINING.replace("objectives: [{kind: lm}]", "objectives: [{kind: lm}, {kind: lm}]")
    assert "listed twice" in only_problem(write(tmp_path, text)).message
    text = TRAINING.replace("connector: {kind: mlp}", "connector: {kind: patch-linear}")
    assert "patch-linear goes with vision kind none" in only_problem(write(tmp_path, text)).message
    text = TRAINING.replace("    trainable: [connector]", "    trainable: [language]\n    lora: {module: language}")
    assert "LoRA keeps its base frozen" in only_problem(write(tmp_path, text)).message
    text = TRAINING.replace(
        "    trainable", "    format: choice\n    choice_template: '{question} {answer}'\n    trainable"
    )
    problem = only_problem(write(tmp_path, text))
    assert "may use only the fields {question} and {options}" in problem.message
    assert problem.line == next(i for i, row in enumerate(text.splitlines(), 1) if "choice_template" in row)
    text = TRAINING.replace("    trainable", "    format: choice\n    choice_template: '{question}'\n    trainable")
    assert "must hold {options}" in only_problem(write(tmp_path, text)).message


@pytest.mark.parametrize("name", LITERATURE)
def test_every_tiny_twin_model_trains_a_step_and_generates(name):
    import torch

    from vlmflow.components.train.evaluate import greedy
    from vlmflow.components.train.setup import build_stage_model
    from vlmflow.models.vlm import Vocab

    recipe = load_recipe(RECIPES / f"{name}-tiny.yaml")
    special = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, "<image>": 4, "<|user|>": 6, "<|assistant|>": 7}
    torch.manual_seed(0)
    for stage in recipe.stages:
        model = build_stage_model(recipe.model, Vocab(300, special), stage, None)
        size, tokens = recipe.model.vision.image_size, model.num_image_tokens
        ids = torch.tensor([[1, 6, *[4] * tokens, 30, 31, 7, 40, 2]] * 4)
        labels = torch.full_like(ids, -100)
        labels[:, -2:] = ids[:, -2:]
        batch = {
            "pixels": torch.randn(4, 3, size, size),
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": labels,
            "text_ids": torch.randint(8, 300, (4, 6)),
            "text_mask": torch.ones(4, 6, dtype=torch.long),
        }
        losses = model(batch, [o.kind for o in stage.objectives])
        sum(losses.values()).backward()
        trained = [p for p in model.parameters() if p.requires_grad]
        assert trained and any(p.grad is not None for p in trained)
        if model.language is not None:
            assert len(greedy(model, [1, 6, *[4] * tokens, 30, 7], batch["pixels"][:1], eos=-1, max_new=2)) == 2


def test_mixture_problems_point_at_the_field(tmp_path):
    text = TRAINING.replace(
        "    data: dedup\n",
        "    data:\n      mixture:\n        - {data: dedup, weight: 0}\n        - {data: nope, count: 3}\n"
        "        - {data: ingest, weight: 1, count: 2}\n",
    )
    with pytest.raises(SpecError) as error:
        load_recipe(write(tmp_path, text))
    rows = text.splitlines()
    found = {p.field: (p.line, p.message) for p in error.value.problems}
    assert found["stages.0.data.mixture.0.weight"] == (rows.index("        - {data: dedup, weight: 0}") + 1,
                                                       "Input should be greater than 0")  # fmt: skip
    assert found["stages.0.data.mixture.2"][1] == "give weight or count, not both"
    text = TRAINING.replace("    data: dedup\n", "    data:\n      mixture: [{data: dedup}, {data: nope}]\n")
    problem = only_problem(write(tmp_path, text))
    assert problem.field == "stages.0.data.mixture.1.data" and "unknown data artifact 'nope'" in problem.message
