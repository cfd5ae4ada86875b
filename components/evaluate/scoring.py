"""Score a task's predictions against its items: corpus metrics with a chance or majority
baseline beside each, and one row per item for the predictions parquet.

Baselines are what a model blind to the image scores: the most common reference caption for
every image (captioning), the majority answer of each question text (VQA), 1/#options
(multiple choice), 1/#classes and the majority class (classification), and the expected
recall of a random ranking (retrieval).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from vlmflow.components.evaluate.caption_metrics import score_captions
from vlmflow.components.evaluate.choice import extract_choice
from vlmflow.components.evaluate.datasets import Item
from vlmflow.components.evaluate.metrics import retrieval_recall_matrix, topk_accuracy
from vlmflow.components.evaluate.vqa import exact_match, normalize_vqa_answer, vqa_accuracy

Scored = tuple[dict[str, float], list[dict]]


def captioning(items: Sequence[Item], predictions: Sequence[str]) -> Scored:
    candidates = {item.id: text for item, text in zip(items, predictions, strict=True)}
    references = {item.id: list(item.references) for item in items}
    scores = score_captions(candidates, references)
    common = Counter(ref for item in items for ref in item.references).most_common(1)[0][0]
    baseline = score_captions(dict.fromkeys(candidates, common), references)
    metrics = {f"bleu{n}": scores.bleu[n - 1] for n in range(1, 5)} | {"cider": scores.cider}
    metrics |= {f"bleu{n}_baseline": baseline.bleu[n - 1] for n in range(1, 5)}
    metrics |= {"cider_baseline": baseline.cider, "items": float(len(items))}
    rows = [
        {"id": item.id, "prediction": text, "references": list(item.references),
         "cider": scores.cider_per_image[item.id], "bleu4": scores.bleu_per_image[item.id][3]}
        for item, text in zip(items, predictions, strict=True)
    ]  # fmt: skip
    return metrics, rows


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 soft accuracy with three or more human answers; exact match with fewer (one
    answer would score 0 under the leave-one-out rule)."""
    if len(answers) >= 3:
        return vqa_accuracy(prediction, answers)
    return max(exact_match(prediction, a) for a in answers)


def vqa(items: Sequence[Item], predictions: Sequence[str]) -> Scored:
    by_question: dict[str, Counter] = defaultdict(Counter)
    for item in items:
        by_question[item.question].update(normalize_vqa_answer(a) for a in item.references)
    majority = {q: c.most_common(1)[0][0] for q, c in by_question.items()}
    rows, accuracy, exact, base_accuracy, base_exact = [], [], [], [], []
    for item, text in zip(items, predictions, strict=True):
        top = Counter(normalize_vqa_answer(a) for a in item.references).most_common(1)[0][0]
        accuracy.append(vqa_score(text, item.references))
        exact.append(exact_match(text, top))
        base_accuracy.append(vqa_score(majority[item.question], item.references))
        base_exact.append(exact_match(majority[item.question], top))
        rows.append({"id": item.id, "question": item.question, "prediction": text, "references": list(item.references),
                     "accuracy": accuracy[-1], "exact_match": exact[-1]})  # fmt: skip
    metrics = {
        "vqa_accuracy": float(np.mean(accuracy)),
        "vqa_accuracy_baseline": float(np.mean(base_accuracy)),
        "exact_match": float(np.mean(exact)),
        "exact_match_baseline": float(np.mean(base_exact)),
        "items": float(len(items)),
    }
    return metrics, rows


def multiple_choice(items: Sequence[Item], predictions: Sequence[str]) -> Scored:
    rows, correct, failed = [], [], []
    for item, text in zip(items, predictions, strict=True):
        picked = extract_choice(text, dict(item.options))
        correct.append(picked == item.references[0])
        failed.append(picked is None)
        rows.append({"id": item.id, "question": item.question, "prediction": text, "extracted": picked,
                     "answer": item.references[0], "correct": correct[-1]})  # fmt: skip
    metrics = {
        "accuracy": float(np.mean(correct)),
        "accuracy_chance": float(np.mean([1 / len(item.options) for item in items])),
        "extraction_failure_rate": float(np.mean(failed)),
        "items": float(len(items)),
    }
    return metrics, rows


def classification(items: Sequence[Item], classes: Sequence[str], scores: np.ndarray) -> Scored:
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index[item.references[0]] for item in items])
    ks = [1, 5] if len(classes) > 5 else [1]  # top-5 of five classes or fewer is 1 whatever the model
    accuracy = topk_accuracy(scores, labels, ks)
    counts = np.bincount(labels, minlength=len(classes))
    metrics = {f"top{k}": accuracy[f"top{k}"] for k in ks} | {f"top{k}_chance": k / len(classes) for k in ks}
    metrics |= {"top1_majority": float(counts.max() / counts.sum()), "items": float(len(items))}
    predicted = scores.argmax(axis=1)
    rows = [
        {"id": item.id, "label": item.references[0], "prediction": classes[int(p)], "correct": bool(p == t),
         "scores": [float(s) for s in row]}
        for item, p, t, row in zip(items, predicted, labels, scores, strict=True)
    ]  # fmt: skip
    return metrics, rows


def retrieval_texts(items: Sequence[Item]) -> tuple[list[str], np.ndarray]:
    """The distinct texts of the items and positive[i, t]: text t is one of image i's captions
    (synthetic captions repeat across images: an identical caption is a correct retrieval)."""
    texts = list(dict.fromkeys(ref for item in items for ref in item.references))
    position = {t: j for j, t in enumerate(texts)}
    positive = np.zeros((len(items), len(texts)), dtype=bool)
    for i, item in enumerate(items):
        positive[i, [position[r] for r in item.references]] = True
    return texts, positive


def retrieval(items: Sequence[Item], similarity: np.ndarray, ks: Sequence[int]) -> Scored:
    texts, positive = retrieval_texts(items)
    metrics = retrieval_recall_matrix(similarity, positive, ks)
    metrics |= {f"i2t_r{k}_chance": chance_recall(positive, k) for k in ks}
    metrics |= {f"t2i_r{k}_chance": chance_recall(positive.T, k) for k in ks}
    metrics |= {"items": float(len(items)), "texts": float(len(texts))}
    best = similarity.argmax(axis=1)
    rows = [
        {
            "id": item.id,
            "references": list(item.references),
            "prediction": texts[int(b)],
            "correct": bool(positive[i, b]),
        }
        for i, (item, b) in enumerate(zip(items, best, strict=True))
    ]
    return metrics, rows


def chance_recall(positive: np.ndarray, k: int) -> float:
    """Expected Recall@k of a uniformly random ranking: 1 - P(no positive among k draws)."""
    n = positive.shape[1]
    values = []
    for count in positive.sum(axis=1):
        miss = 1.0
        for j in range(min(k, n)):
            miss *= max(0, n - count - j) / (n - j)
        values.append(1.0 - miss)
    return float(np.mean(values))
