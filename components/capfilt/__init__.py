"""CapFilt (BLIP): caption noisy web images and filter web and synthetic captions on Ray.

This module declares the `capfilt-caption` and `capfilt-filter` components and expands the
concise `capfilt:` section into steps; their work (`stage.py`, on Ray Data actor pools with
torch models) is imported only when a CapFilt step runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vlmflow.component import Component, Port
from vlmflow.components.train import COMPONENT as TRAIN
from vlmflow.components.train import stage_name as train_stage_name
from vlmflow.pipeline import Step
from vlmflow.specs.capfilt import CapfiltSpec, CaptionStepSpec, FilterStepSpec, hf_architecture
from vlmflow.specs.recipe import Recipe
from vlmflow.specs.train import TrainStageSpec

CAPTION, FILTER = "capfilt-caption", "capfilt-filter"
DEFAULT_PROMPT = "Describe the image."

# ------------------------------------------------------------------------------ graph and digests


def caption_name(round_: int) -> str:
    return CAPTION if round_ == 1 else f"{CAPTION}-r{round_}"


def filter_name(round_: int) -> str:
    return FILTER if round_ == 1 else f"{FILTER}-r{round_}"


def output_stage(spec: CapfiltSpec) -> str:
    """The stage that writes the `capfilt` data artifact: the last round's filter."""
    return filter_name(spec.rounds)


def round_stage_name(name: str, round_: int) -> str:
    """The recipe's training stage `name` as trained for bootstrap round `round_` (1: the stage itself)."""
    return name if round_ == 1 else f"{name}-r{round_}"


def round_train_spec(recipe: Recipe, name: str, round_: int) -> TrainStageSpec:
    """Stage `name` trained further for round `round_` >= 2: on the previous round's output (every
    source's training rows: the kept web pairs and the clean data), from the previous round's model."""
    base = next(s for s in recipe.stages if s.name == name)
    update = {"name": round_stage_name(name, round_), "data": "capfilt"}
    update["init_from"] = round_stage_name(name, round_ - 1)
    if recipe.capfilt.round_steps is not None:
        update |= {"max_steps": recipe.capfilt.round_steps, "epochs": 1}
    return base.model_copy(update=update)


def model_input(spec: CapfiltSpec, role: str, round_: int = 1) -> str | None:
    """The training stage the captioner or filter reads in a round: the round's own model when the
    rounds retrain it, else round 1's (None: a registered version or a folder)."""
    ref = spec.model_refs().get(role)
    if ref is None or ref.stage is None:
        return None
    return train_stage_name(round_stage_name(ref.stage, spec.model_round(role, round_)))


def concise_steps(recipe: Recipe, data: dict[str, str], tokenizer: str) -> list[Step]:
    """The steps of the concise `capfilt:` section, in order: caption and filter, then per further
    round the retrained models, caption, filter. `data`: data artifact -> the step writing it."""
    spec = recipe.capfilt
    steps: list[Step] = []
    names = [s.name for s in recipe.stages]
    for round_ in range(1, spec.rounds + 1):
        if round_ > 1:
            for name in spec.retrained_stages():
                train = round_train_spec(recipe, name, round_)
                inputs = {
                    "tokenizer": tokenizer,
                    "data": filter_name(round_ - 1),
                    "init": train_stage_name(train.init_from),
                }
                field = ("stages", names.index(name))  # what it inherits its settings from
                steps.append(Step(train_stage_name(train), TRAIN, train, inputs, field))
        filter_inputs = {"data": data[spec.data]}
        if spec.captioner is not None:
            inputs = {"data": data[spec.data]}
            if captioner := model_input(spec, "captioner", round_):
                inputs["captioner"] = captioner
            steps.append(
                Step(caption_name(round_), CAPTION_COMPONENT, caption_config(recipe, round_), inputs, ("capfilt",))
            )
            filter_inputs["captions"] = caption_name(round_)
        if judge := model_input(spec, "filter", round_):
            filter_inputs["filter"] = judge
        steps.append(
            Step(filter_name(round_), FILTER_COMPONENT, filter_config(recipe, round_), filter_inputs, ("capfilt",))
        )
    return steps


def caption_config(recipe: Recipe, round_: int) -> CaptionStepSpec:
    spec = recipe.capfilt
    return CaptionStepSpec(
        data=spec.data, sources=spec.sources, captioner=spec.captioner, prompt=prompt_of(recipe),
        resources=spec.resources, round=round_,
    )  # fmt: skip


def filter_config(recipe: Recipe, round_: int) -> FilterStepSpec:
    spec = recipe.capfilt
    return FilterStepSpec(
        data=spec.data, sources=spec.sources, filter=spec.filter, apply_to=spec.apply_to, resources=spec.resources,
        shard_size=recipe.data.shard_size, round=round_,
    )  # fmt: skip


def prompt_of(recipe: Recipe) -> str | None:
    captioner = recipe.capfilt.captioner
    if captioner.prompt is not None:
        return captioner.prompt
    if captioner.model.path is not None and hf_architecture(captioner.model.path):
        return None  # BLIP captions without a prefix
    stage = next((s for s in recipe.stages if s.name == captioner.model.stage), None)
    return stage.prompt if stage is not None else DEFAULT_PROMPT


def model_ports(role: str) -> Callable[[Any], dict[str, Port]]:
    """The data input, and the model input of `role` (required when its model is a training stage)."""

    def ports(config: Any) -> dict[str, Port]:
        ref = getattr(config, role).model
        found = {"data": Port("samples"), role: Port("model", optional=ref.stage is None)}
        if role == "filter":
            found["captions"] = Port("captions", optional=True, description="the captioner's synthetic captions")
        return found

    return ports


def scope_rows(step: Step, plan: Any) -> int | None:
    """The images CapFilt judges, at most: its sources' rows, else its data input's."""
    config, data = step.config, plan.input_rows(step)["data"]
    if config.sources is None:
        return data
    return sum(plan.sources.get(s, 0) for s in config.sources)


def caption_rows(step: Step, plan: Any) -> tuple[int | None, int | None]:
    images = scope_rows(step, plan)
    return images, images


def filter_rows(step: Step, plan: Any) -> tuple[int | None, int | None]:
    """The pairs it judges (web and k synthetic per image) in; the images, at most, out."""
    images = scope_rows(step, plan)
    captions = "captions" in step.inputs and plan.steps[step.inputs["captions"]].config.captioner.k
    per_image = 1 + (captions or 0)
    return (None if images is None else images * per_image), plan.input_rows(step)["data"]


CAPTION_COMPONENT = Component(
    name="capfilt-caption",
    config=CaptionStepSpec,
    reads=model_ports("captioner"),
    writes="captions",
    run="vlmflow.components.capfilt.stage:run_caption",
    rows_estimate=caption_rows,
    recipe_fields=("seed",),
    description="CapFilt's captioner: k synthetic captions per web image",
)
FILTER_COMPONENT = Component(
    name="capfilt-filter",
    config=FilterStepSpec,
    reads=model_ports("filter"),
    writes="samples",
    run="vlmflow.components.capfilt.stage:run_filter",
    rows_estimate=filter_rows,
    description="CapFilt's filter: keep the image-text pairs the ITM / ITC scores pass",
)
COMPONENTS = [CAPTION_COMPONENT, FILTER_COMPONENT]
