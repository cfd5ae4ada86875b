"""Metrics beside their baselines, and the recipe run's description in the MLflow UI."""

from __future__ import annotations

from vlmflow.results import model_eval_tags, run_note, with_baselines


def test_each_metric_is_paired_with_the_baseline_its_stage_wrote():
    metrics = {"eval_vqa_accuracy": 0.7, "eval_vqa_accuracy_baseline": 0.6, "eval_accuracy": 0.5,
               "eval_accuracy_chance": 0.33, "vqa_accuracy_color": 0.8, "vqa_majority_color": 0.3,
               "top1": 0.2, "top1_chance": 0.1, "top1_majority": 0.3, "eval_items": 64.0,
               "final_loss": 0.3}  # fmt: skip
    assert sorted(with_baselines(metrics)) == [
        ("eval_accuracy", 0.5, "eval_accuracy_chance", 0.33),
        ("eval_vqa_accuracy", 0.7, "eval_vqa_accuracy_baseline", 0.6),
        ("top1", 0.2, "top1_chance", 0.1),
        ("top1", 0.2, "top1_majority", 0.3),
        ("vqa_accuracy_color", 0.8, "vqa_majority_color", 0.3),
    ]
    assert with_baselines({"eval_items": 3.0, "eval_items_baseline": 1.0}) == []  # a count is no skill


def test_the_run_note_says_which_evaluation_metrics_are_not_above_their_baselines():
    summary = {"recipe": "r", "run_id": "20261207-1", "status": "succeeded", "stages": [
        {"name": "train-a", "metrics": {"vqa_accuracy": 0.1, "vqa_majority": 0.5}},
        {"name": "eval-vqa", "metrics": {"eval_exact_match": 0.7, "eval_exact_match_baseline": 0.6}},
        {"name": "eval-choice", "metrics": {"eval_accuracy": 0.2, "eval_accuracy_chance": 0.25}},
    ]}  # fmt: skip
    note = run_note(summary, "STAGES")
    assert note.startswith("**r**, vlmflow run `20261207-1`: succeeded")
    assert "| eval-vqa | exact_match | 0.700 | 0.600 | above |" in note
    assert "| eval-choice | accuracy | 0.200 | 0.250 | **not above** |" in note
    assert "train-a" not in note and note.endswith("STAGES")


def test_a_registered_model_is_tagged_with_the_scores_of_the_evaluations_that_read_it():
    summary = {
        "stages": [
            {"name": "train-instruct", "status": "computed", "input_stages": {"init": "train-align"},
             "metrics": {"eval_vqa_accuracy": 0.5, "final_loss": 0.2}},
            {"name": "eval-vqa", "status": "computed", "input_stages": {"model": "train-instruct", "data": "dedup"},
             "metrics": {"eval_vqa_accuracy": 0.6481, "eval_vqa_accuracy_baseline": 0.578}},
            {"name": "eval-old", "status": "cached", "input_stages": {"model": "train-align"},
             "metrics": {"eval_cider": 1.0}},
            {"name": "eval-broken", "status": "failed", "input_stages": {"model": "train-instruct"},
             "metrics": {"eval_cider": 9.0}},
            {"name": "eval-skipped", "status": "skipped", "input_stages": {"model": "train-instruct"}},
        ]
    }  # fmt: skip
    assert model_eval_tags(summary, "train-instruct") == {
        "eval.eval-vqa.vqa_accuracy": "0.6481",
        "eval.eval-vqa.vqa_accuracy_baseline": "0.578",
    }
    assert model_eval_tags(summary, "train-align") == {"eval.eval-old.cider": "1"}  # not train-instruct's own
