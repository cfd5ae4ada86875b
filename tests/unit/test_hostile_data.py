"""Hostile datasets: a malicious dataset must not leak host files nor take a run down.

Three attack classes, each generated in bulk:
- paths that escape the dataset (absolute, `..` chains, symlinks to an outside file or folder,
  existing or not) in every reader that takes a path from an annotation or a folder: they are
  `path-outside-dataset`, with the same reason and detail whether or not the target exists;
- mutated images of every format Pillow writes (bytes flipped, truncated, inserted...): the
  checks never raise, a bad image is quarantined with a reason;
- WebDataset tars with sparse / over-size members and link / device members: nothing is read
  beyond the per-kind limits, each such sample is quarantined with its reason.
Every test checks the accounting: rows in == rows out + quarantined, nothing vanishes.

Small by default (a few hundred image mutations); fuzz longer with VLMFLOW_FUZZ_CASES=20000.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tarfile
import tracemalloc
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import TypeAdapter
from skimage import data as skdata

from vlmflow.components.evaluate import datasets
from vlmflow.components.evaluate.stage import load_items
from vlmflow.components.ingest import process_unit
from vlmflow.components.sources.base import OUTSIDE, SOURCES, RawRow, Rejected, SourceContext, contained_path
from vlmflow.errors import UserError
from vlmflow.images import BadImage, CheckedImage, check_image
from vlmflow.specs.data import CocoSource, ImageFolderSource, LlavaJsonSource, ParquetSource, WebDatasetSource
from vlmflow.specs.evaluate import EvalTask

CASES = int(os.environ.get("VLMFLOW_FUZZ_CASES", "300"))
# Pillow warns about the damage it meets in mutated files (corrupt EXIF, tags larger than the file)
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]
CTX = SourceContext(name="src", seed=0, shard_size=7)
IMAGE_REASONS = {"unreadable-image", "truncated-image", "decompression-bomb", "zero-byte-image"}


def photo(name: str = "astronaut", size: int = 24, fmt: str = "PNG") -> bytes:
    image = Image.fromarray(np.asarray(getattr(skdata, name)()))
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=fmt)
    return buffer.getvalue()


def run_source(spec) -> list[RawRow | Rejected]:
    """plan + read of every unit; each unit yields exactly its planned rows, keys unique."""
    reader = SOURCES.get(spec.kind)
    produced: list[RawRow | Rejected] = []
    for unit in reader.plan(spec, CTX):
        out = list(reader.read(spec, CTX, unit))
        assert len(out) == unit.rows
        produced += out
    keys = [item.key for item in produced]
    assert len(set(keys)) == len(keys)
    return produced


def outcome(produced: list[RawRow | Rejected]) -> dict[str, tuple[str, str]]:
    return {i.key: ("row", "") if isinstance(i, RawRow) else (i.reason, i.detail) for i in produced}


# ============================================================================ escaping paths


@dataclass
class Host:
    """Files outside the dataset that a hostile annotation reaches for."""

    dir: Path
    secret: bytes  # a valid PNG: were it read, it would pass every check and land in a shard
    text: bytes  # a caption-shaped secret (an image-folder sidecar)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    folder = tmp_path / "host"
    (folder / "dir").mkdir(parents=True)
    secret = photo("coffee")
    (folder / "secret.png").write_bytes(secret)
    (folder / "dir" / "secret.png").write_bytes(secret)
    (folder / "secret.txt").write_bytes(b"TOP SECRET CAPTION")
    return Host(folder, secret, b"TOP SECRET CAPTION")


SYSTEM_TARGETS = ["/etc/passwd", "/proc/self/environ", "/dev/zero", "/", "/nonexistent-vlmflow/x.png"]


def named_escapes(root: Path, host: Path) -> list[tuple[str, str]]:
    """(label, annotation path) pairs leading outside ROOT: absolute paths, `..` chains of every
    depth and spelling, to a target that exists and to one that does not."""
    forms = []
    for target in ("secret.png", "nothing.png", "dir/secret.png", "nodir/secret.png"):
        outside = host / target
        rel = os.path.relpath(outside, root)
        forms += [
            (f"absolute {target}", str(outside)),
            (f"absolute-dotted {target}", f"{host}/./{target}"),
            (f"absolute-doubled {target}", f"{host}//{target}"),
            (f"absolute-back {target}", f"{host}/dir/../{target}"),
            (f"dotdot {target}", rel),
            (f"dotdot-dot {target}", f"./{rel}"),
            (f"dotdot-via-subdir {target}", f"sub/../{rel}"),
            (f"dotdot-via-missing {target}", f"no-such-dir/../{rel}"),
            (f"dotdot-excess {target}", "../" * 40 + str(outside).lstrip("/")),
            (f"dotdot-slashes {target}", rel.replace("/", "//")),
        ]
    forms += [(f"system {t}", t) for t in SYSTEM_TARGETS]
    forms += [(f"system-dotdot {t}", "../" * 40 + t.lstrip("/")) for t in SYSTEM_TARGETS if t != "/"]
    return forms


def linked_escapes(root: Path, host: Path) -> list[tuple[str, str]]:
    """Symlinks made inside ROOT that lead outside it; (label, the path naming them)."""
    (root / "sub").mkdir(parents=True, exist_ok=True)
    links = {
        "file-abs.png": host / "secret.png",
        "file-dangling.png": host / "nothing.png",
        "file-rel.png": Path(os.path.relpath(host / "secret.png", root)),
        "sub/file-rel-deep.png": Path(os.path.relpath(host / "secret.png", root / "sub")),
        "dir-link": host / "dir",
        "dir-dangling": host / "nodir",
        "root-link": Path("/"),
        "zero.png": Path("/dev/zero"),
        "chain-b.png": host / "secret.png",
    }
    for name, target in links.items():
        (root / name).symlink_to(target)
    (root / "chain-a.png").symlink_to("chain-b.png")  # inside -> inside -> outside
    names = [n for n in links if "." in Path(n).name] + ["chain-a.png"]
    names += ["dir-link/secret.png", "dir-link/nothing.png", "dir-dangling/secret.png", "root-link/etc/passwd"]
    return [(f"symlink {n}", n) for n in names]


def inside_names(root: Path) -> list[str]:
    """Paths that stay inside ROOT (one through an inside symlink): they must still be read."""
    (root / "sub").mkdir(parents=True, exist_ok=True)
    (root / "good.png").write_bytes(photo("astronaut"))
    (root / "sub" / "good2.png").write_bytes(photo("chelsea"))
    (root / "alias.png").symlink_to("good.png")
    (root / "alias-dir").symlink_to("sub")
    return ["good.png", "sub/good2.png", "sub/../good.png", "./good.png", "alias.png", "alias-dir/good2.png"]


def check_contained(produced: list, host: Host, escapes: int, inside: int) -> None:
    """Every escaping row is path-outside-dataset; inside rows are read; no host byte leaks."""
    rows = [i for i in produced if isinstance(i, RawRow)]
    rejected = [i for i in produced if isinstance(i, Rejected)]
    assert len(produced) == escapes + inside  # nothing vanished
    assert len(rows) == inside and len(rejected) == escapes
    assert {r.reason for r in rejected} == {OUTSIDE}
    for row in rows:
        assert row.image != host.secret and host.text.decode() not in json.dumps(row.captions)
    for item in rejected:  # the detail names the annotation, never what lies outside
        assert "TOP SECRET" not in item.detail and "root:" not in item.detail


def same_answer_without_the_targets(spec, host: Host, before: list) -> None:
    """Run again with the outside targets gone: reason and detail are the same (no existence oracle)."""
    shutil.rmtree(host.dir)
    after = run_source(spec)
    assert outcome(after) == outcome(before)


@pytest.mark.parametrize("absolute_root", [False, True], ids=["relative-spec-paths", "absolute-spec-paths"])
def test_coco_file_names_stay_in_the_image_folder(tmp_path, host, absolute_root):
    images = tmp_path / "ds" / "images"
    good = inside_names(images)
    forms = named_escapes(images, host.dir) + linked_escapes(images, host.dir)
    names = [name for _, name in forms] + good
    document = {
        "images": [{"id": i, "file_name": name} for i, name in enumerate(names)],
        "annotations": [{"id": i, "image_id": i, "caption": f"caption {i}"} for i in range(len(names))],
    }
    (tmp_path / "ds" / "captions.json").write_text(json.dumps(document))
    where = tmp_path / "ds" if absolute_root else "ds"
    spec = CocoSource.model_validate(
        {"kind": "coco", "captions": f"{where}/captions.json", "images": f"{where}/images"},
        context={"spec_dir": tmp_path},
    )
    produced = run_source(spec)
    check_contained(produced, host, len(forms), len(good))
    same_answer_without_the_targets(spec, host, produced)


def test_llava_images_stay_in_the_image_folder(tmp_path, host):
    images = tmp_path / "images"
    good = inside_names(images)
    forms = named_escapes(images, host.dir) + linked_escapes(images, host.dir)
    turns = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A photo."}]
    entries = [{"id": f"e{i}", "image": name, "conversations": turns} for i, (_, name) in enumerate(forms)]
    entries += [{"id": f"good{i}", "image": name, "conversations": turns} for i, name in enumerate(good)]
    (tmp_path / "llava.json").write_text(json.dumps(entries))
    spec = LlavaJsonSource.model_validate(
        {"kind": "llava-json", "path": "llava.json", "images": "images"}, context={"spec_dir": tmp_path}
    )
    produced = run_source(spec)
    check_contained(produced, host, len(forms), len(good))
    same_answer_without_the_targets(spec, host, produced)


@pytest.mark.parametrize("layout", ["path-column", "hf-struct", "no-image-root"])
def test_parquet_paths_stay_in_the_image_root(tmp_path, host, layout):
    images = tmp_path / "images"
    good = inside_names(images)
    forms = named_escapes(images, host.dir) + linked_escapes(images, host.dir)
    names = [name for _, name in forms] + good
    column = [{"bytes": None, "path": n} for n in names] if layout == "hf-struct" else names
    table = pa.table({"image": column, "caption": [f"c{i}" for i in range(len(names))]})
    if layout == "no-image-root":  # relative paths resolve against the parquet file's folder, the root
        pq.write_table(table, images / "data.parquet")
        fields = {"kind": "parquet", "path": "images/data.parquet"}
    else:
        pq.write_table(table, tmp_path / "data.parquet")
        fields = {"kind": "parquet", "path": "data.parquet", "image_root": "images"}
    spec = ParquetSource.model_validate(fields, context={"spec_dir": tmp_path})
    produced = run_source(spec)
    check_contained(produced, host, len(forms), len(good))
    same_answer_without_the_targets(spec, host, produced)


FOLDER_LINKS = ("dir-link/", "dir-dangling/", "root-link/")


def test_image_folder_symlinks_and_sidecars_stay_inside(tmp_path, host):
    root = tmp_path / "imgs"
    inside_names(root)  # good.png, sub/good2.png, alias.png -> good.png (alias-dir: a folder link, not walked)
    links = [n for _, n in linked_escapes(root, host.dir) if not n.startswith(FOLDER_LINKS)]
    (root / "captioned.png").write_bytes(photo("rocket"))
    (root / "captioned.txt").symlink_to(host.dir / "secret.txt")  # a sidecar leading outside
    spec = ImageFolderSource.model_validate({"kind": "image-folder", "path": "imgs"}, context={"spec_dir": tmp_path})
    produced = run_source(spec)
    result = outcome(produced)
    assert {k for k, v in result.items() if v[0] == "row"} == {"good", "sub_good2", "alias"}
    assert result["captioned"][0] == OUTSIDE and "sidecar" in result["captioned"][1]
    assert sum(v[0] == OUTSIDE for v in result.values()) == len(links) + 1  # dangling links too
    assert len(produced) == len(links) + 1 + 3
    for item in produced:
        if isinstance(item, RawRow):
            assert item.image != host.secret and "TOP SECRET" not in " ".join(item.captions)
    same_answer_without_the_targets(spec, host, produced)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_image_folder_captions_file_names_stay_inside(tmp_path, host, suffix):
    root = tmp_path / "imgs"
    inside_names(root)
    links = linked_escapes(root, host.dir)
    on_disk = [n for _, n in links if not n.startswith(FOLDER_LINKS)]
    listed = [n for _, n in named_escapes(root, host.dir)] + [n for _, n in links if n.startswith(FOLDER_LINKS)]
    listed += ["good.png", "sub/../alias.png"]
    if suffix == ".csv":
        buffer = io.StringIO()
        buffer.write("file,caption\n")
        for name in listed:
            buffer.write(f'"{name}",listed\n')
        (tmp_path / "caps.csv").write_text(buffer.getvalue())
    else:
        (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps({"file": n, "caption": "listed"}) for n in listed))
    fields = {"kind": "image-folder", "path": "imgs", "captions_file": f"caps{suffix}"}
    spec = ImageFolderSource.model_validate(fields, context={"spec_dir": tmp_path})
    produced = run_source(spec)
    result = outcome(produced)
    # every listed name leading outside is a row of its own (a line, or a folder-link path), same reason
    assert {k for k, v in result.items() if v[0] == "row"} == {"good", "sub_good2", "alias"}
    assert sum(v[0] == OUTSIDE for v in result.values()) == len(on_disk) + len(listed) - 2
    assert len(produced) == len(on_disk) + len(listed) - 2 + 3
    assert all(i.image != host.secret for i in produced if isinstance(i, RawRow))
    same_answer_without_the_targets(spec, host, produced)


def test_allow_outside_paths_reads_outside_files(tmp_path, host):
    """The opt-in: the same escaping names are read (missing ones are missing-image-file)."""
    images = tmp_path / "images"
    inside_names(images)
    (images / "link.png").symlink_to(host.dir / "secret.png")
    names = [str(host.dir / "secret.png"), os.path.relpath(host.dir / "secret.png", images), "link.png"]
    names += [str(host.dir / "nothing.png")]
    entries = [{"id": i, "image": n, "conversations": [{"from": "human", "value": "hi"}]} for i, n in enumerate(names)]
    (tmp_path / "llava.json").write_text(json.dumps(entries))
    fields = {"kind": "llava-json", "path": "llava.json", "images": "images", "allow_outside_paths": True}
    produced = run_source(LlavaJsonSource.model_validate(fields, context={"spec_dir": tmp_path}))
    assert [i.image == host.secret for i in produced[:3]] == [True] * 3
    assert isinstance(produced[3], Rejected) and produced[3].reason == "missing-image-file"
    pq.write_table(pa.table({"image": names}), tmp_path / "data.parquet")
    fields = {"kind": "parquet", "path": "data.parquet", "caption_column": None, "image_root": "images"}
    parquet = run_source(
        ParquetSource.model_validate({**fields, "allow_outside_paths": True}, context={"spec_dir": tmp_path})
    )
    assert [isinstance(i, RawRow) for i in parquet] == [True, True, True, False]


@pytest.mark.parametrize("name", ["a\x00b.png", "x" * 300 + ".png", "~no-such-user/x.png", "", ".", "sub/"])
def test_contained_path_odd_names_never_raise(tmp_path, name):
    (tmp_path / "sub").mkdir()
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    for candidate in (name, "loop1", "loop1/x.png"):
        path, detail = contained_path(tmp_path, candidate)
        assert (path is None) == bool(detail)


def test_eval_readers_quarantine_escaping_paths(tmp_path, host):
    images = tmp_path / "images"
    good = inside_names(images)
    forms = named_escapes(images, host.dir) + linked_escapes(images, host.dir)
    names = [n for _, n in forms]
    all_names = names + good
    # COCO captions
    document = {
        "images": [{"id": i, "file_name": n} for i, n in enumerate(all_names)],
        "annotations": [{"image_id": i, "caption": "c"} for i in range(len(all_names))],
    }
    (tmp_path / "coco.json").write_text(json.dumps(document))
    results = {"coco": datasets.coco_captions(tmp_path / "coco.json", images, 10_000)}
    # VQAv2: the image pattern puts the hostile id into the path
    questions = [{"question_id": i, "image_id": n, "question": "q?"} for i, n in enumerate(all_names)]
    answers = [{"question_id": i, "answers": ["yes"]} for i in range(len(all_names))]
    (tmp_path / "q.json").write_text(json.dumps({"questions": questions}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": answers}))
    results["vqav2"] = datasets.vqav2(tmp_path / "q.json", tmp_path / "a.json", images, "{image_id}", 10_000)
    # multiple-choice JSONL
    lines = [json.dumps({"id": i, "image": n, "question": "q", "options": ["a", "b"], "answer": "A"}) for i, n in
             enumerate(all_names)]  # fmt: skip
    (tmp_path / "choice.jsonl").write_text("\n".join(lines))
    results["choice"] = datasets.choice_jsonl(tmp_path / "choice.jsonl", images, 10_000)
    for name, loaded in results.items():
        assert len(loaded.items) + len(loaded.quarantine) == len(all_names), name
        assert len(loaded.items) == len(good), name
        assert Counter(q["reason"] for q in loaded.quarantine) == {OUTSIDE: len(names)}, name
        assert all(item.image != host.secret for item in loaded.items)
    before = {k: v.quarantine for k, v in results.items()}
    shutil.rmtree(host.dir)
    assert datasets.coco_captions(tmp_path / "coco.json", images, 10_000).quarantine == before["coco"]
    again = datasets.vqav2(tmp_path / "q.json", tmp_path / "a.json", images, "{image_id}", 10_000)
    assert again.quarantine == before["vqav2"]
    assert datasets.choice_jsonl(tmp_path / "choice.jsonl", images, 10_000).quarantine == before["choice"]


def eval_tasks(tmp_path: Path, names: list[str], **rules) -> dict[str, object]:
    """One evaluation task per reader of user files with image paths, each naming NAMES under
    tmp_path/images, validated from the spec as a recipe's evaluate: entry is (RULES: its data's
    allow_outside_paths / max_image_bytes)."""
    document = {
        "images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
        "annotations": [{"image_id": i, "caption": "c"} for i in range(len(names))],
    }
    (tmp_path / "coco.json").write_text(json.dumps(document))
    questions = [{"question_id": i, "image_id": n, "question": "q?"} for i, n in enumerate(names)]
    (tmp_path / "q.json").write_text(json.dumps({"questions": questions}))
    answers = [{"question_id": i, "answers": ["yes"]} for i in range(len(names))]
    (tmp_path / "a.json").write_text(json.dumps({"annotations": answers}))
    lines = [json.dumps({"id": i, "image": n, "question": "q", "options": ["a", "b"], "answer": "A"})
             for i, n in enumerate(names)]  # fmt: skip
    (tmp_path / "choice.jsonl").write_text("\n".join(lines))
    data = {
        "captioning": {"kind": "coco-captions", "annotations": "coco.json", "images": "images"},
        "vqa": {"kind": "vqav2", "questions": "q.json", "annotations": "a.json", "images": "images",
                "image_pattern": "{image_id}"},
        "multiple-choice": {"kind": "multiple-choice-jsonl", "path": "choice.jsonl", "images": "images"},
    }  # fmt: skip
    adapter = TypeAdapter(EvalTask)
    return {
        kind: adapter.validate_python(
            {"kind": kind, "name": "t", "data": fields | rules}, context={"spec_dir": tmp_path}
        )
        for kind, fields in data.items()
    }


def test_eval_allow_outside_paths_reads_outside_files(tmp_path, host):
    """The opt-in, from the spec to the readers: the escaping names are read (a missing one is
    missing-image-file); without it they are path-outside-dataset."""
    images = tmp_path / "images"
    inside_names(images)
    (images / "link.png").symlink_to(host.dir / "secret.png")
    (images / "dangling.png").symlink_to(host.dir / "nothing.png")
    names = [str(host.dir / "secret.png"), os.path.relpath(host.dir / "secret.png", images), "link.png"]
    names += [str(host.dir / "nothing.png"), "dangling.png", "good.png"]
    for kind, task in eval_tasks(tmp_path, names, allow_outside_paths=True).items():
        assert task.data.allow_outside_paths is True
        loaded, _ = load_items(task, None)
        assert [i.id for i in loaded.items] == ["0", "1", "2", "5"], kind
        assert [i.image == host.secret for i in loaded.items] == [True, True, True, False], kind
        assert {q["id"]: q["reason"] for q in loaded.quarantine} == dict.fromkeys("34", "missing-image-file")
    for kind, task in eval_tasks(tmp_path, names).items():
        loaded, _ = load_items(task, None)
        assert [i.id for i in loaded.items] == ["5"], kind
        assert {q["id"]: q["reason"] for q in loaded.quarantine} == dict.fromkeys("01234", OUTSIDE), kind


def test_eval_image_folder_allow_outside_paths_lists_outside_classes(tmp_path, host):
    root = tmp_path / "classes"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "ok.png").write_bytes(photo("chelsea"))
    (root / "cat" / "leak.png").symlink_to(host.dir / "secret.png")
    (root / "evil").symlink_to(host.dir / "dir")  # a class folder elsewhere
    fields = {"kind": "zero-shot-classification", "name": "z", "data": {"kind": "image-folder", "path": "classes"}}
    adapter = TypeAdapter(EvalTask)
    contained = adapter.validate_python(fields, context={"spec_dir": tmp_path})
    with pytest.raises(UserError, match="at least two class sub-folders"):  # evil is not a class
        load_items(contained, None)
    fields["data"]["allow_outside_paths"] = True
    loaded, classes = load_items(adapter.validate_python(fields, context={"spec_dir": tmp_path}), None)
    assert classes == ["cat", "evil"] and not loaded.quarantine
    assert sorted(i.id for i in loaded.items) == ["cat/leak.png", "cat/ok.png", "evil/secret.png"]


def test_eval_image_folder_symlinks_are_quarantined(tmp_path, host):
    root = tmp_path / "classes"
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        (root / label / "ok.png").write_bytes(photo("chelsea"))
    (root / "cat" / "leak.png").symlink_to(host.dir / "secret.png")
    (root / "cat" / "dangling.png").symlink_to(host.dir / "nothing.png")
    (root / "dog" / "rel.png").symlink_to(os.path.relpath(host.dir / "secret.png", root / "dog"))
    (root / "dog" / "alias.png").symlink_to("ok.png")  # inside: fine
    (root / "evil").symlink_to(host.dir / "dir")  # a class folder elsewhere: not listed
    (root / "gone").symlink_to(host.dir / "nodir")
    loaded, classes = datasets.image_folder(root, 100)
    assert classes == ["cat", "dog"]
    assert sorted(i.id for i in loaded.items) == ["cat/ok.png", "dog/alias.png", "dog/ok.png"]
    reasons = {q["id"]: q["reason"] for q in loaded.quarantine}
    expected = ("cat/dangling.png", "cat/leak.png", "dog/rel.png", "evil", "gone")
    assert reasons == dict.fromkeys(expected, OUTSIDE)
    shutil.rmtree(host.dir)
    again, _ = datasets.image_folder(root, 100)
    assert again.quarantine == loaded.quarantine


def test_ingest_accounts_for_every_escaping_row_and_no_shard_holds_a_host_file(tmp_path, host):
    images = tmp_path / "images"
    good = inside_names(images)
    forms = named_escapes(images, host.dir) + linked_escapes(images, host.dir)
    entries = [{"id": f"e{i}", "image": n, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt",
               "value": "ok"}]} for i, n in enumerate([n for _, n in forms] + good)]  # fmt: skip
    (tmp_path / "llava.json").write_text(json.dumps(entries))
    spec = LlavaJsonSource.model_validate(
        {"kind": "llava-json", "path": "llava.json", "images": "images"}, context={"spec_dir": tmp_path}
    )
    out = tmp_path / "out"
    for unit in SOURCES.get(spec.kind).plan(spec, CTX):
        process_unit((spec, CTX, unit), [], str(out), "ingest/x/shards")
    manifest = pl.concat([pl.read_parquet(p) for p in (out / "units").glob("*.manifest.parquet")])
    quarantine = pl.concat([pl.read_parquet(p) for p in (out / "units").glob("*.quarantine.parquet")])
    assert manifest.height + quarantine.height == len(entries)
    assert manifest.height == len(good) and set(quarantine["reason"]) == {OUTSIDE}
    for shard in (out / "shards").glob("*.tar"):
        assert host.secret not in shard.read_bytes()


# ============================================================================ image decoder fuzz


def _variants() -> dict[str, bytes]:
    """One small real photo in every format (and a few modes / options) Pillow can write here."""
    source = Image.fromarray(skdata.astronaut())
    source.thumbnail((24, 24))
    wanted = [
        ("PNG", "RGB", {}), ("PNG-RGBA", "RGBA", {}), ("PNG-P", "P", {}), ("PNG-I16", "I;16", {}),
        ("JPEG", "RGB", {}), ("JPEG-progressive", "RGB", {"progressive": True}), ("JPEG-CMYK", "CMYK", {}),
        ("GIF", "RGB", {}), ("GIF-animated", "RGB", {"save_all": True, "append_images": [source.rotate(90)]}),
        ("BMP", "RGB", {}), ("DIB", "RGB", {}), ("ICO", "RGB", {}),
        ("TIFF", "RGB", {}), ("TIFF-lzw", "RGB", {"compression": "tiff_lzw"}),
        ("TIFF-jpeg", "RGB", {"compression": "jpeg"}), ("TIFF-packbits", "RGB", {"compression": "packbits"}),
        ("WEBP", "RGB", {}), ("WEBP-lossless", "RGB", {"lossless": True}), ("AVIF", "RGB", {}),
        ("JPEG2000", "RGB", {}), ("PPM", "RGB", {}), ("TGA", "RGB", {}), ("PCX", "RGB", {}), ("SGI", "RGB", {}),
        ("DDS", "RGB", {}), ("IM", "RGB", {}), ("QOI", "RGB", {}), ("SPIDER", "L", {}), ("BLP", "P", {}),
        ("MSP", "1", {}), ("XBM", "1", {}),
    ]  # fmt: skip
    found = {}
    for name, mode, options in wanted:
        buffer = io.BytesIO()
        try:
            source.convert(mode).save(buffer, format=name.split("-")[0], **options)
        except (KeyError, OSError, ValueError):  # a codec this Pillow build lacks
            continue
        if isinstance(check_image(buffer.getvalue()), CheckedImage):
            found[name] = buffer.getvalue()
    return found


VARIANTS = _variants()
INTERESTING = [0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF]


def mutate(raw: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """(operator, mutated bytes): bit flips, magic values (often in the header), truncation,
    insertion, deletion, duplication, or a header integer set to an extreme."""
    data, n = bytearray(raw), len(raw)
    op = ["flip", "magic", "truncate", "insert", "delete", "duplicate", "header-int"][int(rng.integers(7))]
    if op == "flip":
        for _ in range(int(rng.integers(1, 9))):
            data[int(rng.integers(n))] ^= 1 << int(rng.integers(8))
    elif op == "magic":
        for _ in range(int(rng.integers(1, 5))):
            i = int(rng.integers(min(n, 128))) if rng.random() < 0.6 else int(rng.integers(n))
            data[i] = INTERESTING[int(rng.integers(len(INTERESTING)))]
    elif op == "truncate":
        data = data[: int(rng.integers(1, n))]
    elif op == "insert":
        i = int(rng.integers(n))
        data[i:i] = rng.bytes(int(rng.integers(1, 64)))
    elif op == "delete":
        i = int(rng.integers(n))
        del data[i : i + int(rng.integers(1, 64))]
    elif op == "duplicate":
        i = int(rng.integers(n))
        data[i:i] = data[i : i + int(rng.integers(1, 256))]
    else:
        i, width = int(rng.integers(min(n, 64))), int(rng.choice([2, 4]))
        value = int(rng.choice([0, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]))
        data[i : i + width] = value.to_bytes(4, "little")[:width]
    return op, bytes(data)


def check_never_raises(data: bytes) -> str:
    result = check_image(data)
    if isinstance(result, BadImage):
        assert result.reason in IMAGE_REASONS and isinstance(result.detail, str)
        verdict = result.reason
    else:
        assert result.width > 0 and result.height > 0 and result.data
        verdict = "ok"
    kept, reason = datasets.verified(data)  # the evaluation readers' check
    assert (kept is None) == (reason is not None) and reason in (None, *IMAGE_REASONS)
    return verdict


def test_every_format_pillow_writes_is_covered():
    assert {"PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "ICO"} <= set(VARIANTS)
    assert len(VARIANTS) >= 20


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_mutated_images_are_quarantined_never_raised(name):
    rng = np.random.default_rng(sorted(VARIANTS).index(name))
    verdicts = Counter(
        check_never_raises(mutate(VARIANTS[name], rng)[1]) for _ in range(max(4, CASES // len(VARIANTS)))
    )
    assert sum(verdicts.values()) >= 4


EXCEPTIONS = [
    ValueError("bad value"), struct.error("unpack requires a buffer"), EOFError(), OSError("broken data stream"),
    SyntaxError("not a TIFF"), ZeroDivisionError("division by zero"), IndexError("index out of range"),
    TypeError("bad type"), KeyError("tag"), RuntimeError("decoder failed"), NotImplementedError("mode"),
    MemoryError(), RecursionError(), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), AssertionError(),
]  # fmt: skip


@pytest.mark.parametrize("stage", ["open", "load", "convert"])
@pytest.mark.parametrize("error", EXCEPTIONS, ids=lambda e: type(e).__name__)
def test_any_decoder_exception_is_unreadable_image(monkeypatch, stage, error):
    """Whatever a decoder raises, at open, load or conversion, is a quarantine reason."""
    data, real_open = photo("camera"), Image.open

    def hostile_open(*args, **kwargs):
        if stage == "open":
            raise error
        image = real_open(*args, **kwargs)
        target = "load" if stage == "load" else "convert"

        def boom(*a, **k):
            raise error

        monkeypatch.setattr(image, target, boom)
        if stage == "load":
            monkeypatch.setattr(image, "verify", boom)
        return image

    monkeypatch.setattr(Image, "open", hostile_open)
    result = check_image(data)
    assert isinstance(result, BadImage)
    assert result.reason == ("truncated-image" if "truncated" in str(error) else "unreadable-image")
    assert datasets.verified(data) == (None, "unreadable-image")


@pytest.mark.parametrize("error", [Image.DecompressionBombError("too big"), Image.DecompressionBombWarning("big")])
def test_decompression_bomb_keeps_its_own_reason(monkeypatch, error):
    data = photo("camera")

    def hostile_open(*args, **kwargs):
        raise error

    monkeypatch.setattr(Image, "open", hostile_open)
    assert check_image(data).reason == "decompression-bomb"
    assert datasets.verified(data) == (None, "unreadable-image")


def test_ingest_accounts_for_every_mutated_image(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(12345)
    count = max(len(VARIANTS), CASES // 3)
    for i in range(count):
        name = sorted(VARIANTS)[i % len(VARIANTS)]
        (root / f"m{i:05d}.png").write_bytes(mutate(VARIANTS[name], rng)[1])
        (root / f"m{i:05d}.txt").write_text(f"mutated {name}")
    spec = ImageFolderSource.model_validate({"kind": "image-folder", "path": "imgs"}, context={"spec_dir": tmp_path})
    context = SourceContext(name="fz", seed=0, shard_size=64)
    out = tmp_path / "out"
    for unit in SOURCES.get(spec.kind).plan(spec, context):
        process_unit((spec, context, unit), [], str(out), "ingest/x/shards")
    manifest = pl.concat([pl.read_parquet(p) for p in (out / "units").glob("*.manifest.parquet")])
    quarantine = pl.concat([pl.read_parquet(p) for p in (out / "units").glob("*.quarantine.parquet")])
    assert manifest.height + quarantine.height == count
    assert set(quarantine["reason"]) <= IMAGE_REASONS


# ============================================================================ hostile tars


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def pax_sparse_01(name: str, data: bytes, realsize: int) -> tuple[tarfile.TarInfo, bytes]:
    """GNU sparse 0.1 (pax headers): DATA stored, REALSIZE declared (the rest is holes of zeros)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.pax_headers = {"GNU.sparse.map": f"0,{len(data)}", "GNU.sparse.size": str(realsize)}
    return info, data


def pax_sparse_10(name: str, data: bytes, realsize: int) -> tuple[tarfile.TarInfo, bytes]:
    """GNU sparse 1.0: the map is in the member's data, the real name and size in pax headers."""
    sparse_map = f"1\n0\n{len(data)}\n".encode().ljust(512, b"\0")
    info = tarfile.TarInfo(f"GNUSparseFile.0/{name}")
    info.size = len(sparse_map) + len(data)
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
                        "GNU.sparse.realsize": str(realsize)}  # fmt: skip
    return info, sparse_map + data


def old_gnu_sparse(name: str, data: bytes, realsize: int) -> bytes:
    """An old-GNU sparse member ('S' header: one map entry, the real size at byte 483) as raw blocks."""
    info = tarfile.TarInfo(name)
    info.size, info.type = len(data), tarfile.GNUTYPE_SPARSE
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    block = header[-512:]
    block[386:398] = tarfile.itn(0, 12, tarfile.GNU_FORMAT)
    block[398:410] = tarfile.itn(len(data), 12, tarfile.GNU_FORMAT)
    block[482] = 0
    block[483:495] = tarfile.itn(realsize, 12, tarfile.GNU_FORMAT)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    header[-512:] = block
    return bytes(header) + data + b"\0" * (-len(data) % 512)


def write_tar(path: Path, members: list) -> int:
    """Members: (TarInfo, bytes) or raw header+data blocks; returns the tar's size in bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            if isinstance(member, bytes):
                tar.fileobj.write(member)
                tar.offset += len(member)
            else:
                info, data = member
                tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return len(buffer.getvalue())


def link(name: str, target: str, hard: bool = False) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = (tarfile.LNKTYPE if hard else tarfile.SYMTYPE), target
    return info, b""


def special(name: str, kind: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = kind, 1, 5
    return info, b""


GIB = 1 << 30
SPARSE_FORMATS = {"old-gnu": old_gnu_sparse, "pax-0.1": pax_sparse_01, "pax-1.0": pax_sparse_10}


def hostile_samples() -> list[tuple[str, list, str]]:
    """(sample key, its members, expected reason) for every hostile sample generated."""
    image, small = photo("astronaut", fmt="JPEG"), b"hi"
    cases = []
    for fmt in SPARSE_FORMATS:
        for ext in ("jpg", "png", "txt", "json", "cls"):
            for realsize in (64 * 2**20 + 1 if ext in ("jpg", "png") else 2**20 + 1, GIB, 1 << 40):
                key = f"sp_{fmt}_{ext}_{realsize}".replace(".", "_")
                members = [SPARSE_FORMATS[fmt](f"{key}.{ext}", small, realsize)]
                if ext not in ("jpg", "png"):
                    members.insert(0, regular(f"{key}.jpg", image))
                cases.append((key, members, "member-too-large"))
        key = f"unused_{fmt}".replace(".", "_")  # a huge member the sample does not use is never read
        cases.append((key, [regular(f"{key}.jpg", image), SPARSE_FORMATS[fmt](f"{key}.npy", small, GIB)], "row"))
    for t, target in enumerate(("/etc/passwd", "../../host/secret.png", "inside.jpg", "/dev/zero", "nothing")):
        for hard in (False, True):
            kind = "hard" if hard else "sym"
            for ext in ("jpg", "txt", "json"):
                key = f"ln_{kind}_{ext}_{t}"
                members = [link(f"{key}.{ext}", target, hard)]
                if ext != "jpg":
                    members.insert(0, regular(f"{key}.jpg", image))
                cases.append((key, members, "link-member"))
    for kind, name in ((tarfile.FIFOTYPE, "fifo"), (tarfile.CHRTYPE, "chr"), (tarfile.BLKTYPE, "blk")):
        for ext in ("jpg", "txt"):
            key = f"dev_{name}_{ext}"
            members = [special(f"{key}.{ext}", kind)]
            if ext != "jpg":
                members.insert(0, regular(f"{key}.jpg", image))
            cases.append((key, members, "special-member"))
    return cases


def good_sample(key: str) -> list:
    return [regular(f"{key}.jpg", photo("chelsea", fmt="JPEG")), regular(f"{key}.txt", b"a cat")]


def wds(tmp_path: Path, path: str, **fields) -> WebDatasetSource:
    return WebDatasetSource.model_validate(
        {"kind": "webdataset", "path": path, **fields}, context={"spec_dir": tmp_path}
    )


def test_hostile_tar_members_are_quarantined_and_never_read(tmp_path):
    cases = hostile_samples()
    members = good_sample("inside")
    for i, (_, sample_members, _) in enumerate(cases):
        members += sample_members + good_sample(f"good{i}")  # a good sample between hostile ones
    size = write_tar(tmp_path / "shards" / "evil.tar", members)
    assert size < 2**20  # a small tar declaring many GiB
    tracemalloc.start()
    try:
        produced = run_source(wds(tmp_path, "shards"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20  # nothing declared was read into memory
    result = outcome(produced)
    assert len(produced) == 1 + 2 * len(cases)  # every sample is a row or a quarantined row
    for key, _, expected in cases:
        assert result[f"evil-{key}"][0] == expected, key
    assert sum(v[0] == "row" for v in result.values()) == 1 + len(cases) + sum(c[2] == "row" for c in cases)
    for item in produced:
        if isinstance(item, RawRow):
            assert len(item.image) < 2**20 and all(len(c) < 100 for c in item.captions)


@pytest.mark.parametrize("limit_delta", [-1, 0])
def test_member_size_limits_are_per_kind_and_exact(tmp_path, limit_delta):
    image = photo("camera", fmt="PNG")
    caption = b"x" * 100
    write_tar(tmp_path / "t.tar", [regular("a.png", image), regular("b.png", image), regular("b.txt", caption)])
    fields = {"max_image_bytes": len(image) + limit_delta, "max_text_bytes": 1 << 20}
    result = outcome(run_source(wds(tmp_path, "t.tar", **fields)))
    expected = "member-too-large" if limit_delta < 0 else "row"
    assert result == {"t-a": (expected, result["t-a"][1]), "t-b": (expected, result["t-b"][1])}
    result = outcome(run_source(wds(tmp_path, "t.tar", max_text_bytes=len(caption) + limit_delta)))
    assert result["t-a"][0] == "row" and result["t-b"][0] == expected
    if limit_delta < 0:
        assert "b.txt: 100 bytes > 99" in result["t-b"][1]


def test_a_header_declaring_more_than_the_file_holds_is_a_damaged_shard(tmp_path):
    for declared in (GIB, 2**20):  # over the image limit (skipped, not read) and under it (read, runs out)
        info = tarfile.TarInfo("big.jpg")
        info.size = declared  # not sparse: the data is simply not there
        good = b"".join(i.tobuf() + d + b"\0" * (-len(d) % 512) for i, d in good_sample("a"))
        (tmp_path / "lie.tar").write_bytes(good + info.tobuf() + b"\0" * 4096)
        result = outcome(run_source_loose(wds(tmp_path, "lie.tar")))
        assert result["lie-a"][0] == "row" and result["lie"][0] == "unreadable-shard"
        assert "'big'" in result["lie"][1] and len(result) == 2  # the sample in progress is named


def run_source_loose(spec) -> list:
    reader = SOURCES.get(spec.kind)
    return [item for unit in reader.plan(spec, CTX) for item in reader.read(spec, CTX, unit)]


def test_ingest_accounts_for_every_hostile_tar_sample(tmp_path):
    cases = hostile_samples()
    for i in range(0, len(cases), 10):  # several tars, several units
        members = [m for _, sample_members, _ in cases[i : i + 10] for m in sample_members] + good_sample("ok")
        write_tar(tmp_path / "shards" / f"{i:03d}.tar", members)
    spec = wds(tmp_path, "shards")
    out = tmp_path / "out"
    units = SOURCES.get(spec.kind).plan(spec, CTX)
    for unit in units:
        process_unit((spec, CTX, unit), [], str(out), "ingest/x/shards")
    manifest = pl.concat([pl.read_parquet(p) for p in (out / "units").glob("*.manifest.parquet")])
    quarantine = pl.concat([pl.read_parquet(p) for p in (out / "units").glob("*.quarantine.parquet")])
    rows_in = len(cases) + len(units)
    assert sum(u.rows for u in units) == rows_in  # the plan counts link / device samples too
    assert manifest.height + quarantine.height == rows_in
    expected = Counter(c[2] for c in cases if c[2] != "row")
    assert Counter(quarantine["reason"]) == expected
