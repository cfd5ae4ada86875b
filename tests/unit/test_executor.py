"""The in-process executor: the same results, order and progress as Ray's maps, one model instance
per map (kept with keep=True), JSON round trips as Ray Data's rows; run_stage hands a step its
executor and starts Ray for a step that trains, whatever the executor. (RayExecutor: the
integration tests, test_executor_cli among them.)"""

from __future__ import annotations

import logging

import pytest

from vlmflow.artifacts import ArtifactStore
from vlmflow.component import Component
from vlmflow.errors import UserError
from vlmflow.pipeline import Step
from vlmflow.runtime.executor import LocalExecutor, executor_for, trains_on_ray
from vlmflow.stage import StageContext, StageResult, run_stage


def scaled(unit: int, factor: int, offset: int) -> int:
    return unit * factor + offset


class Model:
    """A stand-in for a model an actor holds: counts how often it is built."""

    built: list[tuple] = []

    def __init__(self, name: str, scale: int):
        self.name, self.scale, self.calls = name, scale, 0
        Model.built.append((name, scale))

    def run(self, batch: list[int]) -> list[int]:
        self.calls += 1
        return [x * self.scale for x in batch]

    def __call__(self, job: dict) -> dict:
        return {"pair": (job["a"], self.scale), 1: job["b"]}


@pytest.fixture(autouse=True)
def _fresh_counts():
    Model.built = []


def test_map_units_calls_fn_with_args_in_input_order_and_reports_each_result():
    seen = []
    results = LocalExecutor().map_units(
        scaled, [3, 1, 2], desc="units", args=(10, 1), progress="log", on_result=lambda i, r: seen.append((i, r))
    )
    assert results == [31, 11, 21]
    assert seen == [(0, 31), (1, 11), (2, 21)]
    assert LocalExecutor().map_units(scaled, [], desc="none", args=(1, 0)) == []


def test_progress_lines_are_the_ones_ray_maps_log(caplog):
    with caplog.at_level(logging.INFO, logger="vlmflow"):
        LocalExecutor().map_units(scaled, list(range(4)), desc="ingest", args=(1, 0), progress="log")
        LocalExecutor().map_on_actors(Model, ("m", 2), "run", [[1], [2]], desc="eval vqa", progress="log")
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("ingest: 4/4 units") for line in lines), lines
    assert any(line.startswith("eval vqa: 2/2 units") for line in lines), lines


def test_map_on_actors_builds_the_model_once_per_map_and_keeps_it_when_asked():
    executor = LocalExecutor()
    batches = [[1, 2], [3], [4, 5, 6]]
    answers = executor.map_on_actors(Model, ("m", 3), "run", batches, desc="a", num_actors=4)
    assert answers == [[3, 6], [9], [12, 15, 18]]
    assert Model.built == [("m", 3)]  # once, however many actors Ray would use
    executor.map_on_actors(Model, ("m", 3), "run", batches, desc="b", keep=True)
    executor.map_on_actors(Model, ("m", 3), "run", batches, desc="c", keep=True)
    assert Model.built == [("m", 3)] * 2  # the kept instance served the second call
    executor.map_on_actors(Model, ("m", 4), "run", batches, desc="d", keep=True)
    executor.map_on_actors(Model, ("m", 3), "run", batches, desc="e", keep=True)
    assert Model.built == [("m", 3), ("m", 3), ("m", 4), ("m", 3)]  # other arguments: a new instance
    assert executor.map_on_actors(Model, ("m", 3), "run", [], desc="f") == []
    assert len(Model.built) == 4  # nothing to do: nothing built


def test_map_jobs_answers_in_order_through_json_as_ray_data_rows_do():
    done = []
    jobs = [{"a": i, "b": [i, i]} for i in range(3)]
    answers = LocalExecutor().map_jobs(Model, ("m", 7), jobs, desc="jobs", num_actors=2, on_result=done.append)
    assert answers == [{"pair": [i, 7], "1": [i, i]} for i in range(3)]  # tuples as lists, keys as strings
    assert done == [0, 1, 2] and Model.built == [("m", 7)]


def test_require_gpus_checks_this_machine():
    import torch

    LocalExecutor().require_gpus(0, "capfilt.resources.gpus_per_actor")  # nothing asked: nothing checked
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(UserError, match=rf"capfilt.resources.gpus_per_actor: {have + 1} per actor, this machine has"):
        LocalExecutor().require_gpus(have + 1, "capfilt.resources.gpus_per_actor")


def test_dask_runs_on_threads_in_process():
    import dask

    assert dask.compute(dask.delayed(sum)([1, 2, 3]), scheduler=LocalExecutor().dask_scheduler()) == (6,)


def test_executor_for_names_the_implementation():
    from vlmflow.runtime.ray import RayExecutor

    assert isinstance(executor_for("local"), LocalExecutor)
    assert isinstance(executor_for("ray"), RayExecutor)


def _step(name: str, recipe_fields: tuple[str, ...], seen: list) -> Step:
    def run(ctx: StageContext) -> StageResult:
        seen.append(ctx.executor)
        (ctx.out / "out.txt").write_text(name)
        return StageResult(1, 1, 0)

    component = Component(name=name, config=dict, writes="samples", run=run, recipe_fields=recipe_fields)
    return Step(name, component, {}, {})


def test_run_stage_gives_the_step_its_executor_and_starts_ray_only_for_ray_train(tmp_path):
    store, seen, started = ArtifactStore(tmp_path / "artifacts"), [], []
    executor = LocalExecutor(start_ray=lambda: started.append(True))
    data = _step("data", ("seed",), seen)
    train = _step("fit", ("seed", "runtime.train.num_workers"), seen)
    assert not trains_on_ray(data.component) and trains_on_ray(train.component)
    assert run_stage(data, "d1", {}, None, store, "log", executor)[0] == "computed"
    assert seen == [executor] and started == []  # the step got this executor; no Ray for data work
    assert run_stage(train, "t1", {}, None, store, "log", executor)[0] == "computed"
    assert started == [True]  # Ray Train runs on Ray whatever the executor
    assert run_stage(train, "t1", {}, None, store, "log", executor)[0] == "cached"
    assert started == [True] and len(seen) == 2  # cached: neither run nor Ray
