"""The curation components' pure cores: decontamination matching, the CLIP-score cut-off, SemDeDup's
k-means and within-cluster rule, and the embedder against transformers' own CLIP forward pass."""

from __future__ import annotations

import io

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from tests.conftest import encode
from tests.hf_clip import write_clip_folder
from vlmflow.artifacts import file_sha256
from vlmflow.components.clip_score import ClipScoreSpec, cutoff, summary
from vlmflow.components.decontaminate import PRINTS, DecontaminateSpec, first_matches, matches
from vlmflow.components.semdedup import cluster_duplicates, kmeans
from vlmflow.images import check_image
from vlmflow.samples import build_index, write_shard


def _print(data: bytes) -> dict:
    image = check_image(data)
    return {"pixel_sha256": image.pixel_sha256, "phash": image.phash, "thumb": image.thumb}


def _small(array: np.ndarray, size: int = 96) -> np.ndarray:
    return np.asarray(Image.fromarray(array).convert("RGB").resize((size, size), Image.Resampling.BICUBIC))


def _jpeg(array: np.ndarray, quality: int = 70) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_decontamination_catches_exact_resized_and_recompressed_copies_only(photos):
    from skimage import data

    evals = {"astronaut": _small(photos["astronaut"]), "coffee": _small(photos["coffee"])}
    val = _small(photos["rocket"])
    rng = np.random.default_rng(0)
    train = {
        "exact": encode(evals["astronaut"], "BMP"),  # the same pixels in another format
        "resized": encode(_small(photos["coffee"], 72)),  # resized from the original
        "jpeg": _jpeg(evals["coffee"]),  # lossy re-encoding
        "val-copy": encode(val, "BMP"),
        "mirrored": encode(np.ascontiguousarray(evals["astronaut"][:, ::-1])),  # a different image
        "cat": encode(_small(photos["chelsea"])),
        "camera": encode(_small(np.stack([data.camera()] * 3, axis=-1))),
        **{f"noise{i}": encode(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for i in range(4)},
    }
    train_rows = pl.DataFrame([{"key": k, **_print(v)} for k, v in train.items()]).cast(
        {"phash": pl.UInt64, "thumb": pl.Binary}
    )
    prints = pl.DataFrame(
        [{"set": "coco", "id": name, **_print(encode(a))} for name, a in evals.items()]
        + [{"set": "val", "id": "rocket", **_print(encode(val))}],
        schema=PRINTS,
        orient="row",
    )
    spec = DecontaminateSpec(held_out=["val"])
    found = matches(train_rows, prints, spec)
    reasons = dict(first_matches(found, ["val", "coco"]).select("key", "reason").iter_rows())
    assert reasons == {
        "exact": "eval-contamination:coco",
        "resized": "eval-contamination:coco",
        "jpeg": "eval-contamination:coco",
        "val-copy": "eval-contamination:val",
    }
    kinds = {(k, m) for k, m in found.select("key", "match").iter_rows()}
    assert kinds == {("exact", "exact"), ("val-copy", "exact"), ("resized", "near"), ("jpeg", "near")}
    assert matches(train_rows, prints, DecontaminateSpec(held_out=["val"], near=False))["key"].sort().to_list() == [
        "exact",
        "val-copy",
    ]


def test_a_training_row_matching_two_sets_is_quarantined_once_under_the_first():
    found = pl.DataFrame(
        {"key": ["a", "a", "b"], "set": ["coco", "val", "coco"], "id": ["1", "k", "2"],
         "match": ["exact", "near", "near"], "distance": [0, 2, 3], "color": [0.0, 1.0, 1.0]}
    )  # fmt: skip
    rows = first_matches(found, ["val", "coco"]).rows()
    assert rows == [
        ("a", "eval-contamination:coco", "exact: identical pixels to coco image 1"),
        ("b", "eval-contamination:coco", "near: phash distance 3 to coco image 2"),
    ]


def test_decontaminate_config_errors_are_named():
    with pytest.raises(ValidationError, match="give an evaluation set"):
        DecontaminateSpec(held_out=[])
    with pytest.raises(ValidationError, match="both checked and held out"):
        DecontaminateSpec(splits=["train", "val"])


def test_clip_score_cutoff_threshold_or_quantile():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert cutoff(scores, 0.25, None) == 0.25
    limit = cutoff(scores, None, 0.7)
    assert limit == 0.7 and (scores >= limit).sum() == 4  # an observed score; at least the top 30% kept
    metrics = summary(scores, scores >= limit, limit)
    assert metrics["kept_share"] == pytest.approx(0.4) and metrics["score_p50"] == pytest.approx(0.55)
    with pytest.raises(ValidationError, match="exactly one of threshold and quantile"):
        ClipScoreSpec(threshold=0.2, quantile=0.5)
    with pytest.raises(ValidationError, match="exactly one of threshold and quantile"):
        ClipScoreSpec()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_kmeans_separates_well_separated_directions():
    rng = np.random.default_rng(1)
    axes = np.eye(8)[:3]
    x = _unit(np.concatenate([axes[i] + 0.05 * rng.standard_normal((20, 8)) for i in range(3)]))
    centroids, assignment = kmeans(x, 3, seed=4, iterations=50)
    truth = np.repeat(np.arange(3), 20)
    assert len({(t, a) for t, a in zip(truth, assignment, strict=True)}) == 3  # a bijection between clusters
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1)
    again = kmeans(x, 3, seed=4, iterations=50)
    assert np.array_equal(again[1], assignment)  # seeded: the same clusters


def test_semdedup_keeps_the_row_farthest_from_the_centroid_as_the_reference_code_does():
    centroid = np.array([1.0, 0.0, 0.0])
    near = _unit(np.array([[1.0, 0.10, 0.0], [1.0, 0.11, 0.0], [1.0, 0.12, 0.0]]))  # three near-identical rows
    alone = _unit(np.array([[1.0, 0.0, 0.9]]))
    x = np.concatenate([near, alone])
    removed = cluster_duplicates(["a", "b", "c", "d"], x, centroid, threshold=0.999)
    assert {(r[0], r[1]) for r in removed} == {("a", "c"), ("b", "c")}  # c: the farthest of the three
    assert all(cos > 0.999 for *_, cos in removed)
    assert cluster_duplicates(["a", "b", "c", "d"], x, centroid, threshold=0.99999) == []


def test_semdedup_removal_is_not_transitive_and_names_the_kept_row_of_a_chain():
    centroid = np.array([1.0, 0.0])
    angles = np.array([0.30, 0.20, 0.10])  # x0 farthest; x0~x1 and x1~x2 within the threshold, x0~x2 not
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    threshold = float(np.cos(0.15))
    removed = cluster_duplicates(["x0", "x1", "x2"], x, centroid, threshold)
    assert [(r[0], r[1], r[2]) for r in removed] == [("x1", "x0", "x0"), ("x2", "x0", "x1")]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return write_clip_folder(tmp_path_factory.mktemp("clip") / "clip")


def test_embedder_scores_equal_the_clip_forward_pass(clip_folder, tmp_path, photos):
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    from vlmflow.components.embedder import Embedder

    images = [encode(_small(photos[n], 48)) for n in ("astronaut", "coffee", "rocket")]
    texts = ["a red circle", "two blue squares and a green triangle", "one yellow square"]
    write_shard(tmp_path / "s.tar", [{"__key__": f"k{i}", "png": d, "json": {}} for i, d in enumerate(images)])
    keys = {"key": ["k0", "k1", "k2"], "shard": ["s.tar"] * 3, "split": ["train"] * 3, "source": ["x"] * 3}
    pl.DataFrame(keys).write_parquet(tmp_path / "manifest.parquet")
    pl.DataFrame({"shard": ["s.tar"], "sha256": [file_sha256(tmp_path / "s.tar")]}).write_parquet(
        tmp_path / "shards.parquet"
    )
    where = build_index(tmp_path, tmp_path).select("shard", "image_offset", "image_size").rows()
    embedder = Embedder(str(clip_folder), str(tmp_path))
    scores = embedder.pairs({"images": where, "texts": texts})
    model = CLIPModel.from_pretrained(str(clip_folder)).eval()
    tokens = AutoTokenizer.from_pretrained(str(clip_folder))(texts, padding=True, return_tensors="pt")
    pixels = CLIPImageProcessorPil.from_pretrained(str(clip_folder))(
        images=[Image.open(io.BytesIO(d)).convert("RGB") for d in images], return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pixels, **tokens)
    expected = (out.image_embeds * out.text_embeds).sum(-1).numpy()
    assert np.allclose(scores, expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(embedder.images(where), axis=1), 1, atol=1e-5)


def test_a_vlmflow_model_folder_embeds_with_its_contrastive_head(tmp_path, photos):
    from tests.tiny_vlm import write_model
    from vlmflow.components.embedder import Embedder
    from vlmflow.components.evaluate.worker import EvalWorker

    write_model(tmp_path / "model")
    images = [encode(_small(photos[n], 40)) for n in ("astronaut", "coffee")]
    write_shard(tmp_path / "s.tar", [{"__key__": f"k{i}", "png": d, "json": {}} for i, d in enumerate(images)])
    where = [["s.tar", *row] for row in build_index_rows(tmp_path)]
    texts = ["a red circle", "a blue square"]
    scores = Embedder(str(tmp_path / "model"), str(tmp_path)).pairs({"images": where, "texts": texts})
    worker = EvalWorker(str(tmp_path / "model"))
    expected = (worker.embed_images(images) * worker.embed_texts(texts)).sum(axis=1)
    assert np.allclose(scores, expected, atol=1e-6)


def build_index_rows(folder) -> list[tuple[int, int]]:
    keys = {"key": ["k0", "k1"], "shard": ["s.tar"] * 2, "split": ["train"] * 2, "source": ["x"] * 2}
    pl.DataFrame(keys).write_parquet(folder / "manifest.parquet")
    pl.DataFrame({"shard": ["s.tar"], "sha256": [file_sha256(folder / "s.tar")]}).write_parquet(
        folder / "shards.parquet"
    )
    return build_index(folder, folder).select("image_offset", "image_size").rows()


def test_a_model_folder_that_is_neither_clip_nor_vlmflow_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "blip"}')
    with pytest.raises(ValidationError, match="neither a Hugging Face CLIP folder"):
        ClipScoreSpec.model_validate({"model": ".", "threshold": 0.2}, context={"spec_dir": tmp_path})
