"""Tokenizer: train a byte-level BPE (HF `tokenizers`) on the dataset's text, or load one.

The corpus is every caption, VQA pair, multiple-choice item and conversation turn of the rows in the input
manifest, read from the shards (one Ray task per shard). Special tokens for the VLM
(`<image>`, pad, bos/eos, chat roles) are always present in the saved tokenizer.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from vlmflow.component import Component, Port
from vlmflow.errors import UserError
from vlmflow.samples import read_shard, sample_json
from vlmflow.specs.recipe import BpeTokenizer, PretrainedTokenizer
from vlmflow.specs.recipe import Tokenizer as TokenizerSpec
from vlmflow.stage import StageContext, StageResult


def sample_texts(record: dict) -> list[str]:
    texts = [c for c in record.get("captions") or [] if c]
    for qa in record.get("qa") or []:
        texts += [qa.get("question", ""), qa.get("answer", "")]
    texts += [t.get("content", "") for t in record.get("conversations") or []]
    for item in record.get("choices") or []:
        if isinstance(item, dict):
            options = item.get("options")
            options = list(options.values()) if isinstance(options, dict) else options
            texts += [item.get("question"), *(options if isinstance(options, list) else [])]
    return [t for t in texts if isinstance(t, str) and t]


def shard_texts(work: tuple[str, str, list[str]]) -> list[str]:
    """Texts of the wanted keys of one shard, in shard order."""
    path, sha256, keys = work
    wanted = set(keys)
    texts: list[str] = []
    for sample in read_shard(Path(path), sha256):
        if sample["__key__"] in wanted:
            texts += sample_texts(sample_json(sample))
    return texts


def train_bpe(texts: list[str], spec: BpeTokenizer) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=spec.min_frequency,
        special_tokens=spec.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def load_pretrained(spec: PretrainedTokenizer) -> Tokenizer:
    if not spec.path.exists():
        raise UserError(f"tokenizer.path: {spec.path} does not exist (a tokenizer.json or a folder holding one)")
    path = spec.path / "tokenizer.json" if spec.path.is_dir() else spec.path
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception for unreadable files
        raise UserError(f"{path}: cannot load tokenizer: {exc}") from None
    missing = [t for t in spec.special_tokens if tokenizer.token_to_id(t) is None]
    if missing:
        tokenizer.add_special_tokens(missing)
    return tokenizer


def round_trip_rate(tokenizer: Tokenizer, texts: list[str], limit: int = 2000) -> float:
    sample = texts[:limit]
    if not sample:
        return 1.0
    encoded = tokenizer.encode_batch(sample)
    decoded = tokenizer.decode_batch([e.ids for e in encoded], skip_special_tokens=False)
    return sum(a == b for a, b in zip(sample, decoded, strict=True)) / len(sample)


def corpus(ctx: StageContext) -> list[str]:
    source = ctx.inputs["data"]
    manifest = pl.read_parquet(source.path / "manifest.parquet", columns=["key", "shard"])
    shards = pl.read_parquet(source.path / "shards.parquet")
    sha = dict(zip(shards["shard"], shards["sha256"], strict=True))
    groups = manifest.group_by("shard", maintain_order=True).agg("key")
    work = [(str(ctx.store.root / s), sha[s], keys) for s, keys in groups.iter_rows()]
    parts = ctx.executor.map_units(shard_texts, work, desc="tokenizer: read text", progress=ctx.progress)
    return [t for part in parts for t in part]


def run(ctx: StageContext) -> StageResult:
    started = time.monotonic()
    spec = ctx.config
    texts = corpus(ctx)
    tokenizer = train_bpe(texts, spec) if isinstance(spec, BpeTokenizer) else load_pretrained(spec)
    tokenizer.save(str(ctx.out / "tokenizer.json"))
    special = {t: tokenizer.token_to_id(t) for t in spec.special_tokens}
    (ctx.out / "special_tokens.json").write_text(json.dumps(special, indent=2))
    lengths = [len(e.ids) for e in tokenizer.encode_batch(texts[:5000])] or [0]
    return StageResult(
        rows_in=len(texts),
        rows_out=len(texts),
        rows_quarantined=0,
        metrics={
            "vocab_size": tokenizer.get_vocab_size(),
            "round_trip_rate": round_trip_rate(tokenizer, texts),
            "mean_tokens_per_text": sum(lengths) / len(lengths),
            "seconds_train": time.monotonic() - started,
        },
        artifacts=["tokenizer.json", "special_tokens.json"],
    )


def rows_estimate(step: object, plan: object) -> tuple[None, None]:
    """Its rows are texts: known once the data is read."""
    return None, None


COMPONENT = Component(
    name="tokenizer",
    config=TokenizerSpec,
    reads={"data": Port("samples", description="the texts a BPE tokenizer trains on")},
    writes="tokenizer",
    run=run,
    rows_estimate=rows_estimate,
    description="train a byte-level BPE tokenizer on the data's text, or load one from a folder",
)
