"""Ingest without Ray: process_unit over a folder of good and bad images accounts for every row."""

from __future__ import annotations

import io
import json

import numpy as np
import polars as pl
from PIL import Image

from tests.conftest import encode
from vlmflow.components.ingest import merge_units, plan_units, process_unit
from vlmflow.samples import QUARANTINE_SCHEMA, read_shard, sample_json
from vlmflow.specs.loader import Marked, validate


def _recipe(tmp_path, **data):
    spec = {"name": "t", "data": {"sources": [{"kind": "image-folder", "name": "web", "path": "imgs"}], **data}}
    return validate(Marked(spec), tmp_path / "spec.yaml")


def _corpus(folder, photos):
    folder.mkdir()
    good = {"astronaut": encode(photos["astronaut"], "JPEG"), "coffee": encode(photos["coffee"], "PNG")}
    for name, data in good.items():
        (folder / f"{name}.{'jpg' if name == 'astronaut' else 'png'}").write_bytes(data)
        (folder / f"{name}.txt").write_text(f"a photo of {name}\n")
    (folder / "zero.png").write_bytes(b"")
    (folder / "zero.txt").write_text("empty file\n")
    (folder / "junk.jpg").write_bytes(b"this is not an image at all")
    (folder / "junk.txt").write_text("junk\n")
    (folder / "cut.jpg").write_bytes(good["astronaut"][: len(good["astronaut"]) // 3])
    (folder / "cut.txt").write_text("truncated\n")
    (folder / "tiny.png").write_bytes(encode(np.zeros((4, 4, 3), np.uint8)))
    (folder / "tiny.txt").write_text("too small\n")
    (folder / "nocap.png").write_bytes(encode(photos["chelsea"]))
    (folder / "blank.png").write_bytes(encode(photos["rocket"]))
    (folder / "blank.txt").write_text("   \n")
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")
    (folder / "bomb.png").write_bytes(bomb.getvalue())
    (folder / "bomb.txt").write_text("a bomb\n")
    return 9


def test_every_row_is_in_output_or_quarantine_with_its_reason(tmp_path, photos):
    rows_in = _corpus(tmp_path / "imgs", photos)
    recipe = _recipe(tmp_path, shard_size=4)
    work = plan_units(recipe.data, recipe.seed)
    assert len(work) == 3
    out = tmp_path / "out"
    for item in work:
        process_unit(item, list(recipe.data.filters), str(out), "ingest/x/shards")
    manifest = pl.concat([pl.read_parquet(p) for p in sorted((out / "units").glob("*.manifest.parquet"))])
    quarantine = pl.concat([pl.read_parquet(p) for p in sorted((out / "units").glob("*.quarantine.parquet"))])
    assert manifest.height + quarantine.height == rows_in
    assert sorted(manifest["key"]) == ["web-astronaut", "web-coffee"]
    reasons = dict(zip(quarantine["key"], quarantine["reason"], strict=True))
    assert reasons == {
        "web-zero": "zero-byte-image",
        "web-junk": "unreadable-image",
        "web-cut": "truncated-image",
        "web-tiny": "image-too-small",
        "web-nocap": "missing-caption",
        "web-blank": "empty-caption",
        "web-bomb": "decompression-bomb",
    }
    assert all(quarantine["detail"].str.len_chars() > 0)


def test_shards_hold_the_original_bytes_and_the_manifest_matches(tmp_path, photos):
    _corpus(tmp_path / "imgs", photos)
    recipe = _recipe(tmp_path, shard_size=100)
    (item,) = plan_units(recipe.data, recipe.seed)
    out = tmp_path / "out"
    process_unit(item, list(recipe.data.filters), str(out), "ingest/x/shards")
    manifest = pl.read_parquet(next((out / "units").glob("*.manifest.parquet")))
    shard_info = json.loads(next((out / "units").glob("*.shard.json")).read_text())
    samples = {s["__key__"]: s for s in read_shard(out / "shards" / "web-000000.tar", shard_info["sha256"])}
    assert set(samples) == set(manifest["key"])
    original = (tmp_path / "imgs" / "astronaut.jpg").read_bytes()
    assert samples["web-astronaut"]["jpg"] == original
    row = manifest.filter(pl.col("key") == "web-astronaut").row(0, named=True)
    assert (row["width"], row["height"], row["ext"], row["caption"]) == (512, 512, "jpg", "a photo of astronaut")
    assert sample_json(samples["web-coffee"])["captions"] == ["a photo of coffee"]


def test_unit_rerun_writes_identical_bytes(tmp_path):
    spec = {"name": "t", "data": {"sources": [{"kind": "synthetic-shapes", "count": 20}], "shard_size": 10}}
    recipe = validate(Marked(spec), tmp_path / "spec.yaml")
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        for item in plan_units(recipe.data, recipe.seed):
            process_unit(item, list(recipe.data.filters), str(out), "ingest/x/shards")
        digests.append([p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()])
    assert digests[0] == digests[1]
    assert len(digests[0]) == 2 * 4  # per unit: shard, shard.json, manifest, quarantine


def test_merge_units_keeps_a_repeated_keys_first_row_and_quarantines_the_later_ones(tmp_path):
    units = {  # unit -> (key, shard) rows; "b" is in units 0 and 1, "c" in units 0 and 2
        "u0": [("a", "s0"), ("b", "s0"), ("c", "s0")],
        "u1": [("b", "s1"), ("d", "s1")],
        "u2": [("c", "s2")],
    }
    manifests, quarantines = [], []
    for name, rows in units.items():
        pl.DataFrame({"key": [k for k, _ in rows], "shard": [s for _, s in rows], "source": "web"}).write_parquet(
            tmp_path / f"{name}.manifest.parquet"
        )
        own = [{"key": f"bad-{name}", "source": "web", "reason": "not-an-image", "detail": "x"}]
        pl.DataFrame(own, schema=QUARANTINE_SCHEMA).write_parquet(tmp_path / f"{name}.quarantine.parquet")
        manifests.append(tmp_path / f"{name}.manifest.parquet")
        quarantines.append(tmp_path / f"{name}.quarantine.parquet")
    manifest, quarantine = merge_units(manifests, quarantines, tmp_path / "manifest.parquet")
    assert manifest.collect().select("key", "shard").rows() == [("a", "s0"), ("b", "s0"), ("c", "s0"), ("d", "s1")]
    assert pl.read_parquet(tmp_path / "manifest.parquet")["key"].to_list() == ["a", "b", "c", "d"]
    assert quarantine.select("key", "reason", "detail").rows() == [
        ("bad-u0", "not-an-image", "x"),
        ("bad-u1", "not-an-image", "x"),
        ("bad-u2", "not-an-image", "x"),
        ("b", "duplicate-key", "also in s1"),
        ("c", "duplicate-key", "also in s2"),
    ]
    empty, nothing = merge_units([], [], tmp_path / "empty.parquet")
    assert empty.collect().height == 0 and nothing.height == 0
