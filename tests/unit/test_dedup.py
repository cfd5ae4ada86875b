"""Dedup on dask (threads scheduler here, no Ray): exact and near duplicates on crafted pairs."""

from __future__ import annotations

import io
import json

import numpy as np
import polars as pl
import pytest
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


# Caption dedup: MinHash LSH over shingles, `captions: none | report | drop`.

VOCAB = (
    "a an the red blue green small large dog cat man woman child bird car boat tree house street field "
    "sits stands runs walks near beside under over on in with holding wearing looking at two three old "
    "young white black brown wooden metal grass water sky snow table plate bowl food picture photo of"
)


def _shingle_set(text: str) -> set:
    """The test's own shingles (strings, no hashing), by the rule the module documents."""
    words = text.split(" ")
    if len(words) >= 8:
        return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}
    return {text[i : i + 5] for i in range(max(1, len(text) - 4))}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def _captions(n_bases: int = 100, seed: int = 0) -> dict[str, str]:
    """~300 captions: each base (long or short) with two variants among: case, punctuation and
    spacing only (same text), a word dropped or added at the end (Jaccard ~0.95), a word replaced
    in the middle (~0.6), the last words replaced (~0.8)."""
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    for i in range(n_bases):
        length = int(rng.integers(3, 7)) if i % 5 == 0 else int(rng.integers(12, 30))
        words = [str(w) for w in rng.choice(VOCAB.split(), length)]
        variants = {
            "case": lambda w: "  " + " ".join(w).upper() + " .",
            "drop-end": lambda w: " ".join(w[:-1]),
            "add-end": lambda w: " ".join([*w, "today"]),
            "middle": lambda w: " ".join([*w[: len(w) // 2], "zebra", *w[len(w) // 2 + 1 :]]),
            "tail": lambda w: " ".join([*w[:-3], "on", "the", "beach"]),
        }
        out[f"c{i:03d}-0"] = " ".join(words)
        for j, name in enumerate(rng.choice(sorted(variants), 2, replace=False)):
            out[f"c{i:03d}-{j + 1}"] = variants[str(name)](words)
    keys = list(out)
    rng.shuffle(keys)  # the manifest's order is not the keys' order
    return {k: out[k] for k in keys}


def _caption_manifest(tmp_path, captions: dict[str, str | None]):
    path = tmp_path / "captions.parquet"
    pl.DataFrame({"key": list(captions), "caption": list(captions.values())}).write_parquet(path)
    return path


def test_normalise_caption():
    from vlmflow.components.dedup import normalise_caption

    assert normalise_caption('  "A  Red\u00a0CIRCLE!!" ') == "a red circle"
    assert normalise_caption("\uff21\uff22\uff23\tx.") == "abc x"  # NFKC: full-width letters
    assert normalise_caption("... dog's ball ...") == "dog's ball"  # inner punctuation stays
    assert normalise_caption("?!") == normalise_caption(None) == ""


def test_minhash_estimates_jaccard_within_a_tenth():
    from vlmflow.components.dedup import NUM_PERM, minhash

    rng = np.random.default_rng(1)
    errors = []
    for target in (0.0, 0.2, 0.5, 0.8, 0.9, 0.95, 1.0):
        union = np.unique(rng.integers(0, 2**32, 700, dtype=np.uint64)).astype(np.uint32)[:600]
        rng.shuffle(union)
        common = round(target * 600)
        a_only = (600 - common) // 2
        a, b = union[: common + a_only], np.concatenate([union[:common], union[common + a_only :]])
        true = common / 600
        estimate = float((minhash([a, b])[0] == minhash([b])[0]).mean())
        assert minhash([a]).shape == (1, NUM_PERM)
        assert abs(estimate - true) <= 0.1, (target, estimate)
        errors.append(abs(estimate - true))
    assert np.mean(errors) <= 0.05


def test_lsh_bands_make_a_pair_at_the_threshold_a_candidate():
    from vlmflow.components.dedup import NUM_PERM, lsh_bands

    for threshold in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0):
        bands, rows = lsh_bands(threshold)
        assert bands * rows <= NUM_PERM
        assert 1 - (1 - threshold**rows) ** bands >= 0.999


def test_caption_pairs_recall_and_precision_against_exact_jaccard(tmp_path):
    from vlmflow.components.dedup import caption_pairs, normalise_caption

    captions = _captions()
    assert 280 <= len(captions) <= 320
    texts = {k: normalise_caption(v) for k, v in captions.items()}
    sets = {k: _shingle_set(t) for k, t in texts.items()}
    rep = {k: min(o for o in texts if texts[o] == t) for k, t in texts.items()}  # smallest key of the same text
    pairs = caption_pairs(_caption_manifest(tmp_path, captions), DedupSpec(partitions=3))
    found = {(k, d): (e, j) for k, d, e, j in pairs.iter_rows()}
    keys = sorted(captions)
    truth = {(b, a): _jaccard(sets[a], sets[b]) for i, a in enumerate(keys) for b in keys[i + 1 :]}

    for (key, other), (estimate, jaccard) in found.items():  # precision: exact, never below the threshold
        assert other < key
        assert jaccard == pytest.approx(truth[key, other]) and jaccard >= 0.9 > 0.5
        assert abs(estimate - jaccard) <= 0.1
    wanted = [(b, a) for (b, a), j in truth.items() if j >= 0.95]
    assert len(wanted) >= 50  # the constructed data has them
    for b, a in wanted:  # recall: every pair >= 0.95 is a pair found, as text or as near duplicates
        if texts[a] == texts[b]:
            assert all(k == rep[k] or (k, rep[k]) in found for k in (a, b)), (a, b)
        else:
            assert (max(rep[a], rep[b]), min(rep[a], rep[b])) in found, (a, b, truth[b, a])
    near_wanted = {(max(rep[a], rep[b]), min(rep[a], rep[b])) for (b, a), j in truth.items() if j >= 0.9}
    near_wanted = {p for p in near_wanted if p[0] != p[1]}
    near_found = {p for p, (_e, j) in found.items() if j < 1.0 or texts[p[0]] != texts[p[1]]}
    assert near_found <= near_wanted and len(near_found) / len(near_wanted) == 1.0  # recall at the threshold


def _stage(tmp_path, photos, captions: dict[str, str | None], spec: DedupSpec):
    """Run the dedup stage on rows of distinct images (plus `z-dup`: the same pixels as the first)."""
    from vlmflow.components.dedup import run
    from vlmflow.runtime.executor import LocalExecutor
    from vlmflow.stage import StageContext, StageOutput

    rng = np.random.default_rng(2)
    source = tmp_path / "in"
    source.mkdir(exist_ok=True)
    rows = []
    for i, (key, caption) in enumerate(captions.items()):
        array = photos["coffee"] if key == "z-dup" or i == 0 else rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        image = check_image(encode(array))
        rows.append(
            {"key": key, "shard": "s0.tar", "pixel_sha256": image.pixel_sha256, "phash": image.phash,
             "thumb": image.thumb, "source": "src", "caption": caption}
        )  # fmt: skip
    schema = {"key": pl.String, "shard": pl.String, "pixel_sha256": pl.String, "phash": pl.UInt64,
              "thumb": pl.Binary, "source": pl.String, "caption": pl.String}  # fmt: skip
    pl.DataFrame(rows, schema=schema).write_parquet(source / "manifest.parquet")
    pl.DataFrame({"shard": ["s0.tar"], "sha256": ["0" * 64], "bytes": [0], "samples": [len(rows)]}).write_parquet(
        source / "shards.parquet"
    )
    out = tmp_path / f"out-{spec.captions}"
    out.mkdir()
    inputs = {"data": StageOutput("ingest", "d", source, {})}
    ctx = StageContext(None, None, out, "x", inputs, "log", spec, "dedup", executor=LocalExecutor())
    result = run(ctx)
    assert result.rows_in == len(captions) == result.rows_out + result.rows_quarantined  # nothing vanishes
    return result, out, pl.read_parquet(out / "manifest.parquet"), pl.read_parquet(out / "quarantine.parquet")


LONG = "a brown dog sits on the grass beside an old wooden table with two bowls of food"
STAGE_CAPTIONS = {
    "k7": "a red circle",  # first row: its image is duplicated by `z-dup`
    "k5": "A red circle.",
    "k2": "A  RED circle!",  # smallest key of the red-circle text: kept with drop
    "k6": LONG,
    "k9": LONG.upper() + " .",
    "k8": LONG + " today",  # near: 15 of its 16 word 3-shingles are the 15 of LONG
    "k3": "a blue square on the left",
    "k4": None,
    "z-dup": "a red circle",  # an image duplicate of k7: quarantined once, as duplicate-of:k7
}


def test_caption_report_keeps_every_row_and_writes_the_pairs(tmp_path, photos):
    result, out, kept, quarantine = _stage(tmp_path, photos, STAGE_CAPTIONS, DedupSpec())
    assert quarantine.select("key", "reason").rows() == [("z-dup", "duplicate-of:k7")]
    assert sorted(kept["key"]) == sorted(k for k in STAGE_CAPTIONS if k != "z-dup")
    pairs = pl.read_parquet(out / "caption_pairs.parquet")
    assert pairs.columns == ["key", "duplicate_of", "jaccard_estimate", "jaccard"]
    assert pairs.select("key", "duplicate_of").rows() == [("k5", "k2"), ("k7", "k2"), ("k8", "k6"), ("k9", "k6")]
    assert pairs.filter(pl.col("key") == "k8")["jaccard"].item() == pytest.approx(15 / 16)
    assert result.metrics["caption_duplicate_pairs"] == 4 and result.metrics["caption_duplicates"] == 4
    assert (result.metrics["exact_duplicates"], result.metrics["near_duplicates"]) == (1, 0)
    assert "caption_pairs.parquet" in result.artifacts


def test_caption_drop_quarantines_all_but_the_smallest_key(tmp_path, photos):
    result, out, kept, quarantine = _stage(tmp_path, photos, STAGE_CAPTIONS, DedupSpec(captions="drop"))
    assert dict(quarantine.select("key", "reason").rows()) == {
        "z-dup": "duplicate-of:k7",
        "k5": "caption-duplicate-of:k2",
        "k7": "caption-duplicate-of:k2",
        "k8": "caption-duplicate-of:k6",
        "k9": "caption-duplicate-of:k6",
    }
    assert sorted(kept["key"]) == ["k2", "k3", "k4", "k6"]
    assert quarantine["source"].to_list() == ["src"] * 5
    assert result.metrics["caption_duplicates"] == 4 and result.metrics["exact_duplicates"] == 1
    summary = json.loads((out / "quarantine_summary.json").read_text())
    assert summary["by_reason"] == {"caption-duplicate-of": 4, "duplicate-of": 1}


def test_caption_none_looks_for_nothing(tmp_path, photos):
    result, out, kept, quarantine = _stage(tmp_path, photos, STAGE_CAPTIONS, DedupSpec(captions="none"))
    assert quarantine["key"].to_list() == ["z-dup"] and kept.height == len(STAGE_CAPTIONS) - 1
    assert not (out / "caption_pairs.parquet").exists() and "caption_duplicates" not in result.metrics


def test_caption_fields_leave_the_default_spec_as_before():
    from vlmflow.specs.data import DataSpec

    before = {"exact": True, "near": True, "hamming_threshold": 4, "max_color_difference": 6.0, "partitions": 4}
    assert DedupSpec().model_dump(mode="json") == before
    assert DedupSpec(captions="report", caption_threshold=0.9).model_dump(mode="json") == before  # written out
    data = DataSpec(sources=[{"kind": "synthetic-shapes"}], dedup={"hamming_threshold": 4})
    assert data.model_dump(mode="json")["dedup"] == before
    changed = DedupSpec(captions="drop", caption_threshold=0.8).model_dump(mode="json")
    assert changed == before | {"captions": "drop", "caption_threshold": 0.8}
    assert DedupSpec.model_validate(changed) == DedupSpec(captions="drop", caption_threshold=0.8)


def test_write_kept_streams_batches_in_input_order(tmp_path, monkeypatch):
    from vlmflow.components import dedup

    monkeypatch.setattr(dedup, "KEPT_BATCH_ROWS", 7)  # 50 rows: eight batches, duplicates in several
    keys = [f"k{i:03d}" for i in range(50)][::-1]  # input order is not key order
    manifest = pl.DataFrame(
        {
            "key": keys,
            "shard": [f"s{i // 10}" for i in range(50)],
            "source": ["web" if i % 2 else "coco" for i in range(50)],
        }
    )
    manifest.write_parquet(tmp_path / "in.parquet")
    drop = ["k049", "k030", "k031", "k032", "k033", "k034", "k035", "k036", "k037", "k038", "k039", "k000"]
    dups = pl.DataFrame({"key": drop, "reason": "duplicate-of:k001", "detail": "exact"})
    (tmp_path / "out").mkdir()
    rows_in, quarantine, shards = dedup.write_kept(tmp_path / "in.parquet", dups, tmp_path / "out")
    kept = pl.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert rows_in == 50 and kept["key"].to_list() == [k for k in keys if k not in drop]
    assert kept.schema == manifest.schema
    assert quarantine["key"].to_list() == drop  # in the order of `dups`, with each row's source
    assert quarantine["source"].to_list() == [manifest.filter(pl.col("key") == k)["source"].item() for k in drop]
    assert shards.to_list() == ["s0", "s2", "s3", "s4"]  # s1 holds k039..k030, all dropped
    empty = pl.DataFrame(schema=manifest.schema)
    empty.write_parquet(tmp_path / "empty.parquet")
    (tmp_path / "out2").mkdir()
    rows_in, quarantine, shards = dedup.write_kept(tmp_path / "empty.parquet", dups.clear(), tmp_path / "out2")
    assert rows_in == 0 and quarantine.height == 0 and shards.len() == 0
    assert pl.read_parquet(tmp_path / "out2" / "manifest.parquet").schema == manifest.schema
