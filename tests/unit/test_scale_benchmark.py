"""benchmarks/scale.py's pure parts at a tiny N: the synthetic manifest's planted copies, the exact
all-pairs search and the recall it feeds; and dedup's multi-index hashing, which must find the same
pairs whatever bands it picks."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from benchmarks.scale import MAX_COLOR, THRESHOLD, Planted, near_pairs_all, pair_recall, roots, synthetic_manifest
from vlmflow.components.dedup import band_plan, find_duplicates, flips, near_pairs
from vlmflow.components.dedup import caption_pairs as find_caption_pairs
from vlmflow.specs.data import DedupSpec

ROWS = 2000


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_manifest(
        ROWS, seed=3, planted=Planted(exact=0.02, near=0.03, caption_exact=0.01, caption_near=0.01)
    )


def _thumbs(manifest: pl.DataFrame) -> np.ndarray:
    return np.stack([np.frombuffer(t, np.uint8) for t in manifest["thumb"]])


def test_planted_copies_are_what_they_claim(synthetic):
    manifest, truth = synthetic
    row = {k: i for i, k in enumerate(manifest["key"])}
    phash, thumbs = manifest["phash"].to_numpy(), _thumbs(manifest)
    counts = dict(truth.group_by("kind").len().iter_rows())
    assert counts == {"exact": 40, "near": 60, "caption-exact": 20, "caption-near": 20}
    for key, of, kind in truth.iter_rows():
        a, b = row[key], row[of]
        distance = int(np.bitwise_count(phash[a] ^ phash[b]))
        color = np.abs(thumbs[a].astype(int) - thumbs[b].astype(int)).mean()
        if kind == "exact":
            assert manifest["pixel_sha256"][a] == manifest["pixel_sha256"][b] and distance == 0 and color == 0
        elif kind == "near":
            assert 1 <= distance <= THRESHOLD and color <= MAX_COLOR
    assert manifest["key"].is_unique().all()


def test_all_pairs_search_finds_every_planted_copy_and_nothing_random(synthetic):
    manifest, truth = synthetic
    keys = manifest["key"].to_list()
    found = {(keys[i], keys[j]) for i, j in near_pairs_all(manifest["phash"].to_numpy(), _thumbs(manifest), 4, 6.0)}
    planted = {
        tuple(sorted(p)) for p in truth.filter(pl.col("kind").is_in(["exact", "near"])).select("key", "of").rows()
    }
    assert found == planted  # random 64-bit hashes are never within 4 bits of each other at this N


def test_recall_counts_pairs_that_end_at_one_kept_key():
    duplicate_of = {"b": "a", "c": "b", "e": "d"}  # c -> b -> a (an exact copy of a near copy)
    assert roots(duplicate_of) == {"b": "a", "c": "a", "e": "d"}
    assert pair_recall([("a", "c"), ("b", "c"), ("d", "e")], duplicate_of) == 1.0
    assert pair_recall([("a", "c"), ("a", "d")], duplicate_of) == 0.5  # a and d were kept apart
    assert pair_recall([], {}) == 1.0


def test_band_plan_is_complete_for_every_pair_within_the_threshold():
    rng = np.random.default_rng(0)
    for threshold in (0, 1, 4, 7):
        for rows in (1_000, 1_000_000):
            masks, radius = band_plan(threshold, rows)
            assert sum(mask.bit_length() for _, mask in masks) == 64 and radius == threshold // len(masks)
            for _ in range(300):
                x = int(rng.integers(0, 2**63)) * 2 + 1
                y = x ^ sum(1 << int(b) for b in rng.choice(64, threshold, replace=False))
                within = [bin(((x ^ y) >> shift) & mask).count("1") <= radius for shift, mask in masks]
                assert any(within)
    assert band_plan(4, 10_000)[1] == 0 and band_plan(4, 1_000_000)[1] == 1  # wider bands for the large table
    assert sorted(flips(4, 1).tolist()) == [0, 1, 2, 4, 8]


def test_dedup_finds_the_planted_copies_with_either_band_plan(synthetic, tmp_path):
    import dask
    import dask.dataframe as dd

    manifest, truth = synthetic
    path = tmp_path / "manifest.parquet"
    manifest.write_parquet(path)
    frame = dd.read_parquet(str(path), columns=["key", "phash", "thumb"]).repartition(npartitions=3)
    with dask.config.set({"dataframe.convert-string": False}):
        narrow = near_pairs(frame, THRESHOLD, MAX_COLOR, rows=ROWS)  # 5 bands, radius 0
        wide = near_pairs(frame, THRESHOLD, MAX_COLOR, rows=10**6)  # 3 bands, radius 1
    assert narrow.equals(wide) and len(narrow) == 100  # the 40 exact and 60 near copies

    dups = find_duplicates(path, DedupSpec(partitions=3))
    duplicate_of = {k: r.split(":", 1)[1] for k, r in dups.select("key", "reason").iter_rows()}
    for kind in ("exact", "near"):
        assert pair_recall(truth.filter(pl.col("kind") == kind).select("key", "of").rows(), duplicate_of) == 1.0
    found = {tuple(sorted(p)) for p in find_caption_pairs(path, DedupSpec()).select("key", "duplicate_of").rows()}
    for kind in ("caption-exact", "caption-near"):
        planted = {tuple(sorted(p)) for p in truth.filter(pl.col("kind") == kind).select("key", "of").rows()}
        assert planted <= found, kind  # each copy's Jaccard is >= 10/11 >= the default 0.9
