"""Training at model scale: a ~1B-parameter LLaVA-shaped VLM (built from configs, random weights)
trained with the project's FSDP path (bf16, activation checkpointing) for a fixed number of steps
on synthetic batches, then the evaluate stage's worker captioning images on the same device.

One process per GPU (`torch.multiprocessing`, spawned, NCCL), or 2 forked gloo processes on a CPU. Each
process builds the model as a training stage does (`build_stage_model`: freezing and checkpoint
wrappers), shards it with `shard_model` (FSDP2 on every transformer block, also with one GPU), sets
up AdamW as the training loop does (`param_groups`) and runs forward (bf16 autocast), backward,
`clip_gradients` and the optimizer step on one full-length batch per step: `<bos>`, the image tokens,
then random text ids, every text position learned. The first --warmup steps are not timed.

Figures: step time, tokens/s (all processes), MFU (model FLOPs per step, as `vlmflow plan` traces them
without the recomputation, / step time / peak bf16 FLOP/s of all GPUs; HFU counts the recomputed
forward too), and the peak tensor memory per process during the steps (`torch.cuda.max_memory_allocated`;
on a CPU, torch's CPU allocations as `plan_accuracy.py` profiles them) beside `vlmflow plan`'s
estimate (`footprint`) for the same stage. The peak FLOP/s comes from a table of known GPUs by
`torch.cuda.get_device_properties(0).name` (--peak-tflops overrides it; on a CPU: an fp32 matmul
measured on one thread per process). Captioning: `EvalWorker.generate` (greedy, left-padded batches,
KV cache, fp32 as the evaluate stage runs it) on a model folder written from the same config, images/s
after one warm-up batch.

    .venv/bin/python benchmarks/gpu.py [--tiny] [--gpus N] [--steps 30] [--warmup 5] [--micro-batch 16]
        [--text-tokens 447] [--precision bf16] [--peak-tflops T] [--caption-images 256]
        [--caption-batch 32] [--max-new-tokens 16] [--out benchmarks/results/gpu.json]

--tiny: a small config, a few steps (runs on a CPU in well under a minute).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlmflow.components.evaluate.generate import Decoding
from vlmflow.components.evaluate.worker import EvalWorker
from vlmflow.components.sources.synthetic import make_row
from vlmflow.components.tokenize import train_bpe
from vlmflow.components.train.loop import param_groups
from vlmflow.components.train.setup import build_stage_model, model_config, write_model_folder
from vlmflow.components.train.sharding import clip_gradients, gradient_sync, shard_model
from vlmflow.models.estimate import footprint, trace_stage
from vlmflow.models.vision import image_spec
from vlmflow.models.vlm import VLM, Vocab, count_parameters
from vlmflow.plan import CPU_WORKER_RUNTIME, GIB, GPU_WORKER_RUNTIME, count_text, cpu_tflops
from vlmflow.prompts import CAPTION_PROMPT
from vlmflow.specs.data import SyntheticShapesSource
from vlmflow.specs.model import ModelSpec
from vlmflow.specs.recipe import BpeTokenizer
from vlmflow.specs.train import TrainStageSpec

REPO = Path(__file__).resolve().parents[1]
IGNORE = -100
STEPS_RANGE = "vlmflow.bench.steps"  # the profiler's range around the training steps (CPU)
CPU_EVENTS = torch.profiler.ProfilerActivity.CPU
# LLaVA-1.5's shape at ~1B: a CLIP ViT-L/14 tower at 336 px (576 image tokens), the 2-layer MLP
# connector, a Llama decoder of width 2048 (TinyLlama's MLP width, 16 heads of 128) and 12 layers.
CONFIGS = {
    "1b": {
        "vision": {"kind": "tiny-vit", "family": "clip", "image_size": 336, "patch_size": 14, "hidden_size": 1024,
                   "layers": 24, "heads": 16, "intermediate_size": 4096},
        "connector": {"kind": "mlp", "layers": 2},
        "language": {"kind": "tiny-llama", "hidden_size": 2048, "layers": 12, "heads": 16,
                     "intermediate_size": 5632, "max_positions": 2048},
    },
    "tiny": {
        "vision": {"kind": "tiny-vit", "family": "clip", "image_size": 32, "patch_size": 8, "hidden_size": 32,
                   "layers": 2, "heads": 2, "intermediate_size": 64},
        "connector": {"kind": "mlp", "layers": 2},
        "language": {"kind": "tiny-llama", "hidden_size": 64, "layers": 2, "heads": 4, "intermediate_size": 128},
    },
}  # fmt: skip
# Per config: vocabulary, micro-batch, text tokens (1 + image tokens + text = 1024 for 1b), steps, warm-up,
# images and batch for captioning.
PRESETS = {
    "1b": {"vocab": 32000, "micro_batch": 16, "text_tokens": 447, "steps": 30, "warmup": 5,
           "caption_images": 256, "caption_batch": 32},
    "tiny": {"vocab": 512, "micro_batch": 2, "text_tokens": 23, "steps": 4, "warmup": 1,
             "caption_images": 8, "caption_batch": 4},
}  # fmt: skip
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a part of the device name; first match wins.
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0),
]  # fmt: skip


def model_spec(config: str) -> ModelSpec:
    return ModelSpec.model_validate(CONFIGS[config])


def stage_spec(args: argparse.Namespace, world: int) -> TrainStageSpec:
    """LLaVA's second stage: connector and language model trained, the vision tower frozen."""
    return TrainStageSpec.model_validate(
        {
            "name": "bench",
            "trainable": ["connector", "language"],
            "objectives": [{"kind": "lm"}],
            "optimizer": {"lr": 2e-5, "weight_decay": 0.01},
            "batch_size": args.micro_batch * world,
            "micro_batch_size": args.micro_batch,
            "max_text_tokens": args.text_tokens,
            "precision": args.precision,
            "activation_checkpointing": True,
        }
    )


def special_tokens(tokenizer) -> dict[str, int]:
    return {t: tokenizer.token_to_id(t) for t in BpeTokenizer(kind="bpe").special_tokens}


def synthetic_batch(vocab: Vocab, image_tokens: int, image_size: int, micro: int, text: int, device) -> dict:
    """A full-length batch: `<bos>`, the image tokens, then `text` random text ids, every one learned."""
    first_text = max(vocab.special.values()) + 1
    ids = torch.randint(first_text, vocab.size, (micro, 1 + image_tokens + text), device=device)
    ids[:, 0] = vocab.special["<bos>"]
    ids[:, 1 : 1 + image_tokens] = vocab.image_id
    labels = ids.clone()
    labels[:, : 1 + image_tokens] = IGNORE
    return {
        "pixels": torch.randn(micro, 3, image_size, image_size, device=device),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
    }


def train_rank(rank: int, world: int, job: dict, folder: str, port: int) -> None:
    """One training process: build, shard, train `job['steps']` steps; writes rank{N}.json into `folder`."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    args = argparse.Namespace(**job["args"])
    spec, stage = model_spec(job["config"]), stage_spec(args, world)
    vocab = Vocab(job["vocab_size"], job["special"])
    profiler = None if cuda else torch.profiler.profile(activities=[CPU_EVENTS], profile_memory=True)
    with profiler or contextlib.nullcontext():
        torch.manual_seed(0)  # the same initial weights in every process
        with device:
            model = build_stage_model(spec, vocab, stage, None)
        counts = count_parameters(model)
        shard_model(model, device.type, stage.precision)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(param_groups(params, stage.optimizer.weight_decay), lr=stage.optimizer.lr)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if stage.precision == "bf16" else None
        size = image_spec(spec.vision)["size"]
        batch = synthetic_batch(vocab, model.num_image_tokens, size, args.micro_batch, args.text_tokens, device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times, losses = [], []
        with torch.profiler.record_function(STEPS_RANGE):
            for _ in range(args.warmup + args.steps):
                started = time.perf_counter()
                with gradient_sync(model, last=True):
                    with autocast or contextlib.nullcontext():
                        loss = model(batch, ["lm"])["lm"]
                    loss.backward()
                clip_gradients(params, stage.optimizer.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))  # waits for the step's kernels
                times.append(time.perf_counter() - started)
    if not all(math.isfinite(value) for value in losses):
        raise FloatingPointError(f"rank {rank}: the loss is not finite: {losses}")
    peak = torch.cuda.max_memory_allocated(device) if cuda else cpu_tensor_peak(profiler)
    result = {
        "rank": rank,
        "step_seconds": times[args.warmup :],
        "warmup_seconds": times[: args.warmup],
        "losses": losses,
        "peak_bytes": peak,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "parameters": counts,
    }
    Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def cpu_tensor_peak(profiler: torch.profiler.profile) -> int:
    """The most bytes torch's CPU allocator held during the steps (profiling began before the model was
    built, so its running total is every tensor of the process)."""
    with tempfile.TemporaryDirectory() as tmp:
        profiler.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(tmp, "trace.json").read_text())["traceEvents"]
    span = next(e for e in events if e.get("name") == STEPS_RANGE and e.get("ph") == "X")
    start, end = span["ts"], span["ts"] + span["dur"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]" and start <= e["ts"] <= end)


def peak_tflops(override: float | None) -> tuple[float, str]:
    """(peak FLOP/s of one process's device in TFLOP/s, where it comes from)."""
    if override:
        return override, "--peak-tflops"
    if not torch.cuda.is_available():
        return cpu_tflops(1), "measured: fp32 matmul, 1 thread"
    name = torch.cuda.get_device_properties(0).name
    known = known_peak(name)
    if known is None:
        raise SystemExit(f"no known bf16 peak for {name!r}: pass --peak-tflops")
    return known[1], f"table: {known[0]} (dense bf16)"


def known_peak(name: str) -> tuple[str, float] | None:
    """(the table's entry, its dense bf16 TFLOP/s) for a CUDA device name; None: not in the table."""
    return next(((part, value) for part, value in PEAK_TFLOPS if part in name), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(args: argparse.Namespace, config: str, vocab: Vocab, world: int) -> dict:
    """Spawn the training processes; their results and the plan's estimate for the same stage."""
    job = {"config": config, "args": vars(args), "vocab_size": vocab.size, "special": vocab.special}
    with tempfile.TemporaryDirectory() as folder:
        # CUDA needs fresh processes; on a CPU, forked ones start in a moment instead of importing torch again.
        method = "spawn" if torch.cuda.is_available() else "fork"
        mp.start_processes(train_rank, (world, job, folder, free_port()), world, join=True, start_method=method)
        ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world)]
    spec, stage = model_spec(config), stage_spec(args, world)
    trace = trace_stage(spec, vocab, stage, image_spec(spec.vision)["size"], args.micro_batch)
    plan = footprint(trace, args.precision, "fsdp", world, args.micro_batch, 1, checkpointing=True).as_dict()
    step = max(statistics.mean(r["step_seconds"]) for r in ranks)  # every step waits for the slowest process
    tflops, source = peak_tflops(args.peak_tflops)
    model_flops, hardware_flops = trace.flops * world, trace.step_flops(True) * world
    tokens = trace.sequence * args.micro_batch * world  # positions into the language model, image tokens included
    cuda = torch.cuda.is_available()
    return {
        "parameters": ranks[0]["parameters"],
        "processes": world,
        "micro_batch": args.micro_batch,
        "sequence": trace.sequence,
        "image_tokens": trace.image_tokens,
        "steps": args.steps,
        "warmup": args.warmup,
        "step_seconds": step,
        "step_seconds_median": statistics.median(s for r in ranks for s in r["step_seconds"]),
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / step,
        "model_flops_per_step": model_flops,
        "hardware_flops_per_step": hardware_flops,
        "peak_tflops_per_device": tflops,
        "peak_source": source,
        "mfu": model_flops / step / (tflops * 1e12 * world),
        "hfu": hardware_flops / step / (tflops * 1e12 * world),
        "losses_rank0": ranks[0]["losses"],
        "memory": {
            "measured": "torch.cuda.max_memory_allocated" if cuda else "torch CPU allocations (profiler)",
            "peak_bytes_per_rank": [r["peak_bytes"] for r in ranks],
            "peak_rss_bytes_per_rank": [r["peak_rss_bytes"] for r in ranks],
            "plan_bytes": plan["total"],
            "plan": plan,
            "plan_with_runtime_gb": (plan["total"] + (GPU_WORKER_RUNTIME if cuda else CPU_WORKER_RUNTIME)) / GIB,
            "plan_over_measured": plan["total"] / max(r["peak_bytes"] for r in ranks),
        },
    }


def caption(args: argparse.Namespace, config: str, vocab: Vocab, tokenizer: Path, workdir: Path) -> dict:
    """images/s of the evaluate stage's worker captioning `args.caption_images` images on this device."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = model_spec(config)
    torch.manual_seed(0)
    with torch.device(device):
        model = VLM(spec, vocab, load_weights=False)
    settings = model_config(spec, vocab, image_spec(spec.vision), model.num_image_tokens)
    write_model_folder(workdir / "model", model.state_dict(), settings, tokenizer)
    del model
    threads = torch.get_num_threads() if device == "cuda" else 1
    worker = EvalWorker(str(workdir / "model"), threads, device)
    source = SyntheticShapesSource(kind="synthetic-shapes", image_size=64)
    images = [make_row(source, 7, i).image for i in range(args.caption_images)]
    decoding = Decoding(max_new_tokens=args.max_new_tokens).__dict__
    batches = [images[s : s + args.caption_batch] for s in range(0, len(images), args.caption_batch)]

    def run(chunk: list[bytes]) -> list[str]:
        return worker.generate({"images": chunk, "prompts": [CAPTION_PROMPT] * len(chunk), "decoding": decoding})

    run(batches[0])  # warm-up: kernels, allocator
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    captions = [text for chunk in batches for text in run(chunk)]
    seconds = time.perf_counter() - started
    return {
        "device": device,
        "images": len(captions),
        "batch_size": args.caption_batch,
        "max_new_tokens": args.max_new_tokens,
        "decoding": "greedy",
        "seconds": seconds,
        "images_per_s": len(captions) / seconds,
    }


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).name
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small config and a few steps (CPU: gloo)")
    parser.add_argument("--gpus", type=int, help="processes: default every visible GPU (2 on a CPU)")
    parser.add_argument("--steps", type=int, help="timed steps (1b: 30, tiny: 4)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (1b: 5, tiny: 1)")
    parser.add_argument("--micro-batch", type=int, help="samples per process per step (1b: 16, tiny: 2)")
    parser.add_argument("--text-tokens", type=int, help="text tokens per sample after the image (1b: 447)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s of one device (default: table)")
    parser.add_argument("--caption-images", type=int, help="images captioned (1b: 256, tiny: 8)")
    parser.add_argument("--caption-batch", type=int, help="images per generate call (1b: 32, tiny: 4)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu.json")
    args = parser.parse_args(argv)
    config = "tiny" if args.tiny else "1b"
    preset = PRESETS[config]
    for key, value in preset.items():
        if key != "vocab" and getattr(args, key) is None:
            setattr(args, key, value)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no GPU here: the 1B config needs one (--tiny runs a small config on the CPU)")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else None
    world = args.gpus or visible or 2
    if visible is not None and world > visible:
        raise SystemExit(f"--gpus {world}: only {visible} GPUs are visible")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        source = SyntheticShapesSource(kind="synthetic-shapes", count=64)
        texts = [make_row(source, 1, i).captions[0] for i in range(64)]
        tokenizer = train_bpe(texts, BpeTokenizer(kind="bpe", vocab_size=400))
        tokenizer.save(f"{tmp}/tokenizer.json")
        # The model's vocabulary is the LM's size; ids past the tokenizer's decode to nothing.
        vocab = Vocab(preset["vocab"], special_tokens(tokenizer))
        training = train(args, config, vocab, world)
        training["seconds"] = time.perf_counter() - started  # start-up, model build, warm-up and steps
        captioning = caption(args, config, vocab, Path(tmp) / "tokenizer.json", Path(tmp))
        captioning["seconds_all"] = time.perf_counter() - started - training["seconds"]  # model folder included
    result = {
        "config": config,
        "model": CONFIGS[config],
        "device": device_name(),
        "precision": args.precision,
        "train": training,
        "caption": captioning,
        "seconds": time.perf_counter() - started,
        "torch": torch.__version__,
    }
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


def print_table(result: dict) -> None:
    train_, memory, mib = result["train"], result["train"]["memory"], float(1 << 20)
    params = train_["parameters"]
    print(
        f"{result['config']} config, {count_text(params['total'])} parameters ({count_text(params['trainable'])} "
        f"trainable), {train_['processes']} x {result['device']}, {result['precision']}, FSDP + activation "
        f"checkpointing, micro-batch {train_['micro_batch']} x {train_['sequence']} tokens "
        f"({train_['image_tokens']} image)"
    )
    rows = [
        ("step time (mean of timed steps, slowest process)", f"{train_['step_seconds']:.4f} s"),
        ("tokens/s (all processes)", f"{train_['tokens_per_s']:.1f}"),
        ("model FLOPs per step", f"{train_['model_flops_per_step']:.4g}"),
        ("peak per device", f"{train_['peak_tflops_per_device']:.4g} TFLOP/s ({train_['peak_source']})"),
        ("MFU", f"{train_['mfu']:.1%}"),
        ("HFU (recomputation counted)", f"{train_['hfu']:.1%}"),
        ("peak tensor memory, busiest process", f"{max(memory['peak_bytes_per_rank']) / mib:.1f} MiB"),
        ("plan's estimate (footprint)", f"{memory['plan_bytes'] / mib:.1f} MiB ({memory['plan_over_measured']:.2f}x)"),
        ("captioning (EvalWorker.generate, greedy)", f"{result['caption']['images_per_s']:.1f} images/s"),
        ("wall clock", f"{result['seconds']:.1f} s"),
    ]
    print("| what | value |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
