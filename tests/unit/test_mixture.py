"""Dataset mixtures: resolved counts, per-epoch draws, and errors that name the field."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmflow.components.train.mixture import MixtureError, largest_remainder, resolve, used_positions
from vlmflow.specs.train import TrainStageSpec


def stage(data, batch_size: int = 4) -> TrainStageSpec:
    return TrainStageSpec(
        name="s", data=data, format="qa", trainable=["connector"], objectives=[{"kind": "lm"}], batch_size=batch_size
    )


def test_a_plain_artifact_is_all_its_rows_once_per_epoch_in_a_new_order():
    resolved = resolve(stage("dedup"), [10])
    assert resolved.counts == [10] and resolved.labels == ["dedup/qa"]
    first, second = resolved.epoch_positions(0, 0), resolved.epoch_positions(0, 1)
    assert sorted(first) == sorted(second) == list(range(10))
    assert not np.array_equal(first, second)
    assert np.array_equal(first, resolved.epoch_positions(0, 0))  # deterministic


def test_weights_share_the_total_and_counts_come_first():
    mix = {
        "mixture": [
            {"data": "instruct", "format": "conversations", "weight": 3},
            {"data": "dedup", "weight": 1},
            {"data": "ingest", "format": "caption", "count": 5},
        ],
        "total": 45,
    }
    resolved = resolve(stage(mix), [100, 100, 50])
    assert resolved.counts == [30, 10, 5] and resolved.total == 45
    assert resolved.labels == ["instruct/conversations", "dedup/qa", "ingest/caption"]
    positions = resolved.epoch_positions(7, 0)
    assert len(positions) == 45 and len(set(positions.tolist())) == 45  # without replacement: distinct
    offsets = resolved.offsets()
    assert sum(offsets[2] <= p < offsets[2] + 50 for p in positions) == 5


def test_without_total_the_weights_use_the_scarcest_component_fully():
    resolved = resolve(stage({"mixture": [{"data": "instruct", "weight": 1}, {"data": "dedup", "weight": 1}]}), [30, 8])
    assert resolved.counts == [8, 8]
    resolved = resolve(stage({"mixture": [{"data": "a", "weight": 1}, {"data": "b", "replacement": True}]}), [30, 2])
    assert resolved.counts == [30, 30]  # with replacement a small set is oversampled


def test_replacement_draws_repeat_rows_and_reshuffle_off_repeats_epoch_zero():
    mix = {"mixture": [{"data": "dedup", "count": 20, "replacement": True}], "reshuffle": False}
    resolved = resolve(stage(mix), [5])
    positions = resolved.epoch_positions(1, 0)
    assert len(positions) == 20 and set(positions.tolist()) <= set(range(5))
    assert np.array_equal(positions, resolved.epoch_positions(1, 3))


def test_used_positions_cover_exactly_the_trained_steps():
    resolved = resolve(stage({"mixture": [{"data": "dedup", "count": 6}]}, batch_size=4), [10])
    one_step = used_positions(resolved, 0, 4, 1)
    assert len(one_step) == 4 and set(one_step) <= set(resolved.epoch_positions(0, 0)[:4].tolist())
    many = used_positions(resolved, 0, 4, 40)  # a new subset of 6 each epoch: all 10 get drawn
    assert many.tolist() == list(range(10))


@pytest.mark.parametrize(
    ("data", "available", "field", "message"),
    [
        ({"mixture": [{"data": "dedup", "count": 11}]}, [10], ("data", "mixture", 0, "count"), "but it has 10"),
        ({"mixture": [{"data": "dedup"}, {"data": "instruct"}]}, [10, 0], ("data", "mixture", 1), "no training"),
        ({"mixture": [{"data": "dedup", "weight": 1}], "total": 50}, [10], ("data", "mixture", 0), "replacement"),
        ({"mixture": [{"data": "a", "count": 8}, {"data": "b"}], "total": 8}, [9, 9], ("data", "total"), "nothing"),
        ({"mixture": [{"data": "a", "replacement": True}]}, [9], ("data", "total"), "set total"),
    ],
)
def test_unresolvable_mixtures_name_the_field(data, available, field, message):
    with pytest.raises(MixtureError, match=message) as error:
        resolve(stage(data), available)
    assert error.value.field == field


@given(st.integers(0, 10_000), st.lists(st.floats(0.01, 100), min_size=1, max_size=6))
@settings(max_examples=200, deadline=None)
def test_largest_remainder_sums_to_the_total_and_stays_within_one(total, weights):
    counts = largest_remainder(total, weights)
    assert sum(counts) == total
    exact = [total * w / sum(weights) for w in weights]
    assert all(abs(c - x) < 1 for c, x in zip(counts, exact, strict=True))
