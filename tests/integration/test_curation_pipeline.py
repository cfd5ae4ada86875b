"""The curation steps in a `pipeline:` spec, run in process (run_stage on a LocalExecutor, no Ray):
ingest -> decontaminate -> semdedup -> clip-score on real photographs with planted copies of the
evaluation images, a tiny Hugging Face CLIP folder as the model. Every row is accounted for."""

from __future__ import annotations

import io
import json

import numpy as np
import polars as pl
from PIL import Image

from tests.conftest import encode
from tests.hf_clip import write_clip_folder
from vlmflow.artifacts import ArtifactStore
from vlmflow.pipeline import graph_digests, recipe_graph
from vlmflow.runtime.executor import LocalExecutor
from vlmflow.specs import load_recipe
from vlmflow.stage import StageOutput, run_stage

SPEC = """\
name: curation
seed: 5
pipeline:
  - name: ingest
    uses: ingest
    with:
      sources:
        - {kind: image-folder, name: web, path: web}
        - {kind: image-folder, name: held, path: held, split: val}
      shard_size: 8
  - name: decontaminate
    uses: decontaminate
    inputs: {data: ingest}
    with:
      held_out: [val]
      datasets:
        - {name: coco, data: {kind: coco-captions, annotations: coco/captions.json, images: coco/images}}
  - name: semdedup
    uses: semdedup
    inputs: {data: decontaminate}
    with: {model: clip, clusters: 2, threshold: 0.9999, batch_size: 4}
  - name: clip-score
    uses: clip-score
    inputs: {data: semdedup}
    with: {model: clip, quantile: 0.5, batch_size: 4}
"""


def _small(array: np.ndarray, size: int = 64) -> np.ndarray:
    return np.asarray(Image.fromarray(array).convert("RGB").resize((size, size), Image.Resampling.BICUBIC))


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=70)
    return buffer.getvalue()


def _write(folder, name: str, data: bytes, caption: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    (folder / name).with_suffix(".txt").write_text(caption + "\n")


def _data(root, photos) -> None:
    coco = {"astronaut": _small(photos["astronaut"]), "coffee": _small(photos["coffee"])}
    (root / "coco" / "images").mkdir(parents=True)
    records = {"images": [], "annotations": []}
    for i, (name, array) in enumerate(coco.items()):
        (root / "coco" / "images" / f"{name}.png").write_bytes(encode(array))
        records["images"].append({"id": i, "file_name": f"{name}.png"})
        records["annotations"].append({"image_id": i, "caption": f"a photo of {name}"})
    (root / "coco" / "captions.json").write_text(json.dumps(records))
    rocket = _small(photos["rocket"])
    _write(root / "held", "rocket.png", encode(rocket), "a rocket")
    web = root / "web"
    _write(web, "exact.bmp", encode(coco["astronaut"], "BMP"), "an astronaut")  # the same pixels
    _write(web, "resized.png", encode(_small(photos["coffee"], 48)), "a cup of coffee")
    _write(web, "jpeg.jpg", _jpeg(coco["coffee"]), "coffee again")
    _write(web, "rocket-copy.bmp", encode(rocket, "BMP"), "a rocket launch")
    _write(web, "cat.png", encode(_small(photos["chelsea"])), "a cat")
    _write(web, "mirrored.png", encode(np.ascontiguousarray(coco["astronaut"][:, ::-1])), "a person")
    rng = np.random.default_rng(3)
    twin = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    _write(web, "twin-a.png", encode(twin), "noise")
    _write(web, "twin-b.png", encode(twin), "more noise")  # the same image: a semantic duplicate for any model
    for i in range(6):
        _write(web, f"noise{i}.png", encode(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)), f"static {i}")


def test_curation_steps_account_for_every_row_and_catch_each_planted_copy(tmp_path, photos):
    _data(tmp_path, photos)
    write_clip_folder(tmp_path / "clip")
    (tmp_path / "spec.yaml").write_text(SPEC)
    recipe = load_recipe(tmp_path / "spec.yaml")
    steps = recipe_graph(recipe)
    digests, store, outputs = graph_digests(steps, recipe), ArtifactStore(tmp_path / "artifacts"), {}
    for step in steps:
        inputs = {port: outputs[up] for port, up in step.inputs.items()}
        assert run_stage(step, digests[step.name], inputs, recipe, store, "log", LocalExecutor())[0] == "computed"
        path = store.path(step.name, digests[step.name])
        outputs[step.name] = StageOutput(
            step.name, digests[step.name], path, store.stats(step.name, digests[step.name])
        )

    def table(step: str, name: str) -> pl.DataFrame:
        return pl.read_parquet(outputs[step].path / name)

    for name in ("decontaminate", "semdedup", "clip-score"):
        stats = outputs[name].stats
        assert stats["rows_in"] == stats["rows_out"] + stats["rows_quarantined"]
        before = set(table(steps[[s.name for s in steps].index(name) - 1].name, "manifest.parquet")["key"])
        after, removed = set(table(name, "manifest.parquet")["key"]), set(table(name, "quarantine.parquet")["key"])
        assert after | removed == before and not after & removed

    reasons = dict(table("decontaminate", "quarantine.parquet").select("key", "reason").iter_rows())
    keys = {k.split("-", 1)[1]: k for k in table("ingest", "manifest.parquet")["key"]}  # SOURCE-NAME
    assert {k: reasons[v] for k, v in keys.items() if v in reasons} == {
        "exact": "eval-contamination:coco",
        "resized": "eval-contamination:coco",
        "jpeg": "eval-contamination:coco",
        "rocket-copy": "eval-contamination:val",
    }, keys
    metrics = outputs["decontaminate"].stats["metrics"]
    assert metrics["decontaminate/coco"] == 3 and metrics["decontaminate/val"] == 1
    assert metrics["exact"] == 2 and metrics["near"] == 2

    pairs = table("semdedup", "semantic_pairs.parquet")
    assert {keys["twin-a"], keys["twin-b"]} in [{k, kept} for k, kept in pairs.select("key", "kept").iter_rows()]
    assert all(c > 0.9999 for c in pairs["cosine"])
    semantic = table("semdedup", "quarantine.parquet")
    assert all(r.startswith("semantic-duplicate:") for r in semantic["reason"])
    kept_after = set(table("semdedup", "manifest.parquet")["key"])
    assert {r.split(":", 1)[1] for r in semantic["reason"]} <= kept_after  # each names a row it kept

    scores = table("clip-score", "scores.parquet")
    judged = table("semdedup", "manifest.parquet").filter(pl.col("split") == "train")
    assert scores.height == judged.height and scores["kept"].sum() >= judged.height / 2
    quarantine = table("clip-score", "quarantine.parquet")
    limit = outputs["clip-score"].stats["metrics"]["threshold"]
    assert set(quarantine["reason"]) <= {f"clip-score-below:{limit:.4f}"}
    assert set(quarantine["key"]) == set(scores.filter(pl.col("score") < limit)["key"])
    assert keys["rocket"] in set(table("clip-score", "manifest.parquet")["key"])  # the val row passed every step
