"""`hf-disk`: a Hugging Face dataset saved with `save_to_disk`, read from its Arrow files with pyarrow
(the `datasets` package is not needed).

A Dataset folder holds state.json (its `_data_files` name the data-XXXXX-of-YYYYY.arrow files, in
order), dataset_info.json (the features) and those files; a DatasetDict folder holds
dataset_dict.json and a Dataset folder per split, of which `dataset_split` names the one read.
The files are Arrow IPC streams (no footer): the plan reads each one's message headers through a
memory map (no image is copied) to count the rows of its record batches, and cuts those into units
of at most `shard_size` rows, as the parquet source cuts row groups; the rows are read by the same
code as parquet rows (an Image feature is a {bytes, path} struct; bytes or a path column work too).

Keys are `<split>-<row number in the split>` (the split: `dataset_split`, else the Dataset's own
`_split` from state.json, else `data`) or the `key_column` value, made unique over the source. An
image given by `path` only resolves under the folder `path` names, and must stay inside it (else
`path-outside-dataset`, unless `allow_outside_paths: true`); an image file over `max_image_bytes`
is `too-large`. A label column that is a ClassLabel gives its class names (-1: no label).

An Arrow file that is damaged (a truncated or garbled message, no end-of-stream marker, bytes after
it) or missing: the record batches read whole before the damage are planned as usual, and the rest
of the file is one `unreadable-shard` row keyed `<split>-<file stem>` whose detail says where the
damage is (the rows after it cannot be counted). A file that fails on the worker (changed since the
plan) rejects each of its planned rows as `unreadable-shard`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import pyarrow as pa

from vlmflow.components.sources.base import (
    SOURCES,
    RawRow,
    Rejected,
    SourceContext,
    SourceReader,
    Unit,
    load_json,
    safe_key,
)
from vlmflow.components.sources.parquet import (
    Columns,
    assign_keys,
    check_columns,
    pack_units,
    read_piece,
    row_ranges,
)
from vlmflow.errors import UserError
from vlmflow.specs.data import HfDiskSource

END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # the IPC stream's last 8 bytes (continuation, length 0)
UNREADABLE = "unreadable-shard"


def _folder(spec: HfDiskSource) -> Path:
    return spec.path / spec.dataset_split if spec.dataset_split else spec.path


def _state(folder: Path) -> tuple[list[Path], str | None]:
    """The Arrow files state.json names, in order, and the Dataset's own split name (or None)."""
    file = folder / "state.json"
    if not file.is_file():
        raise UserError(f"{folder}: no state.json: not a folder written by Dataset.save_to_disk")
    state = load_json(file)
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{file}: '_data_files' is not a list of {{filename: ...}} entries")
    files = []
    for entry in entries:
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or PurePosixPath(name).name != name or name in ("", ".", ".."):
            raise UserError(f"{file}: _data_files: {entry!r} is not the name of a file in this folder")
        files.append(folder / name)
    split = state.get("_split")
    return files, split if isinstance(split, str) and split else None


def _class_names(folder: Path, column: str | None) -> list[str] | None:
    """The names of a ClassLabel column, from dataset_info.json (None: not a ClassLabel, or no info)."""
    file = folder / "dataset_info.json"
    if column is None or not file.is_file():
        return None
    info = load_json(file)
    features = info.get("features") if isinstance(info, dict) else None
    feature = features.get(column) if isinstance(features, dict) else None
    if not isinstance(feature, dict) or feature.get("_type") != "ClassLabel":
        return None
    names = feature.get("names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{file}: features.{column}: a ClassLabel whose 'names' is not a list of strings")
    return names


def _batches(path: Path) -> tuple[pa.Schema | None, list[int], str]:
    """(schema, rows of each record batch read whole, "" or where the file is damaged)."""
    schema, rows = None, []
    try:
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_stream(source)
            schema = reader.schema
            for batch in reader:  # appended one by one: the batches before a damaged one count
                rows.append(batch.num_rows)
            end, size = source.tell(), source.size()
            source.seek(max(0, size - len(END_OF_STREAM)))
            if end != size:
                return schema, rows, f"{size - end} unexpected bytes after the end-of-stream marker"
            if source.read() != END_OF_STREAM:
                return schema, rows, "no end-of-stream marker (the file is truncated)"
    except (pa.ArrowException, OSError) as exc:
        return schema, rows, str(exc)
    return schema, rows, ""


def _pieces(spec: HfDiskSource, ctx: SourceContext, folder: Path) -> list[dict]:
    """Row ranges of at most shard_size rows in file / record-batch order, cut at `limit`, and one
    damaged piece for each file's unreadable rest."""
    files, own_split = _state(folder)
    prefix = spec.dataset_split or own_split or "data"
    pieces: list[dict] = []
    left = spec.limit if spec.limit is not None else float("inf")
    offset = 0  # rows of the split before this file
    for path in files:
        schema, rows, damage = _batches(path)
        if schema is not None:
            check_columns(spec, path, schema)
        for batch, first_row, start, stop in row_ranges(rows, ctx.shard_size, left):
            key_row = offset + first_row + start
            piece = {"file": str(path), "batch": batch, "start": start, "stop": stop, "prefix": prefix}
            pieces.append(piece | {"first_row": first_row, "key_row": key_row, "keys": None})
            left -= stop - start
        if damage and left > 0:
            detail = f"{path}: {damage} (after {sum(rows)} rows in {len(rows)} record batches; the rest is not read)"
            key = safe_key(prefix, path.stem)
            pieces.append({"file": str(path), "damaged": detail, "start": 0, "stop": 1, "keys": [key]})
            left -= 1
        offset += sum(rows)
        if left <= 0:
            break
    return pieces


def _open_batches(path: str) -> Iterator[pa.RecordBatch]:
    with pa.memory_map(path) as source:
        yield from pa.ipc.open_stream(source)


def _key_values(spec: HfDiskSource) -> Callable[[dict], list]:
    """A piece's values of the key column; each file's column is read once."""
    columns: dict[str, list] = {}

    def values(piece: dict) -> list:
        if piece["file"] not in columns:
            column: list = []
            try:
                for batch in _open_batches(piece["file"]):  # planned batches only: any damage is after them
                    column += batch.column(spec.key_column).to_pylist()
                    if len(column) >= piece["first_row"] + piece["stop"]:
                        break
            except (pa.ArrowException, OSError) as exc:
                raise UserError(f"{piece['file']}: cannot read the key column {spec.key_column!r}: {exc}") from None
            columns[piece["file"]] = column
        return columns[piece["file"]][piece["first_row"] + piece["start"] : piece["first_row"] + piece["stop"]]

    return values


def plan(spec: HfDiskSource, ctx: SourceContext) -> list[Unit]:
    folder = _folder(spec)
    _class_names(folder, spec.label_column)  # a broken dataset_info.json is an error now, not on a worker
    pieces = _pieces(spec, ctx, folder)
    if spec.key_column is not None:
        assign_keys([p for p in pieces if "damaged" not in p], _key_values(spec))
    return pack_units(ctx, pieces)


def _load_batch_range(piece: dict, wanted: list[str]) -> Columns:
    """The piece's rows of the WANTED columns, from its record batch (checked in full first: a
    garbled offset must not reach a read)."""
    batches = _open_batches(piece["file"])
    try:
        for index, batch in enumerate(batches):
            if index == piece["batch"]:
                missing = [name for name in wanted if name not in batch.schema.names]
                if missing:
                    raise OSError(f"no column {', '.join(missing)} (changed since it was planned)")
                part = batch.select(wanted).slice(piece["start"], piece["stop"] - piece["start"])
                part.validate(full=True)
                return {name: part.column(name).to_pylist() for name in wanted}
    finally:
        batches.close()
    raise OSError(f"no record batch {piece['batch']} (changed since it was planned)")


def _label(names: list[str] | None) -> Callable[[object], str | None]:
    def label(value: object) -> str | None:
        if value is None or (names is not None and value == -1):
            return None
        if names is not None and isinstance(value, int) and 0 <= value < len(names):
            return names[value]
        return str(value)

    return label


def read(spec: HfDiskSource, ctx: SourceContext, unit: Unit) -> Iterator[RawRow | Rejected]:
    label = _label(_class_names(_folder(spec), spec.label_column))
    for piece in unit.payload:
        if "damaged" in piece:
            yield Rejected(piece["keys"][0], UNREADABLE, piece["damaged"])
            continue
        yield from read_piece(spec, piece, _load_batch_range, spec.path, label)


SOURCES.register("hf-disk", SourceReader("hf-disk", plan, read))
