"""Ranking metrics: image-text retrieval Recall@K and top-k classification accuracy.

Ties are broken pessimistically everywhere: a wrong candidate scoring exactly as much as the
right one is ranked ahead of it. The numbers are therefore deterministic and never inflated
by a degenerate model (all-equal scores give chance-or-worse recall, not 100%).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def _finite_matrix(values: object, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _checked_ks(ks: Iterable[int]) -> list[int]:
    checked = [int(k) for k in ks]
    if not checked or any(k < 1 for k in checked):
        raise ValueError(f"ks must be positive integers, got {checked}")
    return checked


def _text_owners(image_to_texts: Sequence[Sequence[int]], n_images: int, n_texts: int) -> np.ndarray:
    if len(image_to_texts) != n_images:
        raise ValueError(f"image_to_texts has {len(image_to_texts)} entries for {n_images} images")
    owner = np.full(n_texts, -1, dtype=np.int64)
    for image, texts in enumerate(image_to_texts):
        if len(texts) == 0:
            raise ValueError(f"image {image} has no texts in image_to_texts")
        for text in texts:
            if not 0 <= text < n_texts:
                raise ValueError(f"image {image} lists text {text}, outside 0..{n_texts - 1}")
            if owner[text] != -1:
                raise ValueError(f"text {text} is listed under images {owner[text]} and {image}")
            owner[text] = image
    unowned = np.flatnonzero(owner == -1)
    if unowned.size:
        raise ValueError(f"texts {unowned[:5].tolist()} belong to no image in image_to_texts")
    return owner


def retrieval_recall(
    similarity: object, image_to_texts: Sequence[Sequence[int]], ks: Iterable[int] = (1, 5, 10)
) -> dict[str, float]:
    """Image->text and text->image Recall@K, several captions per image (the COCO/Flickr30K protocol).

    Image->text: an image is a hit at K if *any* of its captions is among the K best-scoring texts.
    Text->image: a caption is a hit at K if its own image is among the K best-scoring images.
    Ties count against the query (pessimistic).

    Args:
        similarity: ``[n_images, n_texts]`` scores (higher = more similar); numpy or CPU tensor.
        image_to_texts: for each image, the indices of its texts; every text belongs to exactly one image.
        ks: the K values.

    Returns:
        ``{"i2t_r1": .., "i2t_r5": .., ..., "t2i_r1": .., ..., "i2t_median_rank": .., "t2i_median_rank": ..}``
        with recalls in [0, 1] and 1-based median ranks (MLflow-safe metric names).
    """
    scores = _finite_matrix(similarity, "similarity")
    n_images, n_texts = scores.shape
    owner = _text_owners(image_to_texts, n_images, n_texts)
    positive = np.zeros_like(scores, dtype=bool)
    positive[owner, np.arange(n_texts)] = True
    return retrieval_recall_matrix(scores, positive, ks)


def retrieval_recall_matrix(similarity: object, positive: object, ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K as :func:`retrieval_recall`, the correct pairs given as a boolean ``[n_images, n_texts]``
    matrix: a text may be correct for several images (identical captions of different images).

    Image->text: hit at K if a positive text is among the K best. Text->image: hit at K if a positive
    image is among the K best. Every row and column needs at least one positive.
    """
    scores = _finite_matrix(similarity, "similarity")
    positive = np.asarray(positive, dtype=bool)
    if positive.shape != scores.shape:
        raise ValueError(f"positive has shape {positive.shape}, similarity {scores.shape}")
    if not positive.any(axis=1).all() or not positive.any(axis=0).all():
        raise ValueError("every image and every text needs at least one positive pair")
    checked = _checked_ks(ks)
    best_positive = np.where(positive, scores, -np.inf).max(axis=1)
    i2t_rank = 1 + ((scores >= best_positive[:, None]) & ~positive).sum(axis=1)
    best_image = np.where(positive, scores, -np.inf).max(axis=0)
    t2i_rank = 1 + ((scores >= best_image[None, :]) & ~positive).sum(axis=0)
    result = {f"i2t_r{k}": float(np.mean(i2t_rank <= k)) for k in checked}
    result |= {f"t2i_r{k}": float(np.mean(t2i_rank <= k)) for k in checked}
    result["i2t_median_rank"] = float(np.median(i2t_rank))
    result["t2i_median_rank"] = float(np.median(t2i_rank))
    return result


def topk_accuracy(logits_or_scores: object, labels: Sequence[int] | np.ndarray, ks: Iterable[int] = (1, 5)) -> dict:
    """Top-k accuracy of ``[n_samples, n_classes]`` scores against integer labels (zero-shot classification).

    A sample counts at k if fewer than k other classes score at least as high as its true class
    (pessimistic ties). k larger than the number of classes gives 1.0.

    Returns:
        ``{"top1": .., "top5": ..}`` in [0, 1].
    """
    scores = _finite_matrix(logits_or_scores, "logits_or_scores")
    targets = np.asarray(labels).astype(np.int64, copy=False).reshape(-1)
    n_samples, n_classes = scores.shape
    if targets.shape[0] != n_samples:
        raise ValueError(f"{targets.shape[0]} labels for {n_samples} rows of scores")
    if n_samples == 0:
        raise ValueError("no samples to score")
    if targets.min() < 0 or targets.max() >= n_classes:
        raise ValueError(f"labels must lie in 0..{n_classes - 1}")
    true_scores = scores[np.arange(n_samples), targets]
    rank = (scores >= true_scores[:, None]).sum(axis=1)  # includes the true class itself
    return {f"top{k}": float(np.mean(rank <= k)) for k in _checked_ks(ks)}
