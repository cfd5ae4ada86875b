"""Vision towers: a tiny CLIP/SigLIP ViT from a config, the same towers from a local HF folder,
or none (encoder-free: the tower hands raw patches to the connector).

Every tower maps pixels [B, 3, H, W] to `features` [B, N, D] (the chosen hidden layer and
token selection) and `pooled` [B, D] (a single vector for contrastive objectives).
"""

from __future__ import annotations

import json

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from vlmflow.errors import UserError
from vlmflow.specs.model import HfVision, NoVision, TinyVit

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


class HfVisionTower(nn.Module):
    """A transformers CLIPVisionModel / SiglipVisionModel with LLaVA's feature choice."""

    def __init__(self, model: nn.Module, feature_layer: int, select: str, has_cls: bool):
        super().__init__()
        self.model = model
        self.feature_layer = feature_layer
        self.has_cls = has_cls
        self.drop_cls = has_cls and select == "patch"
        config = model.config
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.hidden_size = config.hidden_size
        self.grid = config.image_size // config.patch_size
        self.num_tokens = self.grid**2 + (1 if has_cls and not self.drop_cls else 0)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        features = out.hidden_states[self.feature_layer]
        if self.drop_cls:
            features = features[:, 1:]
        pooled = out.pooler_output if out.pooler_output is not None else out.last_hidden_state.mean(dim=1)
        return features, pooled


class PatchTower(nn.Module):
    """No encoder: non-overlapping patches flattened to vectors (Fuyu)."""

    def __init__(self, image_size: int, patch_size: int):
        super().__init__()
        self.image_size, self.patch_size = image_size, patch_size
        self.grid = image_size // patch_size
        self.num_tokens = self.grid**2
        self.hidden_size = 3 * patch_size**2

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, _, _ = pixels.shape
        p, g = self.patch_size, self.grid
        patches = pixels.reshape(b, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, p * p * c)
        return patches, patches.mean(dim=1)


def tiny_config(spec: TinyVit) -> CLIPVisionConfig | SiglipVisionConfig:
    common = {
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
    }
    if spec.family == "clip":
        return CLIPVisionConfig(**common)
    return SiglipVisionConfig(**common, vision_use_head=False)


def build_vision(spec: TinyVit | HfVision | NoVision, load_weights: bool = True) -> nn.Module:
    if isinstance(spec, NoVision):
        return PatchTower(spec.image_size, spec.patch_size)
    if isinstance(spec, TinyVit):
        config = tiny_config(spec)
        model = CLIPVisionModel(config) if spec.family == "clip" else SiglipVisionModel(config)
        return HfVisionTower(model, spec.feature_layer, spec.select, has_cls=spec.family == "clip")
    return load_hf_vision(spec, load_weights)


def load_hf_vision(spec: HfVision, load_weights: bool = True) -> HfVisionTower:
    """load_weights=False builds the tower from its config.json alone (shapes for `vlmflow plan`)."""
    if not (spec.path / "config.json").is_file():
        raise UserError(f"model.vision.path: {spec.path} is not a Hugging Face model folder (no config.json)")
    cls = CLIPVisionModel if spec.kind == "hf-clip-vision" else SiglipVisionModel
    if load_weights:
        model = cls.from_pretrained(str(spec.path), local_files_only=True)
    else:
        config_cls = CLIPVisionConfig if spec.kind == "hf-clip-vision" else SiglipVisionConfig
        model = cls(config_cls.from_pretrained(str(spec.path), local_files_only=True))
    return HfVisionTower(model, spec.feature_layer, spec.select, has_cls=spec.kind == "hf-clip-vision")


def image_spec(spec: TinyVit | HfVision | NoVision) -> dict:
    """Preprocessing (square size, mean, std) a tower expects, without building it."""
    if isinstance(spec, NoVision):
        return {"size": spec.image_size, "mean": HALF, "std": HALF}
    if isinstance(spec, TinyVit):
        mean, std = (CLIP_MEAN, CLIP_STD) if spec.family == "clip" else (HALF, HALF)
        return {"size": spec.image_size, "mean": mean, "std": std}
    config_file = spec.path / "config.json"
    if not config_file.is_file():
        raise UserError(f"model.vision.path: {spec.path} is not a Hugging Face model folder (no config.json)")
    config = json.loads(config_file.read_text())
    config = config.get("vision_config", config)
    mean, std = (CLIP_MEAN, CLIP_STD) if spec.kind == "hf-clip-vision" else (HALF, HALF)
    processor = spec.path / "preprocessor_config.json"
    if processor.is_file():
        extra = json.loads(processor.read_text())
        mean, std = extra.get("image_mean", mean), extra.get("image_std", std)
    return {"size": int(config.get("image_size", 224)), "mean": tuple(mean), "std": tuple(std)}
