"""Dedup: exact duplicates (same decoded pixels) and near duplicates (perceptual hash).

The work is a join over the manifest, so it runs on dask dataframes on the stage executor's
scheduler (Ray through `ray.util.dask`; dask's threads in process), partitioned, never all in memory:
- exact: group by pixel_sha256; every row whose key is not the group's smallest key is a
  duplicate of it;
- near: a 64-bit pHash split into threshold+1 bands (pigeonhole: two hashes within the
  Hamming threshold agree exactly on at least one band); a self-join on (band, value)
  gives candidate pairs, kept when their full Hamming distance is within the threshold.
  Pairs are merged into clusters (union-find); each cluster keeps its smallest key.
Duplicates go to the quarantine as `duplicate-of:KEY`; shards are not copied: the output
manifest references the input's shards.

Captions (`captions: none | report | drop`, on the rows the image dedup kept; the manifest's
`caption` column is each sample's first caption):
- the text is normalised (Unicode NFKC, lowercase, whitespace collapsed, punctuation stripped at
  the ends); rows with the same normalised text are pairs with the group's smallest key (a group
  by text, as for exact images), and one row per distinct text goes on to:
- near: MinHash over the text's shingles (word 3-shingles; character 5-grams for a caption of
  fewer than SHORT_WORDS words, which has too few word shingles for a Jaccard threshold to mean
  anything), banded for LSH (b bands of r rows, r as large as keeps a pair at the threshold a
  candidate with probability >= 0.999); a self-join on (band, value) gives candidate pairs, kept
  when the exact Jaccard of their shingle sets is >= caption_threshold (so the LSH only costs
  recall, never precision). The MinHash estimate is reported beside it.
MinHash is written here with numpy (128 universal hashes a*x+b mod a prime over the crc32 of each
shingle, vectorised per partition) rather than taken from `datasketch`: that is not a dependency
of the project, and the few lines it needs do not justify one. `report` (the default) writes the
pairs to caption_pairs.parquet and counts them but keeps every row: synthetic and COCO-style data
repeat captions legitimately, for different images. `drop` quarantines every row of a caption
cluster (union-find, as for images) but its smallest key as `caption-duplicate-of:KEY`.
"""

from __future__ import annotations

import threading
import time
import unicodedata
import zlib
from collections.abc import Iterable
from itertools import combinations
from math import comb
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from vlmflow.component import Component, Port
from vlmflow.components import report
from vlmflow.samples import QUARANTINE_SCHEMA, write_tables
from vlmflow.specs.data import DedupSpec
from vlmflow.stage import StageContext, StageResult

if TYPE_CHECKING:
    import dask.dataframe as dd
    import pandas as pd

# dask and pandas are imported by the functions that use them: declaring the component (and
# validating or planning a recipe) imports neither. `scheduler`: what dask computes on (the stage
# executor's dask_scheduler()).

# Two dedup stages of parallel branches run in threads of one driver. dask's expression optimiser
# relies on functools.cached_property, which on Python 3.11 holds one lock per property for all
# instances of its class: two threads optimising at once take those locks in opposite orders and
# deadlock (seen: two dedup stages of test_s3_sources waited for ever). Their dask work takes turns.
DASK_LOCK = threading.Lock()


def exact_duplicates(frame: dd.DataFrame, scheduler: Any = "threads") -> pd.DataFrame:
    """(key, canonical) for every row whose pixels equal a row with a smaller key."""
    canonical = frame.groupby("pixel_sha256")["key"].min().rename("canonical").reset_index()
    joined = frame[["key", "pixel_sha256"]].merge(canonical, on="pixel_sha256")
    dups = joined[joined["key"] != joined["canonical"]][["key", "canonical"]]
    return dups.compute(scheduler=scheduler)


def band_masks(threshold: int, bits: int = 64, bands: int | None = None) -> list[tuple[int, int]]:
    """(shift, mask) of `bands` (default threshold+1) bands covering all bits."""
    bands = bands or threshold + 1
    width = bits // bands
    out = []
    for b in range(bands):
        shift = b * width
        size = width if b < bands - 1 else bits - shift
        out.append((shift, (1 << size) - 1))
    return out


def band_plan(threshold: int, rows: int, bits: int = 64) -> tuple[list[tuple[int, int]], int]:
    """(bands, radius) for multi-index hashing: split the hash into m bands; two hashes within
    `threshold` bits differ in some band by at most radius = threshold // m bits (pigeonhole), so
    joining each row's band values with every value within `radius` of another's finds every pair.
    m is the one of least expected work per row for `rows` uniform hashes: the probes a row makes
    (sum over bands of the values within radius) plus the candidates they meet (each probe meets
    rows / 2**width others). threshold+1 bands (radius 0) suit small tables; wider bands keep a
    large one near-linear (1M rows, threshold 4: 3 bands of 21 bits, radius 1)."""
    best: tuple[float, int] | None = None
    for m in range(1, threshold + 2):
        masks, radius = band_masks(threshold, bits, m), threshold // m
        probes = [sum(comb(mask.bit_length(), i) for i in range(radius + 1)) for _, mask in masks]
        cost = sum(probes) + rows * sum(p / (mask + 1) for p, (_, mask) in zip(probes, masks, strict=True))
        if best is None or cost < best[0]:
            best = (cost, m)
    m = best[1]
    return band_masks(threshold, bits, m), threshold // m


def flips(width: int, radius: int) -> np.ndarray:
    """Every XOR mask of at most `radius` set bits among `width`: the values within radius of 0."""
    out = [0]
    for r in range(1, radius + 1):
        out += [sum(1 << b for b in chosen) for chosen in combinations(range(width), r)]
    return np.array(out, dtype=np.uint64)


def _with_ids(part: pd.DataFrame, partition_info: dict | None = None) -> pd.DataFrame:
    """A row id unique over the frame (partition number, row): the band tables carry it, not the key."""
    number = (partition_info or {}).get("number", 0)
    out = part.copy()
    out["id"] = (np.uint64(number) << np.uint64(32)) | np.arange(len(part), dtype=np.uint64)
    return out


def _bands(part: pd.DataFrame, masks: list[tuple[int, int]], radius: int = 0) -> pd.DataFrame:
    """(id, band, value) for every band value of each row's pHash, XORed with every mask of at most
    `radius` bits of the band (radius 0: the band values themselves)."""
    import pandas as pd

    hashes = part["phash"].to_numpy(dtype=np.uint64)
    ids = part["id"].to_numpy(dtype=np.uint64)
    frames = []
    for b, (shift, mask) in enumerate(masks):
        values = (hashes >> np.uint64(shift)) & np.uint64(mask)
        xor = flips(mask.bit_length(), radius)
        frames.append(
            pd.DataFrame(
                {
                    "id": np.repeat(ids, len(xor)),
                    "band": np.full(len(part) * len(xor), b, dtype=np.int16),
                    "value": (values[:, None] ^ xor[None, :]).ravel(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _close(part: pd.DataFrame, threshold: int) -> pd.DataFrame:
    """Candidate pairs (id_a, id_b) whose pHashes are within the threshold (before any thumbnail)."""
    xor = part["phash_a"].to_numpy(np.uint64) ^ part["phash_b"].to_numpy(np.uint64)
    return part.loc[np.bitwise_count(xor) <= threshold, ["id_a", "id_b"]]


def _verify(part: pd.DataFrame, threshold: int, max_color: float) -> pd.DataFrame:
    """Keep candidate pairs within the Hamming threshold and the colour difference; key_a < key_b."""
    import pandas as pd

    xor = part["phash_a"].to_numpy(np.uint64) ^ part["phash_b"].to_numpy(np.uint64)
    distance = np.bitwise_count(xor).astype(np.int16)
    thumbs_a = np.stack([np.frombuffer(t, np.uint8) for t in part["thumb_a"]]) if len(part) else np.empty((0, 1))
    thumbs_b = np.stack([np.frombuffer(t, np.uint8) for t in part["thumb_b"]]) if len(part) else np.empty((0, 1))
    color = np.abs(thumbs_a.astype(np.int16) - thumbs_b.astype(np.int16)).mean(axis=1) if len(part) else np.empty(0)
    keys_a, keys_b = part["key_a"].to_numpy(), part["key_b"].to_numpy()
    ordered = keys_a < keys_b if len(part) else np.empty(0, bool)
    out = pd.DataFrame(
        {
            "key_a": np.where(ordered, keys_a, keys_b),
            "key_b": np.where(ordered, keys_b, keys_a),
            "distance": distance,
            "color": color.astype(np.float64),
        }
    )
    return out[(out["distance"] <= threshold) & (out["color"] <= max_color)]


def near_pairs(
    frame: dd.DataFrame, threshold: int, max_color: float, scheduler: Any = "threads", rows: int | None = None
) -> pd.DataFrame:
    """(key_a, key_b, distance, color) with key_a < key_b, Hamming(phash) <= threshold and
    mean |RGB| difference of the thumbnails <= max_color. Multi-index hashing (`band_plan` for
    `rows`, default: the frame's length): every pair within the threshold meets in some band."""
    import pandas as pd

    masks, radius = band_plan(threshold, len(frame) if rows is None else rows)
    meta_ids = frame[["key", "phash", "thumb"]]._meta.assign(id=np.empty(0, np.uint64))
    ided = frame[["key", "phash", "thumb"]].map_partitions(_with_ids, meta=meta_ids)
    meta = pd.DataFrame(
        {"id": pd.Series(dtype=np.uint64), "band": pd.Series(dtype=np.int16), "value": pd.Series(dtype=np.uint64)}
    )
    exact = ided[["id", "phash"]].map_partitions(_bands, masks, meta=meta)
    probes = ided[["id", "phash"]].map_partitions(_bands, masks, radius, meta=meta) if radius else exact
    # Within radius is symmetric: a pair meets as (x, y) and as (y, x); the smaller id's side is kept.
    candidates = exact.merge(probes, on=["band", "value"], suffixes=("_a", "_b"))
    candidates = candidates[candidates["id_a"] < candidates["id_b"]][["id_a", "id_b"]]
    hashes = ided[["id", "phash"]]
    for side in ("a", "b"):
        candidates = candidates.merge(
            hashes.rename(columns={"id": f"id_{side}", "phash": f"phash_{side}"}), on=f"id_{side}"
        )
    meta_close = pd.DataFrame({"id_a": pd.Series(dtype=np.uint64), "id_b": pd.Series(dtype=np.uint64)})
    close = candidates.map_partitions(_close, threshold, meta=meta_close).drop_duplicates()
    for side in ("a", "b"):
        values = ided.rename(columns={c: f"{c}_{side}" for c in ("id", "key", "phash", "thumb")})
        close = close.merge(values, on=f"id_{side}")
    meta_out = pd.DataFrame(
        {
            "key_a": pd.Series(dtype=str),
            "key_b": pd.Series(dtype=str),
            "distance": pd.Series(dtype=np.int16),
            "color": pd.Series(dtype=np.float64),
        }
    )
    found = close.map_partitions(_verify, threshold, max_color, meta=meta_out).compute(scheduler=scheduler)
    return found.sort_values(["key_a", "key_b"]).reset_index(drop=True)


DUPLICATES_SCHEMA = {"key": pl.String, "reason": pl.String, "detail": pl.String}  # rows set aside, why


def roots(edges: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Union-find: every key of an edge -> the smallest key of its connected component."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {k: find(k) for k in list(parent)}


def clusters(pairs: pd.DataFrame) -> dict[str, tuple[str, int]]:
    """Union-find over pairs: key -> (smallest key of its cluster, distance of the pair that joined it)."""
    rows = list(pairs.itertuples(index=False))
    joined_by: dict[str, int] = {}
    for _a, b, distance, _color in rows:
        joined_by.setdefault(b, int(distance))
    found = roots((a, b) for a, b, _distance, _color in rows)
    return {k: (root, joined_by.get(k, 0)) for k, root in found.items() if root != k}


def find_duplicates(manifest: Path, spec: DedupSpec, scheduler: Any = "threads") -> pl.DataFrame:
    """Quarantine rows (key, reason, detail) for every duplicate in the manifest."""
    import dask

    # One string dtype on both sides of the joins; one dask computation at a time (DASK_LOCK).
    with DASK_LOCK, dask.config.set({"dataframe.convert-string": False}):
        return _find_duplicates(manifest, spec, scheduler)


def _find_duplicates(manifest: Path, spec: DedupSpec, scheduler: Any) -> pl.DataFrame:
    import dask.dataframe as dd
    import pandas as pd

    frame = dd.read_parquet(str(manifest), columns=["key", "pixel_sha256", "phash", "thumb"])
    frame = frame.repartition(npartitions=spec.partitions)
    count = pl.scan_parquet(manifest).select(pl.len()).collect().item()  # from the footer: picks the bands
    rows: list[dict] = []
    exact = exact_duplicates(frame, scheduler) if spec.exact else pd.DataFrame(columns=["key", "canonical"])
    for key, canonical in exact.sort_values("key").itertuples(index=False):
        rows.append({"key": key, "reason": f"duplicate-of:{canonical}", "detail": "exact: identical pixels"})
    if spec.near:
        survivors = frame[~frame["key"].isin(set(exact["key"]))]
        for key, (canonical, distance) in sorted(
            clusters(near_pairs(survivors, spec.hamming_threshold, spec.max_color_difference, scheduler, count)).items()
        ):
            rows.append(
                {"key": key, "reason": f"duplicate-of:{canonical}", "detail": f"near: phash distance {distance}"}
            )
    return pl.DataFrame(rows, schema=DUPLICATES_SCHEMA, orient="row")


# Caption dedup: MinHash LSH over shingles (see the module docstring).

NUM_PERM = 128
PRIME = (1 << 32) - 5  # the largest prime below 2**32: a*x+b (a, b < PRIME, x < 2**32) fits in uint64
SHINGLE_WORDS = 3
SHINGLE_CHARS = 5
SHORT_WORDS = 8  # a caption of fewer words is shingled by characters
CANDIDATE_PROBABILITY = 0.999  # of a pair exactly at the threshold becoming a candidate
_rng = np.random.default_rng(20240607)  # fixed: signatures (and so the candidates) are the same in every run
HASH_A = _rng.integers(1, PRIME, NUM_PERM, dtype=np.uint64)
HASH_B = _rng.integers(0, PRIME, NUM_PERM, dtype=np.uint64)
_CHUNK = 1 << 15  # shingles hashed at once: CHUNK x NUM_PERM x 8 bytes = 32 MiB
_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)
CAPTION_PAIRS_SCHEMA = {
    "key": pl.String,
    "duplicate_of": pl.String,
    "jaccard_estimate": pl.Float64,
    "jaccard": pl.Float64,
}


def normalise_caption(text: str | None) -> str:
    """NFKC, lowercase, whitespace collapsed to one space, punctuation (and space) stripped at both ends."""
    if not text:
        return ""
    words = unicodedata.normalize("NFKC", text).lower().split()
    out = " ".join(words)

    def edge(ch: str) -> bool:
        return ch.isspace() or unicodedata.category(ch).startswith("P")

    start, end = 0, len(out)
    while start < end and edge(out[start]):
        start += 1
    while end > start and edge(out[end - 1]):
        end -= 1
    return out[start:end]


def shingles(text: str) -> np.ndarray:
    """Sorted distinct crc32s of a normalised caption's shingles: word 3-shingles, or character
    5-grams (the whole text if shorter) for a caption of fewer than SHORT_WORDS words."""
    if not text:
        return np.empty(0, np.uint32)
    words = text.split(" ")
    if len(words) >= SHORT_WORDS:
        grams = ["w\x1f" + "\x1f".join(words[i : i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1)]
    else:
        n = max(1, len(text) - SHINGLE_CHARS + 1)
        grams = ["c\x1f" + text[i : i + SHINGLE_CHARS] for i in range(n)]
    return np.unique(np.fromiter((zlib.crc32(g.encode("utf-8")) for g in grams), np.uint32, len(grams)))


def minhash(sets: list[np.ndarray]) -> np.ndarray:
    """(len(sets), NUM_PERM) uint32 signatures: per hash (a*x+b) mod PRIME, the minimum over a set.
    Every set must be non-empty."""
    out = np.empty((len(sets), NUM_PERM), np.uint32)
    start = 0
    while start < len(sets):
        stop, total = start, 0
        while stop < len(sets) and (stop == start or total + len(sets[stop]) <= _CHUNK):
            total += len(sets[stop])
            stop += 1
        chunk = sets[start:stop]
        flat = np.concatenate(chunk).astype(np.uint64)
        hashed = (flat[:, None] * HASH_A[None, :] + HASH_B[None, :]) % np.uint64(PRIME)
        offsets = np.cumsum([0] + [len(c) for c in chunk[:-1]])
        out[start:stop] = np.minimum.reduceat(hashed, offsets, axis=0)
        start = stop
    return out


def lsh_bands(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest candidates) for which a pair with Jaccard
    `threshold` shares a band with probability >= CANDIDATE_PROBABILITY."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= CANDIDATE_PROBABILITY:
            best = (bands, rows)
    return best


def _normalised(part: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    texts = [normalise_caption(t) if isinstance(t, str) else "" for t in part["caption"]]
    out = pd.DataFrame({"key": part["key"].to_numpy(), "text": np.array(texts, dtype=object)})
    return out[out["text"] != ""]


def _signatures(part: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    sets = [shingles(t) for t in part["text"]]
    sigs = minhash(sets) if sets else np.empty((0, NUM_PERM), np.uint32)
    return pd.DataFrame(
        {
            "key": part["key"].to_numpy(),
            "shingles": np.array([s.tobytes() for s in sets], dtype=object),
            "signature": np.array([s.tobytes() for s in sigs], dtype=object),
        }
    )


def _stack(values: Iterable[bytes]) -> np.ndarray:
    arrays = [np.frombuffer(v, np.uint32) for v in values]
    return np.stack(arrays) if arrays else np.empty((0, NUM_PERM), np.uint32)


def _caption_bands(part: pd.DataFrame, bands: int, rows: int) -> pd.DataFrame:
    import pandas as pd

    sigs = _stack(part["signature"]).astype(np.uint64)
    frames = []
    for b in range(bands):
        value = np.full(len(part), _FNV_OFFSET, np.uint64)
        for column in sigs[:, b * rows : (b + 1) * rows].T:  # FNV-1a over the band's hashes
            value = (value ^ column) * _FNV_PRIME
        frames.append(
            pd.DataFrame({"key": part["key"].to_numpy(), "band": np.full(len(part), b, np.int16), "value": value})
        )
    return pd.concat(frames, ignore_index=True)


def _verify_captions(part: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Keep candidate pairs whose shingle sets' Jaccard is >= threshold; with the MinHash estimate."""
    import pandas as pd

    estimate = (_stack(part["signature_a"]) == _stack(part["signature_b"])).mean(axis=1) if len(part) else np.empty(0)
    exact = np.empty(len(part))
    for i, (a, b) in enumerate(zip(part["shingles_a"], part["shingles_b"], strict=True)):
        sa, sb = np.frombuffer(a, np.uint32), np.frombuffer(b, np.uint32)
        common = np.intersect1d(sa, sb, assume_unique=True).size
        exact[i] = common / (sa.size + sb.size - common)
    out = pd.DataFrame(
        {
            "key": part["key_b"].to_numpy(),
            "duplicate_of": part["key_a"].to_numpy(),
            "jaccard_estimate": estimate.astype(np.float64),
            "jaccard": exact,
        }
    )
    return out[out["jaccard"] >= threshold]


def caption_pairs(
    manifest: Path, spec: DedupSpec, skip: Iterable[str] = (), scheduler: Any = "threads"
) -> pl.DataFrame:
    """(key, duplicate_of, jaccard_estimate, jaccard) with duplicate_of < key for every pair of
    near-duplicate captions among the manifest's rows not in `skip`: a row with the same normalised
    text as a smaller key (jaccard 1), and pairs of distinct texts (their groups' smallest keys) whose
    shingle sets' Jaccard is >= spec.caption_threshold."""
    import dask

    if "caption" not in pl.read_parquet_schema(manifest):
        return pl.DataFrame(schema=CAPTION_PAIRS_SCHEMA)
    with DASK_LOCK, dask.config.set({"dataframe.convert-string": False}):
        return _caption_pairs(manifest, spec, set(skip), scheduler)


def _caption_pairs(manifest: Path, spec: DedupSpec, skip: set[str], scheduler: Any) -> pl.DataFrame:
    import dask
    import dask.dataframe as dd
    import pandas as pd

    frame = dd.read_parquet(str(manifest), columns=["key", "caption"]).repartition(npartitions=spec.partitions)
    if skip:
        frame = frame[~frame["key"].isin(skip)]
    texts = frame.map_partitions(_normalised, meta={"key": str, "text": object})
    canonical = texts.groupby("text")["key"].min().rename("canonical").reset_index()
    joined = texts.merge(canonical, on="text")
    exact = joined[joined["key"] != joined["canonical"]][["key", "canonical"]]
    distinct = joined[joined["key"] == joined["canonical"]][["key", "text"]]
    meta_sig = pd.DataFrame(
        {"key": pd.Series(dtype=str), "shingles": pd.Series(dtype=object), "signature": pd.Series(dtype=object)}
    )
    sigs = distinct.map_partitions(_signatures, meta=meta_sig)
    bands, rows = lsh_bands(spec.caption_threshold)
    meta_band = pd.DataFrame(
        {"key": pd.Series(dtype=str), "band": pd.Series(dtype=np.int16), "value": pd.Series(dtype=np.uint64)}
    )
    banded = sigs.map_partitions(_caption_bands, bands, rows, meta=meta_band)
    candidates = banded.merge(banded, on=["band", "value"], suffixes=("_a", "_b"))
    candidates = candidates[candidates["key_a"] < candidates["key_b"]][["key_a", "key_b"]].drop_duplicates()
    for side in ("a", "b"):
        candidates = candidates.merge(
            sigs.rename(columns={c: f"{c}_{side}" for c in ("key", "shingles", "signature")}),
            on=f"key_{side}",
        )
    meta_out = pd.DataFrame(
        {
            "key": pd.Series(dtype=str),
            "duplicate_of": pd.Series(dtype=str),
            "jaccard_estimate": pd.Series(dtype=np.float64),
            "jaccard": pd.Series(dtype=np.float64),
        }
    )
    near = candidates.map_partitions(_verify_captions, spec.caption_threshold, meta=meta_out)
    same, near = dask.compute(exact, near, scheduler=scheduler)
    rows_out = [(k, c, 1.0, 1.0) for k, c in same.itertuples(index=False)]
    rows_out += list(near.itertuples(index=False, name=None))
    pairs = pl.DataFrame(rows_out, schema=CAPTION_PAIRS_SCHEMA, orient="row")
    return pairs.sort("key", "duplicate_of")


def caption_clusters(pairs: pl.DataFrame) -> dict[str, tuple[str, float]]:
    """key -> (smallest key of its caption cluster, the highest Jaccard of a pair it is in), for
    every key of a cluster but its smallest."""
    best: dict[str, float] = {}
    for key, other, _estimate, jaccard in pairs.iter_rows():
        best[key] = max(best.get(key, 0.0), jaccard)
        best[other] = max(best.get(other, 0.0), jaccard)
    found = roots(zip(pairs["key"].to_list(), pairs["duplicate_of"].to_list(), strict=True))
    return {k: (root, best[k]) for k, root in sorted(found.items()) if root != k}


def caption_quarantine(pairs: pl.DataFrame) -> pl.DataFrame:
    """Quarantine rows (key, reason, detail) of `drop`: every key of a caption cluster but its smallest."""
    rows = [
        {"key": key, "reason": f"caption-duplicate-of:{root}", "detail": f"caption: jaccard {jaccard:.3f}"}
        for key, (root, jaccard) in caption_clusters(pairs).items()
    ]
    return pl.DataFrame(rows, schema=DUPLICATES_SCHEMA, orient="row")


def run(ctx: StageContext) -> StageResult:
    """The manifest is never held whole: the duplicates (a small table) are found on the executor's
    dask scheduler, then the kept manifest streams from the input to the output (an anti-join)."""
    started = time.monotonic()
    source = ctx.inputs["data"]
    spec: DedupSpec = ctx.config
    path = source.path / "manifest.parquet"
    scheduler = ctx.executor.dask_scheduler()
    images = find_duplicates(path, spec, scheduler)
    metrics: dict[str, float] = {}
    dups = images
    if spec.captions != "none":  # on the rows the image dedup keeps: a row is quarantined once
        pairs = caption_pairs(path, spec, images["key"].to_list(), scheduler)
        pairs.write_parquet(ctx.out / "caption_pairs.parquet", statistics=False)
        by_caption = caption_quarantine(pairs)
        metrics |= {"caption_duplicate_pairs": pairs.height, "caption_duplicates": by_caption.height}
        if spec.captions == "drop":
            dups = pl.concat([images, by_caption])
    rows_in, quarantine, kept_shards = write_kept(path, dups, ctx.out)
    shards = pl.read_parquet(source.path / "shards.parquet").filter(pl.col("shard").is_in(kept_shards.implode()))
    write_tables(ctx.out, None, quarantine, shards)  # the manifest is written by write_kept
    report.write_quarantine_summary(quarantine, ctx.out / "quarantine_summary.json")
    seconds = max(time.monotonic() - started, 1e-9)
    near = images.filter(pl.col("detail").str.starts_with("near")).height
    return StageResult(
        rows_in=rows_in,
        rows_out=rows_in - quarantine.height,
        rows_quarantined=quarantine.height,
        metrics={
            "exact_duplicates": images.height - near,
            "near_duplicates": near,
            **metrics,
            "rows_per_s": rows_in / seconds,
        },
        artifacts=["quarantine.parquet", "quarantine_summary.json"]
        + (["caption_pairs.parquet"] if spec.captions != "none" else []),
    )


KEPT_BATCH_ROWS = 8192  # manifest rows read, filtered and written at once (one output row group each)


def write_kept(manifest: Path, dups: pl.DataFrame, out: Path) -> tuple[int, pl.DataFrame, pl.Series]:
    """Copy the manifest's rows not in `dups` to out/manifest.parquet, in input order, a batch of
    KEPT_BATCH_ROWS at a time, in one pass. Returns (rows in, the quarantine rows of `dups` with
    their source, the shards the kept rows reference).

    pyarrow's batch reader, unbuffered column chunks read through a small buffer and one thread,
    holds about one batch: the driver's memory stays flat however long the manifest and whatever its
    row groups (polars' streaming anti-join grew with it: 360 MiB more at 300k rows in
    benchmarks/scale.py's driver; whole column chunks read at once, 240 MiB more)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    source = pq.ParquetFile(manifest, pre_buffer=False, buffer_size=1 << 20)  # pages through a 1 MiB buffer
    drop = pa.array(dups["key"].to_list(), pa.string())
    rows_in, shards, dropped_sources = 0, set(), []
    with pq.ParquetWriter(out / "manifest.parquet", source.schema_arrow, write_statistics=False) as writer:
        for batch in source.iter_batches(batch_size=KEPT_BATCH_ROWS, use_threads=False):
            rows_in += batch.num_rows
            dropped = pc.is_in(batch.column("key"), value_set=drop.cast(batch.schema.field("key").type))
            kept = batch.filter(pc.invert(dropped))
            writer.write_batch(kept)
            shards.update(pc.unique(kept.column("shard")).to_pylist())
            dropped_sources.append(pl.from_arrow(batch.filter(dropped).select(["key", "source"])))
    sources = (
        pl.concat(dropped_sources) if dropped_sources else pl.DataFrame(schema={"key": pl.String, "source": pl.String})
    )
    quarantine = dups.join(sources, on="key", how="left", maintain_order="left").select(list(QUARANTINE_SCHEMA))
    return rows_in, quarantine, pl.Series("shard", sorted(shards), dtype=pl.String)


COMPONENT = Component(
    name="dedup",
    config=DedupSpec,
    reads={"data": Port("samples")},
    writes="samples",
    run=run,
    description="drop exact and near duplicate images (quarantined as duplicate-of:KEY); report or drop "
    "near-duplicate captions (MinHash LSH; caption-duplicate-of:KEY)",
)
