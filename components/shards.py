"""WebDataset shards: deterministic, atomic writes and sha256-checked reads."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

from vlmflow.artifacts import atomic_path, file_sha256


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
