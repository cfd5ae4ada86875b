"""A tiny Hugging Face CLIP folder as a user has one (CLIPModel.save_pretrained beside its tokenizer
and preprocessor_config.json), random weights from a small config: no download."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

from tests.hf_text import FAMILIES, write_tokenizer


def write_clip_folder(folder: Path, seed: int = 0) -> Path:
    tokenizer = write_tokenizer(folder, "clip")
    ends = {t: tokenizer.token_to_id(t) for t in FAMILIES["clip"][0]}
    text = {"vocab_size": tokenizer.get_vocab_size(), "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 40,
            "bos_token_id": ends["<|startoftext|>"], "eos_token_id": ends["<|endoftext|>"],
            "pad_token_id": ends["<|endoftext|>"]}  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(str(folder))
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        str(folder)
    )
    return folder
