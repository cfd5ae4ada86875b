"""A training stage's conversation template and its samples that are too long for it.

Before training, every row of the stage's mixture is rendered in the stage's template with each
of the items it may train on (every caption, VQA pair and multiple-choice item, or its
conversation). With `overflow: quarantine` a row whose longest item has more text tokens than
`max_text_tokens` is left out of training and listed with the reason `too-long:N tokens > MAX`;
with `overflow: truncate` the collator cuts it at the limit. Nothing is cut silently.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from vlmflow.chat import ChatFormat, resolve
from vlmflow.components.train.data import TextCodec, TooLong, pick_caption
from vlmflow.grounding import refer_items
from vlmflow.prompts import choice_items, choice_prompt
from vlmflow.samples import read_member
from vlmflow.specs.train import TrainStageSpec

CHAT_FILE = "chat.json"


def stage_chat(tokenizer_dir: Path, spec: TrainStageSpec) -> ChatFormat | None:
    """The stage's template with the tokenizer stage's tokens (None: a tokenizer artifact of before
    chat.json, which trains in the vlmflow template)."""
    file = tokenizer_dir / CHAT_FILE
    if not file.is_file():
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return resolve(spec.template, json.loads(file.read_text()), lambda t: tokenizer.token_to_id(t) is not None)


def candidate_turns(record: dict, fmt: str, prompt: str, choice_template: str) -> list[list[dict]]:
    """Every conversation a sample may train on in `fmt` (one per caption, VQA pair, choice item)."""

    def pair(question: str, answer: str) -> list[dict]:
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    if fmt == "caption":
        captions = [c for c in record.get("captions") or [] if c]
        return [pair(prompt, pick_caption(record, epoch)) for epoch in range(len(captions))]
    if fmt == "qa":
        return [pair(qa["question"], qa["answer"]) for qa in record.get("qa") or []]
    if fmt == "choice":
        return [pair(choice_prompt(choice_template, q, options), a) for q, options, a in choice_items(record)]
    if fmt == "refer":
        return [pair(question, answer) for question, answer, _ in refer_items(record)]
    turns = [t for t in record.get("conversations") or [] if t.get("role") in ("user", "assistant")]
    return [turns] if turns else []


def longest(codec: TextCodec, record: dict, fmt: str, spec: TrainStageSpec) -> int | None:
    """Text tokens of the sample's longest item when it is over the limit (None: all fit)."""
    over = []
    for turns in candidate_turns(record, fmt, spec.prompt, spec.choice_template):
        try:
            codec.chat(turns)
        except TooLong as exc:
            over.append(exc.tokens)
    return max(over) if over else None


def split_too_long(
    parts: list[pl.DataFrame], store_root: Path, codec: TextCodec, spec: TrainStageSpec
) -> tuple[list[pl.DataFrame], pl.DataFrame]:
    """Each mixture component's rows without the too-long ones, and those (data, key, reason)."""
    kept, rejected = [], []
    for part in parts:
        drop = []
        for row in part.select("key", "shard", "json_offset", "json_size", "format", "data").iter_rows(named=True):
            record = json.loads(read_member(store_root / row["shard"], row["json_offset"], row["json_size"]))
            tokens = longest(codec, record, row["format"], spec)
            if tokens is not None:
                drop.append(row["key"])
                rejected.append(
                    {"data": row["data"], "key": row["key"], "reason": f"too-long:{tokens} tokens > {codec.max_text}"}
                )
        kept.append(part.filter(~pl.col("key").is_in(drop)))
    schema = {"data": pl.String, "key": pl.String, "reason": pl.String}
    return kept, pl.DataFrame(rejected, schema=schema, orient="row").unique(["data", "key"], maintain_order=True)


def with_too_long(unused: pl.DataFrame, too_long: pl.DataFrame) -> pl.DataFrame:
    """The stage's unused rows (data, key, reason) with the too-long ones' reason."""
    return (
        unused.join(too_long, on=["data", "key"], how="left", suffix="_too_long")
        .with_columns(reason=pl.coalesce("reason_too_long", "reason"))
        .drop("reason_too_long")
    )
