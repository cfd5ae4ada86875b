"""`webdataset`: existing WebDataset shards (a .tar file, or a folder of them searched recursively;
or an fsspec URL of one, or of a prefix holding them: `s3://bucket/shards/`).

One unit per tar. The plan lists each local tar's member headers (tarfile reads one 512-byte
header per member and seeks over the data, no image is read) to count its samples, so
`Unit.rows` is exact for a sound tar and a lower estimate for a damaged one. A remote tar is
not read at plan time (its headers are spread over the whole object: counting them would
download it twice), so its `Unit.rows` is 0, unknown, unless `limit` is set: then the tars are
streamed in order to count their samples until the limit is reached. A remote tar is read with
the ETag it was listed with; one changed since is `unreadable-shard` (see vlmflow.remote).

Members are grouped the WebDataset way: the key is the path up to the first dot of the
basename, the rest is the extension, and a sample is a run of consecutive members with
one key. The image is the first of IMAGE_EXTENSIONS present; the caption comes from the
`caption_key` member (the whole text, stripped) or from the json member's "caption" /
"captions"; the json's other fields go to extra["json"]; a `cls` member gives the label.
A tar that fails part-way yields the samples completed before the failure, then one
`Rejected(<tar key>, "unreadable-shard", ...)`; the sample being read when it failed is
named in that detail and not yielded (its members may be incomplete).

Hostile tars: a member's size is checked from its header before anything is read (a sparse
member of a few KiB can declare a GiB of zeros): a sample with an image member over
`max_image_bytes`, or a caption / json / cls member over `max_text_bytes`, is
`member-too-large`. Members the sample does not use (other extensions) are never read. A
sample with a symlink or hardlink member is `link-member`, and one with a device or FIFO
member is `special-member` (neither is followed or read), so no sample vanishes.
"""

from __future__ import annotations

import json
import re
import tarfile
import zlib
from collections.abc import Iterator
from typing import IO, BinaryIO

from vlmflow.components.sources.base import (
    SOURCES,
    InputFile,
    RawRow,
    Rejected,
    SourceContext,
    SourceReader,
    Unit,
    input_files,
    open_input,
    safe_key,
)
from vlmflow.remote import URL
from vlmflow.specs.data import WebDatasetSource

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MALFORMED = "malformed-annotation"
TOO_LARGE = "member-too-large"
LINK = "link-member"
SPECIAL = "special-member"
# webdataset.tariterators.base_plus_ext: (dirname + basename up to the first dot, the rest)
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def _split(name: str) -> tuple[str, str] | None:
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def _kind(member: tarfile.TarInfo) -> str | None:
    """The member's kind, "file", "link" or "special" (it belongs to a sample); None for a directory."""
    if member.isfile():
        return "file"
    if member.issym() or member.islnk():
        return "link"
    if member.isdir():
        return None
    return "special"  # character / block device, FIFO, or a type tarfile does not know


def _count_samples(tar_file: InputFile) -> int:
    """Samples in the tar from its member headers (a remote tar is streamed); the count so far
    when the tar is damaged."""
    count, previous = 0, None
    mode = "r|" if isinstance(tar_file.location, URL) else "r:"
    try:
        with open_input(tar_file.location, tar_file.identity) as raw, tarfile.open(fileobj=raw, mode=mode) as tar:
            for member in tar:
                parts = _split(member.name) if _kind(member) else None
                if parts and parts[0] != previous:
                    count, previous = count + 1, parts[0]
    except _TAR_ERRORS:
        pass
    return count


def plan(spec: WebDatasetSource, ctx: SourceContext) -> list[Unit]:
    units = []
    left = spec.limit
    for tar in input_files(spec.path, ".tar"):
        if left is not None and left <= 0:
            break
        remote = isinstance(tar.location, URL)
        count = 0 if remote and left is None else _count_samples(tar)
        rows = count if left is None else min(count, left)
        where = tar.location if remote else str(tar.location)
        payload = {"path": where, "prefix": tar.prefix, "max_samples": left, "identity": tar.identity}
        units.append(Unit(ctx.name, len(units), payload, rows))
        if left is not None:
            left -= count
    return units


def _members(path: str | URL, identity: dict | None) -> Iterator[tuple[str, str, tarfile.TarInfo, IO[bytes] | None]]:
    """(sample key, extension, header, data stream) of each member but directories, streamed;
    raises the tar's errors. The stream (None for a link or special member) is read, if at all,
    before the next member is asked for (the tar is read in one pass).

    tarfile ends quietly at a truncated or garbled header, so the bytes after the last
    member must be the end-of-archive zero blocks: anything else is reported as damage.
    """
    with open_input(path, identity) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for member in tar:
            kind = _kind(member)
            parts = _split(member.name) if kind else None
            if parts is None:
                continue
            yield parts[0], parts[1], member, tar.extractfile(member) if kind == "file" else None
        raw.seek(tar.offset)
        _check_end(raw, tar.offset)


def _check_end(raw: BinaryIO, offset: int) -> None:
    seen = 0
    while block := raw.read(1 << 16):
        if block.count(0) != len(block):
            raise tarfile.ReadError(f"unreadable data at byte {offset + seen} (a damaged or truncated header)")
        seen += len(block)
    if seen == 0:
        raise tarfile.ReadError(f"truncated at byte {offset}: no end-of-archive marker")


def _text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def _annotations(spec: WebDatasetSource, members: dict[str, bytes]) -> tuple[list[str], dict | None, str | None]:
    """(captions, json fields other than the captions, problem)."""
    meta: dict | None = None
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return [], None, f"json: invalid JSON: {exc}"
        if not isinstance(meta, dict):
            return [], None, "json: expected an object"
    if spec.caption_key != "json" and spec.caption_key in members:
        text = _text(members[spec.caption_key])
        if text is None:
            return [], None, f"{spec.caption_key}: not UTF-8 text"
        captions = [text.strip()]
    else:
        captions = []
        if meta is not None and isinstance(meta.get("caption"), str):
            captions.append(meta["caption"].strip())
        elif meta is not None and "caption" in meta:
            return [], None, "json: caption: not a string"
        many = meta.get("captions", []) if meta is not None else []
        if not isinstance(many, list) or not all(isinstance(c, str) for c in many):
            return [], None, "json: captions: not a list of strings"
        captions += [c.strip() for c in many]
    rest = {k: v for k, v in meta.items() if k not in ("caption", "captions")} if meta else None
    return captions, rest, None


def _sample(spec: WebDatasetSource, key: str, sample: _Sample) -> RawRow | Rejected:
    members, duplicates = sample.members, sample.duplicates
    if sample.links:
        return Rejected(key, LINK, f"link members (not followed): {'; '.join(sample.links)}")
    if sample.special:
        return Rejected(key, SPECIAL, f"device or FIFO members (not read): {'; '.join(sample.special)}")
    if sample.too_large:
        return Rejected(key, TOO_LARGE, f"members over the size limit (not read): {'; '.join(sample.too_large)}")
    if duplicates:
        return Rejected(key, MALFORMED, f"duplicate members: {', '.join(sorted(duplicates))}")
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image_ext is None:
        return Rejected(key, "no-image", f"members: {', '.join(sorted(members))}")
    captions, meta, problem = _annotations(spec, members)
    if problem:
        return Rejected(key, MALFORMED, problem)
    label_text = _text(members["cls"]) if "cls" in members else None
    extra = {"json": meta} if meta else {}
    label = label_text.strip() if label_text is not None else None
    return RawRow(key=key, image=members[image_ext], captions=captions, label=label, extra=extra)


class _Sample:
    def __init__(self, key: str):
        self.key = key
        self.members: dict[str, bytes] = {}
        self.duplicates: set[str] = set()
        self.links: list[str] = []  # "NAME -> TARGET" of symlink / hardlink members
        self.special: list[str] = []
        self.too_large: list[str] = []  # "NAME: SIZE bytes > LIMIT"

    def add(self, ext: str, data: bytes) -> None:
        if ext in self.members:
            self.duplicates.add(ext)
        self.members[ext] = data


def _limit(spec: WebDatasetSource, ext: str) -> int | None:
    """The most bytes read for a member with this extension; None: the sample does not use it."""
    if ext in IMAGE_EXTENSIONS:
        return spec.max_image_bytes
    if ext in (spec.caption_key, "json", "cls"):
        return spec.max_text_bytes
    return None


def _add_member(
    spec: WebDatasetSource, sample: _Sample, ext: str, member: tarfile.TarInfo, stream: IO[bytes] | None
) -> None:
    """Record one member; its data is read only when the sample uses it and it is within the limit."""
    if member.issym() or member.islnk():
        sample.links.append(f"{member.name} -> {member.linkname}")
        return
    if stream is None:
        sample.special.append(member.name)
        return
    limit = _limit(spec, ext)
    if limit is not None and member.size > limit:
        sample.too_large.append(f"{member.name}: {member.size} bytes > {limit}")
        return
    # an unused member is recorded (duplicates, the no-image detail) but not read
    sample.add(ext, stream.read() if limit is not None else b"")


def read(spec: WebDatasetSource, ctx: SourceContext, unit: Unit) -> Iterator[RawRow | Rejected]:
    path, prefix, max_samples = unit.payload["path"], unit.payload["prefix"], unit.payload["max_samples"]
    seen: set[str] = set()

    def finish(sample: _Sample) -> RawRow | Rejected:
        key, n = safe_key(prefix, sample.key), 2
        while key in seen:  # a key repeated later in the tar, or two keys equal after safe_key
            key, n = safe_key(prefix, sample.key, n), n + 1
        seen.add(key)
        return _sample(spec, key, sample)

    done, current = 0, None
    members = _members(path, unit.payload.get("identity"))
    try:
        for sample_key, ext, member, stream in members:
            if current is not None and sample_key != current.key:
                yield finish(current)
                done, current = done + 1, None
                if max_samples is not None and done >= max_samples:
                    return
            current = current or _Sample(sample_key)
            _add_member(spec, current, ext, member, stream)
    except _TAR_ERRORS as exc:
        partial = f"; sample {current.key!r} was being read and is not included" if current else ""
        yield Rejected(safe_key(prefix), "unreadable-shard", f"{path}: {exc} (after {done} samples{partial})")
        return
    finally:
        members.close()
    if current is not None:
        yield finish(current)


SOURCES.register("webdataset", SourceReader("webdataset", plan, read))
