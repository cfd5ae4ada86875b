"""A tiny Hugging Face BLIP folder (random weights, built from a config, saved with
save_pretrained) whose tokenizer knows the synthetic-shapes captions: what a user's local
BLIP checkpoint looks like, without downloading one."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import BertTokenizerFast, BlipConfig, BlipImageProcessorPil

from vlmflow.components.sources.synthetic import make_row
from vlmflow.specs.data import SyntheticShapesSource

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_blip(folder: Path, architecture: str, image_size: int = 32, seed: int = 0) -> Path:
    """architecture: BlipForConditionalGeneration (captioner) or BlipForImageTextRetrieval (filter)."""
    source = SyntheticShapesSource(kind="synthetic-shapes", count=200, max_objects=3)
    words = {w for i in range(200) for w in make_row(source, 0, i).captions[0].replace(".", " .").split()}
    folder.mkdir(parents=True)
    vocab = {token: i for i, token in enumerate([*SPECIAL, "picture", "of", *sorted(words)])}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    ids = {t: vocab[t] for t in SPECIAL}
    config = BlipConfig(
        text_config={
            "vocab_size": tokenizer.vocab_size, "hidden_size": 32, "encoder_hidden_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
            "max_position_embeddings": 40, "bos_token_id": ids["[CLS]"], "sep_token_id": ids["[SEP]"],
            "eos_token_id": ids["[SEP]"], "pad_token_id": ids["[PAD]"],
        },
        vision_config={"hidden_size": 32, "image_size": image_size, "patch_size": 16, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "intermediate_size": 64},
        projection_dim=16,
        image_text_hidden_size=32,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    BlipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder
