"""A stage's model: build from the spec, start from the previous stage's weights, add LoRA,
freeze everything that is not trainable; and fold LoRA back into plain weights at the end."""

from __future__ import annotations

import json
from pathlib import Path

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from vlmflow.components.train.checkpoint import load_model
from vlmflow.models.vlm import VLM, Vocab
from vlmflow.specs.model import ModelSpec
from vlmflow.specs.train import TrainStageSpec

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "vlmflow_model.json"


def build_stage_model(spec: ModelSpec, vocab: Vocab, stage: TrainStageSpec, init: Path | None) -> VLM:
    model = VLM(spec, vocab)
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


def write_model_folder(folder: Path, state: dict, spec: ModelSpec, vocab: Vocab, image: dict, tokens: int) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / MODEL_FILE))
    config = {
        "model": spec.model_dump(mode="json"),
        "vocab": {"size": vocab.size, "special": vocab.special},
        "image": image,
        "num_image_tokens": tokens,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def read_model_folder(folder: Path) -> tuple[VLM, dict]:
    """A trained model folder (a stage's model/) back into a VLM, with its config."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    spec = ModelSpec.model_validate(config["model"])
    model = VLM(spec, Vocab(config["vocab"]["size"], config["vocab"]["special"]))
    load_model(model, folder / MODEL_FILE)
    return model, config
