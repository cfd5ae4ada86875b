"""benchmarks/plan_accuracy.py's measurement: the peak of torch's CPU allocations while a function runs."""

from __future__ import annotations

import torch

from benchmarks.plan_accuracy import allocated_peak

MIB = 1 << 20


def test_allocated_peak_counts_from_zero_in_every_measurement_of_a_process():
    kept: list[torch.Tensor] = []

    def run() -> None:
        kept.append(torch.ones(MIB // 4))  # 1 MiB that outlives the measurement
        twice = torch.ones(2 * MIB // 4)  # the peak: 3 MiB
        del twice

    first = allocated_peak(run)
    kept.clear()  # freed while no profiler records: torch still counts it
    second = allocated_peak(run)
    assert first == second
    assert 3 * MIB <= first < 3 * MIB + 4096  # and a few bytes of bookkeeping at most
