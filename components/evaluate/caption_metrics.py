"""BLEU-1..4 and CIDEr-D exactly as the COCO caption evaluation (pycocoevalcap 1.2) computes them.

Both scorers read whitespace-separated tokens. By default the inputs are first put through
:func:`tokenize_captions` (the COCO PTB tokenisation), as ``COCOEvalCap`` does: references
in one batch, candidates in another, in the candidates' key order.

Reproduced details of the reference code (they change the numbers):

* BLEU: corpus level, effective reference length "closest" (ties go to the shorter
  reference), every ratio computed as ``(correct + 1e-15) / (guess + 1e-9)``, brevity
  penalty ``exp(1 - 1 / ratio)`` with ``ratio = (testlen + 1e-15) / (reflen + 1e-9)``.
* CIDEr-D ("CIDEr" in pycocoevalcap): n = 1..4, document frequency over the references of
  the evaluated set, idf ``log(n_images) - log(max(1, df))``, clipped tf-idf, Gaussian
  length penalty with sigma = 6 where the "length" is the number of *bigrams* (a quirk of
  the reference code), mean over n, mean over references, times 10.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vlmflow.components.evaluate.ptb_tokenize import tokenize_captions

MAX_N = 4
CIDER_SIGMA = 6.0
_TINY = 1e-15
_SMALL = 1e-9

Ngram = tuple[str, ...]


@dataclass(frozen=True)
class CaptionScores:
    """Corpus scores plus the per-image scores, keyed like the candidates."""

    bleu: list[float]
    cider: float
    bleu_per_image: dict[str, list[float]]
    cider_per_image: dict[str, float]


def ngram_counts(sentence: str, max_n: int = MAX_N) -> Counter[Ngram]:
    """Counts of every 1..max_n-gram of a whitespace-tokenised sentence (insertion ordered by n, then position)."""
    words = sentence.split()
    counts: Counter[Ngram] = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(words) - n + 1):
            counts[tuple(words[i : i + n])] += 1
    return counts


def _prepared(
    candidates: Mapping[str, str], references: Mapping[str, Sequence[str]], tokenize: bool
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Check the two mappings pair up, then tokenise as COCOEvalCap does (references and candidates apart)."""
    missing = [key for key in candidates if key not in references]
    extra = [key for key in references if key not in candidates]
    if missing or extra:
        raise ValueError(
            f"candidates and references must have the same keys: no references for {missing[:5]}, "
            f"no candidate for {extra[:5]}"
        )
    for key in candidates:
        refs = references[key]
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise TypeError(f"references[{key!r}] must be a list of strings, got {type(refs).__name__}")
        if len(refs) == 0:
            raise ValueError(f"references[{key!r}] is empty: every image needs at least one reference caption")
        if not isinstance(candidates[key], str):
            raise TypeError(f"candidates[{key!r}] must be a string, got {type(candidates[key]).__name__}")
    keys = list(candidates)
    if not keys:
        raise ValueError("no candidates to score")
    refs = {key: list(references[key]) for key in keys}
    if not tokenize:
        return {key: candidates[key] for key in keys}, refs
    tokenized_refs = tokenize_captions(refs)
    tokenized_cands = tokenize_captions({key: [candidates[key]] for key in keys})
    return {key: tokenized_cands[key][0] for key in keys}, tokenized_refs


# ----------------------------------------------------------------------------------------- BLEU


def _bleu_sentence_stats(candidate: str, refs: list[str]) -> tuple[int, int, list[int], list[int]]:
    """(testlen, closest reflen, guesses per n, clipped matches per n) for one image."""
    max_ref_counts: dict[Ngram, int] = {}
    ref_lengths = []
    for ref in refs:
        ref_lengths.append(len(ref.split()))
        for ngram, count in ngram_counts(ref).items():
            max_ref_counts[ngram] = max(max_ref_counts.get(ngram, 0), count)
    testlen = len(candidate.split())
    reflen = min((abs(length - testlen), length) for length in ref_lengths)[1]
    guess = [max(0, testlen - n + 1) for n in range(1, MAX_N + 1)]
    correct = [0] * MAX_N
    for ngram, count in ngram_counts(candidate).items():
        correct[len(ngram) - 1] += min(max_ref_counts.get(ngram, 0), count)
    return testlen, reflen, guess, correct


def _bleu_from_stats(testlen: float, reflen: float, guess: Sequence[float], correct: Sequence[float]) -> list[float]:
    scores = []
    product = 1.0
    for n in range(MAX_N):
        product *= (correct[n] + _TINY) / (guess[n] + _SMALL)
        scores.append(product ** (1.0 / (n + 1)))
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    if ratio < 1:
        scores = [score * math.exp(1 - 1 / ratio) for score in scores]
    return scores


def _bleu_scores(cands: dict[str, str], refs: dict[str, list[str]]) -> tuple[list[float], dict[str, list[float]]]:
    total_test = total_ref = 0
    total_guess, total_correct = [0] * MAX_N, [0] * MAX_N
    per_image = {}
    for key, candidate in cands.items():
        testlen, reflen, guess, correct = _bleu_sentence_stats(candidate, refs[key])
        total_test += testlen
        total_ref += reflen
        total_guess = [a + b for a, b in zip(total_guess, guess, strict=True)]
        total_correct = [a + b for a, b in zip(total_correct, correct, strict=True)]
        per_image[key] = _bleu_from_stats(testlen, reflen, guess, correct)
    return _bleu_from_stats(total_test, total_ref, total_guess, total_correct), per_image


def bleu(
    candidates: Mapping[str, str], references: Mapping[str, Sequence[str]], *, tokenize: bool = True
) -> list[float]:
    """Corpus BLEU-1..4 as pycocoevalcap's ``Bleu(4)``.

    Args:
        candidates: image id -> generated caption.
        references: image id -> reference captions (at least one each); same keys as ``candidates``.
        tokenize: apply the COCO PTB tokenisation first (set False for pre-tokenised text).

    Returns:
        ``[BLEU-1, BLEU-2, BLEU-3, BLEU-4]`` in [0, 1].
    """
    cands, refs = _prepared(candidates, references, tokenize)
    return _bleu_scores(cands, refs)[0]


# ---------------------------------------------------------------------------------------- CIDEr


def _tfidf(counts: Counter[Ngram], doc_freq: Counter[Ngram], log_n_images: float) -> tuple[list, list[float], int]:
    """Per-n tf-idf vectors, their norms, and the bigram count (the reference's 'length')."""
    vectors: list[dict[Ngram, float]] = [{} for _ in range(MAX_N)]
    squares = [0.0] * MAX_N
    bigrams = 0
    for ngram, tf in counts.items():
        n = len(ngram) - 1
        weight = float(tf) * (log_n_images - math.log(max(1.0, doc_freq.get(ngram, 0.0))))
        vectors[n][ngram] = weight
        squares[n] += weight**2
        if n == 1:
            bigrams += tf
    return vectors, [math.sqrt(s) for s in squares], bigrams


def _cider_similarity(hyp: tuple, ref: tuple) -> list[float]:
    (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
    delta = float(len_h - len_r)
    penalty = math.e ** (-(delta**2) / (2 * CIDER_SIGMA**2))
    values = []
    for n in range(MAX_N):
        value = 0.0
        for ngram, weight in vec_h[n].items():
            ref_weight = vec_r[n].get(ngram, 0.0)
            value += min(weight, ref_weight) * ref_weight
        if norm_h[n] != 0 and norm_r[n] != 0:
            value /= norm_h[n] * norm_r[n]
        values.append(value * penalty)
    return values


def _cider_scores(cands: dict[str, str], refs: dict[str, list[str]]) -> tuple[float, dict[str, float]]:
    ref_counts = {key: [ngram_counts(ref) for ref in refs[key]] for key in cands}
    doc_freq: Counter[Ngram] = Counter()
    for counts_list in ref_counts.values():
        doc_freq.update({ngram for counts in counts_list for ngram in counts})
    if not doc_freq:
        raise ValueError("every reference caption is empty after tokenisation: CIDEr is undefined")
    log_n_images = math.log(float(len(cands)))
    per_image = {}
    for key, candidate in cands.items():
        hyp = _tfidf(ngram_counts(candidate), doc_freq, log_n_images)
        totals = [0.0] * MAX_N
        for counts in ref_counts[key]:
            sims = _cider_similarity(hyp, _tfidf(counts, doc_freq, log_n_images))
            totals = [t + s for t, s in zip(totals, sims, strict=True)]
        per_image[key] = sum(totals) / MAX_N / len(ref_counts[key]) * 10.0
    return sum(per_image.values()) / len(per_image), per_image


def cider(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]], *, tokenize: bool = True) -> float:
    """Corpus CIDEr-D as pycocoevalcap's ``Cider`` (the COCO caption leaderboard's "CIDEr").

    The document frequencies come from the references of *this* set, so the score of an
    image depends on the whole set (a set of one image always scores 0).

    Args:
        candidates: image id -> generated caption.
        references: image id -> reference captions (at least one each); same keys as ``candidates``.
        tokenize: apply the COCO PTB tokenisation first (set False for pre-tokenised text).

    Returns:
        The mean of the per-image scores (typically 0..~1.5 for real models, up to 10).
    """
    cands, refs = _prepared(candidates, references, tokenize)
    return _cider_scores(cands, refs)[0]


def cider_per_image(
    candidates: Mapping[str, str], references: Mapping[str, Sequence[str]], *, tokenize: bool = True
) -> dict[str, float]:
    """CIDEr-D of each image (pycocoevalcap's second return value), keyed like ``candidates``."""
    cands, refs = _prepared(candidates, references, tokenize)
    return _cider_scores(cands, refs)[1]


def score_captions(
    candidates: Mapping[str, str], references: Mapping[str, Sequence[str]], *, tokenize: bool = True
) -> CaptionScores:
    """BLEU-1..4 and CIDEr-D, corpus and per image, from one tokenisation pass."""
    cands, refs = _prepared(candidates, references, tokenize)
    corpus_bleu, image_bleu = _bleu_scores(cands, refs)
    corpus_cider, image_cider = _cider_scores(cands, refs)
    return CaptionScores(corpus_bleu, corpus_cider, image_bleu, image_cider)
