"""The fixed cost of a training stage's Ray Train run: `fit()` wall clock of a trainer whose
workers only report once, vlmflow's Trainer (components/train/stage.py: Ray Train's TorchTrainer
without its PlacementGroupCleaner, see without_placement_group_cleaner for why no public Ray
setting does this) vs Ray Train's own TorchTrainer, alternated on one local Ray so both sides see
the same machine. Every training stage pays this on top of its steps.

    .venv/bin/python benchmarks/train_overhead.py [--repeats 3] [--workers 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from vlmflow.components.train.stage import Trainer

REPO = Path(__file__).resolve().parents[1]


def report_once(config: dict) -> None:
    import ray.train

    ray.train.report({"step": 1})


def timed_fit(cls: type, workers: int, storage: Path, name: str) -> float:
    trainer = cls(
        report_once,
        scaling_config=ScalingConfig(num_workers=workers),
        run_config=RunConfig(name=name, storage_path=str(storage)),
    )
    started = time.monotonic()
    trainer.fit()
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train_overhead.json")
    args = parser.parse_args()
    sides = {"vlmflow Trainer": Trainer, "Ray TorchTrainer": TorchTrainer}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    ray.init(address="local", num_cpus=max(2, args.workers), log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            timed_fit(Trainer, args.workers, Path(tmp), "warmup")  # worker processes, imports
            for repeat in range(args.repeats):
                for name, cls in sides.items():
                    seconds[name].append(timed_fit(cls, args.workers, Path(tmp), f"{cls.__name__}-{repeat}"))
                    print(f"  {name} #{repeat + 1}: {seconds[name][-1]:.1f} s", flush=True)
    finally:
        ray.shutdown()
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    ours, theirs = medians["vlmflow Trainer"], medians["Ray TorchTrainer"]
    print(f"\n| trainer | fit() s, median of {args.repeats} | all |")
    print("|---|---|---|")
    for name, values in seconds.items():
        print(f"| {name} | {medians[name]:.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
    print(f"\nRay TorchTrainer / vlmflow Trainer: {theirs / ours:.2f}x; saved per stage: {theirs - ours:.1f} s")
    report = {
        "benchmark": "train_overhead",
        "workers": args.workers,
        "repeats": args.repeats,
        "seconds": seconds,
        "median_seconds": medians,
        "ratio_ray_over_vlmflow": theirs / ours,
        "saved_seconds_per_stage": theirs - ours,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "ray": ray.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
