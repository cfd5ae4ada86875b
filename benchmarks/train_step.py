"""Training throughput: vlmflow's training loop (Ray Train TorchTrainer, DDP on gloo, batches
read from the WebDataset shards and collated per step, checkpoints) vs a bare single-process
torch loop on the same model and the same batches, prepared in memory beforehand.

The bare loop is the ceiling: no data reading, no distribution, no bookkeeping. Both sides
use the same total number of CPU threads. The data and tokenizer come from the default
recipe's data stages (built once into --workdir, cached afterwards). Ray startup and the
first --warmup steps are left out of both figures.

Two more tables, each measured side by side in the same run on one 1-thread Ray Train worker:
samples/s with the batches built in the training thread (loader_workers 0) vs in 1 and 2
loader processes (--loader-workers), and tokens/s of the stage with packing vs padding (its
data: the recipe's last stage, a mixture of variable-length instruction data), with the share
of each batch's positions that hold a real token.

    .venv/bin/python benchmarks/train_step.py [--steps 40] [--warmup 5] [--workers 1 2]
                                              [--loader-workers 0 1 2] [--tables throughput loader packing]
                                              [--spec specs/recipes/shapes-tiny.yaml] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import polars as pl
import ray
import torch

from vlmflow.components.train import mixture
from vlmflow.components.train.data import Collator, ImageSpec, ShardSamples, TextCodec
from vlmflow.components.train.data import worker_micro_batches as micro_batches
from vlmflow.components.train.loader import Share, StepBatches, load_steps
from vlmflow.components.train.loop import WorkerConfig
from vlmflow.components.train.packing import pack_batch
from vlmflow.components.train.setup import build_stage_model
from vlmflow.components.train.stage import fit, mixture_rows, worker_config
from vlmflow.models.vlm import Vocab
from vlmflow.samples import build_index
from vlmflow.specs import load_recipe

REPO = Path(__file__).resolve().parents[1]


def data_stages(spec: Path, workdir: Path) -> dict[str, Path]:
    cmd = [sys.executable, "-m", "vlmflow.cli", "run", str(spec), "--workdir", str(workdir), "--set", "stages=[]",
           "--set", "evaluate=[]"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    summary = json.loads((workdir / "runs" / "latest" / "summary.json").read_text())
    return {s["name"]: Path(s["artifact_path"]) for s in summary["stages"]}


def bench_recipe(recipe, steps: int, workers: int, **changes):
    """The recipe with its last stage cut to `steps` (one checkpoint, at the end; `changes` to its other
    fields) on `workers` 1-thread workers."""
    stage = recipe.stages[-1].model_copy(update={"max_steps": steps, "checkpoint_every": steps, **changes})
    train = recipe.runtime.train.model_copy(update={"num_workers": workers, "cpus_per_worker": 1})
    runtime = recipe.runtime.model_copy(update={"train": train})
    return recipe.model_copy(update={"stages": [*recipe.stages[:-1], stage], "runtime": runtime})


def stage_config(recipe, artifacts: dict[str, Path], store: Path, out: Path) -> WorkerConfig:
    stage = recipe.stages[-1]
    parts = mixture_rows({c.data: build_index(artifacts[c.data], store) for c in stage.components()}, stage)
    out.mkdir(parents=True, exist_ok=True)
    pl.concat(parts).write_parquet(out / "train_rows.parquet")
    resolved = mixture.resolve(stage, [part.height for part in parts])
    return worker_config(recipe, stage, artifacts["tokenizer"], out / "train_rows.parquet", store, out, None, resolved)


def vlmflow_rate(recipe, config: WorkerConfig, warmup: int, metric: str = "samples_per_s") -> float:
    fit(config, recipe, f"bench-{recipe.runtime.train.num_workers}", Path(config.out) / "ray")
    rows = [json.loads(line) for line in (Path(config.out) / "history.jsonl").read_text().splitlines()]
    return float(np.median([r[metric] for r in rows[warmup:]]))


def bare_rate(recipe, config: WorkerConfig, steps: int, warmup: int, threads: int) -> float:
    torch.set_num_threads(threads)
    stage = recipe.stages[-1]
    vocab = Vocab(config.vocab["size"], config.vocab["special"])
    torch.manual_seed(config.seed)
    model = build_stage_model(recipe.model, vocab, stage, None)
    samples = ShardSamples(pl.read_parquet(config.index), Path(config.store_root))
    image = ImageSpec.of(config.image)
    codec = TextCodec(Path(config.tokenizer), vocab.special, model.num_image_tokens, stage.max_text_tokens)
    collate = Collator(samples, image, codec, stage.prompt, None)
    order = mixture.Resolved.from_dict(config.mixture).epoch_positions(config.seed, 0)
    size, micro = stage.batch_size, stage.micro_batch_size
    batches = [
        [collate(m, 0) for m in micro_batches(order, s % config.steps_per_epoch, size, micro, 0, 1)]
        for s in range(steps)
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.optimizer.lr)
    kinds = [o.kind for o in stage.objectives]
    times = []
    for parts in batches:
        started = time.perf_counter()
        for batch in parts:
            (sum(model(batch, kinds).values()) / len(parts)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return float(stage.batch_size / np.median(times[warmup:]))


def stage_rate(recipe, artifacts: dict[str, Path], store: Path, args, metric: str, **changes) -> float:
    """Median `metric` of the recipe's last stage with `changes`, on one 1-thread Ray Train worker."""
    with tempfile.TemporaryDirectory() as tmp:
        bench = bench_recipe(recipe, args.steps, 1, **changes)
        config = stage_config(bench, artifacts, store, Path(tmp) / "stage")
        return vlmflow_rate(bench, config, args.warmup, metric)


def token_share(recipe, artifacts: dict[str, Path], store: Path, steps: int, packing: bool) -> float:
    """Of the positions in the stage's first `steps` batches (all micro-batches), the share that hold a
    real token rather than padding."""
    stage = recipe.stages[-1]
    with tempfile.TemporaryDirectory() as tmp:
        config = stage_config(bench_recipe(recipe, steps, 1), artifacts, store, Path(tmp) / "stage")
        samples = ShardSamples(pl.read_parquet(config.index), Path(config.store_root))
    vocab = Vocab(config.vocab["size"], config.vocab["special"])
    model = build_stage_model(recipe.model, vocab, stage, None)
    codec = TextCodec(Path(config.tokenizer), vocab.special, model.num_image_tokens, stage.max_text_tokens)
    collate = Collator(samples, ImageSpec.of(config.image), codec, stage.prompt, None)
    share = Share(mixture.Resolved.from_dict(config.mixture), config.seed, config.steps_per_epoch, stage.batch_size,
                  stage.micro_batch_size)  # fmt: skip
    capacity = 1 + model.num_image_tokens + stage.max_text_tokens
    pack = partial(pack_batch, capacity=capacity, image_id=vocab.image_id, pad_id=vocab.pad_id) if packing else None
    real = positions = 0
    for step in load_steps(StepBatches(collate, share, pack), 0, steps, workers=0):
        real += sum(int(part["attention_mask"].sum()) for part in step.parts)
        positions += sum(part["attention_mask"].numel() for part in step.parts)
    return real / positions


def throughput_rows(recipe, artifacts: dict[str, Path], store: Path, args) -> list[dict]:
    rows = []
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            bench = bench_recipe(recipe, args.steps, workers)
            config = stage_config(bench, artifacts, store, Path(tmp) / "stage")
            ours = vlmflow_rate(bench, config, args.warmup)
            bare = bare_rate(bench, config, args.steps, args.warmup, threads=workers)
        rows.append({"workers": workers, "threads_total": workers, "vlmflow_samples_per_s": ours,
                     "bare_samples_per_s": bare, "ratio": ours / bare})  # fmt: skip
    print(f"\ntraining throughput, {recipe.name} stage {recipe.stages[-1].name} (median samples/s after warm-up)")
    print(f"{'workers':>8}{'vlmflow':>12}{'bare loop':>12}{'ratio':>8}")
    for r in rows:
        print(f"{r['workers']:>8}{r['vlmflow_samples_per_s']:>12.1f}{r['bare_samples_per_s']:>12.1f}{r['ratio']:>8.2f}")
    return rows


def loader_rows(recipe, artifacts: dict[str, Path], store: Path, args) -> list[dict]:
    rates = {
        n: stage_rate(recipe, artifacts, store, args, "samples_per_s", loader_workers=n) for n in args.loader_workers
    }
    base = rates[args.loader_workers[0]]
    rows = [{"loader_workers": n, "samples_per_s": rate, "ratio": rate / base} for n, rate in rates.items()]
    print(f"\nloading off the training thread, one 1-thread training worker (median samples/s; ratio to "
          f"loader_workers {args.loader_workers[0]})")  # fmt: skip
    print(f"{'loader_workers':>15}{'samples/s':>12}{'ratio':>8}")
    for r in rows:
        print(f"{r['loader_workers']:>15}{r['samples_per_s']:>12.1f}{r['ratio']:>8.2f}")
    return rows


def packing_rows(recipe, artifacts: dict[str, Path], store: Path, args) -> list[dict]:
    rows = []
    for packing in (False, True):
        rate = stage_rate(recipe, artifacts, store, args, "tokens_per_s", packing=packing)
        share = token_share(recipe, artifacts, store, args.steps, packing)
        rows.append({"packing": packing, "tokens_per_s": rate, "real_token_share": share})
    for r in rows:
        r["ratio"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(
        "\npacking vs padding, one 1-thread training worker (median real tokens/s; share of batch positions "
        "that are real tokens)"
    )
    print(f"{'rows':>10}{'tokens/s':>12}{'real share':>12}{'ratio':>8}")
    for r in rows:
        name = "packed" if r["packing"] else "padded"
        print(f"{name:>10}{r['tokens_per_s']:>12.1f}{r['real_token_share']:>12.2f}{r['ratio']:>8.2f}")
    return rows


TABLES = {"throughput": throughput_rows, "loader": loader_rows, "packing": packing_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=REPO / "specs" / "recipes" / "shapes-tiny.yaml")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vlmflow-bench-train")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tables", nargs="+", choices=list(TABLES), default=list(TABLES))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train_step.json")
    args = parser.parse_args()
    recipe = load_recipe(args.spec)
    artifacts = data_stages(args.spec, args.workdir)
    store = args.workdir / "artifacts"
    ray.init(address="local", num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
    tables = {name: TABLES[name](recipe, artifacts, store, args) for name in args.tables}
    ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "spec": str(args.spec),
        "steps": args.steps,
        "warmup": args.warmup,
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "stage": recipe.stages[-1].name,
        **{"rows" if name == "throughput" else name: rows for name, rows in tables.items()},
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
