"""How close `vlmflow plan`'s memory estimate comes to what training really allocates.

For every training stage of every tiny twin: the plan's estimate of tensor memory for one
worker (weights, gradients, AdamW state, activations of a full-length micro-batch; one
worker, so no DDP buckets) beside the peak of torch's CPU allocations measured while the
same model trains three steps on such batches (torch.profiler with profile_memory: the CPU
counterpart of torch.cuda.max_memory_allocated). Each measurement runs in a fresh process,
which also reports how much its resident memory grew (the allocator, oneDNN and thread
pools add to the tensors).

    .venv/bin/python benchmarks/plan_accuracy.py [--twins clip-tiny llava-tiny ...] [--checkpointing]

--checkpointing trains (and plans) every stage with activation_checkpointing: true.

Prints a table and writes benchmarks/results/plan_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TWINS = [
    "clip-tiny", "siglip-tiny", "blip-tiny", "blip2-tiny", "llava-tiny", "llava-1.5-tiny",
    "llava-lora-tiny", "minigpt4-tiny", "minigpt-v2-tiny", "fuyu-tiny",
]  # fmt: skip
VOCAB = 1024
STEPS = 3


def setup(twin: str, index: int, checkpointing: bool = False):
    from vlmflow.models.vision import image_spec
    from vlmflow.models.vlm import Vocab
    from vlmflow.specs import load_recipe

    recipe = load_recipe(REPO / "specs" / "recipes" / f"{twin}.yaml")
    special = recipe.tokenizer.special_tokens
    vocab = Vocab(VOCAB, {t: VOCAB - len(special) + i for i, t in enumerate(special)})
    stage = recipe.stages[index]
    if checkpointing:
        stage = stage.model_copy(update={"activation_checkpointing": True})
    return recipe, stage, vocab, image_spec(recipe.model.vision)["size"]


def estimate(twin: str, index: int, checkpointing: bool = False) -> dict:
    from vlmflow.models.estimate import footprint, trace_stage

    recipe, stage, vocab, image = setup(twin, index, checkpointing)
    trace = trace_stage(recipe.model, vocab, stage, image, stage.micro_batch_size)
    return footprint(trace, stage.precision, "ddp", workers=1, checkpointing=checkpointing).as_dict()


def measure(twin: str, index: int, checkpointing: bool = False) -> dict:
    """Runs in its own process: peak torch CPU bytes and resident growth over three steps."""
    import psutil
    import torch
    from torch.profiler import ProfilerActivity, profile

    from vlmflow.components.train.setup import build_stage_model
    from vlmflow.models.estimate import meta_batch

    recipe, stage, vocab, image = setup(twin, index, checkpointing)
    torch.manual_seed(0)
    start_rss = psutil.Process().memory_info().rss
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = build_stage_model(recipe.model, vocab, stage, None)
        shapes = meta_batch(model, vocab, stage, image, stage.micro_batch_size)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        kinds = [o.kind for o in stage.objectives]
        for _ in range(STEPS):
            batch = {k: _real(k, v, vocab, model.num_image_tokens) for k, v in shapes.items()}
            losses = model(batch, kinds)
            sum(losses.values()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del batch, losses
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    peak = max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")
    return {"tensor_peak": peak, "rss_growth": peak_rss - start_rss}


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


def stage_count(twin: str) -> int:
    from vlmflow.specs import load_recipe

    return len(load_recipe(REPO / "specs" / "recipes" / f"{twin}.yaml").stages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--twins", nargs="+", default=TWINS)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "plan_accuracy.json")
    parser.add_argument("--checkpointing", action="store_true", help="activation_checkpointing: true on every stage")
    parser.add_argument("--measure", nargs=2, metavar=("TWIN", "STAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], int(args.measure[1]), args.checkpointing)))
        return
    rows = []
    mib = float(1 << 20)
    print(f"{'twin':<17} {'stage':<12} {'plan MiB':>9} {'measured MiB':>13} {'ratio':>6} {'RSS growth MiB':>15}")
    for twin in args.twins:
        for index in range(stage_count(twin)):
            stage = setup(twin, index)[1]
            command = [sys.executable, __file__, "--measure", twin, str(index)]
            command += ["--checkpointing"] if args.checkpointing else []
            result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            planned = estimate(twin, index, args.checkpointing)
            row = {
                "twin": twin,
                "stage": stage.name,
                "plan_bytes": planned["total"],
                "plan": planned,
                "measured_tensor_peak": measured["tensor_peak"],
                "measured_rss_growth": measured["rss_growth"],
                "ratio": planned["total"] / measured["tensor_peak"],
            }
            rows.append(row)
            planned_mib, measured_mib = row["plan_bytes"] / mib, row["measured_tensor_peak"] / mib
            print(
                f"{twin:<17} {stage.name:<12} {planned_mib:>9.1f} {measured_mib:>13.1f}"
                f" {row['ratio']:>6.2f} {row['measured_rss_growth'] / mib:>15.1f}"
            )
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"\nlargest deviation of the plan from the measured tensor peak: {worst:.0%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": STEPS, "vocab": VOCAB, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
