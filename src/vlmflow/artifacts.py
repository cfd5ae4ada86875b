"""Content-addressed stage outputs: DIR/artifacts/STAGE/DIGEST/, `_SUCCESS` written last.

DIGEST = hash(stage name, stage spec, input digests, component version). A stage builds in
DIGEST.partial/ (units it finished there survive a crash and are reused on resume), writes
`_MANIFEST.json` (every file's sha256 and size), then `_SUCCESS` with its stats, makes its
files read-only, then renames the folder into place: a folder named DIGEST is always
complete, and `check_manifest` (`vlmflow verify`) says whether it still holds what was
committed. Folders stay writable by their owner, so removing an artifact still works.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUCCESS = "_SUCCESS"
MANIFEST = "_MANIFEST.json"
MANIFEST_FORMAT = 1


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
    except OSError as exc:
        if exc.filename is None:  # a write's own error names no file (a full disk): name the one written
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


PROBE_BYTES = 64 * 1024


def check_writable(folder: Path) -> None:
    """Create `folder` and write (and remove) a small file in it: a workdir that is read-only,
    not this user's, or on a full disk fails here with the OSError naming it, before a run
    starts anything (Prefect's server, which keeps its database there, would only time out)."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".vlmflow-write-check-{os.getpid()}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * PROBE_BYTES)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(folder)) from exc
    finally:
        if os.path.lexists(probe):
            probe.unlink()


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
        if partial.is_dir():
            make_writable(partial)  # a commit that died after making its files read-only
        partial.mkdir(parents=True, exist_ok=True)
        return partial

    def partial_path(self, stage: str, digest: str) -> Path:
        """Where the build folder is (or will be); creates and removes nothing."""
        return self.path(stage, digest).with_name(f"{digest}.partial")

    def commit(self, stage: str, digest: str, stats: dict) -> Path:
        """The build folder as the artifact: its manifest, then `_SUCCESS`, every file made
        read-only, then renamed into place."""
        partial = self.partial_path(stage, digest)
        write_manifest(partial)
        atomic_write_text(partial / SUCCESS, json.dumps(stats, indent=2, sort_keys=True))
        make_read_only(partial)
        final = self.path(stage, digest)
        os.replace(partial, final)
        return final


# ---------------------------------------------------------------------------------------------
# Content manifests and read-only artifacts


def _entries(folder: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix name, path) of every file and symlink under `folder`, sorted by name;
    symlinks are listed, never followed; other kinds (sockets, fifos) are left out."""
    found = []
    for parent, dirs, files in os.walk(folder):
        base = Path(parent)
        for name in [*files, *(d for d in dirs if (base / d).is_symlink())]:
            path = base / name
            if path.is_symlink() or stat.S_ISREG(path.lstat().st_mode):
                found.append((path.relative_to(folder).as_posix(), path))
    return iter(sorted(found))


def _entry(path: Path) -> dict:
    if path.is_symlink():
        return {"link": os.readlink(path)}
    return {"sha256": file_sha256(path), "size": path.stat().st_size}


def manifest_of(folder: Path) -> dict[str, dict]:
    """{relative path: {"sha256", "size"}} of every file under `folder` ({"link": text} for a
    symlink), but `_MANIFEST.json` and `_SUCCESS`; files are hashed as they are, streaming."""
    return {name: _entry(path) for name, path in _entries(folder) if name not in (MANIFEST, SUCCESS)}


def write_manifest(folder: Path) -> dict[str, dict]:
    """Write `folder`/_MANIFEST.json; returns its files. The same files give the same bytes."""
    files = manifest_of(folder)
    text = json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1, sort_keys=True)
    atomic_write_text(folder / MANIFEST, text)
    return files


@dataclass
class Drift:
    """How a committed folder differs from its manifest (relative paths, sorted)."""

    files: int  # in the manifest
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.extra)

    def describe(self, limit: int = 5) -> str:
        if self.ok:
            return f"ok ({self.files} files)"
        counts = f"{len(self.changed)} files changed, {len(self.missing)} missing, {len(self.extra)} extra"
        named = [f"{kind} {name}" for kind in ("changed", "missing", "extra") for name in getattr(self, kind)]
        more = f", and {len(named) - limit} more" if len(named) > limit else ""
        return f"drift: {counts}: {', '.join(named[:limit])}{more}"


def check_manifest(folder: Path) -> Drift | None:
    """Re-hash `folder` against its `_MANIFEST.json`: None when it has none (committed before
    vlmflow recorded one). A file whose size differs is changed without being read."""
    try:
        recorded = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Drift(0, changed=[f"{MANIFEST} (unreadable: {exc})"])
    drift = Drift(len(recorded))
    present = dict(_entries(folder))
    for name, entry in sorted(recorded.items()):
        path = present.pop(name, None)
        if path is None:
            drift.missing.append(name)
        elif "link" in entry or path.is_symlink():
            if not path.is_symlink() or os.readlink(path) != entry.get("link"):
                drift.changed.append(name)
        elif path.stat().st_size != entry.get("size") or file_sha256(path) != entry.get("sha256"):
            drift.changed.append(name)
    drift.extra = sorted(name for name in present if name not in (MANIFEST, SUCCESS))
    return drift


def make_read_only(folder: Path) -> None:
    """chmod a-w every file under `folder` (symlinks are not followed; folders keep their modes)."""
    for _, path in _entries(folder):
        if not path.is_symlink():
            mode = path.stat().st_mode
            if mode & 0o222:
                os.chmod(path, stat.S_IMODE(mode) & ~0o222)


def make_writable(folder: Path) -> None:
    """chmod u+w every file under `folder` (a build folder whose commit did not finish)."""
    for _, path in _entries(folder):
        if not path.is_symlink():
            mode = path.stat().st_mode
            if not mode & stat.S_IWUSR:
                os.chmod(path, stat.S_IMODE(mode) | stat.S_IWUSR)


def store_holding(path: Path, stores: Iterable[Path]) -> Path | None:
    """The artifact store `path` would be written inside (symlinks and `..` resolved; `path`
    need not exist): one of `stores`, or the store of a committed artifact (a folder holding
    `_SUCCESS`) above it. None: outside every store."""
    target = Path(os.path.realpath(path))
    for store in stores:
        root = Path(os.path.realpath(store))
        if target.is_relative_to(root):
            return store
    for folder in (target, *target.parents):
        if (folder / SUCCESS).is_file() and folder.parent != folder:
            return folder.parent.parent
    return None
