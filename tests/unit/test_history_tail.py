"""HistoryTail: a stage's history.jsonl streamed into its MLflow run while the stage runs."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from vlmflow.progress import Progress, StepProgress, reporting_to
from vlmflow.tracking import HistoryTail, Tracker, metric_name


def _append(path: Path, *rows: dict, tail: str = "") -> None:
    with open(path, "a") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_rows_arrive_while_the_file_grows_and_moves(tmp_path: Path):
    build, final = tmp_path / "d.partial", tmp_path / "d"
    build.mkdir()
    batches: list[list[int]] = []
    tail = HistoryTail(lambda rows: batches.append([r["step"] for r in rows]), [build / "h.jsonl", final / "h.jsonl"],
                       threading.RLock(), interval=0.05).start()  # fmt: skip
    _append(build / "h.jsonl", {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, tail='{"step": 3, "lo')
    deadline = time.monotonic() + 5
    while not batches and time.monotonic() < deadline:
        time.sleep(0.02)
    assert batches == [[1, 2]]  # the half-written third line waits for its end
    with open(build / "h.jsonl", "a") as handle:
        handle.write('ss": 1.2}\n')
    _append(build / "h.jsonl", {"step": 4, "loss": 1.0})
    build.rename(final)  # the stage commits its folder before the tail's last look
    assert tail.stop() == 4
    assert [s for batch in batches for s in batch] == [1, 2, 3, 4]


def test_a_rewritten_file_is_read_again_without_logging_a_step_twice(tmp_path: Path):
    path = tmp_path / "h.jsonl"
    logged: list[int] = []
    tail = HistoryTail(lambda rows: logged.extend(r["step"] for r in rows), [path], threading.RLock(), 60)
    _append(path, *({"step": s, "loss": 1.0} for s in range(1, 6)))
    tail._drain()
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2)))  # resumed at step 2
    tail._drain()
    _append(path, *({"step": s, "loss": 0.5} for s in range(3, 8)))
    tail._drain()
    assert logged == [1, 2, 3, 4, 5, 6, 7]


def test_a_failing_log_is_retried_on_the_next_look(tmp_path: Path):
    path = tmp_path / "h.jsonl"
    calls: list[list[int]] = []

    def flaky(rows: list[dict]) -> None:
        calls.append([r["step"] for r in rows])
        if len(calls) == 1:
            raise ConnectionError("tracking server down")

    tail = HistoryTail(flaky, [path], threading.RLock(), 60)
    _append(path, {"step": 1, "loss": 1.0})
    with pytest.raises(ConnectionError):
        tail._drain()
    _append(path, {"step": 2, "loss": 1.0})
    tail._drain()
    assert calls == [[1], [1, 2]]


def test_points_carry_their_own_step_time(tmp_path: Path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "tail", tmp_path / "art")
    run = tracker.start("train", {})
    tracker.log_history(run, [{"step": 1, "loss": 2.0, "time": 1_700_000_000.25, "resumed": True}], "train")
    (point,) = tracker.client.get_metric_history(run, "train/loss")
    assert (point.step, point.value, point.timestamp) == (1, 2.0, 1_700_000_000_250)
    assert set(tracker.client.get_run(run).data.metrics) == {"train/loss"}  # no `time` or boolean series


def test_the_console_shows_steps_and_loss_and_each_resume_once(tmp_path: Path, caplog):
    path = tmp_path / "h.jsonl"
    progress = StepProgress("train-instruct", mode="log")
    tail = HistoryTail(lambda rows: None, [path], threading.RLock(), 60, progress=progress)
    row = {"total_steps": 6, "loss": 1.0}
    with caplog.at_level(logging.INFO, logger="vlmflow"):
        _append(path, *({"step": s, "time": float(s), **row} for s in (1, 2, 3)))
        tail._drain()
        progress.progress.last_log = 0.0  # log mode prints every 5 s and at the end: print at this look too
        # A worker died after step 3; its replacement went back to the checkpoint at step 2.
        # It wrote a new file in the old one's place, and two steps more, before the tail looked again.
        again = tmp_path / "new.jsonl"
        _append(again, *({"step": s, "time": float(s), **row} for s in (1, 2)))
        _append(again, {"step": 3, "time": 13.0, "resumed_from": 2, **row}, {"step": 4, "time": 14.0, **row})
        os.replace(again, path)
        tail._drain()
        _append(path, *({"step": s, "time": 10.0 + s, **row, "loss": 0.25} for s in (5, 6)))
        tail._drain()
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("train-instruct: 3/6 steps, loss 1.0000")
    assert lines.count("train-instruct: resumed from its checkpoint at step 2") == 1
    assert lines[-1].startswith("train-instruct: 6/6 steps, loss 0.2500")


def test_bookkeeping_keys_are_not_curves(tmp_path: Path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "tail", tmp_path / "art")
    run = tracker.start("train", {})
    tracker.log_history(run, [{"step": 3, "loss": 2.0, "total_steps": 10, "resumed_from": 2}], "train")
    assert set(tracker.client.get_run(run).data.metrics) == {"train/loss"}


@pytest.mark.parametrize(
    ("key", "group", "name"),
    [
        ("loss", "train", "train/loss"),
        ("grad_norm", "train", "train/grad_norm"),
        ("rows_out", "train", "data/rows_out"),
        ("rows_out.shapes", "ingest", "data/rows_out.shapes"),
        ("eval_vqa_accuracy", "evaluate", "eval/vqa_accuracy"),
        ("eval_vqa_accuracy", "train", "eval/vqa_accuracy"),
        ("plan_memory_gb", "train", "plan/memory_gb"),
        ("params_trainable", "train", "model/params_trainable"),
        ("worker_rss_peak_mb", "train", "system/worker_rss_peak_mb"),
        ("mixture/dedup-qa/count", "train", "mixture/dedup-qa.count"),
        ("calls.made", "instruct", "instruct/calls.made"),
        ("seconds", "dedup", "stage/seconds"),
        ("stages_cached", "run", "run/stages_cached"),
    ],
)
def test_metric_names_have_one_section_each(key: str, group: str, name: str):
    assert metric_name(key, group) == name


def test_progress_inside_a_stage_also_goes_to_its_sink_at_the_log_pace(tmp_path: Path):
    seen: list[tuple[str, int, int]] = []
    with reporting_to(lambda desc, done, total: seen.append((desc, done, total))):
        bar = Progress("eval vqa", 4, mode="log", every_s=3600)
        for _ in range(4):
            bar.update()
    assert seen == [("eval vqa", 1, 4), ("eval vqa", 4, 4)]  # the first look, then done (not every unit)
    Progress("elsewhere", 1, mode="log").update()  # outside the block: no sink
    assert len(seen) == 2

    def broken(desc: str, done: int, total: int) -> None:
        raise ConnectionError("tracking server down")

    with reporting_to(broken):
        Progress("ingest", 2, mode="log").update(2)  # the work goes on

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "progress", tmp_path / "art")
    run = tracker.start("eval-vqa", {})
    for desc, done, total in seen:
        tracker.log_progress(run, desc, done, total)
    points = tracker.client.get_metric_history(run, "progress/eval_vqa")
    assert [(p.step, p.value) for p in points] == [(1, 0.25), (4, 1.0)]
