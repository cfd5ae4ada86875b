"""The hf-disk source on folders written by the real `datasets` save_to_disk, with scikit-image photos."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import datasets
import numpy as np
import polars as pl
import pytest
from PIL import Image
from skimage import data as skdata

from vlmflow.components.ingest import plan_units, process_unit
from vlmflow.components.sources.base import SOURCES, RawRow, Rejected, SourceContext
from vlmflow.errors import SpecError, UserError
from vlmflow.fingerprint import fingerprint_value
from vlmflow.specs import load_recipe
from vlmflow.specs.data import HfDiskSource
from vlmflow.specs.loader import Marked, validate

PHOTOS = (skdata.astronaut, skdata.coffee, skdata.chelsea, skdata.rocket, skdata.camera)
IMAGE_TEXT = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})


def photo(index: int, size: int = 40) -> bytes:
    image = Image.fromarray(np.asarray(PHOTOS[index % len(PHOTOS)]()))
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def save(folder: Path, columns: dict, features: datasets.Features = IMAGE_TEXT, **kwargs) -> Path:
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(folder), **kwargs)
    return folder


def spec(tmp_path: Path, path: str = "ds", **fields) -> HfDiskSource:
    return HfDiskSource.model_validate({"kind": "hf-disk", "path": path, **fields}, context={"spec_dir": tmp_path})


def ctx(shard_size: int = 100) -> SourceContext:
    return SourceContext(name="src", seed=0, shard_size=shard_size)


def run_source(source: HfDiskSource, context: SourceContext | None = None):
    context = context or ctx()
    reader = SOURCES.get("hf-disk")
    units = reader.plan(source, context)
    assert pickle.loads(pickle.dumps(units)) == units
    rows: dict[str, RawRow] = {}
    rejected: dict[str, Rejected] = {}
    for unit in units:
        assert 0 < unit.rows <= context.shard_size
        produced = list(reader.read(source, context, unit))
        assert len(produced) == unit.rows
        for item in produced:
            assert item.key not in rows and item.key not in rejected
            (rows if isinstance(item, RawRow) else rejected)[item.key] = item
    return rows, rejected


def reasons(rejected: dict[str, Rejected]) -> dict[str, str]:
    return {key: r.reason for key, r in rejected.items()}


@pytest.fixture
def mixed(tmp_path: Path) -> list[bytes]:
    """A saved Dataset: good photos, a broken image, an empty and a missing caption, no image."""
    good = [photo(i) for i in range(3)]
    images = [good[0], b"this is not an image", good[1], good[2], None]
    save(tmp_path / "ds", {"image": images, "text": [" an astronaut ", "junk", "", None, "no image"]})
    return good


def test_image_feature_rows_captions_and_rejections(tmp_path, mixed):
    rows, rejected = run_source(spec(tmp_path))
    assert sorted(rows) == ["data-0", "data-1", "data-2", "data-3"]
    assert [rows[f"data-{i}"].image for i in (0, 2, 3)] == mixed
    assert rows["data-1"].image == b"this is not an image"  # judged by ingest's image check
    assert [rows[f"data-{i}"].captions for i in range(4)] == [["an astronaut"], ["junk"], [""], []]
    assert reasons(rejected) == {"data-4": "no-image"}
    assert spec(tmp_path).split == "train"


def test_ingest_accounts_for_every_row(tmp_path, mixed):
    source = {"kind": "hf-disk", "name": "hf", "path": "ds"}
    recipe = validate(Marked({"name": "t", "data": {"sources": [source], "shard_size": 2}}), tmp_path / "spec.yaml")
    work = plan_units(recipe.data, recipe.seed)
    assert [unit.rows for _, _, unit in work] == [2, 2, 1]
    out = tmp_path / "out"
    for item in work:
        process_unit(item, list(recipe.data.filters), str(out), "ingest/x/shards")
    manifest = pl.concat([pl.read_parquet(p) for p in sorted((out / "units").glob("*.manifest.parquet"))])
    quarantine = pl.concat([pl.read_parquet(p) for p in sorted((out / "units").glob("*.quarantine.parquet"))])
    assert manifest["key"].to_list() == ["hf-data-0"]
    assert manifest["caption"].to_list() == ["an astronaut"]
    assert dict(zip(quarantine["key"], quarantine["reason"], strict=True)) == {
        "hf-data-1": "unreadable-image",
        "hf-data-2": "empty-caption",
        "hf-data-3": "missing-caption",
        "hf-data-4": "no-image",
    }
    assert manifest.height + quarantine.height == 5


def test_path_column_stays_inside_the_folder_and_is_capped(tmp_path):
    # save_to_disk embeds the files an Image feature names, so paths survive only as a string column
    (tmp_path / "ds/pics").mkdir(parents=True)
    (tmp_path / "ds/pics/cat.png").write_bytes(photo(2))
    (tmp_path / "outside.png").write_bytes(photo(3))
    big = photo(4, size=200)
    (tmp_path / "ds/pics/big.png").write_bytes(big)
    files = ["pics/cat.png", str(tmp_path / "outside.png"), "../outside.png", "pics/gone.png", "pics/big.png"]
    features = datasets.Features({"file": datasets.Value("string"), "text": datasets.Value("string")})
    save(tmp_path / "ds", {"file": files, "text": list("abcde")}, features)
    source = spec(tmp_path, image_column="file", max_image_bytes=len(big) - 1)
    rows, rejected = run_source(source)
    assert list(rows) == ["data-0"] and rows["data-0"].image == photo(2)
    assert reasons(rejected) == {
        "data-1": "path-outside-dataset",
        "data-2": "path-outside-dataset",
        "data-3": "missing-image-file",
        "data-4": "too-large",
    }
    rows, rejected = run_source(spec(tmp_path, image_column="file", allow_outside_paths=True))
    assert rows["data-1"].image == rows["data-2"].image == photo(3)
    assert reasons(rejected) == {"data-3": "missing-image-file"}


def test_image_feature_embeds_the_files_it_names(tmp_path):
    (tmp_path / "outside.png").write_bytes(photo(3))
    save(tmp_path / "ds", {"image": [{"path": str(tmp_path / "outside.png"), "bytes": None}], "text": ["x"]})
    rows, rejected = run_source(spec(tmp_path))
    assert rows["data-0"].image == photo(3) and rejected == {}


def test_dataset_dict_split_keys_and_split_default(tmp_path):
    train = datasets.Dataset.from_dict({"image": [photo(0), photo(1)], "text": ["a", "b"]}, features=IMAGE_TEXT)
    test = datasets.Dataset.from_dict({"image": [photo(2)], "text": [["c", " d "]]}).cast_column(
        "image", datasets.Image()
    )
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    rows, _ = run_source(spec(tmp_path, "dd", dataset_split="train"))
    assert {k: r.captions for k, r in rows.items()} == {"train-0": ["a"], "train-1": ["b"]}
    source = spec(tmp_path, "dd", dataset_split="test")
    rows, _ = run_source(source)
    assert source.split == "test" and rows["test-0"].captions == ["c", "d"] and rows["test-0"].image == photo(2)
    assert spec(tmp_path, "dd", dataset_split="test", split="train").split == "train"


def test_units_follow_record_batches_across_files(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "DEFAULT_MAX_BATCH_SIZE", 3)  # save_to_disk writes batches of 3
    captions = [f"c{i}" for i in range(8)]
    save(tmp_path / "ds", {"image": [photo(i) for i in range(8)], "text": captions}, num_shards=2)
    reader = SOURCES.get("hf-disk")
    assert [u.rows for u in reader.plan(spec(tmp_path), ctx(shard_size=4))] == [4, 4]  # batches 3+1 | 3+1
    assert [u.rows for u in reader.plan(spec(tmp_path), ctx(shard_size=3))] == [3, 1, 3, 1]
    units = reader.plan(spec(tmp_path), ctx(shard_size=2))  # a batch of 3 is split
    pieces = [[(Path(p["file"]).name[:10], p["batch"], p["start"], p["stop"]) for p in u.payload] for u in units]
    assert pieces == [
        [("data-00000", 0, 0, 2)],
        [("data-00000", 0, 2, 3), ("data-00000", 1, 0, 1)],
        [("data-00001", 0, 0, 2)],
        [("data-00001", 0, 2, 3), ("data-00001", 1, 0, 1)],
    ]
    rows, _ = run_source(spec(tmp_path), ctx(shard_size=2))
    assert {k: r.captions[0] for k, r in rows.items()} == {f"data-{i}": c for i, c in enumerate(captions)}
    rows, rejected = run_source(spec(tmp_path, limit=5), ctx(shard_size=2))
    assert sorted(rows) == [f"data-{i}" for i in range(5)] and rejected == {}


def test_key_column_unique_and_class_label_names(tmp_path):
    features = datasets.Features(
        {**IMAGE_TEXT, "id": datasets.Value("string"), "cls": datasets.ClassLabel(names=["cat", "dog"])}
    )
    columns = {"image": [photo(i) for i in range(4)], "text": list("abcd")}
    save(tmp_path / "ds", {**columns, "id": ["x.1", "x_1", None, "y"], "cls": [1, 0, 0, -1]}, features)
    rows, rejected = run_source(spec(tmp_path, key_column="id", label_column="cls"), ctx(shard_size=2))
    assert sorted(rows) == ["x_1", "x_1-2", "y"]
    assert [rows[k].label for k in ("x_1", "x_1-2", "y")] == ["dog", "cat", None]
    assert reasons(rejected) == {"data-2": "malformed-annotation"}
    assert "id: null at row 2" in rejected["data-2"].detail


def test_damaged_arrow_files_are_unreadable_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "DEFAULT_MAX_BATCH_SIZE", 2)
    save(tmp_path / "ds", {"image": [photo(i) for i in range(6)], "text": list("abcdef")}, num_shards=2)
    first, second = tmp_path / "ds/data-00000-of-00002.arrow", tmp_path / "ds/data-00001-of-00002.arrow"
    first.write_bytes(first.read_bytes()[:-8])  # the end-of-stream marker cut: batches end quietly
    second.write_bytes(second.read_bytes()[:-100])  # cut inside its last batch (an image of a few KiB)
    rows, rejected = run_source(spec(tmp_path))
    assert sorted(rows) == ["data-0", "data-1", "data-2", "data-3", "data-4"]  # every batch read whole
    assert reasons(rejected) == {
        "data-data-00000-of-00002": "unreadable-shard",
        "data-data-00001-of-00002": "unreadable-shard",
    }
    assert "no end-of-stream marker" in rejected["data-data-00000-of-00002"].detail
    assert "after 2 rows in 1 record batches" in rejected["data-data-00001-of-00002"].detail
    second.unlink()
    _, rejected = run_source(spec(tmp_path))
    assert "after 0 rows" in rejected["data-data-00001-of-00002"].detail
    save(tmp_path / "more", {"image": [photo(0)], "text": ["a"]})
    with (tmp_path / "more/data-00000-of-00001.arrow").open("ab") as arrow:
        arrow.write(b"junk")
    rows, rejected = run_source(spec(tmp_path, "more"))
    assert list(rows) == ["data-0"] and reasons(rejected) == {"data-data-00000-of-00001": "unreadable-shard"}
    assert "4 unexpected bytes after the end-of-stream marker" in rejected["data-data-00000-of-00001"].detail


def test_a_file_changed_after_the_plan_rejects_its_rows(tmp_path):
    save(tmp_path / "ds", {"image": [photo(i) for i in range(3)], "text": list("abc")})
    source = spec(tmp_path)
    reader = SOURCES.get("hf-disk")
    (unit,) = reader.plan(source, ctx())
    (tmp_path / "ds/data-00000-of-00001.arrow").write_bytes(b"garbage")
    produced = list(reader.read(source, ctx(), unit))
    assert [(r.key, r.reason) for r in produced] == [(f"data-{i}", "unreadable-shard") for i in range(3)]


def test_cache_key_follows_the_arrow_files_content(tmp_path):
    save(tmp_path / "ds", {"image": [photo(0)], "text": ["a"]})
    before = fingerprint_value(spec(tmp_path), base=tmp_path)
    assert fingerprint_value(spec(tmp_path), base=tmp_path) == before
    save(tmp_path / "ds2", {"image": [photo(0)], "text": ["b"]})
    arrow = tmp_path / "ds/data-00000-of-00001.arrow"
    arrow.write_bytes((tmp_path / "ds2/data-00000-of-00001.arrow").read_bytes())
    assert fingerprint_value(spec(tmp_path), base=tmp_path) != before


def write_spec(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(f"name: t\ndata:\n  sources:\n    - kind: hf-disk\n{source}")
    return path


@pytest.mark.parametrize(
    ("fields", "where", "message"),
    [
        (
            "      path: dd\n",
            "4:7: data.sources.0:",
            "is a saved DatasetDict with splits train, test; no dataset_split",
        ),
        ("      path: dd\n      dataset_split: validation\n", "4:7: data.sources.0:", "dataset_split 'validation':"),
        ("      path: ds\n      dataset_split: train\n", "4:7: data.sources.0:", "is a saved Dataset (state.json)"),
        ("      path: plain\n", "4:7: data.sources.0:", "is not a folder written by save_to_disk"),
        ("      path: ds\n      dataset_split: ../x\n", "6:22: data.sources.0.dataset_split:", "should match"),
    ],
)
def test_folder_and_split_errors_are_located(tmp_path, fields, where, message):
    one = datasets.Dataset.from_dict({"image": [photo(0)], "text": ["a"]}, features=IMAGE_TEXT)
    one.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": one, "test": one}).save_to_disk(str(tmp_path / "dd"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(SpecError) as caught:
        load_recipe(write_spec(tmp_path, fields))
    assert f"spec.yaml:{where}" in str(caught.value) and message in str(caught.value)


def test_unknown_column_names_the_columns_present(tmp_path, mixed):
    with pytest.raises(UserError, match=r"no caption column 'caption' \(columns: image, text\)"):
        SOURCES.get("hf-disk").plan(spec(tmp_path, caption_column="caption"), ctx())
    with pytest.raises(UserError, match=r"data-00000-of-00001\.arrow: no label column 'cls'"):
        SOURCES.get("hf-disk").plan(spec(tmp_path, label_column="cls"), ctx())


def test_a_broken_state_file_is_an_error_naming_it(tmp_path, mixed):
    (tmp_path / "ds/state.json").write_text('{"_data_files": [{"filename": "../elsewhere.arrow"}]}')
    with pytest.raises(UserError, match=r"state.json: _data_files: .* is not the name of a file in this folder"):
        SOURCES.get("hf-disk").plan(spec(tmp_path), ctx())
    (tmp_path / "ds/state.json").write_text("{")
    with pytest.raises(UserError, match=r"state\.json: invalid JSON at line 1"):
        SOURCES.get("hf-disk").plan(spec(tmp_path), ctx())
