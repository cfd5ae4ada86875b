"""The byte cap on image files read from local disk (`max_image_bytes`, sources and evaluation
data): a bigger file is a `too-large` row, refused from its size before any read, and a file that grows past the cap
while it is read is refused too, having been read no further than the cap. Big files here are
sparse (`truncate`), so no disk is used; tracemalloc shows they are never read whole.
"""

from __future__ import annotations

import base64
import io
import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import TypeAdapter, ValidationError
from skimage import data as skdata
from test_hostile_data import eval_tasks

from vlmflow.components.evaluate.stage import load_items
from vlmflow.components.sources import base
from vlmflow.components.sources.base import SOURCES, RawRow, Rejected, SourceContext, read_capped
from vlmflow.specs.data import (
    DEFAULT_MAX_IMAGE_BYTES,
    CocoSource,
    ImageFolderSource,
    LlavaJsonSource,
    ParquetSource,
)
from vlmflow.specs.evaluate import EvalTask

CTX = SourceContext(name="src", seed=0, shard_size=4)
MiB = 2**20


def png() -> bytes:
    image = Image.fromarray(np.asarray(skdata.astronaut()))
    image.thumbnail((16, 16))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sparse(path: Path, size: int) -> Path:
    """A file of SIZE bytes that takes no disk: a PNG header, then a hole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        handle.write(png()[:64])
        handle.truncate(size)
    return path


def peak_bytes(call):
    """(CALL's result, the most memory Python allocated while it ran)."""
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ------------------------------------------------------------------------------ the reader


def test_the_cap_is_exact(tmp_path):
    data = png()
    (tmp_path / "a.png").write_bytes(data)
    assert read_capped(tmp_path / "a.png", len(data)) == (data, "", "")
    found, reason, detail = read_capped(tmp_path / "a.png", len(data) - 1)
    assert (found, reason) == (None, "too-large")
    assert f"{len(data)} bytes, over max_image_bytes {len(data) - 1}" in detail
    assert read_capped(tmp_path / "a.png", None) == (data, "", "")  # no cap: the sidecar's use


def test_a_huge_file_is_refused_from_its_size_without_reading(tmp_path):
    big = sparse(tmp_path / "big.png", 8 * 2**30)  # 8 GiB, all hole
    (found, reason, detail), peak = peak_bytes(lambda: read_capped(big, DEFAULT_MAX_IMAGE_BYTES))
    assert (found, reason) == (None, "too-large") and str(8 * 2**30) in detail
    assert peak < MiB


def test_a_file_that_grows_after_the_size_check_is_read_no_further_than_the_cap(tmp_path, monkeypatch):
    """The size seen says 100 bytes; the file holds a GiB by the time it is read."""
    big = sparse(tmp_path / "grown.png", 2**30)
    real_fstat = os.fstat

    def before_it_grew(fd: int) -> os.stat_result:
        seen = list(real_fstat(fd))
        seen[6] = 100  # st_size
        return os.stat_result(seen)

    monkeypatch.setattr(base.os, "fstat", before_it_grew)
    (found, reason, detail), peak = peak_bytes(lambda: read_capped(big, 4 * MiB))
    assert (found, reason) == (None, "too-large") and "grew" in detail
    assert peak < 6 * MiB  # the cap and a byte, never the GiB
    monkeypatch.undo()
    assert read_capped(big, 4 * MiB)[1] == "too-large"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_a_file_that_reports_size_zero_is_still_capped():
    """/proc files are regular files of st_size 0 that hold text: the read cap decides."""
    found, reason, _ = read_capped(Path("/proc/self/status"), 16)
    assert (found, reason) == (None, "too-large")
    found, reason, _ = read_capped(Path("/proc/self/status"), MiB)
    assert reason == "" and found and b"Name:" in found


@pytest.mark.parametrize("value", [0, -1, 1.5, "64MiB", True, 2**63])
def test_max_image_bytes_must_be_a_positive_int(tmp_path, value):
    (tmp_path / "imgs").mkdir()
    fields = {"kind": "image-folder", "path": "imgs", "max_image_bytes": value}
    with pytest.raises(ValidationError, match="max_image_bytes"):
        ImageFolderSource.model_validate(fields, context={"spec_dir": tmp_path})


# ------------------------------------------------------------------------------ the sources


def run_source(spec) -> dict[str, tuple[str, str]]:
    """plan + read; every planned row comes out once: key -> ("row", "") or (reason, detail)."""
    reader = SOURCES.get(spec.kind)
    out: dict[str, tuple[str, str]] = {}
    for unit in reader.plan(spec, CTX):
        produced = list(reader.read(spec, CTX, unit))
        assert len(produced) == unit.rows
        for item in produced:
            assert item.key not in out
            out[item.key] = ("row", "") if isinstance(item, RawRow) else (item.reason, item.detail)
            assert isinstance(item, RawRow | Rejected)
    return out


def image_dir(tmp_path: Path, cap: int) -> tuple[Path, list[str]]:
    """images/: small.png (read), exact.png (the cap exactly: read), big.png (a byte over),
    huge.png (a sparse GiB); returns the folder and the names, in that order."""
    folder = tmp_path / "images"
    folder.mkdir()
    data = png()
    (folder / "small.png").write_bytes(data)
    (folder / "exact.png").write_bytes(data + b"\0" * (cap - len(data)))
    sparse(folder / "big.png", cap + 1)
    sparse(folder / "huge.png", 2**30)
    return folder, ["small.png", "exact.png", "big.png", "huge.png"]


CAP = 4096
EXPECTED = ["row", "row", "too-large", "too-large"]


def coco(tmp_path: Path, names: list[str], cap: int | None) -> CocoSource:
    document = {
        "images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
        "annotations": [{"id": i, "image_id": i, "caption": "a photo"} for i in range(len(names))],
    }
    (tmp_path / "captions.json").write_text(json.dumps(document))
    fields = {"kind": "coco", "captions": "captions.json", "images": "images"}
    return CocoSource.model_validate(fields | _cap(cap), context={"spec_dir": tmp_path})


def llava(tmp_path: Path, names: list[str], cap: int | None) -> LlavaJsonSource:
    turns = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a photo"}]
    entries = [{"id": i, "image": n, "conversations": turns} for i, n in enumerate(names)]
    (tmp_path / "llava.json").write_text(json.dumps(entries))
    fields = {"kind": "llava-json", "path": "llava.json", "images": "images"}
    return LlavaJsonSource.model_validate(fields | _cap(cap), context={"spec_dir": tmp_path})


def parquet(tmp_path: Path, names: list[str], cap: int | None) -> ParquetSource:
    column = [{"bytes": None, "path": n} for n in names]
    pq.write_table(pa.table({"image": column, "caption": ["c"] * len(names)}), tmp_path / "data.parquet")
    fields = {"kind": "parquet", "path": "data.parquet", "image_root": "images"}
    return ParquetSource.model_validate(fields | _cap(cap), context={"spec_dir": tmp_path})


def folder(tmp_path: Path, names: list[str], cap: int | None) -> ImageFolderSource:
    for name in names:
        (tmp_path / "images" / name).with_suffix(".txt").write_text("a photo")
    fields = {"kind": "image-folder", "path": "images"}
    return ImageFolderSource.model_validate(fields | _cap(cap), context={"spec_dir": tmp_path})


def _cap(cap: int | None) -> dict:
    return {} if cap is None else {"max_image_bytes": cap}


SPECS = {"coco": coco, "llava-json": llava, "parquet": parquet, "image-folder": folder}


def in_name_order(out: dict[str, tuple[str, str]], names: list[str]) -> list[str]:
    """The outcome of each name; keys are the row index (coco, llava), `data-INDEX` (parquet) or
    the file stem (image-folder)."""
    by_name = {}
    for i, name in enumerate(names):
        for key in (str(i), f"data-{i}", Path(name).stem):
            if key in out:
                by_name[name] = out[key][0]
    assert len(by_name) == len(out) == len(names)  # every row accounted for, none lost
    return [by_name[n] for n in names]


@pytest.mark.parametrize("kind", SPECS)
def test_sources_quarantine_image_files_over_the_cap(tmp_path, kind):
    _, names = image_dir(tmp_path, CAP)
    spec = SPECS[kind](tmp_path, names, CAP)
    out, peak = peak_bytes(lambda: run_source(spec))
    assert in_name_order(out, names) == EXPECTED
    assert peak < 2 * MiB  # the sparse GiB was never read
    details = [detail for reason, detail in out.values() if reason == "too-large"]
    assert any(f"{CAP + 1} bytes" in d for d in details) and any(str(2**30) in d for d in details)


@pytest.mark.parametrize("kind", SPECS)
def test_the_default_cap_is_64_mib(tmp_path, kind):
    folder_ = tmp_path / "images"
    folder_.mkdir()
    (folder_ / "small.png").write_bytes(png())
    sparse(folder_ / "over.png", 64 * MiB + 1)
    spec = SPECS[kind](tmp_path, ["small.png", "over.png"], None)
    assert spec.max_image_bytes == DEFAULT_MAX_IMAGE_BYTES == 64 * MiB
    out, peak = peak_bytes(lambda: run_source(spec))
    assert in_name_order(out, ["small.png", "over.png"]) == ["row", "too-large"]
    assert peak < 2 * MiB


# ------------------------------------------------------------------------ the evaluation readers


@pytest.mark.parametrize("kind", ["captioning", "vqa", "multiple-choice"])
def test_eval_readers_quarantine_image_files_over_the_cap(tmp_path, kind):
    _, names = image_dir(tmp_path, CAP)
    task = eval_tasks(tmp_path, names, max_image_bytes=CAP)[kind]
    (loaded, _), peak = peak_bytes(lambda: load_items(task, None))
    assert [i.id for i in loaded.items] == ["0", "1"]
    assert {q["id"]: q["reason"] for q in loaded.quarantine} == {"2": "too-large", "3": "too-large"}
    assert peak < 2 * MiB
    default = eval_tasks(tmp_path, names)[kind]
    assert default.data.max_image_bytes == DEFAULT_MAX_IMAGE_BYTES
    # under the default cap big.png (a PNG header and a hole) is read and fails to decode; the GiB is refused
    assert [q["reason"] for q in load_items(default, None)[0].quarantine] == ["unreadable-image", "too-large"]


def test_eval_image_folder_quarantines_image_files_over_the_cap(tmp_path):
    root = tmp_path / "classes"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    (root / "cat" / "ok.png").write_bytes(png())
    (root / "dog" / "ok.png").write_bytes(png())
    sparse(root / "dog" / "huge.png", 2**30)
    fields = {"kind": "zero-shot-classification", "name": "z", "data": {"kind": "image-folder", "path": "classes"}}
    task = TypeAdapter(EvalTask).validate_python(fields, context={"spec_dir": tmp_path})
    (loaded, classes), peak = peak_bytes(lambda: load_items(task, None))
    assert classes == ["cat", "dog"] and sorted(i.id for i in loaded.items) == ["cat/ok.png", "dog/ok.png"]
    assert loaded.quarantine == [
        {"id": "dog/huge.png", "source": str(root / "dog" / "huge.png"), "reason": "too-large"}
    ]
    assert peak < 2 * MiB


def test_eval_tsv_base64_over_the_cap_is_too_large_before_decoding(tmp_path):
    image = png()
    header = "index\tquestion\tA\tB\tanswer\timage"
    rows = [f"{i}\tq?\tx\ty\tA\t{base64.b64encode(data).decode()}" for i, data in enumerate([image, image + b"\0"])]
    (tmp_path / "mmbench.tsv").write_text("\n".join([header, *rows]) + "\n")
    fields = {"kind": "multiple-choice", "name": "m", "data": {"kind": "multiple-choice-tsv", "path": "mmbench.tsv"}}
    adapter = TypeAdapter(EvalTask)
    for cap, kept in [(len(image) + 1, ["0", "1"]), (len(image), ["0"]), (len(image) - 1, [])]:
        fields["data"]["max_image_bytes"] = cap
        loaded, _ = load_items(adapter.validate_python(fields, context={"spec_dir": tmp_path}), None)
        assert [i.id for i in loaded.items] == kept, cap
        assert [q["reason"] for q in loaded.quarantine] == ["too-large"] * (2 - len(kept)), cap


@pytest.mark.parametrize("value", [0, -5, "1GB", 2.0])
def test_eval_max_image_bytes_must_be_a_positive_int(tmp_path, value):
    (tmp_path / "images").mkdir()
    (tmp_path / "c.json").write_text("{}")
    data = {"kind": "coco-captions", "annotations": "c.json", "images": "images", "max_image_bytes": value}
    with pytest.raises(ValidationError, match="max_image_bytes"):
        TypeAdapter(EvalTask).validate_python(
            {"kind": "captioning", "name": "c", "data": data}, context={"spec_dir": tmp_path}
        )
