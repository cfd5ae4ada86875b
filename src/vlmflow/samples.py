"""The `samples` artifact, the one format every stage that reads or writes samples shares.

A samples artifact is a folder holding:

- `shards/*.tar`: WebDataset shards, one sample per key: an image member (`KEY.png`, ...)
  and a JSON record (`KEY.json`: key, source, split, captions, and any of qa,
  conversations, choices, objects). Written deterministically (mtime 0, sorted members).
- `manifest.parquet` (`MANIFEST_SCHEMA`): one row per sample in the shards.
- `quarantine.parquet` (`QUARANTINE_SCHEMA`): one row per input row that is not in the
  shards, with its reason. rows in = manifest + quarantine.
- `shards.parquet` (`SHARDS_SCHEMA`): each shard's sha256, bytes and sample count.

`build_index` turns an artifact into random access: where each sample's image and JSON
bytes sit in its tar, after checking every shard's sha256 once.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from vlmflow.artifacts import atomic_path, file_sha256
from vlmflow.errors import UserError
from vlmflow.grounding import refer_items
from vlmflow.prompts import choice_items

MANIFEST_SCHEMA = {
    "key": pl.String,
    "shard": pl.String,
    "sha256": pl.String,
    "pixel_sha256": pl.String,
    "phash": pl.UInt64,
    "thumb": pl.Binary,
    "width": pl.Int32,
    "height": pl.Int32,
    "mode": pl.String,
    "ext": pl.String,
    "source": pl.String,
    "split": pl.String,
    "caption": pl.String,
    "captions": pl.List(pl.String),
    "n_captions": pl.Int32,
    "caption_chars": pl.Int32,
    "label": pl.String,
    "n_objects": pl.Int32,
    "n_qa": pl.Int32,
    "n_turns": pl.Int32,
    "caption_corrupted": pl.Boolean,
}
QUARANTINE_SCHEMA = {"key": pl.String, "source": pl.String, "reason": pl.String, "detail": pl.String}
SHARDS_SCHEMA = {"shard": pl.String, "sha256": pl.String, "bytes": pl.Int64, "samples": pl.Int64}
INDEX_SCHEMA = {
    "key": pl.String,
    "split": pl.String,
    "source": pl.String,
    "shard": pl.String,
    "image_offset": pl.Int64,
    "image_size": pl.Int64,
    "json_offset": pl.Int64,
    "json_size": pl.Int64,
    "n_captions": pl.Int64,
    "n_qa": pl.Int64,
    "n_turns": pl.Int64,
    "n_choices": pl.Int64,
    "n_refs": pl.Int64,
}
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_LISTED = ("split", "source")  # index columns read from the manifest (the rest from the shards)


class ShardCorrupt(Exception):
    """A shard whose bytes do not match the sha256 recorded when it was written."""


def write_shard(path: Path, samples: list[dict]) -> tuple[str, int]:
    """Write samples ({"__key__", ext: bytes, "json": dict}) to `path` atomically.

    mtime 0 and sorted members make the bytes depend on the samples only. Returns
    (sha256, size in bytes).
    """
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as stream:
            import webdataset as wds  # imports torch: only where a shard is written

            writer = wds.TarWriter(stream, mtime=0.0, encoder=False)
            for sample in samples:
                writer.write({k: _encode(v) if k != "__key__" else v for k, v in sample.items()})
            writer.close()
        digest, size = file_sha256(tmp), tmp.stat().st_size
    return digest, size


def _encode(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")


def read_shard(path: Path, expected_sha256: str | None = None) -> Iterator[dict]:
    """Yield samples of a shard as {"__key__", ext: bytes}; verify sha256 first when given."""
    if expected_sha256 is not None:
        actual = file_sha256(path)
        if actual != expected_sha256:
            raise ShardCorrupt(f"{path}: sha256 {actual[:12]}… does not match the manifest's {expected_sha256[:12]}…")
    with tarfile.open(path, "r:") as tar:
        sample: dict = {}
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample.setdefault("__key__", key)
            sample[ext] = tar.extractfile(member).read()
        if sample:
            yield sample


def sample_json(sample: dict) -> dict:
    return json.load(io.BytesIO(sample["json"]))


def frame(rows: list[dict], schema: dict) -> pl.DataFrame:
    """`rows` as a table of `schema` (an empty table of that schema when there are none)."""
    return pl.DataFrame(rows, schema=schema, orient="row")


def write_tables(out: Path, manifest: pl.DataFrame | None, quarantine: pl.DataFrame, shards: pl.DataFrame) -> None:
    """The three tables of a samples artifact, each in its schema's columns and types. manifest None:
    a stage that streamed its manifest to out/manifest.parquet already (never whole in memory)."""
    if manifest is not None:
        manifest.write_parquet(out / "manifest.parquet", statistics=False)
    quarantine.select(list(QUARANTINE_SCHEMA)).cast(QUARANTINE_SCHEMA).write_parquet(
        out / "quarantine.parquet", statistics=False
    )
    shards.select(list(SHARDS_SCHEMA)).cast(SHARDS_SCHEMA).write_parquet(out / "shards.parquet", statistics=False)


def build_index(data_dir: Path, store_root: Path) -> pl.DataFrame:
    """One row per manifest sample: where its image and JSON bytes are. Verifies shard sha256s."""
    manifest = pl.read_parquet(data_dir / "manifest.parquet", columns=["key", "shard", "split", "source"])
    shards = pl.read_parquet(data_dir / "shards.parquet", columns=["shard", "sha256"])
    sha = dict(zip(shards["shard"], shards["sha256"], strict=True))
    wanted = set(manifest["key"].to_list())
    rows: list[dict] = []
    for shard in manifest["shard"].unique(maintain_order=True).to_list():
        path = store_root / shard
        if shard not in sha:
            raise UserError(f"{data_dir / 'shards.parquet'}: shard {shard} of the manifest is not listed")
        if file_sha256(path) != sha[shard]:
            raise ShardCorrupt(f"{path}: sha256 does not match {data_dir / 'shards.parquet'}")
        rows += _members(path, shard, wanted)
    located = pl.DataFrame(rows, schema={k: v for k, v in INDEX_SCHEMA.items() if k not in _LISTED}, orient="row")
    index = manifest.select("key", *_LISTED).join(located, on="key", how="left")
    missing = index.filter(pl.col("image_offset").is_null() | pl.col("json_offset").is_null())
    if missing.height:
        raise ShardCorrupt(
            f"{missing.height} manifest samples lack an image or JSON in their shard, e.g. {missing[0, 0]}"
        )
    return index.select(list(INDEX_SCHEMA))


def _members(path: Path, shard: str, wanted: set[str]) -> list[dict]:
    found: dict[str, dict] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if key not in wanted or not member.isfile():
                continue
            row = found.setdefault(key, {"key": key, "shard": shard})
            if ext == "json":
                row["json_offset"], row["json_size"] = member.offset_data, member.size
                record = json.loads(tar.extractfile(member).read())
                row["n_captions"] = sum(1 for c in record.get("captions") or [] if c)
                row["n_qa"] = len(record.get("qa") or [])
                row["n_turns"] = sum(t.get("role") == "assistant" for t in record.get("conversations") or [])
                row["n_choices"] = len(choice_items(record))
                row["n_refs"] = len(refer_items(record))
            elif ext in IMAGE_EXTS:
                row["image_offset"], row["image_size"] = member.offset_data, member.size
    return [{k: r.get(k) for k in INDEX_SCHEMA if k not in _LISTED} for r in found.values()]


def read_member(path: Path, offset: int, size: int) -> bytes:
    """The bytes of one tar member, found by `build_index`: one seek, one read."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)
