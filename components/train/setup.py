"""A stage's model: build from the spec, start from the previous stage's weights, add LoRA,
freeze everything that is not trainable; and fold LoRA back into plain weights at the end."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from vlmflow.components.train.checkpoint import load_model, load_model_weights
from vlmflow.components.train.sharding import checkpoint_blocks
from vlmflow.models.vlm import VLM, Vocab
from vlmflow.specs.model import ModelSpec
from vlmflow.specs.train import TrainStageSpec

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "vlmflow_model.json"
TOKENIZER_FILE = "tokenizer.json"
CHECKPOINT_CONFIG = "model_config.json"  # in checkpoints/: rebuilds the (LoRA) model of a checkpoint


def build_stage_model(
    spec: ModelSpec, vocab: Vocab, stage: TrainStageSpec, init: Path | None, load_weights: bool = True
) -> VLM:
    model = VLM(spec, vocab, load_weights)
    model.itm_edited_negatives = sum(o.edited_negatives for o in stage.objectives if o.kind == "itm")
    if init is not None:
        load_model(model, init / MODEL_FILE)
    model.requires_grad_(False)
    if stage.lora is not None:
        part = model.part(stage.lora.module)
        if part is None:
            raise ValueError(f"lora.module {stage.lora.module}: the model has no such part")
        config = LoraConfig(
            r=stage.lora.r,
            lora_alpha=stage.lora.alpha,
            lora_dropout=stage.lora.dropout,
            target_modules=stage.lora.target_modules,
        )
        inject_adapter_in_model(config, part)
    for name in stage.trainable:
        part = model.part(name)
        if part is None:
            raise ValueError(f"trainable: the model has no {name} part")
        part.requires_grad_(True)
    model.train()  # from_pretrained leaves a local HF model in eval mode: its dropout would be off in training
    if stage.activation_checkpointing:
        checkpoint_blocks(model)
    return model


def merge_lora(model: nn.Module) -> dict:
    """The state dict with every LoRA layer merged into its base weight and adapter keys dropped."""
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    state = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    return state


def model_config(spec: ModelSpec, vocab: Vocab, image: dict, tokens: int) -> dict:
    return {
        "model": spec.model_dump(mode="json"),
        "vocab": {"size": vocab.size, "special": vocab.special},
        "image": image,
        "num_image_tokens": tokens,
    }


def write_model_folder(folder: Path, state: dict, config: dict, tokenizer: Path | None) -> None:
    """A self-contained model folder: plain weights, the config to rebuild it, its tokenizer."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / MODEL_FILE))
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def read_model_folder(folder: Path) -> tuple[VLM, dict]:
    """A trained model folder (a stage's model/) back into a VLM, with its config."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    spec = ModelSpec.model_validate(config["model"])
    model = VLM(spec, Vocab(config["vocab"]["size"], config["vocab"]["special"]))
    load_model(model, folder / MODEL_FILE)
    return model, config


def model_from_checkpoint(folder: Path) -> tuple[VLM, dict]:
    """A checkpoint (checkpoints/step-N) as a plain VLM: its stage's model with LoRA merged."""
    config = json.loads((folder.parent / CHECKPOINT_CONFIG).read_text())
    spec = ModelSpec.model_validate(config["model"])
    vocab = Vocab(config["vocab"]["size"], config["vocab"]["special"])
    model = build_stage_model(spec, vocab, TrainStageSpec.model_validate(config["stage"]), None)
    load_model_weights(model, folder)  # each worker's shards, read in this process
    plain = VLM(spec, vocab)
    plain.load_state_dict(merge_lora(model), strict=True)
    return plain, config
