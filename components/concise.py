"""The concise recipe sections as steps: `data` -> ingest (and dedup), `tokenizer`, `instruct`,
`stages` -> train-NAME, `capfilt` -> capfilt-caption / capfilt-filter (and their rounds), right
before the first stage that trains on its output (or after the last stage), `evaluate` ->
eval-NAME. A data artifact a stage or task names (`data: dedup`) is the step that writes it.
`vlmflow plan --pipeline` prints the result in the explicit `pipeline:` form."""

from __future__ import annotations

from vlmflow.components.capfilt import concise_steps as capfilt_steps
from vlmflow.components.capfilt import output_stage
from vlmflow.components.dedup import COMPONENT as DEDUP
from vlmflow.components.evaluate import COMPONENT as EVALUATE
from vlmflow.components.evaluate import stage_name as eval_name
from vlmflow.components.ingest import COMPONENT as INGEST
from vlmflow.components.instruct import COMPONENT as INSTRUCT
from vlmflow.components.tokenize import COMPONENT as TOKENIZER
from vlmflow.components.train import COMPONENT as TRAIN
from vlmflow.components.train import data_inputs
from vlmflow.components.train import stage_name as train_name
from vlmflow.pipeline import Step, register_concise
from vlmflow.specs.recipe import Recipe


def expand(recipe: Recipe) -> list[Step]:
    steps = [Step("ingest", INGEST, recipe.data.ingest(), {}, ("data",))]
    data = {"ingest": "ingest"}  # data artifact -> the step writing it
    if recipe.data.dedup is not None:
        steps.append(Step("dedup", DEDUP, recipe.data.dedup, {"data": "ingest"}, ("data", "dedup")))
        data["dedup"] = "dedup"
    cleanest = data.get("dedup", "ingest")
    if recipe.tokenizer is not None:
        steps.append(Step("tokenizer", TOKENIZER, recipe.tokenizer, {"data": cleanest}, ("tokenizer",)))
    if recipe.instruct is not None:
        source = cleanest if recipe.instruct.input == "auto" else data[recipe.instruct.input]
        steps.append(Step("instruct", INSTRUCT, recipe.instruct, {"data": source}, ("instruct",)))
        data["instruct"] = "instruct"
    trained: dict[str, str] = {}  # stage name -> step
    capfilt_pending = recipe.capfilt is not None
    for i, spec in enumerate(recipe.stages):
        if capfilt_pending and "capfilt" in spec.artifacts():  # its models are trained by now (cross_checks)
            steps += capfilt_steps(recipe, data, "tokenizer")
            data["capfilt"], capfilt_pending = output_stage(recipe.capfilt), False
        inputs = {"tokenizer": "tokenizer"} | {key: data[name] for key, name in data_inputs(spec).items()}
        start = list(trained.values())[-1] if spec.init_from == "previous" and trained else trained.get(spec.init_from)
        if start is not None:
            inputs["init"] = start
        steps.append(Step(train_name(spec), TRAIN, spec, inputs, ("stages", i)))
        trained[spec.name] = train_name(spec)
    if capfilt_pending:
        steps += capfilt_steps(recipe, data, "tokenizer")
        data["capfilt"] = output_stage(recipe.capfilt)
    for i, task in enumerate(recipe.evaluate):
        inputs = {"model": trained[task.model or recipe.stages[-1].name]}
        if task.data.kind == "held-out":
            inputs["data"] = data[task.data.artifact]
        steps.append(Step(eval_name(task), EVALUATE, task, inputs, ("evaluate", i)))
    return steps


register_concise(expand)
