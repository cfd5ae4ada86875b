"""CapFilt's model side with a vlmflow model folder: jobs read images and records from a shard by
(offset, size), captions are seeded and checked against the scene graph, scores are per image and
text; on a GPU the same scores and greedy captions as on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tiny_vlm import write_model
from vlmflow.components.capfilt.worker import CapfiltWorker
from vlmflow.components.sources.synthetic import make_row
from vlmflow.specs.data import SyntheticShapesSource


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A model folder and a store holding one shard of 4 images and their records; the jobs."""
    root = tmp_path_factory.mktemp("worker")
    write_model(root / "model")
    source = SyntheticShapesSource(kind="synthetic-shapes", count=8, image_size=32, max_objects=2)
    rows = [make_row(source, 0, i) for i in range(4)]
    blob, images, records = b"", [], []
    for row in rows:
        record = json.dumps({"objects": row.extra["objects"]} if row.key != rows[3].key else {}).encode()
        images.append(["shard-0.tar", len(blob), len(row.image)])
        records.append(["shard-0.tar", len(blob) + len(row.image), len(record)])
        blob += row.image + record
    (root / "store").mkdir()
    (root / "store" / "shard-0.tar").write_bytes(blob)
    texts = [[row.captions[0], "an image with two blue squares."] for row in rows[:3]] + [[]]
    return root / "model", root / "store", {"images": images, "records": records, "texts": texts}


def caption_job(jobs: dict, strategy: str, seed: int = 5) -> dict:
    decoding = {"strategy": strategy, "top_p": 0.9, "max_new_tokens": 6, "seed": seed}
    return {"op": "caption", "images": jobs["images"], "records": jobs["records"], "prompt": "",
            "decoding": decoding, "k": 2}  # fmt: skip


def test_captions_are_seeded_and_checked_against_the_scene_graph(store):
    model, root, jobs = store
    worker = CapfiltWorker(str(model), str(root))
    first = worker(caption_job(jobs, "sample"))
    assert first == worker(caption_job(jobs, "sample"))
    assert first["captions"] != worker(caption_job(jobs, "sample", seed=6))["captions"]
    assert [len(c) for c in first["captions"]] == [2] * 4
    assert first["captions"][0][0] != first["captions"][0][1]  # draw j is seeded with seed + 7919 j
    # A random model's captions describe no scene; the record without objects has no truth.
    assert first["correct"][:3] == [[False, False]] * 3 and first["correct"][3] == [None, None]


def test_scores_are_probabilities_and_cosines_per_image_and_text(store):
    model, root, jobs = store
    out = CapfiltWorker(str(model), str(root))({"op": "score", "images": jobs["images"], "texts": jobs["texts"]})
    assert [len(v) for v in out["itm"]] == [len(v) for v in out["itc"]] == [2, 2, 2, 0]
    flat_itm, flat_itc = [p for v in out["itm"] for p in v], [c for v in out["itc"] for c in v]
    assert all(0 < p < 1 for p in flat_itm) and all(-1 <= c <= 1 for c in flat_itc)
    assert len(set(flat_itm)) == len(flat_itm)  # each pair scored on its own image and text
    nothing = {"op": "score", "images": jobs["images"][:1], "texts": [[]]}
    assert CapfiltWorker(str(model), str(root))(nothing) == {"itm": [[]], "itc": [[]]}
    with pytest.raises(ValueError, match="unknown CapFilt job 'train'"):
        CapfiltWorker(str(model), str(root))({"op": "train"})


@pytest.mark.gpu
def test_scores_and_greedy_captions_on_cuda_equal_the_cpu(store):
    model, root, jobs = store
    cpu, gpu = CapfiltWorker(str(model), str(root)), CapfiltWorker(str(model), str(root), device="cuda")
    job = {"op": "score", "images": jobs["images"], "texts": jobs["texts"]}
    on_cpu, on_gpu = cpu(job), gpu(job)
    for key in ("itm", "itc"):
        for a, b in zip(on_cpu[key], on_gpu[key], strict=True):
            assert b == pytest.approx(a, abs=1e-4)
    assert cpu(caption_job(jobs, "greedy")) == gpu(caption_job(jobs, "greedy"))
