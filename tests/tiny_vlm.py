"""A tiny vlmflow model folder (captioning LM, ITC, ITM) with random weights and a BPE tokenizer
trained on synthetic-shapes captions: what a trained stage's model/ looks like, in a second."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmflow.components.sources.synthetic import make_row
from vlmflow.components.tokenize import train_bpe
from vlmflow.components.train.setup import model_config, write_model_folder
from vlmflow.models.vision import image_spec
from vlmflow.models.vlm import VLM, Vocab
from vlmflow.specs.data import SyntheticShapesSource
from vlmflow.specs.model import ModelSpec
from vlmflow.specs.recipe import BpeTokenizer

MODEL = {
    "vision": {"kind": "tiny-vit", "family": "clip", "image_size": 32, "patch_size": 16, "hidden_size": 32,
               "layers": 1, "heads": 2},
    "connector": {"kind": "mlp", "layers": 2},
    "language": {"kind": "tiny-llama", "hidden_size": 32, "layers": 1, "heads": 2, "intermediate_size": 64},
    "text": {"kind": "tiny-text", "hidden_size": 32, "layers": 1, "heads": 2, "max_length": 24},
    "embed_dim": 32,
}  # fmt: skip


def write_model(folder: Path) -> None:
    """The model folder at `folder`, its tokenizer beside it (folder.parent / tokenizer.json)."""
    rows = [make_row(SyntheticShapesSource(kind="synthetic-shapes", count=64), 1, i) for i in range(64)]
    tokenizer = train_bpe([r.captions[0] for r in rows], BpeTokenizer(kind="bpe", vocab_size=400))
    tokenizer.save(str(folder.parent / "tokenizer.json"))
    special = {t: tokenizer.token_to_id(t) for t in BpeTokenizer(kind="bpe").special_tokens}
    spec, vocab = ModelSpec.model_validate(MODEL), Vocab(tokenizer.get_vocab_size(), special)
    torch.manual_seed(0)
    model = VLM(spec, vocab)
    config = model_config(spec, vocab, image_spec(spec.vision), model.num_image_tokens)
    write_model_folder(folder, model.state_dict(), config, folder.parent / "tokenizer.json")
