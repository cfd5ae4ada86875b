"""Synthetic instruction data, LLaVA style: the `instruct` stage and its parts.

context (captions + boxes per image) -> templates (system prompt, few-shot examples, query per
task type) -> a backend (`offline` from the scene graph, or any OpenAI-compatible endpoint
through `client` with the persistent `cache`) -> `replies` validated into turns -> LLaVA JSON
+ shards. `mock_server` is an OpenAI-compatible server for tests and benchmarks; `verify`
checks answers against a scene graph.

This module declares the `instruct` component; its work (`stage.run`) is imported when an
instruct step runs.
"""

from __future__ import annotations

from typing import Any

from vlmflow.component import Component, Port
from vlmflow.specs.instruct import InstructSpec


def templates_of(spec: InstructSpec) -> dict:
    """The prompts the output depends on: the templates' content (the built-in ones by default)."""
    from vlmflow.components.instruct.templates import load_templates

    return {"templates_digest": load_templates(spec.templates).digest}


def rows_estimate(step: Any, plan: Any) -> tuple[int | None, int | None]:
    """Every input row is written (with generated data) or carried through."""
    rows = plan.input_rows(step)["data"]
    return rows, rows


COMPONENT = Component(
    name="instruct",
    config=InstructSpec,
    reads={"data": Port("samples", description="the images (captions + boxes) to write instruction data for")},
    writes="samples",
    run="vlmflow.components.instruct.stage:run",
    recipe_fields=("seed",),
    fingerprint=templates_of,
    rows_estimate=rows_estimate,
    description="LLaVA-style instruction data (conversation, detail, complex reasoning) from captions and boxes",
)
