"""The shared Ray Data actor-pool map (CapFilt's stages): answers come back complete and in job
order when consecutive jobs share a block, with any number of jobs per block."""

from __future__ import annotations

import os

import pytest
import ray

from vlmflow.runtime.ray import BLOCKS_PER_ACTOR, map_jobs_on_ray_data


def squares() -> type:
    """The actor class, defined in a function so Ray ships it by value (tests are no package)."""

    class Squares:
        def __init__(self, offset: int):
            self.offset = offset

        def __call__(self, job: dict) -> dict:
            return {"value": job["n"] ** 2 + self.offset, "pid": os.getpid()}

    return Squares


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.mark.parametrize("count", [1, 7, 2 * BLOCKS_PER_ACTOR * 3 + 5])  # one job; fewer than blocks; uneven
def test_answers_are_complete_and_in_job_order(local_ray, count):
    seen: list[int] = []
    answers = map_jobs_on_ray_data(
        squares(), (1,), [{"n": n} for n in range(count)], desc="squares", num_actors=2, progress="log",
        on_result=seen.append,
    )  # fmt: skip
    assert [a["value"] for a in answers] == [n * n + 1 for n in range(count)]
    assert seen == list(range(count))
    assert os.getpid() not in {a["pid"] for a in answers}  # answered by the pool's actors
