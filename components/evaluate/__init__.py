"""Evaluation: the `evaluate` component (declared here; its work, `stage.run` on Ray actor pools
with torch models, is imported only when an evaluation step runs) and the metrics: captioning
(BLEU, CIDEr-D as pycocoevalcap), VQA accuracy, retrieval, classification, multiple choice."""

from __future__ import annotations

from vlmflow.component import Component, Port
from vlmflow.components.evaluate.caption_metrics import (
    CaptionScores,
    bleu,
    cider,
    cider_per_image,
    score_captions,
)
from vlmflow.components.evaluate.choice import extract_choice
from vlmflow.components.evaluate.metrics import retrieval_recall, retrieval_recall_matrix, topk_accuracy
from vlmflow.components.evaluate.ptb_tokenize import tokenize_captions
from vlmflow.components.evaluate.vqa import exact_match, normalize_vqa_answer, vqa_accuracy
from vlmflow.specs.evaluate import EvalTask

__all__ = [
    "CaptionScores",
    "bleu",
    "cider",
    "cider_per_image",
    "exact_match",
    "extract_choice",
    "normalize_vqa_answer",
    "retrieval_recall",
    "retrieval_recall_matrix",
    "score_captions",
    "tokenize_captions",
    "topk_accuracy",
    "vqa_accuracy",
]


def stage_name(task: EvalTask) -> str:
    """The task's step in the concise form."""
    return f"eval-{task.name}"


def ports(task: EvalTask) -> dict[str, Port]:
    """`model`, the trained model it evaluates, and for held-out data `data`, the artifact."""
    data = {"data": Port("samples", description="the held-out split")} if task.data.kind == "held-out" else {}
    return {"model": Port("model"), **data}


COMPONENT = Component(
    name="evaluate",
    config=EvalTask,
    reads=ports,
    writes="metrics",
    run="vlmflow.components.evaluate.stage:run",
    recipe_fields=("seed",),
    description="an evaluation task: zero-shot classification, retrieval, image-text matching, captioning, VQA "
    "or multiple choice",
)
