"""Dedup on dask (threads scheduler here, no Ray): exact and near duplicates on crafted pairs."""

from __future__ import annotations

import io

import numpy as np
import polars as pl
from PIL import Image

from tests.conftest import encode
from vlmflow.components.dedup import band_masks, clusters, find_duplicates
from vlmflow.images import check_image
from vlmflow.specs.data import DedupSpec


def _manifest(tmp_path, images: dict[str, bytes]):
    rows = []
    for key, data in images.items():
        image = check_image(data)
        rows.append({"key": key, "pixel_sha256": image.pixel_sha256, "phash": image.phash, "thumb": image.thumb})
    path = tmp_path / "manifest.parquet"
    pl.DataFrame(
        rows, schema={"key": pl.String, "pixel_sha256": pl.String, "phash": pl.UInt64, "thumb": pl.Binary}
    ).write_parquet(path)
    return path


def _jpeg_again(data: bytes, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_exact_and_near_duplicates_found_without_false_positives(tmp_path, photos):
    rng = np.random.default_rng(0)
    images = {}
    for name, array in photos.items():
        images[f"{name}-a"] = encode(array, "PNG")
        images[f"{name}-b"] = encode(array, "BMP")  # same pixels, other encoding: exact
        noisy = np.clip(array.astype(np.int16) + rng.integers(-6, 7, array.shape), 0, 255).astype(np.uint8)
        images[f"{name}-c"] = _jpeg_again(encode(noisy, "PNG"), 70)  # noise + lossy: near
        images[f"{name}-d"] = encode(np.ascontiguousarray(array[:, ::-1]), "PNG")  # mirrored: a different image
    found = find_duplicates(_manifest(tmp_path, images), DedupSpec(partitions=3))
    reasons = dict(zip(found["key"], found["reason"], strict=True))
    expected = {f"{n}-b": f"duplicate-of:{n}-a" for n in photos} | {f"{n}-c": f"duplicate-of:{n}-a" for n in photos}
    assert reasons == expected  # recall 100% on the crafted pairs, no false positives
    details = dict(zip(found["key"], found["detail"], strict=True))
    assert all(details[f"{n}-b"].startswith("exact") for n in photos)
    assert all(details[f"{n}-c"].startswith("near") for n in photos)


def test_colour_differences_are_not_near_duplicates(tmp_path):
    red, yellow = np.full((64, 64, 3), 230, np.uint8), np.full((64, 64, 3), 230, np.uint8)
    red[16:48, 16:48] = (220, 40, 40)
    yellow[16:48, 16:48] = (235, 200, 30)
    images = {"red": encode(red), "yellow": encode(yellow)}
    assert check_image(images["red"]).phash == check_image(images["yellow"]).phash  # pHash is colour-blind
    assert find_duplicates(_manifest(tmp_path, images), DedupSpec()).height == 0


def test_switches_turn_each_kind_off(tmp_path, photos):
    images = {"a": encode(photos["coffee"], "PNG"), "b": encode(photos["coffee"], "BMP")}
    manifest = _manifest(tmp_path, images)
    assert find_duplicates(manifest, DedupSpec(exact=False, near=False)).height == 0
    # with exact off, identical pixels are still within any Hamming threshold: found as near
    only_near = find_duplicates(manifest, DedupSpec(exact=False))
    assert only_near["detail"].to_list() == ["near: phash distance 0"]


def test_bands_cover_all_bits_and_pigeonhole_holds():
    for threshold in range(0, 17):
        masks = band_masks(threshold)
        assert len(masks) == threshold + 1
        covered = 0
        for shift, mask in masks:
            assert covered & (mask << shift) == 0
            covered |= mask << shift
        assert covered == (1 << 64) - 1


def test_clusters_keep_the_smallest_key():
    import pandas as pd

    pairs = pd.DataFrame({"key_a": ["b", "a"], "key_b": ["c", "b"], "distance": [1, 2], "color": [0.0, 0.0]})
    result = clusters(pairs)
    assert {k: v[0] for k, v in result.items()} == {"b": "a", "c": "a"}
