"""benchmarks/plan_accuracy.py's measurement: the peak of torch's CPU allocations while a function runs."""

from __future__ import annotations

import gc

import torch

from benchmarks.plan_accuracy import allocated_peak

MIB = 1 << 20


def test_allocated_peak_counts_from_zero_in_every_measurement_of_a_process():
    kept: list[torch.Tensor] = []

    def run() -> None:
        gc.collect()  # as the garbage collector may run at any time in a measured step
        kept.append(torch.ones(MIB // 4))  # 1 MiB that outlives the measurement
        cycle: list = [torch.ones(MIB // 4)]  # 1 MiB of garbage only the collector frees
        cycle.append(cycle)
        twice = torch.ones(2 * MIB // 4)  # the peak: 4 MiB
        del twice, cycle

    first = allocated_peak(run)
    kept.clear()  # freed while no profiler records: torch still counts it
    second = allocated_peak(run)
    assert first == second
    assert 4 * MIB <= first < 4 * MIB + 4096  # and a few bytes of bookkeeping at most
