"""Shard-like source readers (parquet, webdataset) on real scikit-image photos."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data as skdata

from vlmflow.components.sources.base import SOURCES, RawRow, Rejected, SourceContext
from vlmflow.errors import UserError
from vlmflow.specs.data import ParquetSource, WebDatasetSource

PHOTOS = (skdata.astronaut, skdata.camera, skdata.coffee, skdata.chelsea)


def photo(index: int, fmt: str = "PNG", size: int = 40) -> bytes:
    image = Image.fromarray(np.asarray(PHOTOS[index % len(PHOTOS)]()))
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=fmt)
    return buffer.getvalue()


def ctx(shard_size: int = 100) -> SourceContext:
    return SourceContext(name="src", seed=0, shard_size=shard_size)


def run_source(spec, context: SourceContext | None = None, exact: bool = True):
    """plan + read over every unit -> (rows by key, rejected by key); keys unique over the source."""
    context = context or ctx()
    reader = SOURCES.get(spec.kind)
    units = reader.plan(spec, context)
    assert [u.index for u in units] == list(range(len(units)))
    assert pickle.loads(pickle.dumps(units)) == units  # payloads are plain picklable data
    rows: dict[str, RawRow] = {}
    rejected: dict[str, Rejected] = {}
    for unit in units:
        assert unit.source == context.name
        produced = list(reader.read(spec, context, unit))
        if exact:
            assert len(produced) == unit.rows <= context.shard_size
        for item in produced:
            assert "." not in item.key and "/" not in item.key
            assert item.key not in rows and item.key not in rejected
            (rows if isinstance(item, RawRow) else rejected)[item.key] = item
    return rows, rejected


def reasons(rejected: dict[str, Rejected]) -> dict[str, str]:
    return {key: r.reason for key, r in rejected.items()}


# ---------------------------------------------------------------- parquet


def parquet_spec(tmp_path: Path, path: str = "data.parquet", **fields) -> ParquetSource:
    values = {"kind": "parquet", "path": path, **fields}
    return ParquetSource.model_validate(values, context={"spec_dir": tmp_path})


def write_parquet(path: Path, columns: dict, row_group_size: int = 2, schema: pa.Schema | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path, row_group_size=row_group_size)


@pytest.fixture
def photos() -> list[bytes]:
    return [photo(i) for i in range(5)]


def test_parquet_bytes_captions_labels(tmp_path, photos):
    write_parquet(
        tmp_path / "data.parquet",
        {
            "image": [photos[0], photos[1], None, photos[3], photos[4]],
            "caption": [" an astronaut ", None, "nothing", "", "a cat"],
            "cls": [3, 1, 2, None, 0],
        },
    )
    rows, rejected = run_source(parquet_spec(tmp_path, label_column="cls"))
    assert sorted(rows) == ["data-0", "data-1", "data-3", "data-4"]
    assert rows["data-0"].image == photos[0] and rows["data-4"].image == photos[4]
    assert rows["data-0"].captions == ["an astronaut"]
    assert rows["data-1"].captions == []
    assert rows["data-3"].captions == [""]
    assert (rows["data-0"].label, rows["data-3"].label) == ("3", None)
    assert reasons(rejected) == {"data-2": "no-image"}
    assert len(rows) + len(rejected) == 5


def test_parquet_hf_struct_images_and_caption_lists(tmp_path, photos):
    (tmp_path / "hf/pics").mkdir(parents=True)
    (tmp_path / "hf/pics/cat.png").write_bytes(photos[3])
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = [
        {"bytes": photos[0], "path": "astronaut.png"},
        {"bytes": None, "path": "pics/cat.png"},  # relative to the parquet file's folder
        {"bytes": None, "path": "pics/gone.png"},
        {"bytes": None, "path": None},
    ]
    schema = pa.schema([("image", struct), ("caption", pa.list_(pa.string()))])
    captions = [[" one ", "two"], [], None, ["x"]]
    write_parquet(tmp_path / "hf/data.parquet", {"image": images, "caption": captions}, schema=schema)
    rows, rejected = run_source(parquet_spec(tmp_path, "hf/data.parquet"))
    assert rows["data-0"].image == photos[0] and rows["data-0"].captions == ["one", "two"]
    assert rows["data-1"].image == photos[3] and rows["data-1"].captions == []
    assert reasons(rejected) == {"data-2": "missing-image-file", "data-3": "no-image"}
    assert "gone.png" in rejected["data-2"].detail


def test_parquet_path_column_with_image_root_and_key_column(tmp_path, photos):
    (tmp_path / "root").mkdir()
    for i in range(3):
        (tmp_path / f"root/{i}.png").write_bytes(photos[i])
    write_parquet(
        tmp_path / "data.parquet",
        {"file": ["0.png", "1.png", "2.png", "9.png", "1.png"], "id": ["a.1", "b", "a_1", None, "b"]},
    )
    spec = parquet_spec(tmp_path, image_column="file", caption_column=None, key_column="id", image_root="root")
    rows, rejected = run_source(spec, ctx(shard_size=2))
    assert sorted(rows) == ["a_1", "a_1-2", "b", "b-2"]  # made unique over the whole source
    assert rows["a_1"].image == photos[0] and rows["a_1-2"].image == photos[2]
    assert rows["b-2"].image == photos[1] and rows["b"].captions == []
    assert reasons(rejected) == {"data-3": "malformed-annotation"}
    assert "id" in rejected["data-3"].detail and "row 3" in rejected["data-3"].detail


def test_parquet_units_follow_row_groups(tmp_path, photos):
    write_parquet(tmp_path / "data.parquet", {"image": photos, "caption": ["c"] * 5}, row_group_size=2)
    reader = SOURCES.get("parquet")
    spec = parquet_spec(tmp_path)
    assert [u.rows for u in reader.plan(spec, ctx(shard_size=4))] == [4, 1]  # groups 2+2 | 1
    assert [u.rows for u in reader.plan(spec, ctx(shard_size=3))] == [2, 3]  # 2 | 2+1
    assert [u.rows for u in reader.plan(spec, ctx(shard_size=1))] == [1, 1, 1, 1, 1]  # groups split
    assert reader.plan(spec, ctx(shard_size=3)) == reader.plan(spec, ctx(shard_size=3))
    rows, _ = run_source(spec, ctx(shard_size=1))
    assert [rows[f"data-{i}"].image for i in range(5)] == photos


def test_parquet_big_row_group_is_split_and_limit(tmp_path, photos):
    write_parquet(tmp_path / "data.parquet", {"image": photos, "caption": list("abcde")}, row_group_size=5)
    reader = SOURCES.get("parquet")
    assert [u.rows for u in reader.plan(parquet_spec(tmp_path), ctx(shard_size=2))] == [2, 2, 1]
    rows, _ = run_source(parquet_spec(tmp_path), ctx(shard_size=2))
    assert {k: r.captions for k, r in rows.items()} == {f"data-{i}": [c] for i, c in enumerate("abcde")}
    rows, rejected = run_source(parquet_spec(tmp_path, limit=3), ctx(shard_size=2))
    assert sorted(rows) == ["data-0", "data-1", "data-2"] and rejected == {}


def test_parquet_folder_is_read_in_sorted_order(tmp_path, photos):
    write_parquet(tmp_path / "set/b.parquet", {"image": photos[2:4], "caption": ["b0", "b1"]})
    write_parquet(tmp_path / "set/a.parquet", {"image": photos[:2], "caption": ["a0", "a1"]})
    write_parquet(tmp_path / "set/sub/a.parquet", {"image": photos[4:], "caption": ["s0"]})
    spec = parquet_spec(tmp_path, "set", limit=4)
    units = SOURCES.get("parquet").plan(spec, ctx(shard_size=3))
    assert [[(Path(p["file"]).name, p["start"], p["stop"]) for p in u.payload] for u in units] == [
        [("a.parquet", 0, 2)],
        [("b.parquet", 0, 2)],
    ]
    rows, _ = run_source(parquet_spec(tmp_path, "set"))
    assert {k: r.captions[0] for k, r in rows.items()} == {
        "a-0": "a0",
        "a-1": "a1",
        "b-0": "b0",
        "b-1": "b1",
        "sub_a-0": "s0",
    }


def test_parquet_unreadable_file_on_the_worker_rejects_its_rows(tmp_path, photos):
    write_parquet(tmp_path / "data.parquet", {"image": photos[:3], "caption": ["a", "b", "c"]})
    spec = parquet_spec(tmp_path)
    units = SOURCES.get("parquet").plan(spec, ctx())
    (tmp_path / "data.parquet").write_bytes(b"not parquet any more")
    produced = list(SOURCES.get("parquet").read(spec, ctx(), units[0]))
    assert [(r.key, r.reason) for r in produced] == [(f"data-{i}", "unreadable-shard") for i in range(3)]


@pytest.mark.parametrize(
    ("columns", "fields", "expected"),
    [
        ({"img": [b"x"]}, {}, r"data\.parquet: no image column 'image'"),
        ({"image": [b"x"]}, {}, r"data\.parquet: no caption column 'caption'"),
        ({"image": [b"x"], "caption": [1]}, {}, r"data\.parquet: caption column 'caption' has type int64"),
        ({"image": [1], "caption": ["c"]}, {}, r"data\.parquet: image column 'image' has type int64"),
        ({"image": [b"x"], "caption": ["c"]}, {"key_column": "id"}, r"data\.parquet: no key column 'id'"),
    ],
)
def test_parquet_schema_problems_are_user_errors(tmp_path, columns, fields, expected):
    write_parquet(tmp_path / "data.parquet", columns)
    with pytest.raises(UserError, match=expected):
        SOURCES.get("parquet").plan(parquet_spec(tmp_path, **fields), ctx())


def test_parquet_not_a_parquet_file_is_a_user_error(tmp_path):
    (tmp_path / "data.parquet").write_text("hello")
    with pytest.raises(UserError, match=r"data\.parquet"):
        SOURCES.get("parquet").plan(parquet_spec(tmp_path), ctx())
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no \.parquet files"):
        SOURCES.get("parquet").plan(parquet_spec(tmp_path, "empty"), ctx())


# ---------------------------------------------------------------- webdataset


def wds_spec(tmp_path: Path, path: str = "shards", **fields) -> WebDatasetSource:
    values = {"kind": "webdataset", "path": path, **fields}
    return WebDatasetSource.model_validate(values, context={"spec_dir": tmp_path})


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def member_offset(raw: bytes, name: str) -> int:
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return tar.getmember(name).offset_data


@pytest.fixture
def shards(tmp_path: Path) -> list[bytes]:
    images = [photo(i, "JPEG") for i in range(4)] + [photo(0, "PNG")]
    meta = {"captions": [" a cup ", "coffee"], "source": "web", "width": 40}
    write_tar(
        tmp_path / "shards/000.tar",
        [
            ("s1.jpg", images[0]),
            ("s1.txt", b" an astronaut \n"),
            ("s2.png", images[4]),
            ("s2.json", json.dumps(meta).encode()),
            ("s3.txt", b"text only"),
            ("dir/s4.JPG", images[3]),
            ("dir/s4.cls", b"7\n"),
            ("s5.jpg", images[1]),
            ("s5.json", b"{not json"),
        ],
    )
    write_tar(tmp_path / "shards/001.tar", [("s1.jpg", images[2]), ("s1.txt", b"a camera man")])
    (tmp_path / "shards/readme.md").write_text("not a shard")
    return images


def test_webdataset_samples_captions_and_rejections(tmp_path, shards):
    rows, rejected = run_source(wds_spec(tmp_path))
    assert sorted(rows) == ["000-dir_s4", "000-s1", "000-s2", "001-s1"]
    assert rows["000-s1"].image == shards[0] and rows["000-s1"].captions == ["an astronaut"]
    assert rows["000-s2"].image == shards[4] and rows["000-s2"].captions == ["a cup", "coffee"]
    assert rows["000-s2"].extra == {"json": {"source": "web", "width": 40}}
    assert rows["000-dir_s4"].captions == [] and rows["000-dir_s4"].label == "7"
    assert rows["001-s1"].image == shards[2] and rows["001-s1"].captions == ["a camera man"]
    assert reasons(rejected) == {"000-s3": "no-image", "000-s5": "malformed-annotation"}
    assert "json" in rejected["000-s5"].detail
    units = SOURCES.get("webdataset").plan(wds_spec(tmp_path), ctx())
    assert [u.rows for u in units] == [5, 1] and units == SOURCES.get("webdataset").plan(wds_spec(tmp_path), ctx())


def test_webdataset_json_caption_key_and_single_tar(tmp_path):
    image = photo(3, "JPEG")
    write_tar(tmp_path / "one.tar", [("k.jpg", image), ("k.txt", b"ignored"), ("k.json", b'{"caption": " cat "}')])
    rows, rejected = run_source(wds_spec(tmp_path, "one.tar", caption_key="json"))
    assert rejected == {} and rows["one-k"].captions == ["cat"] and rows["one-k"].image == image


def test_webdataset_limit_spans_tars(tmp_path, shards):
    rows, rejected = run_source(wds_spec(tmp_path, limit=5))
    assert len(rows) + len(rejected) == 5 and "001-s1" not in rows
    rows, rejected = run_source(wds_spec(tmp_path, limit=2))
    assert sorted(rows) == ["000-s1", "000-s2"] and rejected == {}
    assert len(SOURCES.get("webdataset").plan(wds_spec(tmp_path, limit=2), ctx())) == 1


def test_webdataset_truncated_tar_yields_what_was_read(tmp_path):
    images = [photo(i, "JPEG") for i in range(3)]
    members = [(f"s{i}.jpg", images[i]) for i in range(3)]
    members = [m for i, m in enumerate(members) for m in (m, (f"s{i}.txt", f"caption {i}".encode()))]
    raw = write_tar(tmp_path / "full.tar", members)
    cut = member_offset(raw, "s2.jpg") + 100
    (tmp_path / "full.tar").write_bytes(raw[:cut])
    rows, rejected = run_source(wds_spec(tmp_path, "full.tar"), exact=False)
    assert sorted(rows) == ["full-s0", "full-s1"] and rows["full-s1"].captions == ["caption 1"]
    assert reasons(rejected) == {"full": "unreadable-shard"}
    assert "after 2 samples" in rejected["full"].detail and "s2" in rejected["full"].detail


@pytest.mark.parametrize("where", ["header", "boundary", "garbage"])
def test_webdataset_damage_between_members_is_reported(tmp_path, where):
    members = [
        (f"{k}.{ext}", photo(i, "JPEG") if ext == "jpg" else f"cap {k}".encode())
        for i, k in enumerate("abc")
        for ext in ("jpg", "txt")
    ]
    raw = write_tar(tmp_path / "t.tar", members)
    header = member_offset(raw, "c.jpg") - 512
    damaged = {
        "header": raw[: header + 100],  # cut inside a header: tarfile alone would end quietly
        "boundary": raw[:header],  # cut between members: no end-of-archive marker
        "garbage": raw[:header] + b"\x07" * 512 + raw[header + 512 :],
    }[where]
    (tmp_path / "t.tar").write_bytes(damaged)
    rows, rejected = run_source(wds_spec(tmp_path, "t.tar"), exact=False)
    # "b" was the sample in progress when the damage showed: it may be incomplete, so it is not yielded
    assert list(rows) == ["t-a"] and rows["t-a"].captions == ["cap a"]
    assert reasons(rejected) == {"t": "unreadable-shard"}
    assert "'b'" in rejected["t"].detail


def test_webdataset_not_a_tar_and_empty_folder(tmp_path):
    (tmp_path / "shards").mkdir()
    with pytest.raises(UserError, match=r"no \.tar files"):
        SOURCES.get("webdataset").plan(wds_spec(tmp_path), ctx())
    (tmp_path / "shards/x.tar").write_bytes(b"hello world" * 100)
    rows, rejected = run_source(wds_spec(tmp_path), exact=False)
    assert rows == {} and reasons(rejected) == {"x": "unreadable-shard"}


def test_webdataset_repeated_keys_stay_unique_and_duplicates_are_malformed(tmp_path):
    image = photo(1, "JPEG")
    members = [("a.jpg", image), ("b.jpg", image), ("b.jpg", image), ("a.jpg", image), ("a.txt", b"again")]
    write_tar(tmp_path / "t.tar", members)
    rows, rejected = run_source(wds_spec(tmp_path, "t.tar"))
    assert sorted(rows) == ["t-a", "t-a-2"] and rows["t-a-2"].captions == ["again"]
    assert reasons(rejected) == {"t-b": "malformed-annotation"} and "jpg" in rejected["t-b"].detail
