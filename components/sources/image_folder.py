"""`image-folder`: images under a folder, captions from sidecar .txt files or a captions file.

The captions file is `captions_file`, else a Hugging Face imagefolder `metadata.jsonl` or
`metadata.csv` at the top of the folder, else there is none and each image's captions are the
lines of its `.txt` sidecar. Its columns: `file` or `file_name` (relative to the folder), and
`caption` (jsonl: and/or a `captions` list) or `text`.

Rows are the images found on disk (recursively, sorted) plus any file named in the captions
file, so a listed file that is absent becomes `missing-image-file` instead of vanishing.
A captions-file line that names no usable file is its own `malformed-annotation` row; a
line that names a file but is otherwise malformed rejects that file's row.

Every file is read only when it resolves inside the folder: a captions-file line naming an
absolute path elsewhere or a `..` chain is its own `path-outside-dataset` row, and an image
that is a symlink (or lies under a symlinked folder) leading outside is `path-outside-dataset`
too, whether or not the target exists. `allow_outside_paths: true` lifts both checks.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from vlmflow.components.sources.base import (
    OUTSIDE,
    SOURCES,
    RawRow,
    Rejected,
    SourceContext,
    SourceReader,
    Unit,
    chunk,
    contained_path,
    read_dataset_image,
    read_file_bytes,
    safe_key,
    unique_keys,
)
from vlmflow.errors import UserError
from vlmflow.specs.data import ImageFolderSource

MALFORMED = "malformed-annotation"
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # Hugging Face imagefolder's captions files
FILE_COLUMNS = ("file", "file_name")  # file_name: Hugging Face imagefolder's
CSV_CAPTIONS = ("caption", "text")  # the first present is the caption column; text: Hugging Face's
JSONL_CAPTIONS = ("caption", "captions", "text")


def _extensions(spec: ImageFolderSource) -> set[str]:
    return {e.lower() if e.startswith(".") else f".{e.lower()}" for e in spec.extensions}


def _images_on_disk(root: Path, extensions: set[str]) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in files:
            if Path(name).suffix.lower() in extensions:
                found.append((Path(folder) / name).relative_to(root).as_posix())
    return sorted(found)


def _relative(file: object, root: Path, allow_outside: bool) -> tuple[str | None, bool]:
    """(the listed file as a path relative to the image folder, False); (None, True) when it lies
    outside the folder (with `allow_outside`: its normalised path, absolute or `../...`);
    (None, False) when it is unusable."""
    if not isinstance(file, str) or not file.strip():
        return None, False
    path = Path(file.strip())
    if path.is_absolute() and path.is_relative_to(root):
        path = path.relative_to(root)
    normal = PurePosixPath(os.path.normpath(path.as_posix()))
    if str(normal) == ".":
        return None, False
    if normal.is_absolute() or normal.parts[:1] == ("..",):
        return (normal.as_posix(), False) if allow_outside else (None, True)
    return normal.as_posix(), False


class _Captions:
    """Captions per listed file, the files whose lines were malformed, and unattributable lines."""

    def __init__(self, root: Path, source: Path, allow_outside: bool = False):
        self.root, self.source, self.allow_outside = root, source, allow_outside
        self.file_column = "file"
        self.by_file: dict[str, list[str]] = {}
        self.bad_files: dict[str, str] = {}
        self.bad_lines: list[tuple[int, str, str]] = []  # (line, reason, detail)

    def add(self, line: int, file: object, captions: object, problem: str = "") -> None:
        rel, outside = _relative(file, self.root, self.allow_outside)
        if outside:
            detail = f"{self.source.name} line {line}: file {str(file).strip()!r} is outside the image folder"
            self.bad_lines.append((line, OUTSIDE, detail))
            return
        if rel is None:
            detail = f"{self.source.name} line {line}: {self.file_column}: missing or not a path"
            self.bad_lines.append((line, MALFORMED, detail))
            return
        self.by_file.setdefault(rel, [])
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            self.bad_files.setdefault(rel, f"{self.source.name} line {line}: {problem}")
        else:
            self.by_file[rel].extend(c.strip() for c in captions)

    def columns(self, found: list[str], captions: tuple[str, ...]) -> str:
        """Set the file column (`file`, or Hugging Face imagefolder's `file_name`) from the columns
        FOUND and return the first of CAPTIONS among them; a UserError naming the columns found
        when either is missing."""
        file = next((c for c in FILE_COLUMNS if c in found), None)
        caption = next((c for c in captions if c in found), None)
        if file is None or caption is None:
            raise UserError(
                f"{self.source}: a captions file needs a {' or '.join(FILE_COLUMNS)} column and a "
                f"{' or '.join(captions)} column; found: {_names(found)}"
            )
        self.file_column = file
        return caption


def _names(columns: list[str], most: int = 20) -> str:
    shown = [c if len(c) <= 40 else c[:40] + "..." for c in columns[:most]]
    return ", ".join(shown + ([f"... ({len(columns)} in all)"] if len(columns) > most else [])) or "none"


def _read_csv(path: Path, table: _Captions) -> None:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            column = table.columns(list(reader.fieldnames or []), CSV_CAPTIONS)
            for record in reader:
                caption = record.get(column)
                captions = [caption] if caption is not None else None
                table.add(reader.line_num, record.get(table.file_column), captions, f"{column}: expected a string")
    except (UnicodeDecodeError, csv.Error, OSError) as exc:
        raise UserError(f"{path}: cannot read the captions csv: {exc}") from None


def _jsonl_records(path: Path, table: _Captions) -> list[tuple[int, dict]]:
    """(line number, object) of every usable line; the others are bad lines of TABLE."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (UnicodeDecodeError, OSError) as exc:
        raise UserError(f"{path}: cannot read the captions jsonl: {exc}") from None
    records = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            table.bad_lines.append((number, MALFORMED, f"{path.name} line {number}: invalid JSON: {exc.msg}"))
            continue
        except RecursionError:
            table.bad_lines.append((number, MALFORMED, f"{path.name} line {number}: JSON nested too deeply"))
            continue
        if not isinstance(record, dict):
            table.bad_lines.append((number, MALFORMED, f"{path.name} line {number}: expected an object"))
            continue
        records.append((number, record))
    return records


def _read_jsonl(path: Path, table: _Captions) -> None:
    records = _jsonl_records(path, table)
    if not records:
        return
    found = list(dict.fromkeys(key for _, record in records for key in record))
    column = table.columns(found, JSONL_CAPTIONS)
    for number, record in records:
        captions: object = None
        if column == "text":
            captions = [record["text"]] if "text" in record else None
            problem = "text: expected a string"
        else:
            single = [record["caption"]] if "caption" in record else []
            many = record.get("captions", [])
            if "caption" in record or "captions" in record:
                captions = single + many if isinstance(many, list) else None
            problem = "caption: expected a string (or captions: a list of strings)"
        table.add(number, record.get(table.file_column), captions, problem)


def _captions_path(spec: ImageFolderSource) -> Path | None:
    """The captions file: `captions_file`, else a Hugging Face imagefolder `metadata.jsonl` /
    `metadata.csv` at the top of the folder (it must lie inside the folder), else None (sidecars)."""
    if spec.captions_file is not None:
        return spec.captions_file
    found = [spec.path / name for name in METADATA_FILES if os.path.lexists(spec.path / name)]
    if len(found) > 1:
        both = " and ".join(METADATA_FILES)
        raise UserError(f"{spec.path}: holds both {both}; keep one, or name one as captions_file")
    if not found:
        return None
    real, outside = contained_path(spec.path, found[0].name, spec.allow_outside_paths)
    if real is None:
        raise UserError(f"{found[0]}: {outside} (a symlink); set allow_outside_paths: true to read it")
    if not real.is_file():
        raise UserError(f"{found[0]}: not a regular file")
    return found[0]


def _caption_table(spec: ImageFolderSource) -> _Captions | None:
    path = _captions_path(spec)
    if path is None:
        return None
    table = _Captions(spec.path, path, spec.allow_outside_paths)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        _read_csv(path, table)
    elif suffix == ".jsonl":
        _read_jsonl(path, table)
    else:
        raise UserError(f"{path}: captions_file must be a .csv (file,caption) or a .jsonl ({{file, caption}})")
    return table


def items(spec: ImageFolderSource, ctx: SourceContext) -> list[tuple]:
    """Every row of the source, in order: ("row", key, file, captions or None for the sidecar) or
    ("rejected", key, reason, detail). `plan` cuts them into units; refreshes reuse them one by one."""
    table = _caption_table(spec)
    files = set(_images_on_disk(spec.path, _extensions(spec)))
    if table is not None:
        files |= set(table.by_file)
    if not files and not (table and table.bad_lines):
        raise UserError(f"{spec.path}: no images with extensions {', '.join(sorted(_extensions(spec)))} in this folder")
    ordered = sorted(files)
    names = [str(PurePosixPath(rel).with_suffix("")) for rel in ordered]
    bad_line_keys = [f"{table.source.stem}-line-{n}" for n, _, _ in table.bad_lines] if table else []
    keys = unique_keys([safe_key(n) for n in names] + [safe_key(k) for k in bad_line_keys])
    items: list[tuple] = []
    for key, rel in zip(keys, ordered, strict=False):
        if table is None:
            items.append(("row", key, rel, None))
        elif rel in table.bad_files:
            items.append(("rejected", key, MALFORMED, table.bad_files[rel]))
        else:
            items.append(("row", key, rel, table.by_file.get(rel, [])))
    for key, (_, reason, detail) in zip(keys[len(ordered) :], table.bad_lines if table else [], strict=True):
        items.append(("rejected", key, reason, detail))
    return items[: spec.limit] if spec.limit is not None else items


def item_files(spec: ImageFolderSource, item: tuple) -> list[Path]:
    """The files `read` opens for one item: the image, and its sidecar .txt when it has no listed captions."""
    if item[0] != "row":
        return []
    image = spec.path / item[2]
    return [image, image.with_suffix(".txt")] if item[3] is None else [image]


def plan(spec: ImageFolderSource, ctx: SourceContext) -> list[Unit]:
    rows = items(spec, ctx)
    return [Unit(ctx.name, i, part, len(part)) for i, part in enumerate(chunk(rows, ctx.shard_size))]


def _sidecar_captions(spec: ImageFolderSource, rel: str) -> tuple[list[str] | None, str | None, str]:
    """(captions, None, "") or (None, reason, detail)."""
    sidecar, outside = contained_path(spec.path, PurePosixPath(rel).with_suffix(".txt"), spec.allow_outside_paths)
    if sidecar is None:
        return None, OUTSIDE, f"caption sidecar: {outside}"
    captions, problem = _read_sidecar(sidecar)
    return captions, None if captions is not None else MALFORMED, problem or ""


def _read_sidecar(sidecar: Path) -> tuple[list[str] | None, str | None]:
    if not os.path.lexists(sidecar):
        return [], None
    data, problem = read_file_bytes(sidecar)  # a regular file only: a FIFO would block
    if data is None:
        return None, problem
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, f"{sidecar.name}: not UTF-8 text"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines or [""], None


def read(spec: ImageFolderSource, ctx: SourceContext, unit: Unit) -> Iterator[RawRow | Rejected]:
    for item in unit.payload:
        if item[0] == "rejected":
            yield Rejected(item[1], item[2], item[3])
            continue
        _, key, rel, captions = item
        path = spec.path / rel
        image, reason, detail = read_dataset_image(spec.path, rel, spec.allow_outside_paths, spec.max_image_bytes)
        if image is None:
            yield Rejected(key, reason, detail)
            continue
        if captions is None:
            captions, reason, problem = _sidecar_captions(spec, rel)
            if captions is None:
                yield Rejected(key, reason or MALFORMED, problem)
                continue
        label = path.parent.name if spec.label_from_parent else None
        yield RawRow(key=key, image=image, captions=list(captions), label=label, extra={"path": rel})


SOURCES.register("image-folder", SourceReader("image-folder", plan, read, items, item_files))
