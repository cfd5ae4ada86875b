"""Ingest throughput: vlmflow (Ray, one task per shard) vs a plain single-process PIL loop.

Both sides turn the same `synthetic-shapes` rows (same generator, same seed, so the same
PNG bytes) into tar shards of `--shard-size` samples (png + json members) plus a manifest
with the usual per-image facts (size, sha256 of the bytes, sha256 of the pixels, pHash,
8x8 thumbnail). The vlmflow side is `plan_units` + `map_units(process_unit, ...)`: the
distributed per-shard work of the ingest stage (generation, decode/check, pHash, filters,
atomic shard write, per-unit manifest). Ray startup is timed on its own and left out of the
throughput. The run fails loudly when the two outputs disagree.

    .venv/bin/python benchmarks/ingest.py [--count 4000] [--shard-size 500] [--image-size 64]
                                          [--num-cpus N] [--repeats 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import imagehash
import polars as pl
import ray
from PIL import Image

from vlmflow.components.ingest import plan_units, process_unit
from vlmflow.components.sources.synthetic import make_row
from vlmflow.runtime.ray import init_ray, map_units
from vlmflow.samples import read_shard
from vlmflow.specs.data import SyntheticShapesSource
from vlmflow.specs.loader import Marked, validate
from vlmflow.specs.recipe import Recipe

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ingest.json"
SEED = 0
SOURCE = "synthetic-shapes"  # the source's default name: the prefix of every key
CHECK_KEYS = 5  # PNG bytes compared for this many keys spread over the dataset


def build_recipe(count: int, image_size: int, shard_size: int, num_cpus: int | None, spec_dir: Path) -> Recipe:
    data = {
        "name": "bench-ingest",
        "seed": SEED,
        "data": {
            "sources": [{"kind": SOURCE, "count": count, "image_size": image_size, "seed": SEED}],
            "shard_size": shard_size,
        },
        "runtime": {"ray": {"num_cpus": num_cpus}, "progress": "log"},
    }
    return validate(Marked(data), spec_dir / "spec.yaml")


# --- warm-up -----------------------------------------------------------------------------


def _warm(spec: SyntheticShapesSource) -> int:
    """One image's work, untimed: imports (imagehash loads scipy on first use), PNG codecs."""
    from vlmflow.components import ingest  # noqa: F401  (what process_unit imports on a worker)
    from vlmflow.images import check_image

    check_image(make_row(spec, SEED, 0).image)
    time.sleep(0.5)  # hold the worker so each warm-up task lands on its own process
    return os.getpid()


def warm_up(spec: SyntheticShapesSource, workers: int) -> float:
    """Start and warm one Ray worker per CPU, and warm the driver. Returns seconds."""
    started = time.perf_counter()
    remote = ray.remote(num_cpus=1)(_warm)
    ray.get([remote.remote(spec) for _ in range(workers)])
    _warm(spec)
    return time.perf_counter() - started


# --- vlmflow -----------------------------------------------------------------------------


def run_vlmflow(recipe: Recipe, out_dir: Path) -> tuple[int, float]:
    """The ingest stage's distributed part. Returns (samples written, seconds)."""
    started = time.perf_counter()
    work = plan_units(recipe.data, recipe.seed)
    filters = list(recipe.data.filters)
    map_units(process_unit, work, desc="ingest", args=(filters, str(out_dir), "ingest/bench/shards"), progress="log")
    seconds = time.perf_counter() - started
    images = sum(pl.read_parquet(p).height for p in (out_dir / "units").glob("*.manifest.parquet"))
    return images, seconds


# --- plain single-process loop -----------------------------------------------------------


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o444
    tar.addfile(info, io.BytesIO(payload))


def _write_tar(path: Path, samples: list[tuple[str, bytes, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, png, meta in samples:
            _add_member(tar, f"{key}.png", png)
            _add_member(tar, f"{key}.json", meta)


def run_plain(spec: SyntheticShapesSource, shard_size: int, out_dir: Path) -> tuple[int, float]:
    """Generate, decode, hash and shard every image in one process. Returns (samples, seconds)."""
    started = time.perf_counter()
    shards = out_dir / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    manifest: list[dict] = []
    samples: list[tuple[str, bytes, bytes]] = []
    shard_index = 0
    for index in range(spec.count):
        row = make_row(spec, SEED, index)
        key = f"{SOURCE}-{row.key}"
        image = Image.open(io.BytesIO(row.image))
        image.load()
        rgb = image.convert("RGB")
        shard_name = f"{SOURCE}-{shard_index:06d}.tar"
        manifest.append(
            {
                "key": key,
                "shard": shard_name,
                "sha256": hashlib.sha256(row.image).hexdigest(),
                "pixel_sha256": hashlib.sha256(f"{rgb.width}x{rgb.height}".encode() + rgb.tobytes()).hexdigest(),
                "phash": int(str(imagehash.phash(rgb)), 16),
                "thumb": rgb.resize((8, 8), Image.Resampling.BOX).tobytes(),
                "width": image.width,
                "height": image.height,
                "mode": image.mode,
                "caption": row.captions[0],
                "label": row.label,
            }
        )
        meta = {"key": key, "source": SOURCE, "split": row.split or spec.split, "captions": row.captions}
        meta |= {"label": row.label, **row.extra}
        samples.append((key, row.image, json.dumps(meta, sort_keys=True).encode()))
        if len(samples) == shard_size:
            _write_tar(shards / shard_name, samples)
            samples, shard_index = [], shard_index + 1
    if samples:
        _write_tar(shards / f"{SOURCE}-{shard_index:06d}.tar", samples)
    schema = {"phash": pl.UInt64, "width": pl.Int32, "height": pl.Int32}
    pl.DataFrame(manifest).cast(schema).write_parquet(out_dir / "manifest.parquet", statistics=False)
    return len(manifest), time.perf_counter() - started


# --- checks and report -------------------------------------------------------------------


def _pngs(shard_dir: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for path in sorted(shard_dir.glob("*.tar")):
        for sample in read_shard(path):
            out[sample["__key__"]] = sample["png"]
    return out


def verify(vlmflow_dir: Path, plain_dir: Path, count: int, vlmflow_images: int, plain_images: int) -> None:
    """Same number of samples, same keys, identical PNG bytes for a few keys; raise otherwise."""
    if not (vlmflow_images == plain_images == count):
        raise AssertionError(f"sample counts differ: vlmflow {vlmflow_images}, plain {plain_images}, wanted {count}")
    ours, theirs = _pngs(vlmflow_dir / "shards"), _pngs(plain_dir / "shards")
    if len(ours) != count or ours.keys() != theirs.keys():
        raise AssertionError(f"shard keys differ: vlmflow {len(ours)} keys, plain {len(theirs)} keys")
    keys = sorted(ours)
    picks = sorted({keys[round(i * (len(keys) - 1) / max(CHECK_KEYS - 1, 1))] for i in range(CHECK_KEYS)})
    for key in picks:
        if ours[key] != theirs[key]:
            raise AssertionError(f"PNG bytes differ for {key}")


def summarise(images: int, seconds: list[float]) -> dict:
    best, median = min(seconds), statistics.median(seconds)
    return {
        "images": images,
        "seconds": [round(s, 4) for s in seconds],
        "best_s": round(best, 4),
        "median_s": round(median, 4),
        "images_per_s_best": round(images / best, 2),
        "images_per_s_median": round(images / median, 2),
    }


def table(results: dict, repeats: int) -> str:
    extra = repeats > 1
    header = "| pipeline | images | seconds | images/s |" + (" images/s (median) |" if extra else "")
    lines = [header, "|---|---:|---:|---:|" + ("---:|" if extra else "")]
    for name, label in (("vlmflow", "vlmflow (ray)"), ("plain", "plain loop (PIL, 1 process)")):
        r = results[name]
        line = f"| {label} | {r['images']} | {r['best_s']:.2f} | {r['images_per_s_best']:.1f} |"
        lines.append(line + (f" {r['images_per_s_median']:.1f} |" if extra else ""))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=4000, help="images to ingest (default 4000)")
    parser.add_argument("--shard-size", type=int, default=500, help="samples per shard (default 500)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each pipeline; best and median reported")
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the untimed warm-up (worker start, imports): the first run then pays for it",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    for name in ("count", "shard_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_cpus is not None and args.num_cpus < 1:
        parser.error("--num-cpus must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vlmflow-bench-ingest-") as tmp:
        root = Path(tmp)
        recipe = build_recipe(args.count, args.image_size, args.shard_size, args.num_cpus, root)
        spec = recipe.data.sources[0]
        started = time.perf_counter()
        init_ray(recipe.runtime.ray)
        ray_startup_s = time.perf_counter() - started
        ray_cpus = int(ray.cluster_resources().get("CPU", 0))
        warmup_s = warm_up(spec, ray_cpus) if args.warmup else None
        try:
            times: dict[str, list[float]] = {"vlmflow": [], "plain": []}
            counts: dict[str, int] = {}
            for repeat in range(args.repeats):
                vlm_dir, plain_dir = root / f"vlmflow-{repeat}", root / f"plain-{repeat}"
                counts["vlmflow"], seconds = run_vlmflow(recipe, vlm_dir)
                times["vlmflow"].append(seconds)
                counts["plain"], seconds = run_plain(spec, args.shard_size, plain_dir)
                times["plain"].append(seconds)
                verify(vlm_dir, plain_dir, args.count, counts["vlmflow"], counts["plain"])
                shutil.rmtree(vlm_dir)
                shutil.rmtree(plain_dir)
                print(
                    f"repeat {repeat + 1}/{args.repeats}: vlmflow {times['vlmflow'][-1]:.2f}s, "
                    f"plain {times['plain'][-1]:.2f}s (outputs match)",
                    file=sys.stderr,
                )
        finally:
            ray.shutdown()

    results = {name: summarise(counts[name], times[name]) for name in ("vlmflow", "plain")}
    rate = {name: (counts[name] / min(times[name]), counts[name] / statistics.median(times[name])) for name in times}
    ratio_best, ratio_median = (rate["vlmflow"][i] / rate["plain"][i] for i in (0, 1))
    print(table(results, args.repeats))
    print()
    median_note = f" (median {ratio_median:.2f}x)" if args.repeats > 1 else ""
    warm_note = f", worker warm-up {warmup_s:.2f}s" if warmup_s is not None else ", no warm-up (first run is cold)"
    print(f"ratio (vlmflow / plain loop): {ratio_best:.2f}x{median_note}")
    print(f"cpus: {os.cpu_count()} (ray: {ray_cpus})")
    print(f"ray startup: {ray_startup_s:.2f}s{warm_note} (not in the throughput)")
    config = f"count={args.count} shard_size={args.shard_size} image_size={args.image_size} repeats={args.repeats}"
    print(f"config: {config}")

    report = {
        "benchmark": "ingest",
        "config": {
            "count": args.count,
            "shard_size": args.shard_size,
            "image_size": args.image_size,
            "num_cpus": args.num_cpus,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "seed": SEED,
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "ray_cpus": ray_cpus,
            "platform": platform.platform(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "ray": ray.__version__,
        },
        "ray_startup_s": round(ray_startup_s, 4),
        "warmup_s": round(warmup_s, 4) if warmup_s is not None else None,
        "results": results,
        "ratio_best": round(ratio_best, 4),
        "ratio_median": round(ratio_median, 4),
        "verified": True,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
