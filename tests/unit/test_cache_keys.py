"""Cache correctness: which stages a change invalidates, through the digests `vlmflow plan` computes.

A step's artifact is keyed by hash(component, config without operational fields, declared
recipe settings, input digests by port, component code). Changing one field of a stage's spec,
or one of its input files, must change the digest of exactly that stage and of every stage
downstream of it; an operational knob (runtime.*, actors, partitions), a field of a later stage
or a default written out must change none. Nothing runs: the digests come from
`vlmflow.pipeline.graph_digests` over `recipe_graph`, what `plan` (and `run`) uses. The expected
graph is written out below, independently of `recipe_graph`.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from PIL import Image

from vlmflow.components.instruct.templates import DEFAULT_TEMPLATES
from vlmflow.pipeline import graph_digests, recipe_graph
from vlmflow.specs import load_recipe

RECIPE = """\
name: cache-keys
seed: 3
data:
  sources:
    - {kind: synthetic-shapes, name: shapes, count: 64, val_fraction: 0.1, test_fraction: 0.1}
    - {kind: image-folder, name: photos, path: photos, captions_file: photos/captions.csv}
  filters:
    - {kind: min-size, width: 8, height: 8}
  dedup: {hamming_threshold: 4, partitions: 2}
  shard_size: 32
tokenizer: {kind: bpe, vocab_size: 512}
instruct:
  generator: {kind: offline}
model:
  vision: {kind: tiny-vit, family: clip, image_size: 32, patch_size: 16, hidden_size: 32, layers: 1, heads: 2}
  connector: {kind: mlp, layers: 2}
  language: {kind: tiny-llama, hidden_size: 32, layers: 1, heads: 2, intermediate_size: 64}
stages:
  - {name: align, data: dedup, trainable: [connector], objectives: [{kind: lm}], max_steps: 2, batch_size: 4,
     micro_batch_size: 2}
  - name: tune
    data:
      mixture:
        - {data: instruct, format: conversations, weight: 1}
        - {data: dedup, format: qa, weight: 1}
    format: qa
    trainable: [connector, language]
    objectives: [{kind: lm}]
    max_steps: 2
    batch_size: 4
    micro_batch_size: 2
evaluate:
  - {kind: vqa, name: vqa, samples: 8}
  - {kind: captioning, name: coco, samples: 4,
     data: {kind: coco-captions, annotations: coco/captions.json, images: coco/images}}
runtime:
  ray: {num_cpus: 2}
  train: {num_workers: 2}
"""
# step -> its input ports and the steps wired to them (written out by hand: the test's oracle,
# not recipe_graph). tokenizer and instruct read the most processed data: dedup.
INPUTS = {
    "ingest": {},
    "dedup": {"data": "ingest"},
    "tokenizer": {"data": "dedup"},
    "instruct": {"data": "dedup"},
    "train-align": {"tokenizer": "tokenizer", "data": "dedup"},
    "train-tune": {"tokenizer": "tokenizer", "data.instruct": "instruct", "data.dedup": "dedup", "init": "train-align"},
    "eval-vqa": {"model": "train-tune", "data": "dedup"},
    "eval-coco": {"model": "train-tune"},
}
UPSTREAM = {step: set(ports.values()) for step, ports in INPUTS.items()}


def downstream(*roots: str) -> set[str]:
    """The roots and every stage that reads them, directly or not."""
    found = set(roots)
    while True:
        more = {stage for stage, ups in UPSTREAM.items() if ups & found} - found
        if not more:
            return found
        found |= more


def png(colour: tuple[int, int, int], size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    photos, coco = tmp_path / "photos", tmp_path / "coco" / "images"
    photos.mkdir()
    coco.mkdir(parents=True)
    (photos / "a.png").write_bytes(png((200, 0, 0)))
    (photos / "b.png").write_bytes(png((0, 200, 0)))
    (photos / "captions.csv").write_text("file,caption\na.png,a red square\nb.png,a green square\n")
    (coco / "x.png").write_bytes(png((0, 0, 200)))
    captions = {"images": [{"id": 1, "file_name": "x.png"}], "annotations": [{"image_id": 1, "caption": "blue"}]}
    (tmp_path / "coco" / "captions.json").write_text(json.dumps(captions))
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def digests(spec: Path, overrides: tuple[str, ...] = ()) -> dict[str, str]:
    recipe = load_recipe(spec, overrides)
    return graph_digests(recipe_graph(recipe), recipe)


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {stage for stage, digest in before.items() if after.get(stage) != digest}


def test_the_graph_is_the_one_the_expectations_assume(spec):
    graph = recipe_graph(load_recipe(spec))
    assert {step.name: step.inputs for step in graph} == INPUTS
    assert list(digests(spec)) == [step.name for step in graph]
    assert digests(spec) == digests(spec)  # deterministic


ALL = set(UPSTREAM)
TRAINED = downstream("train-align")
# (--set overrides, the stages whose digest must change)
FIELD_CASES = {
    # data stages: everything downstream
    "seed": (["seed=4"], ALL),
    "source count": (["data.sources.0.count=65"], ALL),
    "filter": (["data.filters.0.width=9"], ALL),
    "shard size": (["data.shard_size=16"], ALL),
    "dedup threshold": (["data.dedup.hamming_threshold=3"], downstream("dedup")),
    "dedup off near": (["data.dedup.near=false"], downstream("dedup")),
    "tokenizer": (["tokenizer.vocab_size=600"], downstream("tokenizer")),
    "instruct mix": (["instruct.mix.detail=5"], downstream("instruct")),
    "instruct turns": (["instruct.generator.max_turns=3"], downstream("instruct")),
    # training: the stage, the stages that start from it, the evaluations of them
    "model": (["model.connector.layers=3"], TRAINED),
    "first stage": (["stages.0.max_steps=3"], TRAINED),
    "first stage prompt": (["stages.0.prompt=What is this?"], TRAINED),
    "later stage": (["stages.1.optimizer.lr=0.01"], downstream("train-tune")),
    "later stage mixture": (["stages.1.data.mixture.0.weight=2"], downstream("train-tune")),
    "workers": (["runtime.train.num_workers=1"], TRAINED),  # DDP's shards of each batch: part of the stage
    "precision": (["stages.1.precision=bf16"], downstream("train-tune")),
    # evaluation: that task alone
    "eval samples": (["evaluate.0.samples=4"], {"eval-vqa"}),
    "eval generation": (["evaluate.1.generation.max_new_tokens=5"], {"eval-coco"}),
    "eval model": (["evaluate.0.model=align"], {"eval-vqa"}),
    # nothing: operational knobs, descriptions, defaults written out
    "ray cpus": (["runtime.ray.num_cpus=1", "runtime.ray.include_dashboard=true"], set()),
    "ray address": (["runtime.ray.address=ray://head:10001"], set()),
    "progress": (["runtime.progress=log"], set()),
    "executor": (["runtime.executor=local"], set()),  # the same artifacts in process or on Ray
    "mlflow": (["runtime.mlflow.experiment=other", "runtime.mlflow.tracking_uri=sqlite:///x.db"], set()),
    "workdir": (["runtime.workdir=elsewhere"], set()),
    "train knobs": (
        [
            "runtime.train.max_failures=0",
            "runtime.train.memory_per_worker_gb=3",
            "runtime.train.tflops_per_worker=1",
            "runtime.train.cpus_per_worker=2",
        ],
        set(),
    ),
    "name and description": (["name=renamed", "description=other words"], set()),
    "dedup partitions": (["data.dedup.partitions=3"], set()),
    "eval actors": (["evaluate.0.actors=2", "evaluate.1.actors=3"], set()),
    "defaults written out": (
        [
            "stages.0.epochs=1",
            "runtime.train.strategy=ddp",
            "data.dedup.exact=true",
            "instruct.generator.min_turns=2",
            "stages.1.init_from=previous",
            "evaluate.0.data={kind: held-out, artifact: dedup, split: test}",
        ],
        set(),
    ),
}


@pytest.mark.parametrize("overrides, expected", FIELD_CASES.values(), ids=FIELD_CASES.keys())
def test_a_field_invalidates_its_stage_and_what_follows_only(spec, overrides, expected):
    before = digests(spec)
    after = digests(spec, tuple(overrides))
    assert list(after) == list(before)
    assert changed(before, after) == expected


OPENAI = "instruct.generator={kind: openai-compatible, base_url: 'http://127.0.0.1:9/v1', model: m}"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            [
                "instruct.generator.concurrency=2",
                "instruct.generator.timeout_s=5",
                "instruct.generator.max_retries=1",
                "instruct.generator.requests_per_minute=60",
                "instruct.generator.price_per_1k_input=1",
            ],
            set(),
        ),
        (["instruct.generator.model=other"], downstream("instruct")),
        (["instruct.generator.temperature=0.7"], downstream("instruct")),
    ],
    ids=["operational knobs", "model", "temperature"],
)
def test_server_generator_knobs(spec, overrides, expected):
    before = digests(spec, (OPENAI,))
    assert changed(digests(spec), before) == downstream("instruct")  # offline -> a server: new data
    assert changed(before, digests(spec, (OPENAI, *overrides))) == expected


def edit_photo(folder: Path) -> None:
    (folder / "photos" / "a.png").write_bytes(png((201, 0, 0), size=17))


def add_photo(folder: Path) -> None:
    (folder / "photos" / "c.png").write_bytes(png((0, 0, 0)))


def edit_captions(folder: Path) -> None:
    with (folder / "photos" / "captions.csv").open("a") as handle:
        handle.write("a.png,another caption\n")


def edit_coco_annotations(folder: Path) -> None:
    path = folder / "coco" / "captions.json"
    data = json.loads(path.read_text())
    data["annotations"].append({"image_id": 1, "caption": "a blue square"})
    path.write_text(json.dumps(data))


def edit_coco_image(folder: Path) -> None:
    (folder / "coco" / "images" / "x.png").write_bytes(png((0, 0, 201), size=18))


def unrelated_file(folder: Path) -> None:
    (folder / "notes.txt").write_text("not read by any stage")


FILE_CASES: dict[str, tuple[Callable[[Path], None], set[str]]] = {
    "an ingested image": (edit_photo, ALL),
    "a new image in a source folder": (add_photo, ALL),
    "a captions file": (edit_captions, ALL),
    "an evaluation annotation file": (edit_coco_annotations, {"eval-coco"}),
    "an evaluation image": (edit_coco_image, {"eval-coco"}),
    "a file no stage reads": (unrelated_file, set()),
}


@pytest.mark.parametrize("edit, expected", FILE_CASES.values(), ids=FILE_CASES.keys())
def test_an_input_file_invalidates_the_stages_that_read_it(spec, edit, expected):
    before = digests(spec)
    edit(spec.parent)
    assert changed(before, digests(spec)) == expected


def test_instruct_templates_count_by_content_not_by_folder(spec):
    before = digests(spec)
    copy = spec.parent / "templates"
    shutil.copytree(DEFAULT_TEMPLATES, copy)
    assert changed(before, digests(spec, ("instruct.templates=templates",))) == set()
    query = copy / "conversation" / "query.txt"
    query.write_text(query.read_text() + "\nAnswer briefly.\n")
    assert changed(before, digests(spec, ("instruct.templates=templates",))) == downstream("instruct")


def test_adding_a_task_or_a_stage_keeps_what_was_built(spec):
    before = digests(spec)
    recipe = yaml.safe_load(spec.read_text())
    recipe["evaluate"].append({"kind": "vqa", "name": "extra", "samples": 2})
    spec.write_text(yaml.safe_dump(recipe))
    after = digests(spec)
    assert changed(before, after) == set() and set(after) - set(before) == {"eval-extra"}
    recipe["stages"].append(
        {
            "name": "more",
            "data": "dedup",
            "trainable": ["connector"],
            "objectives": [{"kind": "lm"}],
            "batch_size": 4,
            "micro_batch_size": 2,
        }
    )
    spec.write_text(yaml.safe_dump(recipe))
    after = digests(spec)
    # the earlier stages stay; the evaluations (of the last stage by default) now evaluate the new one
    assert changed(before, after) == {"eval-vqa", "eval-coco"} and "train-more" in after
