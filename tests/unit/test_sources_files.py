"""File-based source readers (image-folder, coco, llava-json) on real scikit-image photos."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from vlmflow.components.sources.base import SOURCES, RawRow, Rejected, SourceContext
from vlmflow.errors import UserError
from vlmflow.specs.data import CocoSource, ImageFolderSource, LlavaJsonSource

PHOTOS = {"astronaut": skdata.astronaut, "camera": skdata.camera, "coffee": skdata.coffee, "chelsea": skdata.chelsea}


def save_photo(path: Path, name: str = "astronaut", size: int = 48) -> bytes:
    """A real photo, shrunk, saved as PNG or JPEG (by suffix); returns the file's bytes."""
    image = Image.fromarray(np.asarray(PHOTOS[name]()))
    image.thumbnail((size, size))
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def ctx(shard_size: int = 100) -> SourceContext:
    return SourceContext(name="src", seed=0, shard_size=shard_size)


def run_source(spec, context: SourceContext | None = None) -> tuple[dict[str, RawRow], dict[str, Rejected]]:
    """plan + read over every unit; keys must be unique over the whole source."""
    context = context or ctx()
    reader = SOURCES.get(spec.kind)
    units = reader.plan(spec, context)
    assert [u.index for u in units] == list(range(len(units)))
    assert pickle.loads(pickle.dumps(units)) == units  # payloads are plain picklable data
    rows: dict[str, RawRow] = {}
    rejected: dict[str, Rejected] = {}
    for unit in units:
        assert unit.source == context.name
        assert 0 < unit.rows <= context.shard_size
        produced = list(reader.read(spec, context, unit))
        assert len(produced) == unit.rows
        for item in produced:
            assert "." not in item.key and "/" not in item.key
            assert item.key not in rows and item.key not in rejected
            (rows if isinstance(item, RawRow) else rejected)[item.key] = item
    return rows, rejected


def reasons(rejected: dict[str, Rejected]) -> dict[str, str]:
    return {key: r.reason for key, r in rejected.items()}


# ---------------------------------------------------------------- image-folder


def folder_spec(tmp_path: Path, **fields) -> ImageFolderSource:
    return ImageFolderSource.model_validate(
        {"kind": "image-folder", "path": "imgs", **fields}, context={"spec_dir": tmp_path}
    )


@pytest.fixture
def sidecar_folder(tmp_path: Path) -> dict[str, bytes]:
    root = tmp_path / "imgs"
    stored = {
        "cats/chelsea.jpg": save_photo(root / "cats/chelsea.jpg", "chelsea"),
        "people/astronaut.png": save_photo(root / "people/astronaut.png", "astronaut"),
        "people/camera.PNG": save_photo(root / "people/camera.PNG", "camera"),
        "coffee.jpeg": save_photo(root / "coffee.jpeg", "coffee"),
    }
    (root / "cats/chelsea.txt").write_text("  a tabby cat  \n\n a cat on a table\n")
    (root / "people/astronaut.txt").write_text("   \n \n")
    (root / "notes.md").write_text("not an image")
    return stored


def test_image_folder_sidecars_labels_and_bytes(tmp_path, sidecar_folder):
    rows, rejected = run_source(folder_spec(tmp_path, label_from_parent=True))
    assert rejected == {}
    assert sorted(rows) == ["cats_chelsea", "coffee", "people_astronaut", "people_camera"]
    assert rows["cats_chelsea"].captions == ["a tabby cat", "a cat on a table"]
    assert rows["people_astronaut"].captions == [""]  # blank sidecar stays visible
    assert rows["people_camera"].captions == []  # no sidecar
    assert rows["cats_chelsea"].label == "cats"
    assert rows["coffee"].label == "imgs"
    assert rows["people_camera"].extra == {"path": "people/camera.PNG"}
    for key, row in rows.items():
        assert row.image == sidecar_folder[row.extra["path"]], key


def test_image_folder_extensions_filter_and_no_label(tmp_path, sidecar_folder):
    rows, _ = run_source(folder_spec(tmp_path, extensions=["png"]))
    assert sorted(rows) == ["people_astronaut", "people_camera"]
    assert all(row.label is None for row in rows.values())


def test_image_folder_shards_limit_and_determinism(tmp_path, sidecar_folder):
    spec = folder_spec(tmp_path)
    reader = SOURCES.get("image-folder")
    units = reader.plan(spec, ctx(shard_size=3))
    assert [u.rows for u in units] == [3, 1]
    assert units == reader.plan(spec, ctx(shard_size=3))
    rows, _ = run_source(folder_spec(tmp_path, limit=2), ctx(shard_size=1))
    assert sorted(rows) == ["cats_chelsea", "coffee"]


def test_image_folder_key_collisions_stay_unique(tmp_path):
    save_photo(tmp_path / "imgs/a b.png")
    save_photo(tmp_path / "imgs/a_b.jpg")
    save_photo(tmp_path / "imgs/a_b.png")
    rows, _ = run_source(folder_spec(tmp_path))
    assert sorted(rows) == ["a_b", "a_b-2", "a_b-3"]
    assert sorted(r.extra["path"] for r in rows.values()) == ["a b.png", "a_b.jpg", "a_b.png"]


def test_image_folder_csv_captions(tmp_path):
    save_photo(tmp_path / "imgs/cat.jpg", "chelsea")
    save_photo(tmp_path / "imgs/sub/coffee.png", "coffee")
    save_photo(tmp_path / "imgs/uncaptioned.png", "camera")
    (tmp_path / "imgs/cat.txt").write_text("sidecars are ignored with a captions file")
    (tmp_path / "caps.csv").write_text(
        "file,caption\ncat.jpg, a cat \ncat.jpg,a cat on a table\nsub/coffee.png,\ngone.png,lost\n,no file\n"
    )
    rows, rejected = run_source(folder_spec(tmp_path, captions_file="caps.csv"))
    assert rows["cat"].captions == ["a cat", "a cat on a table"]
    assert rows["sub_coffee"].captions == [""]
    assert rows["uncaptioned"].captions == []
    assert reasons(rejected) == {"gone": "missing-image-file", "caps-line-6": "malformed-annotation"}
    assert "gone.png" in rejected["gone"].detail
    assert "line 6" in rejected["caps-line-6"].detail
    assert len(rows) + len(rejected) == 3 + 1 + 1  # images on disk + absent listed file + bad line


def test_image_folder_jsonl_captions(tmp_path):
    save_photo(tmp_path / "imgs/cat.jpg", "chelsea")
    save_photo(tmp_path / "imgs/coffee.png", "coffee")
    save_photo(tmp_path / "imgs/camera.png", "camera")
    lines = [
        {"file": "cat.jpg", "caption": " a cat "},
        {"file": "cat.jpg", "captions": ["tabby", "  "]},
        {"file": "coffee.png", "caption": 3},
        {"file": "ghost.png", "captions": ["x"]},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\n\n{broken\n"
    (tmp_path / "caps.jsonl").write_text(text)
    rows, rejected = run_source(folder_spec(tmp_path, captions_file="caps.jsonl"))
    assert rows["cat"].captions == ["a cat", "tabby", ""]
    assert rows["camera"].captions == []
    assert reasons(rejected) == {
        "coffee": "malformed-annotation",
        "ghost": "missing-image-file",
        "caps-line-6": "malformed-annotation",
    }
    assert "line 3" in rejected["coffee"].detail and "caption" in rejected["coffee"].detail
    assert len(rows) + len(rejected) == 5


def test_image_folder_bad_captions_file_is_a_user_error(tmp_path):
    save_photo(tmp_path / "imgs/cat.jpg")
    (tmp_path / "caps.csv").write_text("path,text\ncat.jpg,a cat\n")
    (tmp_path / "caps.txt").write_text("cat.jpg a cat\n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no images with extensions"):
        SOURCES.get("image-folder").plan(folder_spec(tmp_path, path="empty"), ctx())
    for name in ("caps.csv", "caps.txt"):
        spec = folder_spec(tmp_path, captions_file=name)
        with pytest.raises(UserError, match=name):
            SOURCES.get("image-folder").plan(spec, ctx())


def test_image_folder_hf_metadata_jsonl_is_picked_up(tmp_path):
    """Hugging Face imagefolder: metadata.jsonl at the top, `file_name` + `text`; sidecars are then ignored."""
    save_photo(tmp_path / "imgs/cat.jpg", "chelsea")
    save_photo(tmp_path / "imgs/sub/coffee.png", "coffee")
    save_photo(tmp_path / "imgs/camera.png", "camera")
    (tmp_path / "imgs/cat.txt").write_text("a sidecar, ignored beside metadata.jsonl")
    lines = [
        json.dumps({"file_name": "cat.jpg", "text": " a cat ", "label": 3}),
        json.dumps({"file_name": "sub/coffee.png", "text": ["not", "a string"]}),
        json.dumps({"text": "no file"}),
        "{broken",
        json.dumps({"file_name": "../outside.png", "text": "escapes"}),
    ]
    (tmp_path / "imgs/metadata.jsonl").write_text("\n".join(lines) + "\n")
    rows, rejected = run_source(folder_spec(tmp_path))
    assert {k: r.captions for k, r in rows.items()} == {"cat": ["a cat"], "camera": []}
    assert reasons(rejected) == {
        "sub_coffee": "malformed-annotation",
        "metadata-line-3": "malformed-annotation",
        "metadata-line-4": "malformed-annotation",
        "metadata-line-5": "path-outside-dataset",
    }
    assert rejected["sub_coffee"].detail == "metadata.jsonl line 2: text: expected a string"
    assert rejected["metadata-line-3"].detail == "metadata.jsonl line 3: file_name: missing or not a path"
    assert "line 4: invalid JSON" in rejected["metadata-line-4"].detail


def test_image_folder_hf_metadata_csv_and_as_captions_file(tmp_path):
    save_photo(tmp_path / "imgs/cat.jpg", "chelsea")
    save_photo(tmp_path / "imgs/coffee.png", "coffee")
    (tmp_path / "imgs/metadata.csv").write_text("file_name,text,source\ncat.jpg,a cat,web\ncoffee.png\n")
    rows, rejected = run_source(folder_spec(tmp_path))
    assert rows["cat"].captions == ["a cat"]
    assert reasons(rejected) == {"coffee": "malformed-annotation"}
    assert rejected["coffee"].detail == "metadata.csv line 3: text: expected a string"
    # the same columns in a captions file named by the spec; `caption` wins over `text`
    (tmp_path / "caps.csv").write_text("file_name,text,caption\ncat.jpg,ocr words,a cat\ncoffee.png,,a cup\n")
    rows, rejected = run_source(folder_spec(tmp_path, captions_file="caps.csv"))
    assert {k: r.captions for k, r in rows.items()} == {"cat": ["a cat"], "coffee": ["a cup"]} and not rejected


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("metadata.csv", "file_name,description\ncat.jpg,a cat\n"),
        ("metadata.jsonl", json.dumps({"file_name": "cat.jpg", "description": "a cat"}) + "\n"),
        ("metadata.jsonl", json.dumps({"path": "cat.jpg", "text": "a cat"}) + "\n"),
    ],
)
def test_image_folder_metadata_without_known_columns_names_those_found(tmp_path, name, text):
    save_photo(tmp_path / "imgs/cat.jpg")
    (tmp_path / "imgs" / name).write_text(text)
    with pytest.raises(UserError) as caught:
        SOURCES.get("image-folder").plan(folder_spec(tmp_path), ctx())
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "imgs" / name))
    assert "file or file_name column" in message and "caption or " in message
    found = list(json.loads(text)) if name.endswith(".jsonl") else text.splitlines()[0].split(",")
    assert message.endswith("found: " + ", ".join(found))


def test_image_folder_metadata_files_that_cannot_be_read(tmp_path):
    save_photo(tmp_path / "imgs/cat.jpg")
    plan = SOURCES.get("image-folder").plan
    (tmp_path / "imgs/metadata.csv").write_text("file_name,text\ncat.jpg,a cat\n")
    (tmp_path / "imgs/metadata.jsonl").write_text(json.dumps({"file_name": "cat.jpg", "text": "a cat"}))
    with pytest.raises(UserError, match=r"holds both metadata\.jsonl and metadata\.csv"):
        plan(folder_spec(tmp_path), ctx())
    (tmp_path / "imgs/metadata.csv").unlink()
    (tmp_path / "imgs/metadata.jsonl").unlink()
    (tmp_path / "elsewhere.jsonl").write_text(json.dumps({"file_name": "cat.jpg", "text": "from outside"}))
    (tmp_path / "imgs/metadata.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    with pytest.raises(UserError, match=r"metadata\.jsonl.*outside the dataset folder.*allow_outside_paths"):
        plan(folder_spec(tmp_path), ctx())
    rows, _ = run_source(folder_spec(tmp_path, allow_outside_paths=True))
    assert rows["cat"].captions == ["from outside"]
    (tmp_path / "imgs/metadata.jsonl").unlink()
    (tmp_path / "imgs/metadata.jsonl").mkdir()
    with pytest.raises(UserError, match=r"metadata\.jsonl: not a regular file"):
        plan(folder_spec(tmp_path), ctx())


# ---------------------------------------------------------------- coco


def coco_spec(tmp_path: Path, **fields) -> CocoSource:
    values = {"kind": "coco", "captions": "captions.json", "images": "images", **fields}
    return CocoSource.model_validate(values, context={"spec_dir": tmp_path})


@pytest.fixture
def coco_files(tmp_path: Path) -> dict[str, bytes]:
    stored = {
        "a.jpg": save_photo(tmp_path / "images/a.jpg", "astronaut", size=40),
        "b.png": save_photo(tmp_path / "images/b.png", "coffee", size=40),
        "c.jpg": save_photo(tmp_path / "images/c.jpg", "chelsea", size=40),
    }
    captions = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 40, "height": 40},
            {"id": 2, "file_name": "b.png", "width": 40, "height": 27},
            {"id": 3, "file_name": "c.jpg", "width": 40, "height": 27},
            {"id": 4, "file_name": "missing.jpg", "width": 10, "height": 10},
            {"id": 5, "width": 10, "height": 10},  # no file_name
            {"id": 1, "file_name": "a.jpg", "width": 40, "height": 40},  # duplicate id
        ],
        "annotations": [
            {"image_id": 1, "caption": " an astronaut "},
            {"image_id": 1, "caption": "a woman in a space suit"},
            {"image_id": 2, "caption": "a cup of coffee"},
            {"image_id": 99, "caption": "orphan"},
            {"image_id": 2, "caption": None},
            {"image_id": 5, "caption": "goes with its rejected image"},
        ],
    }
    instances = {
        "annotations": [
            {"image_id": 1, "bbox": [10, 20, 10, 10], "category_id": 1},
            {"image_id": 2, "bbox": [0, 0, 20, 27], "category_id": 2},
            {"image_id": 2, "bbox": [0, 0], "category_id": 2},
            {"image_id": 2, "bbox": [0, 0, 1, 1], "category_id": 7},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "cup"}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    return stored


def test_coco_rows_captions_boxes_and_rejections(tmp_path, coco_files):
    rows, rejected = run_source(coco_spec(tmp_path, instances="instances.json"))
    assert sorted(rows) == ["1", "2", "3"]
    assert rows["1"].captions == ["an astronaut", "a woman in a space suit"]
    assert rows["3"].captions == []
    assert rows["1"].image == coco_files["a.jpg"] and rows["2"].image == coco_files["b.png"]
    assert rows["1"].extra["objects"] == [{"category": "person", "bbox": [0.25, 0.5, 0.25, 0.25]}]
    assert rows["2"].extra["objects"] == [{"category": "cup", "bbox": [0.0, 0.0, 0.5, 1.0]}]
    assert rows["3"].extra["objects"] == []
    assert reasons(rejected) == {
        "4": "missing-image-file",
        "image-4": "malformed-annotation",
        "image-5": "malformed-annotation",
        "annotation-3": "malformed-annotation",
        "annotation-4": "malformed-annotation",
        "instance-2": "malformed-annotation",
        "instance-3": "malformed-annotation",
    }
    assert "file_name" in rejected["image-4"].detail
    assert "duplicate" in rejected["image-5"].detail
    assert "image_id" in rejected["annotation-3"].detail and "99" in rejected["annotation-3"].detail
    assert "caption" in rejected["annotation-4"].detail
    assert "bbox" in rejected["instance-2"].detail
    assert "category_id" in rejected["instance-3"].detail
    # accounting: every image entry + every malformed annotation is one row
    assert len(rows) + len(rejected) == 6 + 2 + 2


def test_coco_without_instances_has_no_objects(tmp_path, coco_files):
    rows, _ = run_source(coco_spec(tmp_path))
    assert "objects" not in rows["1"].extra


def test_coco_shards_limit_and_determinism(tmp_path, coco_files):
    spec = coco_spec(tmp_path)
    reader = SOURCES.get("coco")
    units = reader.plan(spec, ctx(shard_size=3))
    assert [u.rows for u in units] == [3, 3, 2]  # 6 images + 2 bad annotations
    assert units == reader.plan(spec, ctx(shard_size=3))
    rows, rejected = run_source(coco_spec(tmp_path, limit=2), ctx(shard_size=1))
    assert sorted(rows) == ["1", "2"] and rejected == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [('{\n  "images": [,]\n}', r"captions\.json: invalid JSON at line 2, column 14"), ("[]", r"captions\.json")],
)
def test_coco_unparseable_file_is_a_user_error(tmp_path, text, expected):
    (tmp_path / "images").mkdir()
    (tmp_path / "captions.json").write_text(text)
    with pytest.raises(UserError, match=expected):
        SOURCES.get("coco").plan(coco_spec(tmp_path), ctx())


# ---------------------------------------------------------------- llava-json


def llava_spec(tmp_path: Path, **fields) -> LlavaJsonSource:
    values = {"kind": "llava-json", "path": "llava.json", "images": "images", **fields}
    return LlavaJsonSource.model_validate(values, context={"spec_dir": tmp_path})


@pytest.fixture
def llava_files(tmp_path: Path) -> bytes:
    stored = save_photo(tmp_path / "images/coco/cat.jpg", "chelsea")
    turns = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]
    entries = [
        {"id": "000001", "image": "coco/cat.jpg", "conversations": [{"from": "system", "value": "Be brief."}, *turns]},
        {"image": "coco/cat.jpg", "conversations": turns},  # no id: key from the index
        {"id": "text-only", "conversations": turns},
        {"id": "gone", "image": "coco/gone.jpg", "conversations": turns},
        {"id": "bad-role", "image": "coco/cat.jpg", "conversations": [{"from": "bot", "value": "hi"}]},
        {"id": "bad-turns", "image": "coco/cat.jpg", "conversations": "hello"},
        "not an object",
        {"id": "000001", "image": "coco/cat.jpg", "conversations": turns},  # duplicate id
    ]
    (tmp_path / "llava.json").write_text(json.dumps(entries))
    return stored


def test_llava_conversations_and_rejections(tmp_path, llava_files):
    rows, rejected = run_source(llava_spec(tmp_path))
    assert sorted(rows) == ["000001", "000001-2", "1"]
    first = rows["000001"]
    assert first.image == llava_files and first.captions == []
    assert first.extra["conversations"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat is this?"},
        {"role": "assistant", "content": "A cat."},
    ]
    assert reasons(rejected) == {
        "text-only": "no-image",
        "gone": "missing-image-file",
        "bad-role": "malformed-annotation",
        "bad-turns": "malformed-annotation",
        "entry-6": "malformed-annotation",
    }
    assert "conversations[0].from" in rejected["bad-role"].detail and "bot" in rejected["bad-role"].detail
    assert "entry 5" in rejected["bad-turns"].detail and "conversations" in rejected["bad-turns"].detail
    assert len(rows) + len(rejected) == 8


def test_llava_shards_limit_and_determinism(tmp_path, llava_files):
    spec = llava_spec(tmp_path)
    reader = SOURCES.get("llava-json")
    units = reader.plan(spec, ctx(shard_size=3))
    assert [u.rows for u in units] == [3, 3, 2]
    assert units == reader.plan(spec, ctx(shard_size=3))
    rows, rejected = run_source(llava_spec(tmp_path, limit=3))
    assert sorted(rows) == ["000001", "1"] and reasons(rejected) == {"text-only": "no-image"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [('[{"id": 1}\n{"id": 2}]', r"llava\.json: invalid JSON at line 2, column 1"), ('{"id": 1}', r"llava\.json")],
)
def test_llava_unparseable_file_is_a_user_error(tmp_path, text, expected):
    (tmp_path / "images").mkdir()
    (tmp_path / "llava.json").write_text(text)
    with pytest.raises(UserError, match=expected):
        SOURCES.get("llava-json").plan(llava_spec(tmp_path), ctx())
