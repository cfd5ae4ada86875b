"""Off-thread loading: loader processes build exactly the batches the training thread would, step by
step, also when a run resumes at step k."""

from __future__ import annotations

import functools

import polars as pl
import pytest
import torch

from vlmflow.components.sources.synthetic import make_row
from vlmflow.components.tokenize import train_bpe
from vlmflow.components.train import mixture
from vlmflow.components.train.data import Collator, ImageSpec, ShardSamples, TextCodec
from vlmflow.components.train.loader import Share, Step, StepBatches, load_steps
from vlmflow.components.train.packing import pack_batch
from vlmflow.samples import build_index, write_shard
from vlmflow.specs.data import SyntheticShapesSource
from vlmflow.specs.recipe import BpeTokenizer
from vlmflow.specs.train import TrainStageSpec

BATCH, MICRO, SEED = 4, 2, 3


@pytest.fixture(scope="module")
def collate(tmp_path_factory) -> Collator:
    """A Collator over a two-shard artifact of 10 samples, with both augmentations on."""
    root = tmp_path_factory.mktemp("store")
    spec = SyntheticShapesSource(kind="synthetic-shapes", count=10, val_fraction=0.0)
    rows = [make_row(spec, 5, i) for i in range(10)]
    data = root / "ingest" / "abc"
    manifest, shards = [], []
    for s in range(2):
        rel = f"ingest/abc/shards/{s}.tar"
        samples = [{"__key__": r.key, "png": r.image, "json": {"captions": r.captions, **r.extra}} for r in rows[s::2]]
        sha, _ = write_shard(root / rel, samples)
        shards.append({"shard": rel, "sha256": sha})
        manifest += [{"key": r.key, "shard": rel, "split": "train", "source": "shapes"} for r in rows[s::2]]
    pl.DataFrame(manifest).write_parquet(data / "manifest.parquet")
    pl.DataFrame(shards).write_parquet(data / "shards.parquet")
    tokenizer = train_bpe(
        [c for r in rows for c in r.captions] + ["Describe."], BpeTokenizer(kind="bpe", vocab_size=300)
    )
    tokenizer.save(str(root / "tokenizer.json"))
    special = {t: tokenizer.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>", "<image>", "<|user|>", "<|assistant|>")}
    codec = TextCodec(root / "tokenizer.json", special, image_tokens=4, max_text=96)
    samples = ShardSamples.split(build_index(data, root), root, "train", "caption")
    image = ImageSpec(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return Collator(samples, image, codec, "Describe.", 8, hflip=0.5, seed=SEED, shift=2)


def share(collate: Collator, rank: int = 0, world: int = 1) -> Share:
    stage = TrainStageSpec.model_validate({"name": "s", "trainable": ["connector"], "objectives": [{"kind": "lm"}],
                                           "batch_size": BATCH, "micro_batch_size": MICRO})  # fmt: skip
    resolved = mixture.resolve(stage, [len(collate.samples)])
    return Share(resolved, SEED, resolved.total // BATCH, BATCH, MICRO, rank, world)


def assert_same(ours: list[Step], theirs: list[Step]) -> None:
    assert [s.step for s in ours] == [s.step for s in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert (a.epoch, a.images, a.flipped, a.moved) == (b.epoch, b.images, b.flipped, b.moved)
        assert len(a.parts) == len(b.parts)
        for x, y in zip(a.parts, b.parts, strict=True):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_loader_processes_give_the_training_threads_batches_also_after_a_resume(collate):
    batches = StepBatches(collate, share(collate))
    steps = 7  # two epochs of 2 steps and then some: each epoch's order is drawn anew
    inline = list(load_steps(batches, 0, steps, workers=0))
    assert [s.epoch for s in inline] == [0, 0, 1, 1, 2, 2, 3]
    assert [s.images for s in inline] == [BATCH] * steps and len(inline[0].parts) == BATCH // MICRO
    assert any(s.flipped for s in inline) and any(s.moved for s in inline)  # the augmentations are drawn
    assert_same(list(load_steps(batches, 0, steps, workers=2)), inline)
    assert_same(list(load_steps(batches, 3, steps, workers=2)), inline[3:])  # resumed at step 3
    assert_same(list(load_steps(batches, 5, steps, workers=1)), inline[5:])


def test_each_rank_and_packing_load_the_same_way_in_processes(collate):
    special = collate.codec.special
    pack = functools.partial(pack_batch, capacity=1 + 4 + 96, image_id=special["<image>"], pad_id=special["<pad>"])
    for rank in range(2):
        batches = StepBatches(collate, share(collate, rank, world=2), pack)
        inline = list(load_steps(batches, 1, 4, workers=0))
        assert all("segment_ids" in part for s in inline for part in s.parts)
        assert any(int(part["segment_ids"].max()) > 1 for s in inline for part in s.parts)  # rows are shared
        assert [s.images for s in inline] == [BATCH // 2] * 3
        assert_same(list(load_steps(batches, 1, 4, workers=2)), inline)
