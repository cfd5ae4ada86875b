"""The recipe as a graph of stages: what runs, in order, and what each stage reads.

`vlmflow run` executes it (flows/recipe.py) and `vlmflow plan` walks it without running
anything, so both see the same stages, inputs and digests.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmflow.components import dedup, ingest, tokenize
from vlmflow.components.capfilt import stage as capfilt
from vlmflow.components.evaluate import stage as evaluate
from vlmflow.components.instruct import stage as instruct
from vlmflow.components.train.stage import data_inputs, stage_for
from vlmflow.errors import UserError
from vlmflow.specs.recipe import Recipe
from vlmflow.specs.train import TrainStageSpec
from vlmflow.stage import Stage


@dataclass(frozen=True)
class Node:
    stage: Stage
    inputs: dict[str, str]  # input name -> the upstream stage's name
    train: TrainStageSpec | None = None  # a training stage's spec (also for those CapFilt's rounds derive)
    field: tuple = ()  # the training stage whose settings it runs with: ("stages", 2), also for a round stage


def artifact_stage(artifact: str, recipe: Recipe) -> str:
    """The stage that writes a data artifact a training stage names in `data:`."""
    return capfilt.output_stage(recipe.capfilt) if artifact == "capfilt" else artifact


def recipe_graph(recipe: Recipe) -> list[Node]:
    """ingest -> dedup -> tokenizer -> instruct -> training stages, each reading its data
    artifacts, the tokenizer and the stage it starts from; CapFilt (caption, filter) right
    before the first stage that trains on its output, or after the last stage -> evaluation
    tasks (eval-NAME), each reading the training stage it evaluates and its held-out data artifact."""
    nodes = [Node(ingest.STAGE, {})]
    data = {"ingest": ingest.STAGE.name}
    if recipe.data.dedup is not None:
        nodes.append(Node(dedup.STAGE, {"ingest": data["ingest"]}))
        data["dedup"] = dedup.STAGE.name
    if recipe.tokenizer is not None:
        nodes.append(Node(tokenize.STAGE, dict(data)))
    if recipe.instruct is not None:
        nodes.append(Node(instruct.STAGE, dict(data)))
        data["instruct"] = instruct.STAGE.name
    trained: dict[str, str] = {}
    capfilt_pending = recipe.capfilt is not None
    for i, spec in enumerate(recipe.stages):
        if capfilt_pending and "capfilt" in spec.artifacts():  # its models are trained by now (cross_checks)
            nodes += _capfilt_nodes(recipe, data)
            data["capfilt"], capfilt_pending = capfilt.output_stage(recipe.capfilt), False
        stage = stage_for(recipe, i)
        inputs = {"tokenizer": tokenize.STAGE.name} | {key: data[name] for key, name in data_inputs(spec).items()}
        start = list(trained.values())[-1] if spec.init_from == "previous" and trained else trained.get(spec.init_from)
        if start is not None:
            inputs["init"] = start
        nodes.append(Node(stage, inputs, spec, ("stages", i)))
        trained[spec.name] = stage.name
    if capfilt_pending:
        nodes += _capfilt_nodes(recipe, data)
    for i, task in enumerate(recipe.evaluate):
        nodes.append(Node(evaluate.stage_for(recipe, i), _eval_inputs(recipe, task)))
    return nodes


def _capfilt_nodes(recipe: Recipe, data: dict[str, str]) -> list[Node]:
    return [
        Node(stage, inputs, *(train or ()))
        for stage, inputs, train in capfilt.graph_inputs(recipe, data, tokenize.STAGE.name)
    ]


def _eval_inputs(recipe: Recipe, task: object) -> dict[str, str]:
    inputs = evaluate.stage_inputs(recipe, task)
    return inputs | ({"data": artifact_stage(inputs["data"], recipe)} if "data" in inputs else {})


def evaluate_graph(recipe: Recipe, model: Stage) -> list[Node]:
    """`vlmflow evaluate --model`: the data stages the evaluation reads, the imported model, and the
    recipe's evaluation tasks, every one reading that model instead of a training stage."""
    needed = {artifact_stage(t.data.artifact, recipe) for t in recipe.evaluate if t.data.kind == "held-out"}
    graph = recipe_graph(recipe)
    if needed & {n.stage.name for n in graph if n.stage.name.startswith(("train-", "capfilt-"))}:
        raise UserError("vlmflow evaluate --model reads data artifacts that need no training; this recipe's "
                        f"evaluation reads {', '.join(sorted(needed))}")  # fmt: skip
    data_nodes = [n for n in graph if n.stage.name in ("ingest", "dedup", "instruct")]
    last = max((i for i, n in enumerate(data_nodes) if n.stage.name in needed), default=-1)
    nodes = [*data_nodes[: last + 1], Node(model, {})]
    for i, task in enumerate(recipe.evaluate):
        nodes.append(Node(evaluate.stage_for(recipe, i), _eval_inputs(recipe, task) | {"model": model.name}))
    return nodes
