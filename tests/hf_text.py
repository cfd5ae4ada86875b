"""Tiny pretrained text towers as a user has them: CLIP, SigLIP and BERT text models built from small
configs with random weights, written with save_pretrained beside a word-level tokenizer (trained
with the `tokenizers` library on synthetic-shapes captions) saved through transformers' fast
tokenizer, with each family's special tokens and post-processor (CLIP <|startoftext|> … <|endoftext|>,
BERT [CLS] … [SEP], SigLIP … </s>)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    SiglipTextConfig,
    SiglipTextModel,
)

from vlmflow.components.sources.synthetic import make_row
from vlmflow.specs.data import SyntheticShapesSource

WIDTH, HEADS, LAYERS, PROJECTION = 32, 4, 2, 24
# family: (special tokens, template, pad, unk)
FAMILIES = {
    "clip": (
        ["<|startoftext|>", "<|endoftext|>"],
        "<|startoftext|> $A <|endoftext|>",
        "<|endoftext|>",
        "<|endoftext|>",
    ),
    "siglip": (["</s>", "<unk>"], "$A </s>", "</s>", "<unk>"),
    "bert": (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[CLS] $A [SEP]", "[PAD]", "[UNK]"),
}
FOLDERS = {"hf-clip-text": "clip-text", "hf-siglip-text": "siglip-text", "hf-bert": "bert"}


def captions(count: int = 64, seed: int = 1) -> list[str]:
    source = SyntheticShapesSource(kind="synthetic-shapes", count=count)
    return [make_row(source, seed, i).captions[0] for i in range(count)]


def write_tokenizer(folder: Path, family: str) -> Tokenizer:
    specials, template, pad, unk = FAMILIES[family]
    tokenizer = Tokenizer(models.WordLevel(unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(captions(), trainers.WordLevelTrainer(special_tokens=specials, show_progress=False))
    ids = [(t, tokenizer.token_to_id(t)) for t in specials if t in template]
    tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=ids)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=pad, unk_token=unk)
    fast.save_pretrained(str(folder))
    return tokenizer


def write_text_folder(root: Path, kind: str, projection: bool = True, seed: int = 0) -> Path:
    """The tiny folder of an hf text kind under root (clip-text, siglip-text or bert); `projection`:
    a CLIPTextModelWithProjection (else a plain CLIPTextModel)."""
    folder = root / FOLDERS[kind]
    family = {"hf-clip-text": "clip", "hf-siglip-text": "siglip", "hf-bert": "bert"}[kind]
    tokenizer = write_tokenizer(folder, family)
    size = {"vocab_size": tokenizer.get_vocab_size(), "hidden_size": WIDTH, "intermediate_size": 2 * WIDTH,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS}  # fmt: skip
    torch.manual_seed(seed)
    if kind == "hf-clip-text":
        ends = {t: tokenizer.token_to_id(t) for t in FAMILIES["clip"][0]}
        config = CLIPTextConfig(**size, max_position_embeddings=40, projection_dim=PROJECTION,
                                bos_token_id=ends["<|startoftext|>"], eos_token_id=ends["<|endoftext|>"],
                                pad_token_id=ends["<|endoftext|>"])  # fmt: skip
        model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    elif kind == "hf-siglip-text":
        pad = tokenizer.token_to_id("</s>")
        config = SiglipTextConfig(**size, max_position_embeddings=24, projection_size=PROJECTION, pad_token_id=pad,
                                  eos_token_id=pad)  # fmt: skip
        model = SiglipTextModel(config)
    else:  # saved from a pretraining head, as bert-base-uncased (BertForMaskedLM); initialised wider than
        # BERT (0.02), where a random [CLS] output hardly depends on the text and tiny training stalls
        config = BertConfig(**size, max_position_embeddings=40, pad_token_id=tokenizer.token_to_id("[PAD]"),
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            initializer_range=0.2)  # fmt: skip
        model = BertForMaskedLM(config)
    model.save_pretrained(str(folder))
    return folder
