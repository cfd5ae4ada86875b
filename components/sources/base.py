"""What every source reader produces, and the registry that maps `kind:` to a reader.

A reader has two halves:
- `plan(spec, ctx) -> list[Unit]` runs on the driver: it lists files / parses annotation
  files and cuts the rows into units of about `ctx.shard_size` rows (one output shard each).
  It must be cheap: no image is opened here.
- `read(spec, ctx, unit) -> Iterator[RawRow | Rejected]` runs on a Ray worker: it yields
  every row of the unit, either as a RawRow (image bytes + text) or as a Rejected row with
  its reason (a missing image file is `Rejected(key, "missing-image-file", detail)`).
  Nothing may be dropped silently. A path named by an annotation (or a symlink in an image
  folder) is opened only when it resolves inside the dataset's folder (`contained_path`),
  else the row is `path-outside-dataset`, whether or not the file exists. An image file over
  the source's `max_image_bytes` is `too-large`, refused before it is read whole
  (`read_dataset_image` does all three checks).
A reader may also offer, for incremental refreshes (components/refresh.py):
- `items(spec, ctx) -> list[tuple]`: the rows `plan` cuts into units, in order, each a small
  picklable tuple whose second element is its key (a unit's payload is a list of them);
- `item_files(spec, item) -> list[Path]`: the files `read` opens for that item.

Inputs named by fsspec URLs (`s3://...`, see vlmflow.remote) go through the same helpers as local
files: `input_files` lists a file or a folder / prefix, `open_input` opens one, and
`read_dataset_image` reads an image an annotation names under a local folder or a URL prefix.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from vlmflow.errors import UserError
from vlmflow.registry import Registry
from vlmflow.remote import URL, list_objects, open_object

Location = Path | URL  # a local file or folder, or an fsspec URL (an object or a prefix)


@dataclass(frozen=True)
class SourceContext:
    name: str  # the source's unique name, prefix of every key it yields
    seed: int  # the recipe seed (sources with their own seed override it)
    shard_size: int


@dataclass(frozen=True)
class Unit:
    """One unit of ingest work: becomes one shard. `payload` must be small and picklable."""

    source: str
    index: int
    payload: Any
    rows: int  # rows in the unit (an estimate only for webdataset sources)


@dataclass
class RawRow:
    key: str  # unique within the source; ingest prefixes it with the source name
    image: bytes | None = None  # the image file's bytes, exactly as stored at the source
    captions: list[str] = field(default_factory=list)
    label: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # objects, qa, conversations, truth
    split: str | None = None  # None: the source's split


@dataclass(frozen=True)
class Rejected:
    key: str
    reason: str  # a stable reason code, e.g. "malformed-annotation"
    detail: str = ""


@dataclass(frozen=True)
class SourceReader:
    kind: str
    plan: Callable[[Any, SourceContext], list[Unit]]
    read: Callable[[Any, SourceContext, Unit], Iterator[RawRow | Rejected]]
    items: Callable[[Any, SourceContext], list[tuple]] | None = None
    item_files: Callable[[Any, tuple], list[Path]] | None = None


SOURCES: Registry[SourceReader] = Registry("source")

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_key(*parts: object) -> str:
    """A WebDataset-safe key: no dots (WebDataset splits keys at the first dot) or slashes."""
    return "-".join(_UNSAFE.sub("_", str(p)).strip("_") or "_" for p in parts)


def chunk(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)] or []


@dataclass(frozen=True)
class InputFile:
    location: Location
    prefix: str  # the key prefix of its rows: unique within the source
    identity: dict | None = None  # a remote object's ETag / size / version as listed (None: a local file)


def input_files(location: Location, suffix: str) -> list[InputFile]:
    """The file LOCATION names, or every SUFFIX file under it as a folder (recursively) or a URL
    prefix, sorted by name. Key prefixes are the file's stem, or its path relative to the folder
    without SUFFIX (made unique). A UserError when a folder or prefix holds no SUFFIX file."""
    if isinstance(location, URL):
        objects = list_objects(location)
        if len(objects) == 1 and objects[0].name == "":
            return [InputFile(location, safe_key(location.stem), objects[0].identity)]
        found = [(o.url, o.name, o.identity) for o in objects if o.name.lower().endswith(suffix)]
    elif location.is_file():
        return [InputFile(location, safe_key(location.stem))]
    else:
        files = sorted((p for p in location.rglob(f"*{suffix}") if p.is_file()), key=lambda p: p.as_posix())
        found = [(p, p.relative_to(location).as_posix(), None) for p in files]
    if not found:
        raise UserError(f"{location}: no {suffix} files in this {'prefix' if isinstance(location, URL) else 'folder'}")
    names = [safe_key(PurePosixPath(name).with_suffix("")) for _, name, _ in found]
    return [InputFile(where, key, ident) for (where, _, ident), key in zip(found, unique_keys(names), strict=True)]


def open_input(location: Location | str, identity: dict | None = None) -> IO[bytes]:
    """A local file or an fsspec URL opened for binary reading (a str is a local path). A remote
    object whose identity is no longer IDENTITY (the listing the run planned with) raises OSError."""
    if isinstance(location, URL):
        return open_object(location, identity)
    return open(location, "rb")


MISSING = "missing-image-file"
TOO_LARGE = "too-large"


def read_file_bytes(path: Path, max_bytes: int | None = None) -> tuple[bytes | None, str | None]:
    """Bytes of a file, or (None, detail) when it is missing, unreadable or over MAX_BYTES. Only a
    regular file is read: a FIFO, socket or device under the name would block or never end."""
    data, _, detail = read_capped(path, max_bytes)
    return data, detail or None


def read_capped(path: Path, max_bytes: int | None) -> tuple[bytes | None, str, str]:
    """(bytes, "", "") of a regular file, or (None, reason, detail): `missing-image-file` when it
    is absent or unreadable, `too-large` when it holds more than MAX_BYTES (None: no cap). The
    size is checked before reading, and the read stops one byte past the cap, so a file that
    grows after the check is refused too without being read whole."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None, MISSING, f"no such file: {path}"
    except OSError as exc:
        return None, MISSING, f"cannot read {path}: {exc.strerror or exc}"
    except ValueError as exc:  # a NUL byte in the name
        return None, MISSING, f"cannot read {str(path)!r}: {exc}"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None, MISSING, f"cannot read {path}: not a regular file"
        if max_bytes is not None and info.st_size > max_bytes:
            return None, TOO_LARGE, f"{path}: {info.st_size} bytes, over max_image_bytes {max_bytes}"
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = _read_up_to(handle, info.st_size, max_bytes)
    except OSError as exc:
        return None, MISSING, f"cannot read {path}: {exc.strerror or exc}"
    finally:
        os.close(fd)
    if data is None:
        return None, TOO_LARGE, f"{path}: over max_image_bytes {max_bytes} (it grew while read; reading stopped)"
    return data, "", ""


def _read_up_to(handle: IO[bytes], expected: int, max_bytes: int | None) -> bytes | None:
    """The file's bytes, reading at most MAX_BYTES + 1 (None: more than MAX_BYTES). EXPECTED (the
    size seen before reading) sizes the first read, so a small file never allocates the cap."""
    if max_bytes is None:
        return handle.read()
    data = handle.read(expected + 1)
    if len(data) > expected:  # it grew (or, like /proc files, reports 0): read again, capped
        handle.seek(0)
        data = handle.read(max_bytes + 1)
    return data if len(data) <= max_bytes else None


def read_dataset_image(
    root: Location, name: str | os.PathLike, allow_outside: bool, max_bytes: int | None
) -> tuple[bytes | None, str, str]:
    """(bytes, "", "") of the image file an annotation names under the dataset folder ROOT, or
    (None, reason, detail): `path-outside-dataset` (see `contained_path`), `missing-image-file`
    or `too-large` (over MAX_BYTES, refused before it is read whole). ROOT may be a URL prefix."""
    if isinstance(root, URL):
        return _read_remote_image(root, os.fspath(name), allow_outside, max_bytes)
    path, outside = contained_path(root, name, allow_outside)
    if path is None:
        return None, OUTSIDE, outside
    return read_capped(path, max_bytes)


OUTSIDE = "path-outside-dataset"


def _read_remote_image(
    root: URL, name: str, allow_outside: bool, max_bytes: int | None
) -> tuple[bytes | None, str, str]:
    """`read_dataset_image` under a URL prefix: NAME is a path relative to it (`..` may not leave it,
    an absolute path or a URL is outside it, unless ALLOW_OUTSIDE), read from the same store."""
    if "://" in name:
        if not allow_outside:
            return None, OUTSIDE, f"{name!r} is a URL outside the dataset prefix {root}"
        url = URL(name, root.options)
    else:
        joined = posixpath.normpath(posixpath.join(root.path, name))
        if not allow_outside and not joined.startswith(root.path + "/"):
            return None, OUTSIDE, f"{name!r} is outside the dataset prefix {root}"
        url = root.at(joined)
    try:
        fs = url.filesystem()
        size = fs.info(url.path).get("size")
        if max_bytes is not None and size is not None and size > max_bytes:
            return None, TOO_LARGE, f"{url}: {size} bytes, over max_image_bytes {max_bytes}"
        with open_input(url) as handle:
            data = handle.read(max_bytes + 1) if max_bytes is not None else handle.read()
    except FileNotFoundError:
        return None, MISSING, f"no such object: {url}"
    except Exception as exc:  # the store's client raises its own types
        return None, MISSING, f"cannot read {url}: {type(exc).__name__}: {exc}"
    if max_bytes is not None and len(data) > max_bytes:
        return None, TOO_LARGE, f"{url}: over max_image_bytes {max_bytes} (it grew while read; reading stopped)"
    return data, "", ""


def contained_path(root: Path, name: str | os.PathLike, allow_outside: bool = False) -> tuple[Path | None, str]:
    """(the path to open, "") for a file an annotation names under the dataset folder ROOT, or
    (None, detail) when it resolves (symlinks followed) outside ROOT: an absolute path, a `..`
    chain, a symlink to a file or folder elsewhere. The check runs before any existence test, so
    the answer is the same whether or not the outside file exists. `allow_outside` (a source's
    `allow_outside_paths: true`) turns the check off.

    The path returned is the resolved one (no symlink left to swap between check and read);
    one that cannot be resolved (a NUL byte, a symlink loop) is checked lexically and returned
    as written, for the read to fail on it.
    """
    path = root / name
    if allow_outside:
        return path, ""
    try:
        base = root.resolve()
    except (OSError, RuntimeError, ValueError):
        base = Path(os.path.abspath(root))
    try:
        real = opened = path.resolve()
    except (OSError, RuntimeError, ValueError):
        real, opened = Path(os.path.normpath(os.path.abspath(path))), path
        base = Path(os.path.normpath(os.path.abspath(root)))
    if not real.is_relative_to(base):
        return None, f"{os.fspath(name)!r} is outside the dataset folder {root}"
    return opened, ""


def unique_keys(keys: Iterable[str]) -> list[str]:
    """The keys, in order, with later duplicates renamed `KEY-2`, `KEY-3`... (never a natural key)."""
    keys = list(keys)
    taken = set(keys)
    seen: set[str] = set()
    result = []
    for key in keys:
        if key in seen:
            n = 2
            while f"{key}-{n}" in taken:
                n += 1
            key = f"{key}-{n}"
            taken.add(key)
        seen.add(key)
        result.append(key)
    return result


def load_json(path: Path) -> Any:
    """The parsed JSON file; a UserError naming the file (and line/column) when it cannot be parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text: {exc}") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
