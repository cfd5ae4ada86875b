"""Content-addressed stage outputs: DIR/artifacts/STAGE/DIGEST/, `_SUCCESS` written last.

DIGEST = hash(stage name, stage spec, input digests, component version). A stage builds in
DIGEST.partial/ (units it finished there survive a crash and are reused on resume), writes
`_SUCCESS` with its stats, then renames the folder into place: a folder named DIGEST is
always complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SUCCESS = "_SUCCESS"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def digest_of(value: Any, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]


def stage_digest(stage: str, spec: Any, input_digests: list[str], version: str) -> str:
    return digest_of({"stage": stage, "spec": spec, "inputs": input_digests, "version": version})


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is renamed onto `path` (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created with its folder) across processes, released on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = root

    def path(self, stage: str, digest: str) -> Path:
        return self.root / stage / digest

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def is_complete(self, stage: str, digest: str) -> bool:
        return (self.path(stage, digest) / SUCCESS).is_file()

    def stats(self, stage: str, digest: str) -> dict:
        return json.loads((self.path(stage, digest) / SUCCESS).read_text())

    def partial(self, stage: str, digest: str) -> Path:
        """The build folder; kept across crashes so finished units can be reused."""
        final = self.path(stage, digest)
        if final.exists() and not (final / SUCCESS).exists():
            shutil.rmtree(final)  # cannot happen through commit(); be safe against hand edits
        partial = self.partial_path(stage, digest)
        partial.mkdir(parents=True, exist_ok=True)
        return partial

    def partial_path(self, stage: str, digest: str) -> Path:
        """Where the build folder is (or will be); creates and removes nothing."""
        return self.path(stage, digest).with_name(f"{digest}.partial")

    def commit(self, stage: str, digest: str, stats: dict) -> Path:
        partial = self.partial_path(stage, digest)
        atomic_write_text(partial / SUCCESS, json.dumps(stats, indent=2, sort_keys=True))
        final = self.path(stage, digest)
        os.replace(partial, final)
        return final
