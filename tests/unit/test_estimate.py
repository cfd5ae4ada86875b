"""Shapes-only stage estimates: meta-device parameters and FLOPs equal the real model's, the
memory footprint arithmetic, and the estimate against torch's measured CPU allocations."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.plan_accuracy import allocated_peak
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


TRACE = Trace(
    {"total": 1000, "trainable": 100},
    micro_batch=4,
    image_tokens=0,
    sequence=8,
    activations=300,
    largest_activation=40,
    flops=500,
    checkpointed_activations=90,
    block_activations=110,
    block_flops=120,
    block_params=150,
    root_params=400,  # and 4 blocks of 150: 1000 in all
)


def test_footprint_arithmetic_for_ddp_bf16_and_accumulation():
    ddp = footprint(TRACE, "fp32", "ddp", workers=2, accumulation=2)
    # weights 4 x 1000; gradients 4 x 100 (accumulating); AdamW 2 x 4 x 100; DDP buckets 4 x 100
    assert (ddp.weights, ddp.gradients, ddp.optimizer, ddp.communication) == (4000, 400, 800, 400)
    assert (ddp.activations, ddp.transient, ddp.total) == (300, 80, 5980)  # transient: 2 x 40
    # One micro-batch per step: gradients only outgrow the activations they replace in backward.
    assert footprint(TRACE, "fp32", "ddp", workers=2).gradients == 100  # 400 - 300
    assert footprint(TRACE, "fp32", "ddp", workers=1).communication == 0  # one worker: no DDP wrapper
    half = footprint(TRACE, "bf16", "ddp", workers=2, micro=2)  # half the micro-batch, half-size activations
    assert (half.activations, half.transient) == ((150 - 20) // 2 + 20, 40)
    assert FP32 == 4


def test_footprint_of_fsdp_per_block():
    fsdp = footprint(TRACE, "fp32", "fsdp", workers=4)
    # weights 4 x 1000 / 4; AdamW 2 x 4 x 100 / 4; gathered: the root unit (400) and the largest block twice
    # (running, prefetched): 4 x (400 + 2 x 150) = 2800; gradients sharded, 4 x 100 / 4 = 100 < 300 activations
    assert (fsdp.weights, fsdp.optimizer, fsdp.communication, fsdp.gradients) == (1000, 200, 2800, 0)
    assert fsdp.total == 1000 + 200 + 2800 + 300 + 80
    # Accumulating: every micro-batch's gradients are reduce-scattered, so each worker holds its shard only,
    # 4 x 100 / 4 (DDP holds them whole: 4 x 100).
    assert footprint(TRACE, "fp32", "fsdp", workers=4, accumulation=2).gradients == 100
    assert footprint(TRACE, "fp32", "ddp", workers=4, accumulation=2).gradients == 400
    # bf16: the gathered parameters are bf16 copies, 2 x 700
    assert footprint(TRACE, "bf16", "fsdp", workers=4).communication == 1400
    # One worker runs without FSDP (as the training loop does): DDP's footprint on one worker.
    assert footprint(TRACE, "fp32", "fsdp", workers=1) == footprint(TRACE, "fp32", "ddp", workers=1)


def test_footprint_with_activation_checkpointing():
    # Kept: the block inputs and what is saved outside the blocks (90); backward recomputes one block (110)
    # after the loss's transient gradients (2 x 40 = 80) are gone: 110 - 80 = 30 more. 90 + 30 = 120.
    on = footprint(TRACE, "fp32", "ddp", workers=1, checkpointing=True)
    assert (on.activations, on.transient) == (120, 80)
    # Fewer activations for backward to free: the gradients (4 x 100) now outgrow them by 400 - 120 = 280.
    assert on.gradients == 280 and on.total == 4000 + 280 + 800 + 0 + 120 + 80
    # A recomputation smaller than the transient adds nothing: 90 kept only.
    small = Trace(**{**TRACE.as_dict(), "block_activations": 60})
    assert footprint(small, "fp32", "ddp", workers=1, checkpointing=True).activations == 90
    # Half the micro-batch: everything halves, 45 kept + (55 recomputed - 2 x 20 transient) = 60.
    assert footprint(TRACE, "fp32", "ddp", workers=1, micro=2, checkpointing=True).activations == 60
    # The recomputation repeats the blocks' forward FLOPs.
    assert (TRACE.step_flops(False), TRACE.step_flops(True)) == (500, 620)


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

    measured = allocated_peak(train)
    assert 0.75 <= planned / measured <= 1.25, (planned, measured)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_with_and_without_checkpointing_against_the_measured_step(checkpointing):
    """The default recipe's align stage (everything trains): one forward and backward of a full-length
    micro-batch of 16 on a built model, measured from zero (weights and gradients of an earlier step
    excluded), against the estimate's activations and transient gradients."""
    recipe, spec, image = tiny("shapes-tiny", 0)
    spec = spec.model_copy(update={"activation_checkpointing": checkpointing})
    trace = trace_stage(recipe.model, VOCAB, spec, image, spec.micro_batch_size)
    planned = footprint(trace, "fp32", "ddp", workers=1, checkpointing=checkpointing)
    torch.manual_seed(0)
    model = build_stage_model(recipe.model, VOCAB, spec, None)
    batch = real_batch(model, spec, image, spec.micro_batch_size)
    sum(model(batch, ["lm"]).values()).backward()  # the gradients exist before the measured step
    measured = allocated_peak(lambda: sum(model(batch, ["lm"]).values()).backward())
    estimate = planned.activations + planned.transient
    print(f"checkpointing {checkpointing}: estimate {estimate / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB")
    assert 0.8 <= estimate / measured <= 1.25, (estimate, measured)
    if checkpointing:  # five blocks keep their inputs only, the logits (5 MiB) stay: a quarter of it all is kept
        assert trace.checkpointed_activations < trace.activations / 3


def test_trace_of_the_default_model_by_hand():
    """The default recipe's model with VOCAB (512): what FSDP gathers and checkpointing keeps."""
    recipe, spec, image = tiny("shapes-tiny", 0)
    trace = trace_stage(recipe.model, VOCAB, spec, image, 16)
    # The largest block, a Llama decoder layer of width 64: q, k, v, o 4 x 64 x 64 = 16384, gate, up,
    # down 3 x 64 x 128 = 24576, two RMSNorms 2 x 64: 41088 (a ViT layer, width 64 and MLP 128, with biases and
    # LayerNorms: 4 x (64 x 64 + 64) + 64 x 128 + 128 + 128 x 64 + 64 + 2 x 128 = 33472).
    assert trace.block_params == 41088
    # The root unit: LM embeddings and head 2 x 512 x 64 + final norm 64 = 65600; ViT patch conv 3 x 8 x 8 x 64
    # = 12288, class token 64, positions 65 x 64 = 4160, two LayerNorms 2 x 128: 16768; MLP connector
    # 2 x (64 x 64 + 64) = 8320. 65600 + 16768 + 8320 = 90688.
    assert trace.root_params == 90688
    # The largest activation: the shifted logits, 16 x 160 x 512 fp32 = 5242880 bytes.
    assert trace.largest_activation == 16 * 160 * 512 * 4
    # FSDP on 2 workers gathers 4 x (90688 + 2 x 41088) = 691456 bytes of parameters.
    assert footprint(trace, "fp32", "fsdp", workers=2).communication == 691456
    # Checkpointing keeps at least every block's input: 3 ViT layers 16 x 65 x 64 and 2 decoder layers
    # 16 x 161 x 64 fp32, and the logits.
    assert trace.checkpointed_activations >= 4 * (3 * 16 * 65 * 64 + 2 * 16 * 161 * 64) + 16 * 160 * 512 * 4
    assert trace.checkpointed_activations < trace.activations / 3
    # The recomputation repeats the five blocks' forward matmuls (the FLOP counter has no formula for the fused
    # CPU attention kernel), 2 FLOPs per multiply-add: 3 ViT layers over 65 tokens with 4 x 64 x 64 + 2 x 64 x 128
    # = 32768 weights and 2 decoder layers over 161 tokens with 40960, 16 samples: 626524160.
    assert trace.block_flops == 16 * 2 * (3 * 65 * 32768 + 2 * 161 * 40960) == 626524160


def test_plan_fixes_offer_checkpointing_and_only_what_the_device_runs():
    from vlmflow.components.train.plan import fixes, memory_need

    recipe, spec, image = tiny("shapes-tiny", 0)  # 2 DDP workers, batch 32 in micro-batches of 16: no accumulation
    trace = trace_stage(recipe.model, VOCAB, spec, image, spec.micro_batch_size)
    mib = 1 / 1024
    cpu = {"kind": "cpu", "memory_per_worker_gb": 40 * mib, "runtime_overhead_gb": 0.0}
    plain = memory_need(trace, spec, recipe, cpu)["total_gb"]
    # 4 x 273280 parameters (all trainable) = 1093120 bytes of weights, as much again in DDP buckets, twice that in
    # AdamW state; activations 44556320 + transient 2 x 5242880: 59414560 bytes = 56.7 MiB
    assert plain == pytest.approx((4 * 1093120 + trace.activations + 2 * 5242880) / 2**30)
    assert 55 * mib < plain < 58 * mib
    found = {f["change"]: f for f in fixes(recipe, spec, VOCAB, image, trace, cpu)}
    on = found["activation_checkpointing: true"]
    # Weights, buckets and AdamW state 4 x 1093120; kept: the block inputs and the rest (11.0 MiB); the recomputed
    # decoder layer (10.75 MiB) less the logits' transient it outlasts (2 x 5242880 = 10 MiB); the transient: 25.9 MiB.
    recomputed = trace.block_activations - 2 * 5242880
    assert 0 < recomputed < 1 * 2**20
    expected = 4 * 1093120 + trace.checkpointed_activations + recomputed + 2 * 5242880
    assert on["need_gb"] == pytest.approx(expected / 2**30) and on["fits"] and 25 * mib < on["need_gb"] < 27 * mib
    assert "precision: bf16" not in found  # a CPU worker: bf16 is not offered
    assert all(f["need_gb"] <= 40 * mib for f in found.values() if f["fits"])
    gpu = {**cpu, "kind": "gpu"}
    found = {f["change"]: f for f in fixes(recipe, spec, VOCAB, image, trace, gpu)}
    assert "precision: bf16" in found and "activation_checkpointing: true" in found
    # bf16 halves the activations but the fp32 logits: (44556320 - 5242880) / 2 + 5242880
    assert found["precision: bf16"]["need_gb"] == pytest.approx(
        (4 * 1093120 + (trace.activations - 5242880) / 2 + 5242880 + 2 * 5242880) / 2**30, rel=1e-6
    )
    checkpointed = spec.model_copy(update={"activation_checkpointing": True})
    assert "activation_checkpointing: true" not in {f["change"] for f in fixes(recipe, checkpointed, VOCAB, image,
                                                                               trace, cpu)}  # fmt: skip
