"""Samples longer than a stage's max_text_tokens are quarantined with their length, before training."""

from __future__ import annotations

import polars as pl

from tests.unit.test_train_data import artifact, codec  # noqa: F401 (fixtures)
from vlmflow.components.train.data import TextCodec
from vlmflow.components.train.overflow import split_too_long, with_too_long
from vlmflow.components.train.stage import mixture_rows
from vlmflow.samples import build_index
from vlmflow.specs.train import TrainStageSpec


def test_too_long_rows_leave_training_with_their_length(artifact, codec, tmp_path):  # noqa: F811
    data, root, rows = artifact
    index = build_index(data, root)
    stage = TrainStageSpec(name="s", trainable=["connector"], objectives=[{"kind": "lm"}], batch_size=2)
    lengths = {}
    for row in rows:
        ids, _ = codec.chat(
            [{"role": "user", "content": stage.prompt}, {"role": "assistant", "content": row.captions[0]}]
        )
        lengths[row.key] = codec.text_tokens(ids)
    limit = sorted(lengths.values())[len(lengths) // 2]  # about half the captions are longer
    codec.tokenizer.save(str(tmp_path / "tokenizer.json"))
    short = TextCodec(tmp_path / "tokenizer.json", codec.special, 4, limit)
    parts = mixture_rows({"dedup": index}, stage)
    kept, too_long = split_too_long(parts, root, short, stage)
    train_keys = set(parts[0]["key"])
    assert set(too_long["key"]) == {k for k in train_keys if lengths[k] > limit} != set()
    assert set(kept[0]["key"]) == {k for k in train_keys if lengths[k] <= limit}
    assert all(r == f"too-long:{lengths[k]} tokens > {limit}" for k, r in too_long.select("key", "reason").iter_rows())
    assert set(too_long["data"]) == {"dedup"}


def test_the_unused_rows_name_the_too_long_reason():
    unused = pl.DataFrame({"data": ["d", "d", "d"], "key": ["a", "b", "c"], "reason": ["held out: split val"] * 3})
    too_long = pl.DataFrame({"data": ["d"], "key": ["b"], "reason": ["too-long:120 tokens > 96"]})
    assert with_too_long(unused, too_long)["reason"].to_list() == [
        "held out: split val", "too-long:120 tokens > 96", "held out: split val"]  # fmt: skip
