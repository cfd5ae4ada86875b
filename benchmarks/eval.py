"""Evaluation throughput: batched generation on a Ray actor pool (vlmflow's evaluate stage:
left-padded batches, KV cache, one model load per actor) vs a plain per-sample greedy loop
(`components/train/evaluate.greedy`: one prompt at a time, no cache) on the same model and
the same held-out VQA questions, and vs a plain loop over the actors' own batches in one process
(the actor pool's steady-state gain alone). All must give the same answers (greedy), or the run fails.

Actor start-up and one warm-up batch are left out of the Ray figure. Each actor uses one torch
thread; the plain loop uses --plain-threads (default 1: on a busy 2-core VM two threads
oversubscribe the cores and ran 50x slower than one in a check).

    .venv/bin/python benchmarks/eval.py [--model RUN_OR_MODEL_FOLDER] [--workdir vlmflow-work]
        [--questions 256] [--batch-size 32] [--actors 2] [--max-new-tokens 8] [--plain-threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import ray
import torch

from vlmflow.components.evaluate.generate import Decoding
from vlmflow.components.evaluate.worker import EvalWorker
from vlmflow.components.export import resolve_model
from vlmflow.components.sources.synthetic import make_row
from vlmflow.components.train.data import preprocess
from vlmflow.components.train.evaluate import greedy
from vlmflow.runtime.ray import map_on_actors, release_actors
from vlmflow.specs.data import SyntheticShapesSource

REPO = Path(__file__).resolve().parents[1]


def questions(count: int) -> list[tuple[bytes, str]]:
    spec = SyntheticShapesSource(kind="synthetic-shapes", image_size=64, max_objects=2)
    found: list[tuple[bytes, str]] = []
    index = 0
    while len(found) < count:
        row = make_row(spec, 1234, index)
        found += [(row.image, qa["question"]) for qa in row.extra["qa"]]
        index += 1
    return found[:count]


def plain_loop(folder: Path, items: list[tuple[bytes, str]], max_new: int, threads: int) -> tuple[list[str], float]:
    worker = EvalWorker(str(folder), threads)
    eos = worker.special["<eos>"]
    started = time.perf_counter()
    answers = []
    for image, question in items:
        pixels = torch.from_numpy(preprocess(image, worker.image)).unsqueeze(0)
        ids = greedy(worker.model, worker.codec.prompt(question), pixels, eos, max_new)
        answers.append(worker.codec.tokenizer.decode(ids))
    return answers, time.perf_counter() - started


def jobs_of(items: list[tuple[bytes, str]], max_new: int, batch: int) -> list[tuple[str, dict]]:
    """The evaluate stage's generation jobs: batches of (images, prompts), greedy decoding."""
    decoding = Decoding(max_new_tokens=max_new).__dict__
    return [
        ("generate", {"images": [i for i, _ in chunk], "prompts": [q for _, q in chunk], "decoding": decoding})
        for chunk in (items[s : s + batch] for s in range(0, len(items), batch))
    ]


def plain_batched(folder: Path, items: list[tuple[bytes, str]], max_new: int, batch: int) -> tuple[list[str], float]:
    """The actors' own jobs answered one after another by one EvalWorker in this process (1 thread):
    the same batches, the same code, no Ray. The warm-up job is left out, as on the actors."""
    worker = EvalWorker(str(folder), 1)
    jobs = jobs_of(items, max_new, batch)
    worker.run(jobs[0])
    started = time.perf_counter()
    answers = [text for job in jobs for text in worker.run(job)]
    return answers, time.perf_counter() - started


def ray_pool(folder: Path, items: list, max_new: int, batch: int, actors: int) -> tuple[list[str], float]:
    """Steady state: the actors' start and one warm-up job each are left out."""
    jobs = jobs_of(items, max_new, batch)
    map_on_actors(EvalWorker, (str(folder),), "run", jobs[:actors], desc="warm-up", num_actors=actors, keep=True)
    started = time.perf_counter()
    results = map_on_actors(EvalWorker, (str(folder),), "run", jobs, desc="eval", num_actors=actors, keep=True)
    seconds = time.perf_counter() - started
    release_actors()
    return [text for result in results for text in result], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="latest", help="run id, run folder, stage or model folder")
    parser.add_argument("--workdir", type=Path, default=REPO / "vlmflow-work")
    parser.add_argument("--questions", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--plain-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "eval.json")
    args = parser.parse_args()
    items = questions(args.questions)
    with resolve_model(args.model, args.workdir) as folder:
        ray.init(address="local", num_cpus=args.actors, include_dashboard=False, logging_level="WARNING")
        batched, ray_seconds = ray_pool(folder, items, args.max_new_tokens, args.batch_size, args.actors)
        ray.shutdown()
        plain, plain_seconds = plain_loop(folder, items, args.max_new_tokens, args.plain_threads)
        same_batches, same_seconds = plain_batched(folder, items, args.max_new_tokens, args.batch_size)
    if same_batches != batched:
        raise SystemExit("the actor pool and the plain loop over the same batches answered differently")
    if batched != plain:
        differ = sum(a != b for a, b in zip(batched, plain, strict=True))
        raise SystemExit(f"batched and per-sample answers differ on {differ} of {len(items)} questions")
    result = {
        "model": str(folder),
        "questions": len(items),
        "batch_size": args.batch_size,
        "actors": args.actors,
        "max_new_tokens": args.max_new_tokens,
        "plain_threads": args.plain_threads,
        "ray_batched_samples_per_s": round(len(items) / ray_seconds, 1),
        "plain_loop_samples_per_s": round(len(items) / plain_seconds, 1),
        "ratio": round(plain_seconds / ray_seconds, 2),
        "plain_batched_samples_per_s": round(len(items) / same_seconds, 1),
        "actors_over_same_batches": round(same_seconds / ray_seconds, 2),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
    }
    print("| what | samples/s |\n|---|---:|")
    print(f"| Ray actor pool, batched + KV cache ({args.actors} actors, batch {args.batch_size}) "
          f"| {result['ray_batched_samples_per_s']} |")  # fmt: skip
    print(f"| plain per-sample greedy loop ({args.plain_threads} threads) | {result['plain_loop_samples_per_s']} |")
    print(f"| plain loop over the actors' batches (1 thread) | {result['plain_batched_samples_per_s']} |")
    print(
        f"ratio: {result['ratio']}x vs the per-sample loop, {result['actors_over_same_batches']}x vs the same "
        f"batches in one process (same answers on all {len(items)} questions)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
