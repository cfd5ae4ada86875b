"""The recipe as a graph of stages: what runs, in order, and what each stage reads.

`vlmflow run` executes it (flows/recipe.py) and `vlmflow plan` walks it without running
anything, so both see the same stages, inputs and digests.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmflow.components import dedup, ingest, tokenize
from vlmflow.components.evaluate import stage as evaluate
from vlmflow.components.instruct import stage as instruct
from vlmflow.components.train.stage import data_inputs, stage_for
from vlmflow.specs.recipe import Recipe
from vlmflow.stage import Stage


@dataclass(frozen=True)
class Node:
    stage: Stage
    inputs: dict[str, str]  # input name -> the upstream stage's name


def recipe_graph(recipe: Recipe) -> list[Node]:
    """ingest -> dedup -> tokenizer -> instruct -> training stages, each reading its data
    artifacts, the tokenizer and the stage it starts from -> evaluation tasks (eval-NAME), each
    reading the training stage it evaluates and its held-out data artifact."""
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
    for i, spec in enumerate(recipe.stages):
        stage = stage_for(recipe, i)
        inputs = {"tokenizer": tokenize.STAGE.name} | {key: data[name] for key, name in data_inputs(spec).items()}
        start = list(trained.values())[-1] if spec.init_from == "previous" and trained else trained.get(spec.init_from)
        if start is not None:
            inputs["init"] = start
        nodes.append(Node(stage, inputs))
        trained[spec.name] = stage.name
    for i, task in enumerate(recipe.evaluate):
        nodes.append(Node(evaluate.stage_for(recipe, i), evaluate.stage_inputs(recipe, task)))
    return nodes
