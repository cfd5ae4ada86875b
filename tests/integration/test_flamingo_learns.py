"""The flamingo-tiny recipe end to end through the CLI (in-process executor; Ray Train for the two
training stages): its few-shot and zero-shot VQA evaluations, on the held-out test split, beat the
majority answer per question, as each evaluation stage's own metrics.json reports it. A learning
proof (make test-learning): the whole recipe, 8 min with the machine shared."""

from __future__ import annotations

import pytest
from twin_run import metrics_of, run_twin

pytestmark = [pytest.mark.slow, pytest.mark.learning]
MARGIN = 0.05  # above the majority baseline of the 256 questions (measured: +0.078)


def test_flamingo_tiny_beats_the_majority_baseline_few_shot_and_zero_shot(tmp_path):
    summary = run_twin("flamingo-tiny", tmp_path)
    four, zero = metrics_of(summary, "eval-vqa-4shot"), metrics_of(summary, "eval-vqa-0shot")
    print(f"4-shot {four['vqa_accuracy']:.3f}, 0-shot {zero['vqa_accuracy']:.3f}, "
          f"baseline {four['vqa_accuracy_baseline']:.3f}")  # fmt: skip
    for metrics in (four, zero):
        assert metrics["items"] == 256
        assert metrics["vqa_accuracy"] > metrics["vqa_accuracy_baseline"] + MARGIN, metrics
