"""A SentencePiece-only language-model folder as a user has one (Vicuna's layout): tokenizer.model,
tokenizer_config.json naming LlamaTokenizer, no tokenizer.json; the SentencePiece model trained in a
second (the `sentencepiece` trainer) on synthetic-shapes captions and the words of LLaVA's templates."""

from __future__ import annotations

import io
import json
from pathlib import Path

import sentencepiece

from vlmflow.chat import VICUNA_SYSTEM
from vlmflow.components.sources.synthetic import make_row
from vlmflow.specs.data import SyntheticShapesSource


def corpus(count: int = 200) -> list[str]:
    source = SyntheticShapesSource(kind="synthetic-shapes", count=count)
    rows = [make_row(source, 1, i) for i in range(count)]
    texts = [c for r in rows for c in r.captions] + [t for r in rows for qa in r.extra["qa"] for t in qa.values()]
    return texts + [VICUNA_SYSTEM, "USER: ASSISTANT: Describe the image."] * 20


def write_sp_folder(folder: Path, chat_template: str | None = None, vocab_size: int = 400) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True}  # fmt: skip
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
