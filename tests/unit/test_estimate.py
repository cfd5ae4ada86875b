"""Shapes-only stage estimates: meta-device parameters and FLOPs equal the real model's, the
memory footprint arithmetic, and the estimate against torch's measured CPU allocations."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import REPO
from vlmflow.components.train.setup import build_stage_model
from vlmflow.models.estimate import FP32, Trace, footprint, meta_batch, trace_stage
from vlmflow.models.vision import image_spec
from vlmflow.models.vlm import Vocab, count_parameters
from vlmflow.specs import load_recipe

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>", "<image>", "<|system|>", "<|user|>", "<|assistant|>"]
VOCAB = Vocab(512, {t: 504 + i for i, t in enumerate(SPECIAL)})


def tiny(name: str, stage: int = 0):
    recipe = load_recipe(REPO / "specs" / "recipes" / f"{name}.yaml")
    return recipe, recipe.stages[stage], image_spec(recipe.model.vision)["size"]


def real_batch(model, stage, image: int, micro: int) -> dict:
    """A full-length batch like meta_batch's: the image tokens after <bos>, text everywhere else."""
    shapes = meta_batch(model, VOCAB, stage, image, micro)
    n = model.num_image_tokens
    ids = torch.randint(0, 500, shapes["input_ids"].shape)
    labels = ids.clone()
    ids[:, 1 : 1 + n], labels[:, : 1 + n] = VOCAB.image_id, -100
    text = torch.randint(0, 500, shapes["text_ids"].shape)
    return {
        "pixels": torch.randn(shapes["pixels"].shape),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "text_ids": text,
        "text_mask": torch.ones_like(text),
    }


@pytest.mark.parametrize(("name", "stage"), [("llava-1.5-tiny", 0), ("blip-tiny", 0), ("llava-lora-tiny", 1)])
def test_meta_trace_counts_the_real_models_parameters_and_flops(name, stage):
    recipe, spec, image = tiny(name, stage)
    trace = trace_stage(recipe.model, VOCAB, spec, image, 4)
    torch.manual_seed(0)
    model = build_stage_model(recipe.model, VOCAB, spec, None)
    assert trace.params == count_parameters(model)
    kinds = [o.kind for o in spec.objectives]
    with FlopCounterMode(display=False) as flops:
        sum(model(real_batch(model, spec, image, 4), kinds).values()).backward()
    # Equal where the real run uses the fused attention kernel the trace assumes; BLIP's text
    # encoder attends with a padding mask, which CPU runs through the unfused path instead. blip-tiny's
    # pretrain adds edited ITM negatives: the trace takes them all batch-wide, some are a token shorter;
    # its ITM head has two layers whose self-attention runs with the padding mask too (one layer: 5.5% over).
    assert trace.flops == pytest.approx(flops.get_total_flops(), rel=0.09)
    assert trace.flops >= flops.get_total_flops()  # the trace is the upper bound
    assert trace.sequence == 1 + model.num_image_tokens + spec.max_text_tokens


def test_footprint_arithmetic_for_ddp_fsdp_bf16_and_accumulation():
    params = {"total": 1000, "trainable": 100}
    trace = Trace(params, micro_batch=4, image_tokens=0, sequence=8, activations=300, largest_activation=40, flops=0)
    ddp = footprint(trace, "fp32", "ddp", workers=2, accumulation=2)
    assert (ddp.weights, ddp.gradients, ddp.optimizer, ddp.communication) == (4000, 400, 800, 400)
    assert (ddp.activations, ddp.transient, ddp.total) == (300, 80, 5980)
    # One micro-batch per step: gradients only outgrow the activations they replace in backward.
    assert footprint(trace, "fp32", "ddp", workers=2).gradients == 100
    assert footprint(trace, "fp32", "ddp", workers=1).communication == 0  # one worker: no DDP wrapper
    fsdp = footprint(trace, "fp32", "fsdp", workers=4, accumulation=2)
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer, fsdp.communication) == (1000, 400, 200, 4000)
    half = footprint(trace, "bf16", "ddp", workers=2, micro=2)  # half the micro-batch, half-size activations
    assert (half.activations, half.transient) == ((150 - 20) // 2 + 20, 40)
    assert FP32 == 4


def peak_allocated(run: Callable[[], object]) -> int:
    """The peak of torch's CPU allocations while `run` runs, counted from zero when it starts (the
    profiler's memory events: the CPU counterpart of torch.cuda.max_memory_allocated)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    trace_file = REPO / ".pytest_cache" / f"estimate-trace-{os.getpid()}.json"
    trace_file.parent.mkdir(exist_ok=True)
    prof.export_chrome_trace(str(trace_file))
    events = json.loads(trace_file.read_text())["traceEvents"]
    trace_file.unlink()
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


def test_estimate_is_within_a_quarter_of_the_measured_cpu_peak():
    """torch's own allocation counter over three AdamW steps, the model built inside."""
    recipe, spec, image = tiny("llava-1.5-tiny", 1)
    trace = trace_stage(recipe.model, VOCAB, spec, image, spec.micro_batch_size)
    planned = footprint(trace, "fp32", "ddp", workers=1).total

    def train() -> None:
        torch.manual_seed(0)
        model = build_stage_model(recipe.model, VOCAB, spec, None)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        for _ in range(3):
            sum(model(real_batch(model, spec, image, spec.micro_batch_size), ["lm"]).values()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    measured = peak_allocated(train)
    assert 0.75 <= planned / measured <= 1.25, (planned, measured)
