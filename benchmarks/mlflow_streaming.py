"""What live MLflow tracking costs a training stage: the same training steps with the driver
streaming the stage's history into an MLflow run (HistoryTail: every 2 s, vlmflow's default,
and every 0.2 s, ten times as often) vs with nothing reading the history, alternated on one
local Ray so every side sees the same machine. The workers only append a line to
`history.jsonl` per step in all three; the driver thread reads it and logs batches to MLflow
(sqlite, as a default run does). Beside the rates (noisy on a shared machine), the share of the
training's wall time the driver spent inside MLflow's client logging the points.

    .venv/bin/python benchmarks/mlflow_streaming.py [--steps 60] [--warmup 5] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import ray
from train_step import REPO, bench_recipe, data_stages, stage_config

from vlmflow.components.train.stage import fit
from vlmflow.specs import load_recipe
from vlmflow.tracking import HistoryTail, Tracker

SIDES = {"no streaming": None, "every 2 s (default)": 2.0, "every 0.2 s": 0.2}


def timed(recipe, config, interval: float | None, tracker: Tracker, warmup: int) -> tuple[float, int, float, float]:
    """Median samples/s after warm-up, the points logged to MLflow, the seconds the driver spent
    logging them (inside MLflow's client) and the training's wall seconds."""
    out = Path(config.out)
    tail, spent = None, [0.0]
    if interval is not None:
        run = tracker.start(f"stream-{interval}", {})

        def log(rows: list[dict]) -> None:
            started = time.perf_counter()
            tracker.log_history(run, rows, "train")
            spent[0] += time.perf_counter() - started

        tail = HistoryTail(log, [out / "history.jsonl"], threading.RLock(), interval).start()
    started = time.perf_counter()
    fit(config, recipe, f"bench-{interval}", out / "ray")
    wall = time.perf_counter() - started
    logged = tail.stop() if tail is not None else 0
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return float(np.median([r["samples_per_s"] for r in rows[warmup:]])), logged, spent[0], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=REPO / "specs" / "recipes" / "shapes-tiny.yaml")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vlmflow-bench-train")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "mlflow_streaming.json")
    args = parser.parse_args()
    recipe = load_recipe(args.spec)
    artifacts = data_stages(args.spec, args.workdir)
    store = args.workdir / "artifacts"
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    rates: dict[str, list[float]] = {side: [] for side in SIDES}
    points: dict[str, int] = dict.fromkeys(SIDES, 0)
    logging_share: dict[str, list[float]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        tracker = Tracker(f"sqlite:///{Path(tmp) / 'mlflow.db'}", "streaming", Path(tmp) / "mlartifacts")
        bench = bench_recipe(recipe, args.steps, args.workers)
        order = list(SIDES.items())
        for repeat in range(args.repeats):
            # Alternated, each repeat starting one side later: a slow spell of the machine, or
            # the first fit's warm-up, falls on every side in turn.
            for side, interval in order[repeat % len(order) :] + order[: repeat % len(order)]:
                config = stage_config(bench, artifacts, store, Path(tmp) / f"{repeat}-{interval}")
                rate, logged, spent, wall = timed(bench, config, interval, tracker, args.warmup)
                rates[side].append(rate)
                points[side] = logged
                logging_share[side].append(spent / wall)
    ray.shutdown()
    base = statistics.median(rates["no streaming"])
    rows = [
        {"side": side, "samples_per_s": statistics.median(values), "runs": values,
         "ratio": statistics.median(values) / base, "steps_logged": points[side],
         "logging_share": statistics.median(logging_share[side])}
        for side, values in rates.items()
    ]  # fmt: skip
    print(f"\nlive MLflow streaming, {recipe.name} stage {recipe.stages[-1].name}, {args.steps} steps, "
          f"{args.workers} worker(s), {args.repeats} alternated repeats (median samples/s after warm-up)")  # fmt: skip
    print(f"{'side':<22}{'samples/s':>11}{'ratio':>8}{'steps logged':>14}{'logging / wall':>16}")
    for r in rows:
        print(f"{r['side']:<22}{r['samples_per_s']:>11.2f}{r['ratio']:>8.3f}{r['steps_logged']:>14}"
              f"{r['logging_share']:>16.2%}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"spec": str(args.spec), "steps": args.steps, "machine": platform.platform(), "rows": rows}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
