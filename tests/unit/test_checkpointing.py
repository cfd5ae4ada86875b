"""activation_checkpointing: true on a stage wraps every transformer block (sharding.transformer_blocks:
vision layers, LM decoder layers, Q-Former layers, nn.Transformer layers) in PyTorch's non-reentrant
checkpoint. Training must not change: losses and gradients over a few AdamW steps equal those without
it, for the default tiny model, the Q-Former and BLIP twins, and a model loaded from local Hugging Face
folders whose attention and LoRA adapters drop out (the recomputation must draw the same masks), with
its vision tower frozen. The peak of torch's allocations in a training step must fall.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from benchmarks.plan_accuracy import allocated_peak
from tests.unit.test_estimate import VOCAB, real_batch, tiny
from vlmflow.components.train.setup import build_stage_model
from vlmflow.components.train.sharding import transformer_blocks
from vlmflow.specs.model import ModelSpec
from vlmflow.specs.train import TrainStageSpec

WRAPPED = "_checkpoint_wrapped_module."
DROPOUT = 0.2


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Bitwise comparisons need one thread: with two, CPU kernels sum in an order that varies from run
    to run (blip-tiny's gradients differed by 6.7e-5 between two identical runs without checkpointing)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_stage(folder: Path) -> tuple[ModelSpec, TrainStageSpec, int]:
    """A CLIP tower and a Llama saved with save_pretrained (what a user's local model is), both with
    attention dropout; the stage trains the connector and LoRA adapters (dropout too) on the frozen LM."""
    torch.manual_seed(5)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, attention_dropout=DROPOUT)  # fmt: skip
    CLIPVisionModel(vision).save_pretrained(folder / "clip")
    language = LlamaConfig(vocab_size=VOCAB.size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, attention_dropout=DROPOUT)  # fmt: skip
    LlamaForCausalLM(language).save_pretrained(folder / "lm")
    spec = ModelSpec.model_validate(
        {"vision": {"kind": "hf-clip-vision", "path": "clip"}, "connector": {"kind": "mlp"},
         "language": {"kind": "hf-causal-lm", "path": "lm"}},
        context={"spec_dir": folder},
    )  # fmt: skip
    stage = TrainStageSpec(
        name="lora",
        trainable=["connector"],
        lora={"module": "language", "dropout": DROPOUT},
        objectives=[{"kind": "lm"}],
        micro_batch_size=8,
    )
    return spec, stage, 32


def stage_of(case: str, folder: Path) -> tuple[ModelSpec, TrainStageSpec, int]:
    if case == "hf-local":
        return hf_stage(folder)
    recipe, stage, image = tiny(case, 0)
    return recipe.model, stage, image


def train(spec: ModelSpec, stage: TrainStageSpec, image: int, checkpointing: bool, steps: int = 3, seed: int = 0):
    """Losses and gradients (by parameter name) of `steps` AdamW steps on fixed random full-length batches."""
    stage = stage.model_copy(update={"activation_checkpointing": checkpointing})
    torch.manual_seed(0)
    model = build_stage_model(spec, VOCAB, stage, None)
    params = {n.replace(WRAPPED, ""): p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-3)
    kinds = [o.kind for o in stage.objectives]
    losses, grads = [], []
    for step in range(steps):
        torch.manual_seed(100 + step)
        batch = real_batch(model, stage, image, stage.micro_batch_size)
        torch.manual_seed(seed + step)  # dropout masks, ITM negatives
        loss = sum(model(batch, kinds).values())
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({n: p.grad.clone() for n, p in params.items() if p.grad is not None})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, grads, model


@pytest.mark.parametrize("case", ["shapes-tiny", "blip2-tiny", "blip-tiny", "hf-local"])
def test_checkpointing_trains_exactly_as_without(case, tmp_path):
    spec, stage, image = stage_of(case, tmp_path)
    losses, grads, plain = train(spec, stage, image, checkpointing=False)
    ck_losses, ck_grads, model = train(spec, stage, image, checkpointing=True)
    blocks = transformer_blocks(model)
    assert blocks and all(isinstance(b, CheckpointWrapper) for b in blocks)
    assert len(blocks) == len(transformer_blocks(plain))
    assert model.state_dict().keys() == plain.state_dict().keys()  # checkpoints and model folders as before
    assert max(abs(a - b) for a, b in zip(losses, ck_losses, strict=True)) < 1e-6, (losses, ck_losses)
    for step, (before, after) in enumerate(zip(grads, ck_grads, strict=True)):
        assert before and before.keys() == after.keys()
        diff = max(float((before[k] - after[k]).abs().max()) for k in before)
        assert diff < 1e-6, f"step {step}: gradients differ by {diff}"
    assert losses[-1] != losses[0]  # the steps trained


def test_the_recomputation_redraws_the_same_dropout_masks(tmp_path):
    """The equality above is not dropout left out: other dropout draws give another loss, and the LoRA
    adapters and the frozen tower are as the stage says."""
    spec, stage, image = hf_stage(tmp_path)
    _, (grads,), model = train(spec, stage, image, checkpointing=True, steps=1)
    _, (other,), _ = train(spec, stage, image, checkpointing=True, steps=1, seed=7)
    # relative to the gradient's size (LoRA's A gets none on the first step: its B starts at zero)
    diff = max(float((grads[k] - other[k]).abs().max() / grads[k].abs().max()) for k in grads if grads[k].any())
    assert diff > 1e-2, diff  # 10^4 times what checkpointing may change
    assert all(m.training for m in model.modules())  # from_pretrained's eval mode does not last into training
    names = {n.replace(WRAPPED, "") for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_A." in n for n in names) and not any(n.startswith("vision.") for n in names)
    assert all(n.startswith("connector.") or ".lora_" in n for n in names)


@pytest.mark.parametrize("case", ["shapes-tiny", "hf-local"])
def test_checkpointing_lowers_the_measured_peak_of_a_training_step(case, tmp_path):
    spec, stage, image = stage_of(case, tmp_path)
    peaks = {}
    for checkpointing in (False, True):
        stage = stage.model_copy(update={"activation_checkpointing": checkpointing})
        torch.manual_seed(0)
        model = build_stage_model(spec, VOCAB, stage, None)
        batch = real_batch(model, stage, image, stage.micro_batch_size)
        kinds = [o.kind for o in stage.objectives]
        sum(model(batch, kinds).values()).backward()  # gradients allocated before the measured step
        peaks[checkpointing] = allocated_peak(lambda: sum(model(batch, kinds).values()).backward())  # noqa: B023
    print(f"{case}: peak {peaks[False] / 2**20:.2f} MiB without checkpointing, {peaks[True] / 2**20:.2f} MiB with")
    assert peaks[True] < 0.75 * peaks[False], peaks
