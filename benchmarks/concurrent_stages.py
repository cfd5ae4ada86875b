"""Independent stages side by side: one graph run by `RecipeRun.run_graph` (each stage a Prefect
task, submitted once its inputs are done) vs the same graph one stage after another as the flows
ran it before (`run_graph(..., sequential=True)`: one stage at a time, in graph order), alternated
in one Prefect flow on one Ray and one MLflow.

The graph: `--sleepers` stages that each wait `--sleep` s without using the CPU (standing for
waiting on Ray actors or remote work), `--ray-stages` stages that each run one Ray task of
`--ray-seconds` s of CPU work (1 CPU), and a cheap `collect` stage that reads them all. Every
run uses fresh digests (a nonce in the steps' configs), so every stage is computed. Prefect's
ephemeral server, Ray start-up and a warm-up Ray task per CPU are not timed.

    .venv/bin/python benchmarks/concurrent_stages.py [--repeats 3] [--sleepers 3] [--sleep 2.0]
        [--ray-stages 1] [--ray-seconds 1.0] [--num-cpus 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def busy(seconds: float) -> float:
    """CPU work: spin until this process has used `seconds` of CPU time."""
    end = time.process_time() + seconds
    x = 0.0
    while time.process_time() < end:
        x += 1.0
    return x


def build_graph(args: argparse.Namespace, remote: Any) -> list[Any]:
    """The graph's steps: one hand-made component per kind of work (sleep, Ray task, nothing),
    each step's config holding a nonce so that every stage is computed."""
    import ray

    from vlmflow.component import Component
    from vlmflow.pipeline import Step
    from vlmflow.specs.base import StrictModel
    from vlmflow.stage import StageResult

    class Work(StrictModel):
        nonce: str
        seconds: float = 0.0

    def component(name: str, work: Any) -> Component:
        def run(ctx: Any) -> StageResult:
            work(ctx.config.seconds)
            (ctx.out / "done.txt").write_text(ctx.name)
            return StageResult(rows_in=1, rows_out=1, rows_quarantined=0)

        # The cache key covers this file's code (run's module is __main__, which has no source to hash).
        return Component(name=name, config=Work, writes="samples", run=run, code=(Path(__file__).stem,))

    sleep = component("bench-sleep", time.sleep)
    ray_task = component("bench-ray", lambda seconds: ray.get(remote.remote(seconds)))
    collect = component("bench-collect", lambda seconds: None)
    nonce = secrets.token_hex(4)
    steps = [Step(f"sleep-{i}", sleep, Work(nonce=nonce, seconds=args.sleep)) for i in range(args.sleepers)]
    steps += [Step(f"ray-{i}", ray_task, Work(nonce=nonce, seconds=args.ray_seconds)) for i in range(args.ray_stages)]
    steps.append(Step("collect", collect, Work(nonce=nonce), {s.name: s.name for s in steps}))
    return steps


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, list[float]]:
    import ray
    from prefect import flow

    from vlmflow.plan import Plan
    from vlmflow.runtime.prefect import RecipeRun
    from vlmflow.specs import load_recipe

    spec = REPO / "specs" / "recipes" / "shapes-tiny.yaml"
    recipe = load_recipe(spec, [f"runtime.ray.num_cpus={args.num_cpus}"])
    seconds: dict[str, list[float]] = {"one after another": [], "run_graph": []}

    @flow(name="benchmark-concurrent-stages", validate_parameters=False)
    def bench() -> None:
        with RecipeRun(recipe, workdir, str(spec), Plan.empty(recipe, workdir), flow="benchmark") as run:
            remote = ray.remote(num_cpus=1)(busy)
            ray.get([remote.remote(0.05) for _ in range(args.num_cpus)])  # worker processes (warm-up)
            for repeat in range(args.repeats):
                for side in seconds:
                    nodes = build_graph(args, remote)
                    started = time.monotonic()
                    run.run_graph(nodes, sequential=side == "one after another")
                    seconds[side].append(time.monotonic() - started)
                    print(f"  {side} #{repeat + 1}: {seconds[side][-1]:.2f} s", flush=True)

    bench()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sleepers", type=int, default=3)
    parser.add_argument("--sleep", type=float, default=2.0)
    parser.add_argument("--ray-stages", type=int, default=1)
    parser.add_argument("--ray-seconds", type=float, default=1.0)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "concurrent_stages.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="vlmflow-bench-") as tmp:
        # As `vlmflow run` does: Prefect's ephemeral server with its database in the workdir.
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
        if "PREFECT_API_URL" not in os.environ:
            os.environ["PREFECT_HOME"] = str(Path(tmp) / "prefect")
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        seconds = measure(args, Path(tmp))
    medians = {side: statistics.median(values) for side, values in seconds.items()}
    work = args.sleepers * args.sleep + args.ray_stages * args.ray_seconds
    # With enough CPUs for the Ray tasks, the longest stage bounds the graph.
    longest = max([args.sleep] * bool(args.sleepers) + [args.ray_seconds] * bool(args.ray_stages))
    ratio = medians["one after another"] / medians["run_graph"]
    stages = args.sleepers + args.ray_stages + 1
    print(f"\n| graph ({stages} stages) | s, median of {args.repeats} | all | ideal s |")
    print("|---|---:|---|---:|")
    for side, values in seconds.items():
        ideal = work if side == "one after another" else longest
        print(f"| {side} | {medians[side]:.2f} | {', '.join(f'{v:.2f}' for v in values)} | {ideal:.2f} |")
    print(f"\none after another / run_graph: {ratio:.2f}x (ideal {work / longest:.2f}x)")
    report = {
        "benchmark": "concurrent_stages",
        "graph": {
            "sleepers": args.sleepers,
            "sleep_s": args.sleep,
            "ray_stages": args.ray_stages,
            "ray_cpu_s": args.ray_seconds,
            "stages": stages,
        },
        "repeats": args.repeats,
        "seconds": seconds,
        "median_seconds": medians,
        "ideal_seconds": {"one after another": work, "run_graph": longest},
        "ratio": ratio,
        "ideal_ratio": work / longest,
        "num_cpus": args.num_cpus,
        "cpus": os.cpu_count(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "python": platform.python_version(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
