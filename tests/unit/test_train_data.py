"""Training data (shard index, chat encoding, batching), schedules and safetensors checkpoints."""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl
import pytest
import torch

from vlmflow.components.sources.synthetic import make_row
from vlmflow.components.tokenize import train_bpe
from vlmflow.components.train import mixture
from vlmflow.components.train.data import (
    Collator,
    ImageSpec,
    ShardSamples,
    TextCodec,
    epoch_order,
    offset,
    preprocess,
    sample_turns,
    translate,
    worker_micro_batches,
)
from vlmflow.components.train.loop import lr_factor, param_groups
from vlmflow.components.train.stage import accounting, mixture_rows, sources_read
from vlmflow.models.objectives import IGNORE
from vlmflow.prompts import choice_items
from vlmflow.samples import ShardCorrupt, build_index, write_shard
from vlmflow.specs.data import SyntheticShapesSource
from vlmflow.specs.recipe import BpeTokenizer
from vlmflow.specs.train import TrainStageSpec


@pytest.fixture()
def artifact(tmp_path):
    """A data artifact like ingest's: two shards, a manifest and shards.parquet under a store root."""
    spec = SyntheticShapesSource(kind="synthetic-shapes", count=12, val_fraction=0.3)
    rows = [make_row(spec, 5, i) for i in range(12)]
    data = tmp_path / "store" / "ingest" / "abc"
    manifest, shards = [], []
    for s in range(2):
        part = rows[s * 6 : (s + 1) * 6]
        rel = f"ingest/abc/shards/{s}.tar"
        samples = [{"__key__": r.key, "png": r.image, "json": {"captions": r.captions, **r.extra}} for r in part]
        sha, _ = write_shard(tmp_path / "store" / rel, samples)
        shards.append({"shard": rel, "sha256": sha})
        manifest += [{"key": r.key, "shard": rel, "split": r.split or "train", "source": "shapes"} for r in part]
    pl.DataFrame(manifest).write_parquet(data / "manifest.parquet")
    pl.DataFrame(shards).write_parquet(data / "shards.parquet")
    return data, tmp_path / "store", rows


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    spec = SyntheticShapesSource(kind="synthetic-shapes", count=50)
    texts = [t for i in range(50) for t in make_row(spec, 1, i).captions]
    tokenizer = train_bpe(
        [*texts, "Describe the image.", "What color is the circle? red"], BpeTokenizer(kind="bpe", vocab_size=400)
    )
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    special = {t: tokenizer.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>", "<image>", "<|user|>", "<|assistant|>")}
    return TextCodec(path, special, image_tokens=4, max_text=64)


def test_index_locates_every_sample_and_reads_its_bytes(artifact):
    data, root, rows = artifact
    index = build_index(data, root)
    assert index.height == 12 and index["image_offset"].null_count() == 0
    assert index["n_captions"].to_list() == [1] * 12
    assert index["n_choices"].to_list() == [len(r.extra["qa"]) for r in rows]  # one item per VQA pair
    samples = ShardSamples.split(index, root, "train", "caption")
    by_key = {r.key: r for r in rows}
    for i in range(len(samples)):
        key, image, record = samples.read(i)
        assert image == by_key[key].image
        assert record["objects"] == by_key[key].extra["objects"]


def test_a_changed_shard_is_refused(artifact):
    data, root, _ = artifact
    shard = root / "ingest/abc/shards/1.tar"
    blob = bytearray(shard.read_bytes())
    blob[700] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(ShardCorrupt, match="sha256"):
        build_index(data, root)


def account(index, stage: TrainStageSpec, steps: int):
    parts = mixture_rows({"dedup": index}, stage)
    resolved = mixture.resolve(stage, [p.height for p in parts])
    table = pl.concat(parts)
    used = mixture.used_positions(resolved, 0, stage.batch_size, steps)
    return table, used, accounting({"dedup": index}, table, used, sources_read(stage))


def test_accounting_puts_every_row_in_training_or_unused_with_a_reason(artifact):
    data, root, _rows = artifact
    index = build_index(data, root)
    stage = TrainStageSpec(name="s", trainable=["connector"], objectives=[{"kind": "lm"}], format="conversations")
    with pytest.raises(mixture.MixtureError, match="dedup/conversations has no training samples"):
        account(index, stage, 1)  # synthetic rows have no conversations
    stage = stage.model_copy(update={"format": "qa", "batch_size": 2})
    table, used, unused = account(index, stage, 100)
    assert table.height + unused.height == 12 and len(used) == table.height
    assert set(unused["reason"]) == {"held out: split val"}
    _table, used, unused = account(index, stage, 1)  # one step of 2 samples: the rest is never drawn
    assert len(used) == 2 and unused.height == 10
    assert unused.group_by("reason").len().sort("reason").rows() == [
        ("held out: split val", index.filter(pl.col("split") == "val").height),
        ("not drawn by the mixture in any step", 10 - index.filter(pl.col("split") == "val").height),
    ]


def test_a_component_reads_only_its_sources_and_the_others_are_accounted_for(artifact):
    data, root, _rows = artifact
    index = build_index(data, root)
    clean_keys = index["key"].to_list()[::2]
    index = index.with_columns(
        source=pl.when(pl.col("key").is_in(clean_keys)).then(pl.lit("clean")).otherwise(pl.lit("web"))
    )
    mix = {"mixture": [{"data": "dedup", "sources": ["clean"]}]}
    stage = TrainStageSpec(name="s", trainable=["connector"], objectives=[{"kind": "lm"}], data=mix, batch_size=2)
    table, _used, unused = account(index, stage, 100)
    assert set(table["source"]) == {"clean"} and table.height > 0
    assert table.height == index.filter((pl.col("source") == "clean") & (pl.col("split") == "train")).height
    web_train = index.filter((pl.col("source") == "web") & (pl.col("split") == "train"))
    reasons = dict(zip(unused["key"], unused["reason"], strict=True))
    assert all(reasons[k] == "source web is not among the stage's sources" for k in web_train["key"])
    assert table.height + unused.height == index.height


def test_chat_labels_cover_only_answers(codec):
    turns = [
        {"role": "user", "content": "<image>\nWhat color is the circle?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "How many circles are there?"},
        {"role": "assistant", "content": "1"},
    ]
    ids, labels = codec.chat(turns)
    s = codec.special
    assert ids.count(s["<image>"]) == 4 and ids[0] == s["<bos>"]
    learned = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert learned == [*codec.ids("red"), s["<eos>"], *codec.ids("1"), s["<eos>"]]
    assert codec.tokenizer.decode(codec.ids("red")) == "red"


def test_sample_turns_per_format():
    spec = SyntheticShapesSource(kind="synthetic-shapes", count=1)
    row = make_row(spec, 3, 0)
    record = {"captions": row.captions, **row.extra}
    caption = sample_turns(record, "caption", "Describe.", 0)
    assert caption == [{"role": "user", "content": "Describe."}, {"role": "assistant", "content": row.captions[0]}]
    pairs = {(q["question"], q["answer"]) for q in row.extra["qa"]}
    asked = set()
    for epoch in range(20):
        qa = sample_turns({**record, "key": "k"}, "qa", "", epoch)
        assert len(qa) == 2 and (qa[0]["content"], qa[1]["content"]) in pairs
        asked.add(qa[0]["content"])
    assert len(asked) > 1  # a different question in different epochs
    assert sample_turns(record, "conversations", "", 0) is None


def test_choice_format_asks_as_evaluation_does_and_answers_with_the_letter():
    spec = SyntheticShapesSource(kind="synthetic-shapes", count=1)
    row = make_row(spec, 3, 0)
    record = {"key": "k", "captions": row.captions, **row.extra}
    asked = set()
    for epoch in range(20):
        user, assistant = sample_turns(record, "choice", "", epoch)
        item = next(c for c in row.extra["choices"] if user["content"].startswith(c["question"] + "\n"))
        lines = [f"{letter}. {text}" for letter, text in zip("ABCD", item["options"], strict=False)]
        assert user["content"] == "\n".join([item["question"], *lines, "Answer with the option's letter."])
        assert assistant["content"] == item["answer"]
        asked.add(item["question"])
    assert len(asked) > 1
    custom = sample_turns(record, "choice", "", 0, template="Q: {question} {options}")
    assert custom[0]["content"].startswith("Q: ")


@pytest.mark.parametrize(
    "item",
    [
        {"question": "q", "options": ["only one"], "answer": "A"},  # fewer than two options
        {"question": "q", "options": ["a", "b"], "answer": "C"},  # the answer is not an option
        {"question": "q", "options": ["a", ""], "answer": "A"},  # an empty option
        {"question": "q", "options": "a, b", "answer": "A"},  # options not a list or mapping
        {"question": 3, "options": ["a", "b"], "answer": "A"},
        "not an object",
    ],
)
def test_malformed_choice_items_are_not_trained_on(item):
    record = {"key": "k", "choices": [item]}
    assert choice_items(record) == [] and sample_turns(record, "choice", "", 0) is None
    keyed = {"key": "k", "choices": [{"question": "q", "options": {"X": "a", "Y": "b"}, "answer": "Y"}]}
    assert choice_items(keyed) == [("q", (("X", "a"), ("Y", "b")), "Y")]


def test_batches_split_the_global_batch_exactly_across_workers():
    order = epoch_order(100, seed=3, epoch=0)
    assert sorted(order) == list(range(100))
    assert not np.array_equal(order, epoch_order(100, seed=3, epoch=1))
    assert np.array_equal(order, epoch_order(100, seed=3, epoch=0))
    parts = [worker_micro_batches(order, 2, 16, 4, rank, 2) for rank in range(2)]
    assert all(len(p) == 2 and all(len(m) == 4 for m in p) for p in parts)
    got = np.sort(np.concatenate([m for p in parts for m in p]))
    assert np.array_equal(got, np.sort(order[32:48]))


def test_preprocess_normalises_to_chw():
    spec = SyntheticShapesSource(kind="synthetic-shapes", count=1, image_size=40)
    pixels = preprocess(make_row(spec, 1, 0).image, ImageSpec(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    assert pixels.shape == (3, 32, 32) and pixels.dtype == np.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0


def unaugmented(artifact, codec) -> tuple[ShardSamples, ImageSpec, np.ndarray, dict]:
    """The training rows of the artifact, the image spec, their positions and their batch without augmentation."""
    data, store, _rows = artifact
    samples = ShardSamples.split(build_index(data, store), store, "train", "caption")
    image = ImageSpec(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    positions = np.arange(len(samples))
    return samples, image, positions, Collator(samples, image, codec, "Describe the image.", 16)(positions, epoch=0)


def test_hflip_mirrors_a_seeded_share_of_the_images_and_nothing_else(artifact, codec):
    samples, image, positions, plain = unaugmented(artifact, codec)
    flips = {}
    for epoch in range(4):
        flipped = Collator(samples, image, codec, "Describe the image.", 16, hflip=0.5, seed=3)(positions, epoch)
        assert torch.equal(flipped["text_ids"], plain["text_ids"]) and torch.equal(flipped["labels"], plain["labels"])
        for k in positions:
            same, mirror = (
                torch.equal(flipped["pixels"][k], plain["pixels"][k]),
                torch.equal(flipped["pixels"][k], plain["pixels"][k].flip(-1)),
            )
            assert same or mirror
            flips[(epoch, int(k))] = mirror and not same
    assert 0.25 < np.mean(list(flips.values())) < 0.75  # about half, and not the same ones every epoch
    assert any(flips[(0, k)] != flips[(1, k)] for k in range(len(samples)))
    again = Collator(samples, image, codec, "Describe the image.", 16, hflip=0.5, seed=3)(positions, 2)
    assert all(
        torch.equal(again["pixels"][k], plain["pixels"][k].flip(-1)) == flips[(2, k)] for k in range(len(samples))
    )
    assert (
        TrainStageSpec.model_validate({"name": "s", "trainable": ["heads"], "objectives": [{"kind": "itc"}]})
        .model_dump(mode="json")
        .get("hflip")
        is None
    )  # off: the cache key of a stage is as before the option


def test_translate_moves_the_image_and_repeats_the_edge():
    array = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
    assert translate(array, 0, 0) is array
    right = translate(array, 2, 0)
    assert np.array_equal(right[:, :, 2:], array[:, :, :-2])
    assert np.array_equal(right[:, :, :2], np.repeat(array[:, :, :1], 2, axis=2))
    up_left = translate(array, -1, -3)
    assert np.array_equal(up_left[:, :1, :-1], array[:, 3:, 1:])
    assert np.array_equal(up_left[:, 1:, :], np.repeat(up_left[:, :1, :], 3, axis=1))  # the last row, repeated
    assert np.array_equal(up_left[:, :, -1], up_left[:, :, -2])
    assert up_left.shape == array.shape and up_left.flags["C_CONTIGUOUS"]


def test_shift_moves_each_image_by_a_seeded_offset_within_the_limit(artifact, codec):
    samples, image, positions, plain = unaugmented(artifact, codec)
    offsets = set()
    for epoch in range(3):
        collate = Collator(samples, image, codec, "Describe the image.", 16, seed=3, shift=3)
        moved = collate(positions, epoch)
        assert torch.equal(moved["text_ids"], plain["text_ids"]) and torch.equal(moved["labels"], plain["labels"])
        steps = 0
        for k in positions:
            dx, dy = offset(3, epoch, int(k), 3)
            assert max(abs(dx), abs(dy)) <= 3
            expected = translate(plain["pixels"][k].numpy(), dx, dy)
            assert np.array_equal(moved["pixels"][k].numpy(), expected)
            offsets.add((dx, dy))
            steps += max(abs(dx), abs(dy))
        assert collate.moved == steps
    assert len(offsets) > 5  # not one offset for all
    assert (
        TrainStageSpec.model_validate({"name": "s", "trainable": ["heads"], "objectives": [{"kind": "itc"}]})
        .model_dump(mode="json")
        .keys()
        .isdisjoint({"shift", "hflip"})
    )  # off: cache keys as before the options


def test_weight_decay_shrinks_matrices_but_not_biases_or_norm_scales():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    params = list(model.parameters())
    assert param_groups(params, 0.0) == [{"params": params, "weight_decay": 0.0}]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(param_groups(params, 0.5), lr=0.1)
    for p in params:
        p.grad = torch.zeros_like(p)  # no gradient: what changes is the decay alone
    optimizer.step()
    weight, bias, scale, shift = (p.detach() for p in params)
    assert torch.allclose(weight, before[0] * (1 - 0.1 * 0.5))
    assert torch.equal(bias, before[1]) and torch.equal(scale, before[2]) and torch.equal(shift, before[3])


def test_warmup_then_cosine():
    stage = TrainStageSpec(
        name="s",
        trainable=["connector"],
        objectives=[{"kind": "lm"}],
        schedule={"warmup_steps": 4, "min_lr_ratio": 0.1},
    )
    factors = [lr_factor(s, 20, stage) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0) and factors[-1] > 0.1
    assert all(a >= b for a, b in itertools.pairwise(factors[3:]))


def test_a_half_written_history_line_is_dropped_on_resume():
    from vlmflow.components.train.loop import parse_row

    assert parse_row('{"step": 3, "loss": 1.5}') == {"step": 3, "loss": 1.5}
    assert parse_row('{"step": 4, "lo') is None
