"""A model whose weights hold NaN or inf is never written (so never registered)."""

from __future__ import annotations

import pytest
import torch

from vlmflow.components.train.loop import check_finite


def test_finite_weights_pass_and_integer_buffers_are_not_checked():
    check_finite({"w": torch.ones(3), "positions": torch.arange(4)}, "train-align")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_weight_is_refused_by_name(bad: float):
    state = {"vision.w": torch.ones(3), "language.w": torch.tensor([1.0, bad])}
    with pytest.raises(FloatingPointError, match=r"train train-instruct: .*NaN or inf values \(language\.w\)"):
        check_finite(state, "train-instruct")


def test_many_bad_tensors_are_counted():
    state = {f"layer{i}.w": torch.full((2,), float("nan"), dtype=torch.bfloat16) for i in range(5)}
    with pytest.raises(FloatingPointError, match=r"layer0\.w, layer1\.w, layer2\.w and 2 more"):
        check_finite(state, "s")
