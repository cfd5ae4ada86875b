"""Streaming at scale: the ingest, dedup (image and caption) and tokenizer stages at 10k to 1M rows.

Each measurement runs the stage's own code through `run_stage` on the Ray executor (the default
executor of a run; dask's joins on Ray through `ray.util.dask`), in a fresh child process so that
its peak RSS is the stage's alone. Ray starts and its workers warm up before the clock starts.

Inputs:
- ingest: real `synthetic-shapes` images (the source renders, decodes, hashes and shards each one);
- dedup and tokenizer: a samples artifact built here, not by ingest (rendering 1M images on two
  cores takes hours): a manifest whose image columns are synthetic (random 64-bit pHashes, random
  8x8 thumbnails, sha256s of row ids: the statistics of distinct web images, not of rendered
  shapes) with planted exact duplicates (the same pixel_sha256/pHash/thumbnail as another row),
  near duplicates (1..threshold pHash bits flipped, thumbnail within +-3), and captions of random
  words with planted exact (case and punctuation changed) and near (last word changed) copies; and
  real WebDataset shards holding each row's JSON record (caption, the synthetic source's VQA pairs
  and multiple-choice items of a sampled scene; no image member: the tokenizer reads text only).

Figures per run: rows, seconds, rows_per_s, peak RSS of the driver (VmHWM of the child) and of
the Ray workers (sampled with psutil every 0.2 s: the largest worker and the largest sum over
workers; Ray's own daemons apart), os.getloadavg() before and after. dedup also checks near-duplicate
recall against an exact all-pairs search (numpy, chunked) on a 20k-row sample, and recall of the
planted caption pairs. Results accumulate in --out by (stage, rows); --plot redraws the figure.

    .venv/bin/python benchmarks/scale.py --stage dedup --rows 100000 [--out FILE] [--plot FILE]
    .venv/bin/python benchmarks/scale.py --plot-only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "scale.json"
DEFAULT_PLOT = HERE.parent / "docs" / "scale.png"
STAGES = ("ingest", "dedup", "tokenizer")
SHARD_SIZE = 1000
RECALL_SAMPLE = 20_000
THRESHOLD, MAX_COLOR = 4, 6.0  # DedupSpec's defaults: pHash bits, mean |RGB| on 8x8 thumbnails
WORDS = 3000  # caption vocabulary
INPUT = "synthetic/input"  # the built artifact's place in the store (its shards' paths start with it)
DISTINCT_SHARDS = 100  # the tokenizer's input: shards of distinct records; later ones link to these


# --- the synthetic samples artifact (pure) ---------------------------------------------------


@dataclass(frozen=True)
class Planted:
    exact: float = 0.02  # rows that copy another row's image
    near: float = 0.03  # rows whose image is a near copy of another's
    caption_exact: float = 0.01  # rows whose caption is another's, re-cased and re-punctuated
    caption_near: float = 0.01  # rows whose caption is another's with one word added (Jaccard >= 0.9)


def _words(rng: np.random.Generator) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(3, 9, WORDS)
    return np.array(["".join(rng.choice(letters, n)) for n in lengths])


def synthetic_manifest(rows: int, seed: int = 0, planted: Planted = Planted()) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(manifest, truth): `rows` manifest rows (the dedup columns and the rest of MANIFEST_SCHEMA) and
    the planted copies (key, of, kind: exact | near | caption-exact | caption-near)."""
    from vlmflow.samples import MANIFEST_SCHEMA

    rng = np.random.default_rng(seed)
    keys = np.array([f"syn-{i:08d}" for i in range(rows)])
    phash = rng.integers(0, 2**64, rows, dtype=np.uint64, endpoint=False)
    thumbs = rng.integers(0, 256, (rows, 192), dtype=np.uint8)
    pixel = np.array([hashlib.sha256(k.encode()).hexdigest() for k in keys])
    copies = rng.permutation(rows)
    n_exact, n_near = int(rows * planted.exact), int(rows * planted.near)
    exact, near = copies[:n_exact], copies[n_exact : n_exact + n_near]
    originals = rng.permutation(copies[n_exact + n_near :])[: n_exact + n_near]  # never a copy themselves
    exact_of, near_of = originals[:n_exact], originals[n_exact:]
    pixel[exact], phash[exact], thumbs[exact] = pixel[exact_of], phash[exact_of], thumbs[exact_of]
    flips = np.zeros(n_near, np.uint64)
    for i, n in enumerate(rng.integers(1, THRESHOLD + 1, n_near)):
        for bit in rng.choice(64, n, replace=False):
            flips[i] |= np.uint64(1) << np.uint64(bit)
    phash[near] = phash[near_of] ^ flips
    noise = rng.integers(-3, 4, (n_near, 192))
    thumbs[near] = np.clip(thumbs[near_of].astype(np.int16) + noise, 0, 255).astype(np.uint8)
    words = _words(rng)
    lengths = rng.integers(12, 21, rows)  # >= 10 word 3-shingles: one added word keeps Jaccard >= 10/11
    ids = rng.integers(0, WORDS, (rows, 20))
    captions = [" ".join(words[ids[i, : lengths[i]]]) for i in range(rows)]
    order = rng.permutation(rows)
    n_cap, n_cap_near = int(rows * planted.caption_exact), int(rows * planted.caption_near)
    cap_copies, cap_originals = order[: n_cap + n_cap_near], order[-(n_cap + n_cap_near) :]
    for copy, original in zip(cap_copies[:n_cap], cap_originals[:n_cap], strict=True):
        captions[copy] = captions[original].upper() + " ."
    for copy, original in zip(cap_copies[n_cap:], cap_originals[n_cap:], strict=True):
        captions[copy] = f"{captions[original]} {words[ids[original, 0]]}zz"
    manifest = pl.DataFrame(
        {
            "key": keys,
            "shard": [f"{INPUT}/shards/{i // SHARD_SIZE:06d}.tar" for i in range(rows)],
            "sha256": pixel,
            "pixel_sha256": pixel,
            "phash": phash,
            "thumb": [t.tobytes() for t in thumbs],
            "width": np.full(rows, 64),
            "height": np.full(rows, 64),
            "mode": "RGB",
            "ext": "png",
            "source": "synthetic",
            "split": "train",
            "caption": captions,
            "captions": [[c] for c in captions],
            "n_captions": np.ones(rows),
            "caption_chars": [len(c) for c in captions],
            "label": None,
            "n_objects": np.zeros(rows),
            "n_qa": np.zeros(rows),
            "n_turns": np.zeros(rows),
            "caption_corrupted": None,
        }
    ).cast(MANIFEST_SCHEMA)
    truth = pl.DataFrame(
        {
            "key": np.concatenate([keys[exact], keys[near], keys[cap_copies]]),
            "of": np.concatenate([keys[exact_of], keys[near_of], keys[cap_originals]]),
            "kind": ["exact"] * n_exact + ["near"] * n_near + ["caption-exact"] * n_cap + ["caption-near"] * n_cap_near,
        }
    )
    return manifest, truth


def near_pairs_all(phash: np.ndarray, thumbs: np.ndarray, threshold: int, max_color: float, chunk: int = 512):
    """Every pair (i, j), i < j, within `threshold` pHash bits and `max_color` mean |thumbnail|
    difference: the exact all-pairs search (numpy, `chunk` rows against all at a time)."""
    phash = phash.astype(np.uint64)
    found: list[tuple[int, int]] = []
    for start in range(0, len(phash), chunk):
        block = phash[start : start + chunk]
        close = np.bitwise_count(block[:, None] ^ phash[None, :]) <= threshold
        for i, j in zip(*np.nonzero(close), strict=True):
            a = start + int(i)
            if a < j and np.abs(thumbs[a].astype(np.int16) - thumbs[j].astype(np.int16)).mean() <= max_color:
                found.append((a, int(j)))
    return found


def roots(duplicate_of: dict[str, str]) -> dict[str, str]:
    """Each quarantined key -> the kept key its `duplicate-of` chain ends at."""
    out: dict[str, str] = {}
    for key in duplicate_of:
        seen, root = [], key
        while root in duplicate_of and root not in seen:
            seen.append(root)
            root = duplicate_of[root]
        out[key] = root
    return out


def pair_recall(pairs: list[tuple[str, str]], duplicate_of: dict[str, str]) -> float:
    """The share of `pairs` that the dedup put in one cluster (both resolve to the same kept key)."""
    if not pairs:
        return 1.0
    root = roots(duplicate_of)
    return sum(root.get(a, a) == root.get(b, b) for a, b in pairs) / len(pairs)


# --- building the inputs ---------------------------------------------------------------------


def _shard_records(args: tuple[Path, int, list[tuple[str, str]], int]) -> None:
    """Write shard `index`'s JSON records (its rows: (key, caption))."""
    root, index, rows, seed = args
    from vlmflow.components.sources.synthetic import choice_items, questions, sample_scene
    from vlmflow.samples import write_shard

    samples = []
    for key, caption in rows:
        rng = np.random.default_rng([seed, int(key[4:])])
        objects = sample_scene(rng, 1, 4)
        qa = questions(objects)
        record = {"key": key, "source": "synthetic", "split": "train", "captions": [caption], "qa": qa}
        record["choices"] = choice_items(qa, rng, 4)
        samples.append({"__key__": key, "json": record})
    write_shard(root / "shards" / f"{index:06d}.tar", samples)


def build_samples(store: Path, rows: int, stage: str, seed: int = 0) -> pl.DataFrame:
    """The dedup or tokenizer input artifact at store/INPUT (manifest, shards listing, quarantine);
    returns the planted copies. Dedup reads the manifest only: its shards are listed, not written.
    The tokenizer reads the shards' JSON records: the first DISTINCT_SHARDS are written (spawned
    processes), later ones are hard links of them, and their manifest rows name the linked shard's
    keys (rendering a distinct record takes ~3 ms of scene sampling: 1M would take most of an hour)."""
    from vlmflow.artifacts import file_sha256
    from vlmflow.samples import QUARANTINE_SCHEMA

    root = store / INPUT
    (root / "shards").mkdir(parents=True)
    manifest, truth = synthetic_manifest(rows, seed)
    shards = (rows + SHARD_SIZE - 1) // SHARD_SIZE
    names = [f"{INPUT}/shards/{i:06d}.tar" for i in range(shards)]
    listing = pl.DataFrame(
        {
            "shard": names,
            "sha256": "0" * 64,
            "bytes": 0,
            "samples": [min(SHARD_SIZE, rows - i * SHARD_SIZE) for i in range(shards)],
        }
    )
    if stage == "tokenizer":
        distinct = min(shards, DISTINCT_SHARDS)
        texts = manifest.select("key", "caption").rows()
        work = [(root, i, texts[i * SHARD_SIZE : (i + 1) * SHARD_SIZE], seed) for i in range(distinct)]
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
            pool.map(_shard_records, work, chunksize=4)
        for i in range(distinct, shards):
            os.link(root / "shards" / f"{i % distinct:06d}.tar", root / "shards" / f"{i:06d}.tar")
        sha = [file_sha256(root / "shards" / f"{i:06d}.tar") for i in range(distinct)]
        listing = listing.with_columns(
            sha256=pl.Series([sha[i % distinct] for i in range(shards)]),
            bytes=pl.Series([(root / "shards" / f"{i:06d}.tar").stat().st_size for i in range(shards)]),
        )
        row = np.arange(rows) % (distinct * SHARD_SIZE)  # the row whose record the linked shard holds
        manifest = manifest.with_columns(key=manifest["key"].gather(row))
    manifest.write_parquet(root / "manifest.parquet", statistics=False)
    pl.DataFrame(schema=QUARANTINE_SCHEMA).write_parquet(root / "quarantine.parquet")
    listing.write_parquet(root / "shards.parquet")
    return truth


# --- one measurement (the child process) ------------------------------------------------------


class WorkerMemory:
    """Peak RSS of the driver's descendant processes, sampled every `period` s: Ray's workers
    (process titles `ray::...`) and Ray's own daemons (raylet, GCS, ...)."""

    def __init__(self, period: float = 0.2):
        import psutil

        self.me, self.period = psutil.Process(), period
        self.worker_max = self.worker_sum = self.system_sum = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.period):
            workers, system = [], []
            for proc in self.me.children(recursive=True):
                try:
                    rss = proc.memory_info().rss
                    title = (proc.cmdline() or [""])[0]
                except psutil.Error:
                    continue
                (workers if title.startswith("ray::") else system).append(rss)
            self.worker_max = max(self.worker_max, max(workers, default=0))
            self.worker_sum = max(self.worker_sum, sum(workers))
            self.system_sum = max(self.system_sum, sum(system))


def _recipe(stage: str, rows: int, store: Path):
    from vlmflow.specs import load_recipe

    partitions = max(2, rows // 25_000)
    steps = {
        "ingest": {
            "uses": "ingest",
            "with": {"sources": [{"kind": "synthetic-shapes", "count": rows}], "shard_size": SHARD_SIZE},
        },
        "dedup": {"uses": "dedup", "inputs": {"data": "input"}, "with": {"partitions": partitions}},
        "tokenizer": {"uses": "tokenizer", "inputs": {"data": "input"}, "with": {"kind": "bpe", "vocab_size": 4096}},
    }
    pipeline = [{"name": stage, **steps[stage]}]
    if stage != "ingest":
        pipeline.insert(0, {"name": "input", "uses": "ingest", "with": {"sources": [{"kind": "synthetic-shapes"}]}})
    spec = {"name": "scale", "seed": 0, "pipeline": pipeline, "runtime": {"executor": "ray", "progress": "log"}}
    path = store / "spec.yaml"
    path.write_text(json.dumps(spec))
    return load_recipe(path)


def measure(stage: str, rows: int, store: Path) -> dict:
    """Run `stage` once on the Ray executor; the figures of this process and its Ray workers."""
    import ray

    from vlmflow.artifacts import ArtifactStore
    from vlmflow.pipeline import recipe_graph
    from vlmflow.runtime.ray import RayExecutor, init_ray
    from vlmflow.stage import StageOutput, run_stage

    recipe = _recipe(stage, rows, store)
    step = next(s for s in recipe_graph(recipe) if s.name == stage)
    inputs = {} if stage == "ingest" else {"data": StageOutput("input", "input", store / INPUT, {})}
    started = time.perf_counter()
    init_ray(recipe.runtime.ray)
    ray.get([ray.remote(num_cpus=1)(_warm).remote() for _ in range(int(ray.cluster_resources()["CPU"]))])
    ray_startup_s = time.perf_counter() - started
    load_before = os.getloadavg()
    with WorkerMemory() as memory:
        started = time.perf_counter()
        _, stats = run_stage(step, "scale", inputs, recipe, ArtifactStore(store), "log", RayExecutor())
        seconds = time.perf_counter() - started
    out = {
        "stage": stage,
        "rows": rows,
        "rows_in": stats["rows_in"],
        "rows_out": stats["rows_out"],
        "rows_quarantined": stats["rows_quarantined"],
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 1),
        "peak_rss_mib": {
            "driver": round(peak_rss() / 2**20, 1),
            "workers_max": round(memory.worker_max / 2**20, 1),
            "workers_sum": round(memory.worker_sum / 2**20, 1),
            "ray_daemons_sum": round(memory.system_sum / 2**20, 1),
        },
        "ray_startup_s": round(ray_startup_s, 2),
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "metrics": stats["metrics"],
        "executor": "ray",
        "partitions": step.config.partitions if stage == "dedup" else None,
    }
    ray.shutdown()
    return out


def peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM, the high-water mark of its own address space. Not
    getrusage's ru_maxrss, which keeps the peak of the process it was forked from (here, the parent
    holding the built input) across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _warm() -> None:
    import importlib

    for stage in ("dedup", "ingest", "tokenize"):  # what the stages import on a worker
        importlib.import_module(f"vlmflow.components.{stage}")

    time.sleep(0.5)  # one warm-up per worker process


# --- dedup's checks -------------------------------------------------------------------------------


def dedup_checks(store: Path, truth: pl.DataFrame) -> dict:
    """Near-duplicate recall against the exact all-pairs search on a RECALL_SAMPLE-row sample; planted
    exact and caption pairs found."""
    out = store / "dedup" / "scale"
    manifest = pl.read_parquet(store / INPUT / "manifest.parquet", columns=["key", "phash", "thumb"])
    quarantine = pl.read_parquet(out / "quarantine.parquet")
    duplicate_of = {k: r.split(":", 1)[1] for k, r in quarantine.select("key", "reason").iter_rows()}
    sample = manifest.sample(min(RECALL_SAMPLE, manifest.height), seed=1, shuffle=False)
    thumbs = np.stack([np.frombuffer(t, np.uint8) for t in sample["thumb"]])
    keys = sample["key"].to_list()
    started = time.perf_counter()
    found = near_pairs_all(sample["phash"].to_numpy(), thumbs, THRESHOLD, MAX_COLOR)
    search_s = time.perf_counter() - started
    pairs = [(keys[i], keys[j]) for i, j in found]
    caption = pl.read_parquet(out / "caption_pairs.parquet")
    caption_found = {tuple(sorted(p)) for p in caption.select("key", "duplicate_of").iter_rows()}

    def planted(kind: str) -> list[tuple[str, str]]:
        return truth.filter(pl.col("kind") == kind).select("key", "of").rows()

    def kept(kind: str) -> list[tuple[str, str]]:  # caption dedup looks at the rows the image dedup keeps
        return [(a, b) for a, b in planted(kind) if a not in duplicate_of and b not in duplicate_of]

    return {
        "recall_sample": len(keys),
        "recall_true_pairs": len(pairs),
        "near_recall": round(pair_recall(pairs, duplicate_of), 5),
        "all_pairs_search_s": round(search_s, 2),
        "planted_exact_recall": round(pair_recall(planted("exact"), duplicate_of), 5),
        "planted_near_recall": round(pair_recall(planted("near"), duplicate_of), 5),
        "planted_caption_recall": {
            kind: round(sum(tuple(sorted(p)) in caption_found for p in kept(kind)) / max(1, len(kept(kind))), 5)
            for kind in ("caption-exact", "caption-near")
        },
    }


# --- the parent: inputs, child, JSON, plot ----------------------------------------------------------


def run_one(stage: str, rows: int, work: Path) -> dict:
    store = work / "store"
    store.mkdir(parents=True)
    truth = None
    built_s = None
    if stage != "ingest":
        started = time.perf_counter()
        truth = build_samples(store, rows, stage)
        built_s = round(time.perf_counter() - started, 1)
    child = subprocess.run(
        [sys.executable, __file__, "--child", "--stage", stage, "--rows", str(rows), "--store", str(store)],
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode != 0:
        raise SystemExit(f"{stage} at {rows} rows failed:\n{child.stderr[-4000:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    result["input"] = "synthetic-shapes images (real, rendered)" if stage == "ingest" else SYNTHETIC_NOTE[stage]
    result["input_build_s"] = built_s
    if stage == "dedup":
        result["checks"] = dedup_checks(store, truth)
    return result


SYNTHETIC_NOTE = {
    "dedup": "built by benchmarks/scale.py, not by ingest: a manifest of synthetic image columns (random pHashes "
    "and 8x8 thumbnails) and random-word captions with planted exact/near image and caption copies; shards "
    "listed, not written (dedup reads the manifest only)",
    "tokenizer": f"built by benchmarks/scale.py, not by ingest: real shards of JSON records (a random-word "
    f"caption, the synthetic source's VQA pairs and multiple-choice items; no image members); beyond "
    f"{DISTINCT_SHARDS * SHARD_SIZE} rows the shards are hard links of the first {DISTINCT_SHARDS} "
    "(their texts repeat)",
}


def merge(out: Path, result: dict) -> dict:
    report = json.loads(out.read_text()) if out.exists() else {"benchmark": "scale", "runs": []}
    report["runs"] = [r for r in report["runs"] if (r["stage"], r["rows"]) != (result["stage"], result["rows"])]
    report["runs"] = sorted(report["runs"] + [result], key=lambda r: (STAGES.index(r["stage"]), r["rows"]))
    report["machine"] = {
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    report["targets"] = targets(report["runs"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def targets(runs: list[dict]) -> dict:
    """The issue's targets per stage, from the smallest and largest N measured."""
    out = {}
    for stage in STAGES:
        mine = sorted((r for r in runs if r["stage"] == stage), key=lambda r: r["rows"])
        if len(mine) < 2:
            continue
        small, large = mine[0], mine[-1]
        entry = {
            "from_rows": small["rows"],
            "to_rows": large["rows"],
            "rows_per_s_ratio": round(large["rows_per_s"] / small["rows_per_s"], 3),
            "rows_per_s_ratio_target": ">= 0.8",
            "driver_rss_ratio": round(large["peak_rss_mib"]["driver"] / small["peak_rss_mib"]["driver"], 3),
            "driver_rss_ratio_target": "<= 1.5",
        }
        if stage == "dedup":
            entry["seconds_at_largest"] = large["seconds"]
            entry["seconds_target_at_1M"] = "< 300"
            entry["near_recall_at_largest"] = large.get("checks", {}).get("near_recall")
        out[stage] = entry
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for stage, color in zip(STAGES, ("tab:blue", "tab:orange", "tab:green"), strict=True):  # one colour per stage
        runs = sorted((r for r in report["runs"] if r["stage"] == stage), key=lambda r: r["rows"])
        if not runs:
            continue
        n = [r["rows"] for r in runs]
        speed.plot(n, [r["rows_per_s"] for r in runs], marker="o", color=color, label=stage)
        memory.plot(n, [r["peak_rss_mib"]["driver"] for r in runs], marker="o", color=color, label=f"{stage} driver")
        workers = [r["peak_rss_mib"]["workers_max"] for r in runs]
        memory.plot(n, workers, marker="x", ls="--", color=color, label=f"{stage} largest worker")
    for axis, label in ((speed, "rows/s"), (memory, "peak RSS (MiB)")):
        axis.set_xscale("log")
        axis.set_xlabel("rows (N)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    speed.set_title("throughput")
    memory.set_title("peak memory")
    fig.suptitle(f"vlmflow stages at scale ({report['machine']['cpu_count']} CPUs, Ray executor)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def table(report: dict) -> str:
    lines = ["| stage | rows | seconds | rows/s | driver MiB | worker max MiB | workers sum MiB | load (1 min) |"]
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in report["runs"]:
        m = r["peak_rss_mib"]
        lines.append(
            f"| {r['stage']} | {r['rows']} | {r['seconds']:.1f} | {r['rows_per_s']:.0f} | {m['driver']:.0f} | "
            f"{m['workers_max']:.0f} | {m['workers_sum']:.0f} | {r['loadavg_before'][0]:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=STAGES)
    parser.add_argument("--rows", type=int, help="N: rows of the input (ingest: images generated)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"JSON results, merged by (stage, rows) (default {DEFAULT_OUT})"
    )
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help=f"the figure (default {DEFAULT_PLOT})")
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure and print the table from --out")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.plot_only and (args.stage is None or args.rows is None or args.rows < 1):
        parser.error("--stage and --rows (>= 1) are required, or --plot-only")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.stage, args.rows, args.store)))
        return 0
    if not args.plot_only:
        with tempfile.TemporaryDirectory(prefix="vlmflow-scale-", dir=args.work) as tmp:
            result = run_one(args.stage, args.rows, Path(tmp))
            shutil.rmtree(tmp, ignore_errors=True)
        merge(args.out, result)
        print(json.dumps({k: v for k, v in result.items() if k != "metrics"}, indent=2), file=sys.stderr)
    report = json.loads(args.out.read_text())
    plot(report, args.plot)
    print(table(report))
    print(json.dumps(report["targets"], indent=2))
    print(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
