"""How close `vlmflow plan`'s memory estimate comes to what training really allocates.

For every training stage of every tiny twin: the plan's estimate of tensor memory for one
worker (weights, gradients, AdamW state, FSDP's gathered parameters, activations of a
full-length micro-batch) beside the peak of torch's CPU allocations measured while the same
model trains three steps on such batches (torch.profiler with profile_memory: the CPU
counterpart of torch.cuda.max_memory_allocated), AdamW's groups built as the training loop
builds them. Each measurement runs in a fresh process, which also reports how much its
resident memory grew (the allocator, oneDNN and thread pools add to the tensors).

    .venv/bin/python benchmarks/plan_accuracy.py [--twins clip-tiny llava-tiny ...]
        [--strategy ddp fsdp] [--workers 2] [--checkpointing [off|on|both]] [--micro N]

ddp rows train on one worker (so no DDP buckets); fsdp rows shard the model with
`sharding.shard_model` across --workers gloo processes (two by default), each rank with a
micro-batch of its own, and show the largest rank's peak. --checkpointing (the flag alone: on)
trains and plans every stage with activation_checkpointing: true; both gives a row without and
one with. --micro replaces the stages' micro_batch_size (a small one leaves the weights, AdamW
state and gathered parameters a larger share of the peak than the activations).

Prints a table and writes benchmarks/results/plan_accuracy.json.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import resource
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TWINS = [
    "clip-tiny", "siglip-tiny", "blip-tiny", "blip2-tiny", "llava-tiny", "llava-1.5-tiny",
    "llava-lora-tiny", "minigpt4-tiny", "minigpt-v2-tiny", "fuyu-tiny",
]  # fmt: skip
VOCAB = 1024
STEPS = 3
TRAIN_MODULES = [
    "torch.profiler", "vlmflow.components.train.loop", "vlmflow.components.train.setup",
    "vlmflow.components.train.sharding", "vlmflow.models.estimate",
]  # fmt: skip
CHECKPOINTING = {"off": [False], "on": [True], "both": [False, True]}


@dataclass(frozen=True)
class Layout:
    """One row's training stage and how it trains."""

    twin: str
    index: int  # the stage's position in the recipe
    strategy: str = "ddp"
    workers: int = 1
    checkpointing: bool = False
    micro: int | None = None  # None: the stage's micro_batch_size

    @property
    def name(self) -> str:
        return f"{self.strategy} x{self.workers}" + (" +ckpt" if self.checkpointing else "")


def setup(layout: Layout):
    from vlmflow.models.vision import image_spec
    from vlmflow.models.vlm import Vocab
    from vlmflow.specs import load_recipe

    recipe = load_recipe(REPO / "specs" / "recipes" / f"{layout.twin}.yaml")
    special = recipe.tokenizer.special_tokens
    vocab = Vocab(VOCAB, {t: VOCAB - len(special) + i for i, t in enumerate(special)})
    stage = recipe.stages[layout.index]
    update = {"activation_checkpointing": layout.checkpointing}
    stage = stage.model_copy(update=update | ({"micro_batch_size": layout.micro} if layout.micro else {}))
    return recipe, stage, vocab, image_spec(recipe.model.vision)["size"]


def estimate(layout: Layout) -> dict:
    from vlmflow.models.estimate import footprint, trace_stage

    recipe, stage, vocab, image = setup(layout)
    trace = trace_stage(recipe.model, vocab, stage, image, stage.micro_batch_size)
    return footprint(
        trace, stage.precision, layout.strategy, layout.workers, checkpointing=layout.checkpointing
    ).as_dict()


def measure(layout: Layout) -> dict:
    """Peak torch CPU bytes and resident growth over three steps, in this process, the model built
    inside the measurement. fsdp shards it across the process group this process has joined."""
    import psutil

    for module in TRAIN_MODULES:  # loaded before the resident baseline: the growth is the training's
        importlib.import_module(module)
    setup(layout)
    start_rss = psutil.Process().memory_info().rss
    peak = allocated_peak(lambda: train(layout))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tensor_peak": peak, "rss_growth": peak_rss - start_rss}


def train(layout: Layout) -> None:
    """Build the stage's model (sharded under fsdp) and train it three steps on full-length micro-batches,
    AdamW's groups as the training loop builds them."""
    import torch

    from vlmflow.components.train.loop import param_groups
    from vlmflow.components.train.setup import build_stage_model
    from vlmflow.components.train.sharding import shard_model
    from vlmflow.models.estimate import meta_batch

    recipe, stage, vocab, image = setup(layout)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = build_stage_model(recipe.model, vocab, stage, None)
    shapes = meta_batch(model, vocab, stage, image, stage.micro_batch_size)
    if layout.strategy == "fsdp":
        model = shard_model(model, "cpu", stage.precision)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(params, stage.optimizer.weight_decay), lr=1e-4)
    kinds = [o.kind for o in stage.objectives]
    for _ in range(STEPS):
        batch = {k: _real(k, v, vocab, model.num_image_tokens) for k, v in shapes.items()}
        sum(model(batch, kinds).values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del batch  # before the next one is drawn


def allocated_peak(run: Callable[[], object]) -> int:
    """The peak of torch's CPU allocations while `run` runs (torch.profiler's memory events), above the
    total when the first came: torch counts those bytes process-wide and only while a profiler records,
    so a tensor allocated under an earlier profiler and freed after it stopped stays counted. Garbage
    is collected first: an earlier run's freed mid-measurement would lower the count by its size."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    memory = [e["args"] for e in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])]
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(m["Total Allocated"] for m in memory) - start


def _real(key: str, shape, vocab, image_tokens: int):
    """A full-length batch: the image tokens after <bos>, every text position a learned token."""
    import torch

    if key == "pixels":
        return torch.randn(shape.shape)
    if key in ("attention_mask", "text_mask"):
        return torch.ones(shape.shape, dtype=torch.long)
    ids = torch.randint(0, vocab.size - 8, shape.shape)
    if key in ("input_ids", "labels"):
        ids[:, 1 : 1 + image_tokens] = vocab.image_id if key == "input_ids" else -100
    return ids


def measure_rank(rank: int, port: int, layout: Layout, out: str) -> None:
    """One of the layout's gloo processes: `measure`, written to out/rank{rank}.json."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=layout.workers)
    try:
        Path(out, f"rank{rank}.json").write_text(json.dumps(measure(layout)))
    finally:
        dist.destroy_process_group()


def measure_ranks(layout: Layout) -> list[dict]:
    """`measure` on every worker of a sharded layout (gloo processes on this machine), by rank."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(measure_rank, args=(port, layout, out), nprocs=layout.workers, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(layout.workers)]


def stage_count(twin: str) -> int:
    from vlmflow.specs import load_recipe

    return len(load_recipe(REPO / "specs" / "recipes" / f"{twin}.yaml").stages)


def row(layout: Layout) -> dict:
    """Measured in a fresh process, planned here: one row of the table."""
    command = [sys.executable, __file__, "--measure", json.dumps(asdict(layout))]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        sys.exit(f"measuring {layout} failed:\n{result.stderr[-4000:]}")
    ranks = json.loads(result.stdout.strip().splitlines()[-1])
    planned = estimate(layout)
    peak = max(r["tensor_peak"] for r in ranks)
    return {
        **asdict(layout),
        "stage": setup(layout)[1].name,
        "plan_bytes": planned["total"],
        "plan": planned,
        "measured_tensor_peak": peak,
        "measured_tensor_peak_per_rank": [r["tensor_peak"] for r in ranks],
        "measured_rss_growth": max(r["rss_growth"] for r in ranks),
        "ratio": planned["total"] / peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--twins", nargs="+", default=TWINS)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "plan_accuracy.json")
    parser.add_argument("--strategy", nargs="+", choices=["ddp", "fsdp"], default=["ddp"])
    parser.add_argument("--workers", type=int, default=2, help="gloo processes of the fsdp rows (ddp rows: one)")
    parser.add_argument(
        "--checkpointing", nargs="?", choices=list(CHECKPOINTING), const="on", default="off",
        help="activation_checkpointing on every stage: off, on (the flag alone) or both",
    )  # fmt: skip
    parser.add_argument("--micro", type=int, help="micro-batch per worker instead of the stages' micro_batch_size")
    parser.add_argument("--measure", metavar="LAYOUT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        layout = Layout(**json.loads(args.measure))
        print(json.dumps(measure_ranks(layout) if layout.workers > 1 else [measure(layout)]))
        return
    rows = []
    mib = float(1 << 20)
    print(
        f"{'twin':<15} {'stage':<16} {'layout':<12} {'plan MiB':>9} {'measured MiB':>13} {'ratio':>6} {'RSS +MiB':>9}"
    )
    for twin in args.twins:
        for index in range(stage_count(twin)):
            for strategy in args.strategy:
                for checkpointing in CHECKPOINTING[args.checkpointing]:
                    workers = args.workers if strategy == "fsdp" else 1
                    layout = Layout(twin, index, strategy, workers, checkpointing, args.micro)
                    rows.append(found := row(layout))
                    print(
                        f"{twin:<15} {found['stage']:<16} {layout.name:<12} {found['plan_bytes'] / mib:>9.2f}"
                        f" {found['measured_tensor_peak'] / mib:>13.2f} {found['ratio']:>6.2f}"
                        f" {found['measured_rss_growth'] / mib:>9.1f}"
                    )
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"\nlargest deviation of the plan from the measured tensor peak: {worst:.0%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": STEPS, "vocab": VOCAB, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
