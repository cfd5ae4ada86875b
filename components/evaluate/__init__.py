"""Evaluation metrics: captioning (BLEU, CIDEr-D as pycocoevalcap), VQA accuracy, retrieval, classification, MC."""

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
