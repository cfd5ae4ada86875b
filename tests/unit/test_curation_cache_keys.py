"""The curation steps' cache keys (the digests `vlmflow plan` and `run` compute; nothing runs): each
changes with its config, its model (a training stage's input or a folder, by content) and its
evaluation files, and with nothing operational."""

from __future__ import annotations

import json

import pytest

from tests.hf_clip import write_clip_folder
from vlmflow.pipeline import graph_digests, recipe_graph
from vlmflow.specs import load_recipe

SPEC = """\
name: curation-keys
model:
  vision: {kind: tiny-vit, family: clip, image_size: 32, patch_size: 16, hidden_size: 32, layers: 1, heads: 2}
  text: {kind: tiny-text, hidden_size: 32, layers: 1, heads: 2, max_length: 16}
  embed_dim: 32
pipeline:
  - name: ingest
    uses: ingest
    with: {sources: [{kind: synthetic-shapes, count: 16, val_fraction: 0.25}]}
  - name: tokenizer
    uses: tokenizer
    inputs: {data: ingest}
    with: {kind: bpe, vocab_size: 300}
  - name: train-clip
    uses: train
    inputs: {tokenizer: tokenizer, data: ingest}
    with: {name: clip, data: ingest, format: caption, trainable: [vision, text, heads], objectives: [{kind: itc}],
           max_steps: 2, batch_size: 4, micro_batch_size: 2}
  - name: clip-score
    uses: clip-score
    inputs: {data: ingest, model: train-clip}
    with: {threshold: 0.2, actors: 1}
  - name: semdedup
    uses: semdedup
    inputs: {data: ingest}
    with: {model: clip, clusters: 4, threshold: 0.95}
  - name: decontaminate
    uses: decontaminate
    inputs: {data: ingest}
    with:
      datasets: [{name: coco, data: {kind: coco-captions, annotations: coco.json, images: images}}]
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    write_clip_folder(root / "clip")
    (root / "images").mkdir()
    (root / "coco.json").write_text(json.dumps({"images": [], "annotations": []}))
    return root


def _digests(folder, text: str) -> dict[str, str]:
    (folder / "spec.yaml").write_text(text)
    recipe = load_recipe(folder / "spec.yaml")
    return graph_digests(recipe_graph(recipe), recipe)


def _changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {name for name in before if before[name] != after[name]}


@pytest.mark.parametrize(
    ("old", "new", "changed"),
    [
        ("threshold: 0.2, actors: 1", "threshold: 0.3, actors: 1", {"clip-score"}),
        ("threshold: 0.2, actors: 1", "threshold: 0.2, actors: 3", set()),  # operational
        ("max_steps: 2", "max_steps: 3", {"train-clip", "clip-score"}),  # the model input
        ("clusters: 4", "clusters: 5", {"semdedup"}),
        ("{name: coco,", "{name: coco-val,", {"decontaminate"}),
    ],
)
def test_a_curation_steps_key_follows_its_config_and_model_input(folder, old, new, changed):
    assert SPEC.count(old) == 1
    assert _changed(_digests(folder, SPEC), _digests(folder, SPEC.replace(old, new))) == changed


def test_a_model_folder_and_evaluation_files_enter_the_key_by_content(folder):
    before = _digests(folder, SPEC)
    config = folder / "clip" / "preprocessor_config.json"
    config.write_text(config.read_text().replace('"do_normalize": true', '"do_normalize": false'))
    assert _changed(before, _digests(folder, SPEC)) == {"semdedup"}
    before = _digests(folder, SPEC)
    (folder / "coco.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": []}))
    assert _changed(before, _digests(folder, SPEC)) == {"decontaminate"}
