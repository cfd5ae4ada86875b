"""An evaluation task of the recipe as a stage (`eval-NAME`): read its items, run the model
on a Ray actor pool (each actor loads the model once; batches of generation, likelihoods or
embeddings), score, and write what MLflow shows.

Inputs: `model` (a training stage: its `model/` folder) and, for held-out data, `data` (a data
artifact). Output folder: `metrics.json`, `predictions.parquet` (one row per item),
`quarantine.parquet` (id, source, reason for every item that could not be scored) and
`examples.png`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from vlmflow.components.evaluate import datasets, grounding, matching, scoring
from vlmflow.components.evaluate.datasets import ImageFiles, Item, Loaded
from vlmflow.components.evaluate.examples import write_examples
from vlmflow.components.evaluate.generate import Decoding
from vlmflow.components.evaluate.shots import shots_of, with_shots
from vlmflow.components.evaluate.worker import EvalWorker
from vlmflow.components.train.data import ShardSamples
from vlmflow.errors import UserError
from vlmflow.prompts import choice_prompt
from vlmflow.runtime.executor import Executor
from vlmflow.samples import build_index
from vlmflow.specs.evaluate import EvalTask, ZeroShotTask
from vlmflow.specs.recipe import Recipe
from vlmflow.stage import Outputs, StageContext, StageResult

ARTIFACTS = ["metrics.json", "predictions.parquet", "quarantine.parquet", "examples.png"]


def load_items(task: EvalTask, ctx: StageContext) -> tuple[Loaded, list[str]]:
    """The task's items (and class names for classification)."""
    data, limit, rules = task.data, task.samples, ImageFiles.of(task.data)
    classes: list[str] = list(getattr(task, "classes", None) or [])
    if data.kind == "held-out":
        index = build_index(ctx.inputs["data"].path, ctx.store.root)
        rows = index.filter(pl.col("split") == data.split).with_columns(format=pl.lit("caption"))
        if rows.height == 0:
            raise UserError(f"evaluate {task.name}: data artifact {data.artifact!r} has no {data.split!r} split")
        loaded = datasets.held_out(ShardSamples(rows, ctx.store.root), task.kind, limit, data.artifact)
    elif data.kind == "coco-captions":
        loaded = datasets.coco_captions(data.annotations, data.images, limit, rules)
    elif data.kind == "vqav2":
        loaded = datasets.vqav2(data.questions, data.annotations, data.images, data.image_pattern, limit, rules)
    elif data.kind == "image-folder":
        loaded, found = datasets.image_folder(data.path, limit, rules)
        classes = classes or found
    elif data.kind == "multiple-choice-tsv":
        loaded = datasets.choice_tsv(data.path, limit, rules)
    else:
        loaded = datasets.choice_jsonl(data.path, data.images, limit, rules)
    if task.kind == "zero-shot-classification":
        classes = classes or sorted({item.references[0] for item in loaded.items})
        keep = [item for item in loaded.items if item.references[0] in classes]
        for item in loaded.items:
            if item.references[0] not in classes:
                loaded.quarantine.append({"id": item.id, "source": "classes", "reason": "label-not-in-classes"})
        loaded.items = keep
    if task.kind == "image-text-matching":
        loaded.items, lacking = matching.with_mismatched(loaded.items, ctx.recipe.seed)
        loaded.quarantine += [{"id": i.id, "source": "captions", "reason": "no-mismatched-caption"} for i in lacking]
    return loaded, classes


def prompt_of(task: EvalTask, item: Item) -> str:
    if task.kind == "captioning":
        return task.prompt
    if task.kind == "multiple-choice":
        return choice_prompt(task.template, item.question, item.options)
    return item.question


def batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@dataclass(frozen=True)
class Runner:
    """Runs jobs on the task's own actor pool (tasks run at the same time: pools are not shared)."""

    folder: Path
    name: str
    actors: int
    progress: str
    executor: Executor
    gpus: float = 0

    def __call__(self, jobs: list[tuple[str, object]]) -> list:
        device = "cuda" if self.gpus > 0 else "cpu"
        return self.executor.map_on_actors(
            EvalWorker, (str(self.folder), 1, device), "run", jobs,
            desc=f"eval {self.name}", num_actors=self.actors, num_gpus=self.gpus, progress=self.progress,
        )  # fmt: skip


def check_gpus(task: EvalTask, executor: Executor) -> None:
    """A task asking for GPUs the executor does not have would wait forever: say so instead."""
    executor.require_gpus(task.gpus, f"evaluate {task.name}: gpus")


def generate_all(task: EvalTask, items: list[Item], runner: Runner, seed: int) -> list[str]:
    g = task.generation
    decoding = asdict(Decoding(g.strategy, g.max_new_tokens, g.num_beams, g.temperature, g.top_p, seed))
    jobs = [
        ("generate", {"images": [i.image for i in chunk], "prompts": [prompt_of(task, i) for i in chunk],
                      "decoding": decoding, **shots_of(chunk)})
        for chunk in batches(items, task.batch_size)
    ]  # fmt: skip
    return [text for result in runner(jobs) for text in result]


def embed_all(task: EvalTask, items: list[Item], texts: list[str], runner: Runner) -> np.ndarray:
    """Similarity [n_items, n_texts] of normalised image and text embeddings (an image with one
    embedding per query, BLIP-2's: its best query's)."""
    text_jobs = [("embed_texts", chunk) for chunk in batches(texts, max(task.batch_size, 64))]
    image_jobs = [("embed_images", [i.image for i in chunk]) for chunk in batches(items, task.batch_size)]
    results = runner(text_jobs + image_jobs)
    text = np.concatenate(results[: len(text_jobs)])
    image = np.concatenate(results[len(text_jobs) :])
    similarity = image @ text.T
    return similarity.max(axis=1) if similarity.ndim == 3 else similarity


def classify(task: ZeroShotTask, recipe: Recipe, items: list[Item], classes: list[str], runner: Runner) -> np.ndarray:
    """Scores [n_items, n_classes]: each class's prompts averaged (a template ensemble)."""
    method = task.method if task.method != "auto" else ("embedding" if recipe.model.text else "likelihood")
    texts = [t.format(c) for c in classes for t in task.templates]
    k = len(task.templates)
    if method == "embedding":
        return embed_all(task, items, texts, runner).reshape(len(items), len(classes), k).mean(axis=2)
    jobs = [
        ("answer_logprobs", {"images": [i.image for i in chunk], "prompts": [task.prompt] * len(chunk),
                             "answers": texts})
        for chunk in batches(items, task.batch_size)
    ]  # fmt: skip
    scores = np.array([row for result in runner(jobs) for row in result])
    return scores.reshape(len(items), len(classes), k).mean(axis=2)


def match_all(task: EvalTask, items: list[Item], runner: Runner) -> list[float]:
    """The ITM head's P(match) of every pair of `matching.pairs(items)`, in order."""
    jobs = [
        ("match", {"images": [item.image for item, _, _ in chunk], "texts": [text for _, text, _ in chunk]})
        for chunk in batches(matching.pairs(items), task.batch_size)
    ]
    return [p for result in runner(jobs) for p in result]


def evaluate(task: EvalTask, recipe: Recipe, loaded: Loaded, classes: list[str], runner: Runner) -> scoring.Scored:
    items = loaded.items
    if task.kind == "zero-shot-classification":
        return scoring.classification(items, classes, classify(task, recipe, items, classes, runner))
    if task.kind == "retrieval":
        texts, _ = scoring.retrieval_texts(items)
        return scoring.retrieval(items, embed_all(task, items, texts, runner), task.ks)
    if task.kind == "image-text-matching":
        return matching.score(items, match_all(task, items, runner))
    predictions = generate_all(task, items, runner, recipe.seed)
    score = {"captioning": scoring.captioning, "vqa": scoring.vqa, "multiple-choice": scoring.multiple_choice,
             "grounding": grounding.score}  # fmt: skip
    return score[task.kind](items, predictions)


def run(ctx: StageContext) -> StageResult:
    recipe, task = ctx.recipe, ctx.config
    folder = ctx.inputs["model"].path / "model"
    loaded, classes = load_items(task, ctx)
    if getattr(task, "shots", 0):  # in-context examples from the artifact's train split
        index = build_index(ctx.inputs["data"].path, ctx.store.root)
        loaded.items = with_shots(loaded.items, index, ctx.store.root, task.shots, recipe.seed, task.name)
    if not loaded.items:
        reasons = sorted({q["reason"] for q in loaded.quarantine}) or ["no items"]
        raise UserError(f"evaluate {task.name}: nothing to score ({', '.join(reasons)})")
    check_gpus(task, ctx.executor)
    runner = Runner(folder, task.name, task.actors, ctx.progress, ctx.executor, task.gpus)
    metrics, rows = evaluate(task, recipe, loaded, classes, runner)
    (ctx.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    pl.DataFrame(rows).write_parquet(ctx.out / "predictions.parquet")
    loaded.quarantine_frame().write_parquet(ctx.out / "quarantine.parquet")
    write_examples(loaded.items, rows, ctx.out / "examples.png", task.examples)
    n_out, n_bad = len(loaded.items), len(loaded.quarantine)
    return StageResult(
        rows_in=n_out + n_bad,
        rows_out=n_out,
        rows_quarantined=n_bad,
        metrics={f"eval_{k}": float(v) for k, v in metrics.items()},
        artifacts=list(ARTIFACTS),
        details={"task": task.kind, "model": str(folder), "classes": classes},
        outputs=Outputs(tables=("predictions.parquet",)),  # MLflow shows the predictions as a table
    )
