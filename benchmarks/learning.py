"""Does a recipe learn? Runs recipes with several seeds and sets every metric of their training
checks and evaluation stages beside its own baseline (`X_baseline`, `X_chance`, `X_majority`,
written by the stage itself): a model that learned nothing scores at its baselines.

Each (recipe, seed) runs `vlmflow run RECIPE --set seed=SEED` in its own workdir under --workdir,
so a second call reuses what the first computed (and reports the run as cached). The table says
per metric whether it beats its baseline; the JSON holds every row and, per recipe, whether all of
its evaluation metrics (the `eval-*` stages) beat theirs with every seed.

    .venv/bin/python benchmarks/learning.py [--recipes shapes-tiny ...] [--seeds 17 18 19]
        [--workdir learning-work] [--out benchmarks/results/learning.json] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from vlmflow.results import with_baselines

REPO = Path(__file__).resolve().parents[1]


def stage_metrics(stage: dict) -> dict[str, float]:
    folder = Path(stage["artifact_path"])
    for name in ("metrics.json", "eval.json"):  # evaluation stages, training stages' held-out checks
        if (folder / name).is_file():
            data = json.loads((folder / name).read_text())
            return {k: v for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return {}


def run(recipe: str, seed: int, workdir: Path, overrides: list[str]) -> tuple[dict, float, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"seed-{seed}.log"
    command = [str(REPO / ".venv" / "bin" / "vlmflow"), "-q", "run", recipe, "--workdir", str(workdir)]
    command += ["--set", f"seed={seed}", *[a for o in overrides for a in ("--set", o)]]
    started = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{recipe} seed {seed} failed (exit {done.returncode}): see {log}")
    return json.loads((workdir / "runs" / "latest" / "summary.json").read_text()), seconds, log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["shapes-tiny"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[17, 18, 19])
    parser.add_argument("--workdir", type=Path, default=REPO / "learning-work")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "learning.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    rows, runs = [], []
    for recipe in args.recipes:
        for seed in args.seeds:
            summary, seconds, log = run(recipe, seed, args.workdir / recipe, args.overrides)
            computed = [s["name"] for s in summary["stages"] if s["status"] == "computed"]
            runs.append({"recipe": recipe, "seed": seed, "seconds": round(seconds, 1), "computed": computed,
                         "run_id": summary["run_id"], "log": str(log)})  # fmt: skip
            for stage in summary["stages"]:
                for metric, value, baseline, base in with_baselines(stage_metrics(stage)):
                    rows.append({"recipe": recipe, "seed": seed, "stage": stage["name"], "metric": metric,
                                 "value": value, "baseline": baseline, "baseline_value": base,
                                 "beats": value > base})  # fmt: skip
    verdict = {
        recipe: all(r["beats"] for r in rows if r["recipe"] == recipe and r["stage"].startswith("eval-"))
        for recipe in args.recipes
    }
    print(f"{'recipe':<16} {'seed':>4} {'stage':<16} {'metric':<22} {'value':>7} {'baseline':>8}  beats")
    for r in rows:
        print(f"{r['recipe']:<16} {r['seed']:>4} {r['stage']:<16} {r['metric']:<22} {r['value']:>7.3f} "
              f"{r['baseline_value']:>8.3f}  {'yes' if r['beats'] else 'NO'}")  # fmt: skip
    for item in runs:
        state = f"computed {len(item['computed'])} stages" if item["computed"] else "all cached"
        print(f"{item['recipe']} seed {item['seed']}: {item['seconds']} s ({state})")
    for recipe, ok in verdict.items():
        print(f"{recipe}: every evaluation metric beats its baseline with every seed: {'yes' if ok else 'NO'}")
    result = {"machine": platform.platform(), "seeds": args.seeds, "overrides": args.overrides, "runs": runs,
              "rows": rows, "all_evaluation_metrics_beat_baselines": verdict}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
