"""A run's results as a person reads them: each metric beside the baseline its stage wrote next
to it (`X_baseline`, `X_chance`, `X_majority`), and the run's description in the MLflow UI."""

from __future__ import annotations

SUFFIXES = ("_baseline", "_chance", "_majority")
NOT_SKILLS = ("items", "texts", "questions", "loss", "seconds", "rows", "steps", "samples_per_s", "tokens_per_s")


def with_baselines(metrics: dict[str, float]) -> list[tuple[str, float, str, float]]:
    """(metric, value, baseline name, baseline value) for every metric that has a baseline beside it:
    `bleu4` with `bleu4_baseline`, `accuracy` with `accuracy_chance`, `vqa_accuracy_color` with
    `vqa_majority_color` (a training stage's check against the majority answer)."""
    found = []
    for key, base in metrics.items():
        for suffix in SUFFIXES:
            if suffix not in key:
                continue
            name = key.replace(suffix, "")
            for candidate in (name, name.replace("vqa", "vqa_accuracy", 1)):
                if candidate in metrics and not any(s in candidate for s in NOT_SKILLS):
                    found.append((candidate, float(metrics[candidate]), key, float(base)))
                    break
    return found


def run_note(summary: dict, stage_table: str) -> str:
    """The recipe run's description in the MLflow UI (markdown): what ran, how it ended, each
    evaluation metric against its baseline, and the stage table."""
    lines = [f"**{summary['recipe']}**, vlmflow run `{summary['run_id']}`: {summary.get('status', 'running')}"]
    rows = [
        (stage["name"], name, value, base)
        for stage in summary.get("stages", [])
        if stage["name"].startswith("eval-")
        for name, value, _, base in with_baselines(stage.get("metrics") or {})
    ]
    if rows:
        lines += ["", "| evaluation | metric | value | baseline | |", "|---|---|---:|---:|---|"]
        for stage, name, value, base in rows:
            mark = "above" if value > base else "**not above**"
            lines.append(f"| {stage} | {name.removeprefix('eval_')} | {value:.3f} | {base:.3f} | {mark} |")
    return "\n".join([*lines, "", stage_table])


def model_eval_tags(summary: dict, stage: str) -> dict[str, str]:
    """Tags for the model stage `stage` wrote: `eval.EVAL_STAGE.METRIC` for each evaluation
    metric of the run's stages that read it as their `model` (evaluations: not a later training
    stage that starts from it) and did not fail."""
    return {
        f"eval.{entry['name']}.{metric.removeprefix('eval_')}": f"{value:.4g}"
        for entry in summary["stages"]
        if (entry.get("input_stages") or {}).get("model") == stage and entry["status"] != "failed"
        for metric, value in (entry.get("metrics") or {}).items()
        if metric.startswith("eval_")
    }
