"""Tokenizer: train a byte-level BPE (HF `tokenizers`) on the dataset's text, or load one.

The corpus is every caption, VQA pair, multiple-choice item and conversation turn of the rows in the input
manifest, read from the shards (one Ray task per shard). A trained BPE has vlmflow's special tokens
(`<image>`, pad, bos/eos, chat roles); a pretrained language model's tokenizer keeps its own and gains
only `<image>` when it has no image token. The stage writes tokenizer.json, special_tokens.json (the
ids of the roles `<pad>`, `<bos>`, `<eos>`, `<unk>`, `<image>`, ...) and chat.json (the token strings
the conversation templates write, and the tokenizer's own chat_template).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import polars as pl
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from vlmflow.component import Component, Port
from vlmflow.errors import UserError
from vlmflow.samples import read_shard, sample_json
from vlmflow.specs.recipe import BpeTokenizer, PretrainedTokenizer
from vlmflow.specs.recipe import Tokenizer as TokenizerSpec
from vlmflow.stage import StageContext, StageResult

IMAGE = "<image>"


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


def shard_texts(work: tuple[str, str, Iterable[str]]) -> list[str]:
    """Texts of the wanted keys of one shard, in shard order."""
    path, sha256, keys = work
    wanted = set(keys)
    texts: list[str] = []
    for sample in read_shard(Path(path), sha256):
        if sample["__key__"] in wanted:
            texts += sample_texts(sample_json(sample))
    return texts


def spill_texts(item: tuple[tuple[str, str, Iterable[str]], str], folder: str) -> int:
    """Write one shard's texts (item: shard_texts' work, a file name) to FOLDER/NAME.parquet, on the
    worker: the driver reads them back a shard at a time. Returns how many."""
    work, name = item
    texts = shard_texts(work)
    pl.DataFrame({"text": texts}, schema={"text": pl.String}).write_parquet(Path(folder) / f"{name}.parquet")
    return len(texts)


def train_bpe(texts: Iterable[str], spec: BpeTokenizer, length: int | None = None) -> Tokenizer:
    """A byte-level BPE trained on `texts` (any iterable: a stream is read once, never held)."""
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
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts) if isinstance(texts, list) else length)
    return tokenizer


def load_pretrained(spec: PretrainedTokenizer) -> tuple[Tokenizer, dict[str, int], dict]:
    """(tokenizer, special ids by role, chat.json) of a pretrained folder. With `special_tokens`
    unset the folder's own tokenizer is kept (any folder AutoTokenizer loads, SentencePiece-only
    ones included): its bos, eos (else its sep, else its pad) and unk, its pad (unk where it has
    none, else eos, as LLaVA), its chat_template; `<image>` is added only when it has no image token. A listed
    `special_tokens` adds the missing ones to the folder's tokenizer.json (vlmflow's roles)."""
    if not spec.path.exists():
        raise UserError(f"tokenizer.path: {spec.path} does not exist (a tokenizer folder or a tokenizer.json)")
    if spec.special_tokens is not None:
        tokenizer = _tokenizer_file(spec.path / "tokenizer.json" if spec.path.is_dir() else spec.path)
        missing = [t for t in spec.special_tokens if tokenizer.token_to_id(t) is None]
        if missing:
            tokenizer.add_special_tokens(missing)
        return tokenizer, special_ids(tokenizer, spec.special_tokens), chat_of(tokenizer, spec.special_tokens)
    return own_tokenizer(spec.path)


def _tokenizer_file(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception for unreadable files
        raise UserError(f"{path}: cannot load tokenizer: {exc}") from None


def own_tokenizer(folder: Path) -> tuple[Tokenizer, dict[str, int], dict]:
    """A language model's own tokenizer through AutoTokenizer, with an image token."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for folders it cannot read
        raise UserError(f"tokenizer.path: {folder}: AutoTokenizer cannot load it: {exc}") from None
    tokenizer = getattr(hf, "backend_tokenizer", None)
    if tokenizer is None:
        raise UserError(f"tokenizer.path: {folder}: {type(hf).__name__} has no fast (tokenizers) form")
    image = getattr(hf, "image_token", None) or IMAGE
    if tokenizer.token_to_id(image) is None:
        tokenizer.add_special_tokens([IMAGE])
        image = IMAGE
    pad = hf.pad_token or hf.unk_token or hf.eos_token
    eos = hf.eos_token or getattr(hf, "sep_token", None) or pad  # a text tower's: BERT ends with [SEP]
    if not pad:
        raise UserError(f"tokenizer.path: {folder}: the tokenizer has no pad, unk or eos token")
    roles = {"<bos>": hf.bos_token, "<eos>": eos, "<unk>": hf.unk_token, "<image>": image, "<pad>": pad}
    special = {role: tokenizer.token_to_id(token) for role, token in roles.items() if token}
    tokens = {"bos": hf.bos_token, "eos": eos, "image": image}
    template = hf.chat_template if isinstance(hf.chat_template, str) else None
    return tokenizer, special, {"tokens": tokens, "chat_template": template}


def special_ids(tokenizer: Tokenizer, tokens: list[str]) -> dict[str, int]:
    return {t: tokenizer.token_to_id(t) for t in tokens}


def chat_of(tokenizer: Tokenizer, tokens: list[str]) -> dict:
    """chat.json of a tokenizer with vlmflow's special tokens (`<bos>`, `<eos>`, `<image>`)."""
    known = {t for t in tokens if tokenizer.token_to_id(t) is not None}
    pick = {"bos": "<bos>", "eos": "<eos>", "image": IMAGE}
    return {"tokens": {k: t if t in known else None for k, t in pick.items()}, "chat_template": None}


def round_trip_rate(tokenizer: Tokenizer, texts: list[str], limit: int = 2000) -> float:
    sample = texts[:limit]
    if not sample:
        return 1.0
    encoded = tokenizer.encode_batch(sample)
    decoded = tokenizer.decode_batch([e.ids for e in encoded], skip_special_tokens=False)
    return sum(a == b for a, b in zip(sample, decoded, strict=True)) / len(sample)


class Corpus:
    """The texts of the input's rows, one task per shard; each task spills its shard's texts to
    `folder`, and iterating reads them back in shard order, a shard at a time: the driver never
    holds the corpus. `head` keeps the first HEAD texts (for the round-trip and length metrics)."""

    HEAD = 5000

    def __init__(self, ctx: StageContext, folder: Path):
        source = ctx.inputs["data"]
        manifest = pl.scan_parquet(source.path / "manifest.parquet").select("key", "shard")
        shards = pl.read_parquet(source.path / "shards.parquet")
        sha = dict(zip(shards["shard"], shards["sha256"], strict=True))
        groups = manifest.group_by("shard", maintain_order=True).agg("key").collect(engine="streaming")
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.names, self.head = folder, [f"{i:06d}" for i in range(groups.height)], []
        work = [  # each shard's keys stay a polars Series (Arrow memory), not a list of Python strings
            ((str(ctx.store.root / s), sha[s], keys), name)
            for s, keys, name in zip(groups["shard"], groups["key"], self.names, strict=True)
        ]
        self.length = sum(
            ctx.executor.map_units(
                spill_texts, work, desc="tokenizer: read text", args=(str(folder),), progress=ctx.progress
            )
        )

    def __iter__(self) -> Iterator[str]:
        for name in self.names:
            for text in pl.read_parquet(self.folder / f"{name}.parquet")["text"]:
                if len(self.head) < self.HEAD:
                    self.head.append(text)
                yield text


def run(ctx: StageContext) -> StageResult:
    started = time.monotonic()
    spec = ctx.config
    texts = Corpus(ctx, ctx.out / ".texts")
    if isinstance(spec, BpeTokenizer):
        tokenizer = train_bpe(texts, spec, texts.length)
        special, chat = special_ids(tokenizer, spec.special_tokens), chat_of(tokenizer, spec.special_tokens)
    else:
        list(texts)  # only the head is kept: the metrics' sample
        tokenizer, special, chat = load_pretrained(spec)
    shutil.rmtree(texts.folder)
    tokenizer.save(str(ctx.out / "tokenizer.json"))
    (ctx.out / "special_tokens.json").write_text(json.dumps(special, indent=2))
    (ctx.out / "chat.json").write_text(json.dumps(chat, indent=2))
    lengths = [len(e.ids) for e in tokenizer.encode_batch(texts.head)] or [0]
    return StageResult(
        rows_in=texts.length,
        rows_out=texts.length,
        rows_quarantined=0,
        metrics={
            "vocab_size": tokenizer.get_vocab_size(),
            "round_trip_rate": round_trip_rate(tokenizer, texts.head),
            "mean_tokens_per_text": sum(lengths) / len(lengths),
            "seconds_train": time.monotonic() - started,
        },
        artifacts=["tokenizer.json", "special_tokens.json", "chat.json"],
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
