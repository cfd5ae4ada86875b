"""`parquet`: parquet file(s) with image bytes, Hugging Face {bytes, path} image structs, or paths.

The plan reads metadata only (plus the key column when `key_column` is set, to make keys
unique across the whole source): consecutive row groups are merged into units of at most
`shard_size` rows, and a row group bigger than that is split into row ranges. Keys are
`<file stem>-<row number in file>` (the relative path for a folder of files) or the
`key_column` value. A parquet file that cannot be read on the worker rejects each of its
planned rows as `unreadable-shard`. An image path (a path column or a struct's `path`) is
read only when it resolves inside `image_root` (default: the parquet file's folder): an
absolute path or `..` chain leading elsewhere is `path-outside-dataset`, whether or not the
file exists, unless `allow_outside_paths: true`; an image file over `max_image_bytes` is
`too-large` (image bytes stored in the parquet file itself are not capped: they are read already).

`path` (and `image_root`) may be fsspec URLs: a remote parquet file is read through fsspec (its
footer, then the row groups a unit needs: range reads), a prefix is listed for .parquet objects,
and image paths resolve under the URL prefix the same way, `..` never leaving it. A remote file
is read with the ETag it was listed with; one changed since rejects its rows as `unreadable-shard`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vlmflow.components.sources.base import (
    SOURCES,
    RawRow,
    Rejected,
    SourceContext,
    SourceReader,
    Unit,
    input_files,
    open_input,
    read_dataset_image,
    safe_key,
    unique_keys,
)
from vlmflow.errors import UserError
from vlmflow.remote import URL
from vlmflow.specs.data import HfDiskSource, ParquetSource


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _is_bytes(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def check_columns(spec: ParquetSource | HfDiskSource, path: Path | URL, schema: pa.Schema) -> None:
    """The columns SPEC names (image, caption, key, label) are in SCHEMA with types it can read;
    a UserError naming PATH and the columns present otherwise."""
    named = {"image": spec.image_column, "caption": spec.caption_column, "key": spec.key_column}
    for what, name in {**named, "label": spec.label_column}.items():
        if name is not None and name not in schema.names:
            raise UserError(f"{path}: no {what} column {name!r} (columns: {', '.join(schema.names)})")
    image = schema.field(spec.image_column).type
    struct_ok = pa.types.is_struct(image) and {image.field(i).name for i in range(image.num_fields)} & {"bytes", "path"}
    if not (_is_bytes(image) or _is_text(image) or struct_ok):
        raise UserError(
            f"{path}: image column {spec.image_column!r} has type {image}; expected binary, a path string, "
            "or a struct with bytes/path"
        )
    if spec.caption_column is not None:
        check_caption_column(path, schema, spec.caption_column)


def check_caption_column(
    path: Path | URL, schema: pa.Schema, column: str, is_text: Callable[[pa.DataType], bool] = _is_text
) -> None:
    """A caption column holds strings or lists of strings (`is_text` says what a string is)."""
    caption = schema.field(column).type
    is_list = pa.types.is_list(caption) or pa.types.is_large_list(caption)
    if not (is_text(caption) or (is_list and is_text(caption.value_type))):
        raise UserError(f"{path}: caption column {column!r} has type {caption}; expected a string or a list of strings")


@contextmanager
def parquet_file(path: Path | URL | str, identity: dict | None = None) -> Iterator[pq.ParquetFile]:
    """The parquet file (local, or remote through `open_input`) with its metadata read, closed
    afterwards; raises pyarrow's errors or OSError."""
    with ExitStack() as stack:
        parquet = pq.ParquetFile(stack.enter_context(open_input(path, identity)) if isinstance(path, URL) else path)
        stack.callback(parquet.close)
        yield parquet


def _metadata(path: Path | URL, identity: dict | None) -> tuple[pa.Schema, pq.FileMetaData]:
    try:
        with parquet_file(path, identity) as parquet:
            return parquet.schema_arrow, parquet.metadata
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: cannot read parquet metadata: {exc}") from None


def row_ranges(group_rows: list[int], shard_size: int, left: float) -> list[tuple[int, int, int, int]]:
    """(group, first row of the group, start, stop) of row ranges of at most SHARD_SIZE rows cut from
    groups of GROUP_ROWS rows (row groups, record batches), in order, LEFT rows at most in all."""
    ranges, first_row = [], 0
    for group, rows in enumerate(group_rows):
        for start in range(0, rows, shard_size):
            stop = int(min(rows, start + shard_size, start + left))
            if stop > start:
                ranges.append((group, first_row, start, stop))
                left -= stop - start
        first_row += rows
        if left <= 0:
            break
    return ranges


def _pieces(spec: ParquetSource, ctx: SourceContext) -> list[dict]:
    """Row ranges of at most shard_size rows, in file / row-group order, cut at `limit`."""
    pieces: list[dict] = []
    left = spec.limit if spec.limit is not None else float("inf")
    for file in input_files(spec.path, ".parquet"):
        path = file.location
        schema, metadata = _metadata(path, file.identity)
        check_columns(spec, path, schema)
        groups = [metadata.row_group(group).num_rows for group in range(metadata.num_row_groups)]
        for group, first_row, start, stop in row_ranges(groups, ctx.shard_size, left):
            pieces.append(
                {
                    "file": path if isinstance(path, URL) else str(path),
                    "identity": file.identity,
                    "prefix": file.prefix,
                    "row_group": group,
                    "first_row": first_row,
                    "start": start,
                    "stop": stop,
                    "key_row": first_row + start,
                    "keys": None,
                }
            )
            left -= stop - start
        if left <= 0:
            break
    return pieces


def default_keys(piece: dict) -> list[str]:
    """`<prefix>-<row>` of each row of the piece, numbered from its `key_row`."""
    return [safe_key(piece["prefix"], piece["key_row"] + i) for i in range(piece["stop"] - piece["start"])]


def assign_keys(pieces: list[dict], key_values: Callable[[dict], list]) -> None:
    """With a key column (KEY_VALUES: a piece's rows' values): make the keys unique over the source,
    store them per piece; a null value keeps the default key and is remembered in `null_keys`."""
    names: list[str] = []
    for piece in pieces:
        values = key_values(piece)
        piece["null_keys"] = [i for i, v in enumerate(values) if v is None]
        defaults = default_keys(piece)
        names += [safe_key(v) if v is not None else default for v, default in zip(values, defaults, strict=True)]
    keys, offset = unique_keys(names), 0
    for piece in pieces:
        count = piece["stop"] - piece["start"]
        piece["keys"], offset = keys[offset : offset + count], offset + count


def _key_values(spec: ParquetSource) -> Callable[[dict], list]:
    """A piece's values of the key column; each file's column is read once."""
    columns: dict[str, list] = {}

    def values(piece: dict) -> list:
        if piece["file"] not in columns:
            with parquet_file(piece["file"], piece["identity"]) as parquet:
                columns[piece["file"]] = parquet.read(columns=[spec.key_column]).column(0).to_pylist()
        return columns[piece["file"]][piece["first_row"] + piece["start"] : piece["first_row"] + piece["stop"]]

    return values


def pack_units(ctx: SourceContext, pieces: list[dict]) -> list[Unit]:
    """Consecutive pieces (dicts with `start` / `stop`) merged into units of at most shard_size rows."""
    units: list[list[dict]] = []
    size = ctx.shard_size
    for piece in pieces:
        rows = piece["stop"] - piece["start"]
        if not units or size + rows > ctx.shard_size:
            units.append([])
            size = 0
        units[-1].append(piece)
        size += rows
    return [Unit(ctx.name, i, part, sum(p["stop"] - p["start"] for p in part)) for i, part in enumerate(units)]


def plan(spec: ParquetSource, ctx: SourceContext) -> list[Unit]:
    pieces = _pieces(spec, ctx)
    if spec.key_column is not None:
        assign_keys(pieces, _key_values(spec))
    return pack_units(ctx, pieces)


def _image(spec: ParquetSource | HfDiskSource, value: object, base: Path | URL) -> tuple[bytes | None, str, str]:
    """(bytes, "", "") or (None, reason, detail)."""
    if isinstance(value, dict):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if value is None or value == "":
        return None, "no-image", "the image column is null"
    if isinstance(value, bytes):
        return value, "", ""
    return read_dataset_image(base, value, spec.allow_outside_paths, spec.max_image_bytes)


def _captions(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value.strip()]
    return [c.strip() for c in value if c is not None]


Columns = dict[str, list]


def read_piece(
    spec: ParquetSource | HfDiskSource,
    piece: dict,
    load: Callable[[dict, list[str]], Columns],
    base: Path | URL,
    label: Callable[[object], str | None] = lambda value: None if value is None else str(value),
) -> Iterator[RawRow | Rejected]:
    """Every row of a piece: LOAD(piece, column names) gives the piece's rows of those columns (a
    pyarrow error or OSError rejects each row as `unreadable-shard`); image paths resolve under BASE;
    LABEL turns a label value into the row's label."""
    count = piece["stop"] - piece["start"]
    keys = piece["keys"] or default_keys(piece)
    null_keys = set(piece.get("null_keys", []))
    wanted = list(dict.fromkeys(c for c in (spec.image_column, spec.caption_column, spec.label_column) if c))
    try:
        columns = load(piece, wanted)
        short = {len(values) for values in columns.values()} - {count}
        if short:
            raise OSError(f"{min(short)} rows where the plan saw {count} (changed since it was planned)")
    except (pa.ArrowException, OSError) as exc:
        for key in keys:
            yield Rejected(key, "unreadable-shard", f"{piece['file']}: {exc}")
        return
    for i, key in enumerate(keys):
        if i in null_keys:
            yield Rejected(key, "malformed-annotation", f"{spec.key_column}: null at row {piece['key_row'] + i}")
            continue
        image, reason, detail = _image(spec, columns[spec.image_column][i], base)
        if image is None:
            yield Rejected(key, reason, detail)
            continue
        captions = _captions(columns[spec.caption_column][i]) if spec.caption_column else []
        yield RawRow(
            key=key,
            image=image,
            captions=captions,
            label=label(columns[spec.label_column][i]) if spec.label_column else None,
        )


def _load_row_range(piece: dict, wanted: list[str]) -> Columns:
    with parquet_file(piece["file"], piece["identity"]) as parquet:
        table = parquet.read_row_group(piece["row_group"], columns=wanted)
    count = piece["stop"] - piece["start"]
    return {name: table.column(name).slice(piece["start"], count).to_pylist() for name in wanted}


def read(spec: ParquetSource, ctx: SourceContext, unit: Unit) -> Iterator[RawRow | Rejected]:
    for piece in unit.payload:
        file = piece["file"]
        base = spec.image_root or (file.parent if isinstance(file, URL) else Path(file).parent)
        yield from read_piece(spec, piece, _load_row_range, base)


SOURCES.register("parquet", SourceReader("parquet", plan, read))
