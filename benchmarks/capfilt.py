"""CapFilt throughput: the caption and filter stages' Ray Data actor pools (1 and 2 actors)
vs a plain single-process loop over the same jobs (same model, same batches, one torch
thread), on blip-tiny's model built from its config (random weights: throughput does not
depend on training) and synthetic shapes written to a shard. The captions and scores of every
variant must be identical (sampling is seeded per batch), or the run fails.

The Ray figures are given twice: with the start of the actors and the model load (what a stage
pays, once), against the plain loop with its model load; and steady (from the moment every actor
has answered its first job to the last answer, timed in the actors), against the plain loop after
its model load, with the start-up (until that moment) shown apart. Each is measured with
consecutive jobs sharing a block (vlmflow's default, 8 blocks per actor) and with one job per block
(Ray Data's per-block cost). `--images` sets how much work amortises the start.

    .venv/bin/python benchmarks/capfilt.py [--images 2048] [--batch-size 32] [--k 1] [--ops caption score] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import ray
import torch

from vlmflow.components.capfilt.worker import CapfiltWorker
from vlmflow.components.sources.synthetic import make_row
from vlmflow.components.tokenize import train_bpe
from vlmflow.components.train.setup import model_config, write_model_folder
from vlmflow.models.vision import image_spec
from vlmflow.models.vlm import VLM, Vocab
from vlmflow.runtime.ray import BLOCKS_PER_ACTOR, map_jobs_on_ray_data
from vlmflow.samples import build_index, write_shard
from vlmflow.specs import load_recipe
from vlmflow.specs.data import SyntheticShapesSource
from vlmflow.specs.recipe import BpeTokenizer

REPO = Path(__file__).resolve().parents[1]
if __name__ != "__main__":  # imported by run_all.py: Ray's workers get TimedWorker by value, not by module name
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def build(root: Path, images: int) -> tuple[Path, pl.DataFrame]:
    """A model folder of blip-tiny's model (random weights) and an indexed shard of shapes."""
    recipe = load_recipe(REPO / "specs" / "recipes" / "blip-tiny.yaml")
    spec = SyntheticShapesSource(kind="synthetic-shapes", count=images, image_size=64, max_objects=2, caption_noise=0.3)
    rows = [make_row(spec, 7, i) for i in range(images)]
    tokenizer = train_bpe([c for r in rows for c in r.captions] + ["Describe the image."], BpeTokenizer(kind="bpe"))
    tokenizer_file = root / "tokenizer.json"
    tokenizer.save(str(tokenizer_file))
    special = {t: tokenizer.token_to_id(t) for t in BpeTokenizer(kind="bpe").special_tokens}
    vocab = Vocab(tokenizer.get_vocab_size(), special)
    torch.manual_seed(0)
    model = VLM(recipe.model, vocab)
    config = model_config(recipe.model, vocab, image_spec(recipe.model.vision), model.num_image_tokens)
    write_model_folder(root / "model", model.state_dict(), config, tokenizer_file)
    data = root / "data"
    data.mkdir()
    rel = "data/shapes.tar"
    sha, _ = write_shard(root / rel, [{"__key__": r.key, "png": r.image, "json": {"captions": r.captions, **r.extra}}
                                      for r in rows])  # fmt: skip
    pl.DataFrame({"key": [r.key for r in rows], "shard": rel, "split": "train", "source": "shapes"}).write_parquet(
        data / "manifest.parquet"
    )
    pl.DataFrame({"shard": [rel], "sha256": [sha]}).write_parquet(data / "shards.parquet")
    return root / "model", build_index(data, root)


def jobs_of(index: pl.DataFrame, batch: int, k: int, op: str) -> list[dict]:
    jobs = []
    for i, start in enumerate(range(0, index.height, batch)):
        part = index.slice(start, batch)
        where = [list(r) for r in part.select("shard", "image_offset", "image_size").iter_rows()]
        if op == "caption":
            records = [list(r) for r in part.select("shard", "json_offset", "json_size").iter_rows()]
            decoding = {"strategy": "sample", "top_p": 0.9, "max_new_tokens": 24, "seed": i}
            jobs.append({"op": op, "images": where, "records": records, "prompt": "Describe the image.", "k": k,
                         "decoding": decoding})  # fmt: skip
        else:
            texts = [["an image with a red circle.", "an image with two blue squares."]] * part.height
            jobs.append({"op": op, "images": where, "texts": texts})
    return jobs


def plain(folder: Path, root: Path, jobs: list[dict]) -> tuple[list[dict], float, float]:
    """(answers, seconds in all, seconds after the model load): one worker in this process."""
    started = time.perf_counter()
    worker = CapfiltWorker(str(folder), str(root), 1)
    loaded = time.perf_counter()
    answers = [worker(job) for job in jobs]
    done = time.perf_counter()
    return answers, done - started, done - loaded


class TimedWorker(CapfiltWorker):
    """The stage's worker, its answer wrapped with when it finished (wall clock) and in which actor."""

    def __call__(self, job: dict) -> dict:
        answer = super().__call__(job)
        return {"answer": answer, "done": time.time(), "actor": os.getpid()}


def pooled(folder: Path, root: Path, jobs: list[dict], actors: int, blocks: int | None) -> dict:
    """The pool on `jobs`; blocks: per actor (None: one job per block). Returns the answers, the
    seconds in all (the actors' start and model load included), and steady: jobs answered per
    second from the moment every actor has finished its first job to the last job (no start-up in
    it), with start_s, the seconds until that moment. The times come from the actors, not from
    the arrivals: Ray Data hands results over in bursts of several blocks."""
    started_wall, started = time.time(), time.perf_counter()
    timed = map_jobs_on_ray_data(TimedWorker, (str(folder), str(root), 1), jobs, desc="bench",
                                 num_actors=actors, progress="log", blocks_per_actor=blocks)  # fmt: skip
    seconds = time.perf_counter() - started
    firsts = {}
    for t in sorted(timed, key=lambda t: t["done"]):
        firsts.setdefault(t["actor"], t["done"])
    up = max(firsts.values())
    later = [t["done"] for t in timed if t["done"] > up]
    rate = len(later) / (max(later) - up) if later else None
    return {"answers": [t["answer"] for t in timed], "seconds": seconds, "jobs_per_s": rate,
            "start_s": up - started_wall, "actors_seen": len(firsts)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--k", type=int, default=1, help="captions per image")
    parser.add_argument("--ops", nargs="+", choices=("caption", "score"), default=["caption", "score"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "capfilt.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    results: dict = {"images": args.images, "batch_size": args.batch_size, "k": args.k, "stages": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder, index = build(root, args.images)
        for op in args.ops:
            jobs = jobs_of(index, args.batch_size, args.k, op)
            reference, plain_s, plain_steady_s = plain(folder, root, jobs)
            row = {
                "plain_images_per_s": round(args.images / plain_s, 1),
                "plain_steady_images_per_s": round(args.images / plain_steady_s, 1),
            }
            stage = "caption" if op == "caption" else "filter"
            for blocks, label in ((BLOCKS_PER_ACTOR, stage), (None, f"{stage}, a block per job")):
                row = dict(row)
                for actors in (1, 2):
                    run = pooled(folder, root, jobs, actors, blocks)
                    if run["answers"] != reference:
                        raise SystemExit(f"{op}: {actors} actor(s) answered differently from the plain loop")
                    per_job = args.images / len(jobs)
                    row[f"ray_{actors}_images_per_s"] = round(args.images / run["seconds"], 1)
                    row[f"ratio_{actors}"] = round(plain_s / run["seconds"], 2)
                    rate = run["jobs_per_s"] * per_job if run["jobs_per_s"] else None
                    row[f"ray_{actors}_steady_images_per_s"] = round(rate, 1) if rate else None
                    row[f"steady_ratio_{actors}"] = round(rate / (args.images / plain_steady_s), 2) if rate else None
                    row[f"start_s_{actors}"] = round(run["start_s"], 2)
                    row[f"actors_seen_{actors}"] = run["actors_seen"]
                results["stages"][label] = row
    ray.shutdown()
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    results["ratio"] = next(iter(results["stages"].values()))["ratio_2"]
    print("| stage | plain loop img/s (after its model load) | Ray Data, 1 actor: img/s (ratio) | 2 actors "
          "| 1 actor, steady | 2, steady | start s, 1 / 2 actors |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in results["stages"].items():
        cells = [f"{row[f'ray_{a}{s}_images_per_s']} ({row[f'{t}ratio_{a}']}x)"
                 for s, t in (("", ""), ("_steady", "steady_")) for a in (1, 2)]  # fmt: skip
        plain_rates = f"{row['plain_images_per_s']} ({row['plain_steady_images_per_s']})"
        print(f"| {name} | {plain_rates} | " + " | ".join(cells) + f" | {row['start_s_1']} / {row['start_s_2']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out} (same captions and scores from every variant)")


if __name__ == "__main__":
    main()
