"""Row filters with reasons, WebDataset shard round trips, and the content-addressed artifact store."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from vlmflow.artifacts import (
    SUCCESS,
    ArtifactStore,
    atomic_path,
    atomic_write_text,
    canonical_json,
    digest_of,
    file_sha256,
    stage_digest,
)
from vlmflow.components.filters import FILTERS, first_failure, row_texts
from vlmflow.components.sources.base import RawRow
from vlmflow.images import CheckedImage, check_image
from vlmflow.samples import ShardCorrupt, read_shard, sample_json, write_shard
from vlmflow.specs.data import AspectRatioFilter, CaptionLengthFilter, MinSizeFilter


def image_of(width: int, height: int) -> CheckedImage:
    """A real checked image of the given size (a crop of scikit-image's coffee photo)."""
    photo = Image.fromarray(skdata.coffee()[:height, :width])
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    result = check_image(buffer.getvalue())
    assert isinstance(result, CheckedImage)
    assert (result.width, result.height) == (width, height)
    return result


@pytest.fixture(scope="module")
def square() -> CheckedImage:
    return image_of(32, 32)


def row(*captions: str, **extra) -> RawRow:
    return RawRow(key="k", captions=list(captions), extra=extra)


MIN_SIZE = MinSizeFilter(kind="min-size", width=16, height=20)
CAPTION = CaptionLengthFilter(kind="caption-length", min_chars=3, max_chars=10)
ASPECT = AspectRatioFilter(kind="aspect-ratio", max_ratio=4.0)


# ---------------------------------------------------------------- filters


def test_filters_registered_for_every_spec_kind():
    assert FILTERS.kinds() == ["aspect-ratio", "caption-length", "min-size"]


@pytest.mark.parametrize(
    ("size", "verdict"),
    [
        ((16, 20), None),
        ((200, 300), None),
        ((15, 20), ("image-too-small", "15x20 < 16x20")),
        ((16, 19), ("image-too-small", "16x19 < 16x20")),
        ((3, 3), ("image-too-small", "3x3 < 16x20")),
    ],
)
def test_min_size(size, verdict):
    assert FILTERS.get("min-size")(MIN_SIZE, row("a caption"), image_of(*size)) == verdict


@pytest.mark.parametrize(
    ("texts", "reason"),
    [
        (("abc",), None),
        (("exactly10!",), None),
        (("abc", "0123456789"), None),
        (("ab",), "caption-too-short"),
        (("abcd", "ab"), "caption-too-short"),
        (("01234567890",), "caption-too-long"),
        (("abcd", "01234567890"), "caption-too-long"),
        (("   ",), "empty-caption"),
        (("", " \n"), "empty-caption"),
        ((), "missing-caption"),
    ],
)
def test_caption_length(square, texts, reason):
    verdict = FILTERS.get("caption-length")(CAPTION, row(*texts), square)
    assert (verdict[0] if verdict else None) == reason
    if verdict:
        assert verdict[1]


def test_caption_length_details(square):
    check = FILTERS.get("caption-length")
    assert check(CAPTION, row("ab"), square) == ("caption-too-short", "2 chars < 3")
    assert check(CAPTION, row("x" * 12), square) == ("caption-too-long", "12 chars > 10")


def test_caption_length_uses_conversations_without_captions(square):
    check = FILTERS.get("caption-length")
    talk = [{"role": "user", "content": "what?"}, {"role": "assistant", "content": "a cat"}]
    assert row_texts(row(conversations=talk)) == ["what?", "a cat"]
    assert check(CAPTION, row(conversations=talk), square) is None
    long_talk = [{"role": "user", "content": "x" * 11}]
    assert check(CAPTION, row(conversations=long_talk), square)[0] == "caption-too-long"
    assert check(CAPTION, row(conversations=[]), square)[0] == "missing-caption"


@pytest.mark.parametrize(
    ("size", "reason"),
    [
        ((32, 32), None),
        ((128, 32), None),
        ((32, 128), None),
        ((132, 32), "extreme-aspect-ratio"),
        ((8, 40), "extreme-aspect-ratio"),
    ],
)
def test_aspect_ratio(size, reason):
    verdict = FILTERS.get("aspect-ratio")(ASPECT, row("a caption"), image_of(*size))
    assert (verdict[0] if verdict else None) == reason
    if size == (8, 40):
        assert verdict[1] == "5.00 > 4.0"


def test_first_failure_follows_filter_order():
    tiny_wide = image_of(100, 5)  # too small, extreme ratio
    bad_caption = row("x" * 50)
    assert first_failure([MIN_SIZE, CAPTION, ASPECT], bad_caption, tiny_wide)[0] == "image-too-small"
    assert first_failure([CAPTION, MIN_SIZE, ASPECT], bad_caption, tiny_wide)[0] == "caption-too-long"
    assert first_failure([ASPECT, CAPTION, MIN_SIZE], bad_caption, tiny_wide)[0] == "extreme-aspect-ratio"
    assert first_failure([CAPTION, ASPECT], row("fine"), tiny_wide)[0] == "extreme-aspect-ratio"


def test_first_failure_keeps_a_good_row(square):
    assert first_failure([MIN_SIZE, CAPTION, ASPECT], row("a cat"), square) is None
    assert first_failure([], row(), image_of(1, 1)) is None


# ---------------------------------------------------------------- shards


def samples() -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(4):
        pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        out.append(
            {
                "__key__": f"src-{i:04d}",
                "png": buffer.getvalue(),
                "json": {"captions": [f"caption {i}", "ünïcode ✓"], "label": None, "z": 1, "a": [i, i * 2]},
            }
        )
    return out


def test_shard_round_trip(tmp_path):
    original = samples()
    path = tmp_path / "shards" / "shard-00000.tar"
    write_shard(path, original)
    loaded = list(read_shard(path))
    assert [s["__key__"] for s in loaded] == [s["__key__"] for s in original]
    for got, want in zip(loaded, original, strict=True):
        assert set(got) == {"__key__", "png", "json"}
        assert got["png"] == want["png"]
        assert sample_json(got) == want["json"]
        assert Image.open(io.BytesIO(got["png"])).size == (8, 8)


def test_shard_is_a_plain_tar_with_expected_members(tmp_path):
    path = tmp_path / "a.tar"
    write_shard(path, samples()[:2])
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["src-0000.json", "src-0000.png", "src-0001.json", "src-0001.png"]
    assert all(m.mtime == 0 for m in members)


def test_shard_sha256_and_size_match_the_file(tmp_path):
    path = tmp_path / "a.tar"
    digest, size = write_shard(path, samples())
    content = path.read_bytes()
    assert digest == hashlib.sha256(content).hexdigest() == file_sha256(path)
    assert size == len(content)


def test_shard_bytes_are_deterministic(tmp_path):
    digest_a, _ = write_shard(tmp_path / "a.tar", samples())
    digest_b, _ = write_shard(tmp_path / "b.tar", samples())
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert digest_a == digest_b
    changed = samples()
    changed[1]["json"]["captions"][0] = "another caption"
    digest_c, _ = write_shard(tmp_path / "c.tar", changed)
    assert digest_c != digest_a


def test_shard_json_key_order_does_not_matter(tmp_path):
    first, second = samples(), samples()
    second[0]["json"] = dict(reversed(list(second[0]["json"].items())))
    assert write_shard(tmp_path / "a.tar", first)[0] == write_shard(tmp_path / "b.tar", second)[0]


def test_read_shard_checks_sha256(tmp_path):
    path = tmp_path / "a.tar"
    digest, _ = write_shard(path, samples())
    assert len(list(read_shard(path, digest))) == 4
    with pytest.raises(ShardCorrupt, match="does not match"):
        list(read_shard(path, "0" * 64))


def test_read_shard_detects_a_flipped_byte(tmp_path):
    path = tmp_path / "a.tar"
    digest, _ = write_shard(path, samples())
    content = bytearray(path.read_bytes())
    content[600] ^= 0xFF
    path.write_bytes(bytes(content))
    with pytest.raises(ShardCorrupt):
        next(read_shard(path, digest))


def test_write_shard_leaves_no_temp_file(tmp_path):
    write_shard(tmp_path / "shard.tar", samples())
    assert [p.name for p in tmp_path.iterdir()] == ["shard.tar"]


def test_write_shard_replaces_atomically(tmp_path):
    path = tmp_path / "shard.tar"
    write_shard(path, samples())
    write_shard(path, samples()[:1])
    assert [s["__key__"] for s in read_shard(path)] == ["src-0000"]
    assert [p.name for p in tmp_path.iterdir()] == ["shard.tar"]


def test_empty_shard(tmp_path):
    path = tmp_path / "empty.tar"
    digest, size = write_shard(path, [])
    assert list(read_shard(path, digest)) == []
    assert size == path.stat().st_size > 0


# ---------------------------------------------------------------- artifacts


BASE = ("ingest", {"count": 3, "sources": [{"kind": "x"}]}, ["aaa", "bbb"], "1")


def test_stage_digest_is_stable():
    first = stage_digest(*BASE)
    assert first == stage_digest(*BASE)
    assert len(first) == 16 and all(c in "0123456789abcdef" for c in first)
    reordered = {"sources": [{"kind": "x"}], "count": 3}
    assert stage_digest("ingest", reordered, ["aaa", "bbb"], "1") == first


@pytest.mark.parametrize(
    "changed",
    [
        ("dedup", *BASE[1:]),
        (BASE[0], {"count": 4, "sources": [{"kind": "x"}]}, *BASE[2:]),
        (BASE[0], {"count": 3, "sources": [{"kind": "y"}]}, *BASE[2:]),
        (BASE[0], {"count": 3, "sources": [{"kind": "x"}], "extra": None}, *BASE[2:]),
        (*BASE[:2], ["aaa", "bbc"], BASE[3]),
        (*BASE[:2], ["aaa"], BASE[3]),
        (*BASE[:2], ["bbb", "aaa"], BASE[3]),
        (*BASE[:3], "2"),
    ],
)
def test_stage_digest_changes_with_any_input(changed):
    assert stage_digest(*changed) != stage_digest(*BASE)


def test_canonical_json_and_digest_of():
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'
    assert canonical_json({"p": Path("/x/y")}) == '{"p":"/x/y"}'
    assert digest_of({"a": 1}) == hashlib.sha256(b'{"a":1}').hexdigest()[:16]
    assert len(digest_of("x", length=40)) == 40


def test_store_partial_then_commit(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    digest = stage_digest(*BASE)
    assert not store.is_complete("ingest", digest)
    partial = store.partial("ingest", digest)
    assert partial == tmp_path / "artifacts" / "ingest" / f"{digest}.partial"
    assert partial.is_dir()
    (partial / "shard-0.tar").write_bytes(b"data")
    assert not store.is_complete("ingest", digest)
    final = store.commit("ingest", digest, {"rows": 3, "shards": ["shard-0.tar"]})
    assert final == store.path("ingest", digest)
    assert not partial.exists()
    assert (final / "shard-0.tar").read_bytes() == b"data"
    assert store.is_complete("ingest", digest)
    assert store.stats("ingest", digest) == {"rows": 3, "shards": ["shard-0.tar"]}
    assert store.relative(final / "shard-0.tar") == f"ingest/{digest}/shard-0.tar"
    assert not store.is_complete("ingest", "another")


def test_store_partial_survives_and_is_reused(tmp_path):
    store = ArtifactStore(tmp_path)
    partial = store.partial("s", "d1")
    (partial / "unit-0").write_text("done")
    again = store.partial("s", "d1")
    assert again == partial
    assert (again / "unit-0").read_text() == "done"


def test_store_partial_removes_an_incomplete_final_folder(tmp_path):
    store = ArtifactStore(tmp_path)
    final = store.path("s", "d1")
    final.mkdir(parents=True)
    (final / "junk").write_text("x")
    store.partial("s", "d1")
    assert not final.exists()


def test_store_commit_writes_success_last(tmp_path):
    store = ArtifactStore(tmp_path)
    store.partial("s", "d1")
    final = store.commit("s", "d1", {"b": 2, "a": 1})
    assert json.loads((final / SUCCESS).read_text()) == {"a": 1, "b": 2}
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["d1"]


def test_atomic_path_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("hello")
        assert not target.exists()
    assert target.read_text() == "hello"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_atomic_path_leaves_nothing_when_the_body_raises(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_the_old_file_when_the_body_raises(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_text("new")
        raise ValueError
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
