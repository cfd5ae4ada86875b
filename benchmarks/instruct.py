"""Instruct throughput: the OpenAI-compatible backend against `vlmflow mock-llm`, beside the ideal.

The mock runs in its own process (`vlmflow mock-llm --latency-ms L`), so it does not share the
client's event loop. With C requests in flight and L ms per reply, the mock's capacity is
C / L requests per second: the ideal. The client side is the stage's real path: prompts from
the templates (system prompt + few-shot examples + the image context), `OpenAIBackend`
(aiohttp, bounded concurrency, reply validation, the sqlite response cache written per reply).
Every timed run starts from an empty cache; a warm-up run (other images) is not timed. With
`--fault-rate`, a second row runs with that share of faults (not comparable to the ideal).

    .venv/bin/python benchmarks/instruct.py [--items 3000] [--concurrency 32] [--latency-ms 50]
                                            [--repeats 3] [--fault-rate 0.1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from vlmflow.components.instruct.backends import Item, OpenAIBackend
from vlmflow.components.instruct.cache import ResponseCache
from vlmflow.components.instruct.context import build_context
from vlmflow.components.instruct.stage import assign_task
from vlmflow.components.instruct.templates import load_templates
from vlmflow.components.sources.synthetic import make_row
from vlmflow.specs.data import SyntheticShapesSource
from vlmflow.specs.instruct import LLAVA_MIX, OpenAICompatibleGenerator

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "instruct.json"
TARGET = 0.90


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mock(latency_ms: float, fault_rate: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "vlmflow.cli", "mock-llm", "--port", str(port), "--latency-ms", str(latency_ms)]
    command += ["--fault-rate", str(fault_rate), "--slow-s", "5", "--retry-after-s", "0.2"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{base}/models", timeout=1).read()
            return proc, base
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("mock-llm did not start")


def mock_stats(base: str) -> dict:
    return json.load(urllib.request.urlopen(base.replace("/v1", "/_mock/stats"), timeout=5))


def make_items(count: int, offset: int) -> list[Item]:
    source = SyntheticShapesSource(kind="synthetic-shapes", max_objects=6)
    items = []
    for index in range(offset, offset + count):
        row = make_row(source, 0, index)
        key = f"bench-{index:08d}"
        task = assign_task(0, key, LLAVA_MIX)
        items.append(Item(f"{key}-{task}", key, task, build_context({"captions": row.captions, **row.extra})))
    return items


def run_once(base: str, items: list[Item], concurrency: int, latency_s: float) -> dict:
    spec = OpenAICompatibleGenerator(
        kind="openai-compatible",
        base_url=base,
        model="mock-llm",
        api_key_env=None,
        concurrency=concurrency,
        timeout_s=max(2.0, 20 * latency_s),
        backoff_base_s=0.05,
        max_retries=10,
    )
    with tempfile.TemporaryDirectory() as tmp:
        cache = ResponseCache(Path(tmp) / "responses.sqlite")
        backend = OpenAIBackend(spec, load_templates(), cache, None, progress="log")
        before = mock_stats(base).get("requests", 0)
        started = time.perf_counter()
        outcomes = backend.generate(items)
        seconds = time.perf_counter() - started
        requests = mock_stats(base).get("requests", 0) - before
        cache.close()
    failed = Counter(o.reason for o in outcomes.values() if o.turns is None)
    latencies = sorted(backend.stats.latencies)
    return {
        "items": len(items),
        "requests": requests,
        "seconds": seconds,
        "items_per_s": len(items) / seconds,
        "requests_per_s": requests / seconds,
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": latencies[int(0.95 * (len(latencies) - 1))],
        "completed": len(items) - sum(failed.values()),
        "not_completed": dict(failed),  # e.g. invalid-reply:truncated after max_reasks re-asks
        "reasked": backend.stats.reasked,
        "retried": backend.stats.retried,
    }


def bench(args: argparse.Namespace, fault_rate: float) -> dict:
    proc, base = start_mock(args.latency_ms, fault_rate)
    try:
        latency_s = args.latency_ms / 1000
        run_once(base, make_items(2 * args.concurrency, 10_000_000), args.concurrency, latency_s)  # warm-up
        single = run_once(base, make_items(40, 20_000_000), 1, latency_s)  # one request at a time: the floor
        runs = [
            run_once(base, make_items(args.items, r * args.items), args.concurrency, latency_s)
            for r in range(args.repeats)
        ]
    finally:
        proc.terminate()
        proc.wait(30)
    ideal = args.concurrency / latency_s
    median = sorted(runs, key=lambda r: r["items_per_s"])[len(runs) // 2]
    return {
        "fault_rate": fault_rate,
        "ideal_requests_per_s": ideal,
        "single_request_latency_s": single["latency_p50_s"],
        "median": median,
        "ratio": median["requests_per_s"] / ideal,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fault-rate", type=float, default=0.0, help="also run a row with this fault rate")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    rows = [bench(args, 0.0)]
    if args.fault_rate > 0:
        rows.append(bench(args, args.fault_rate))
    print(f"\ninstruct backend vs mock-llm: concurrency {args.concurrency}, latency {args.latency_ms:g} ms, "
          f"{args.items} items x {args.repeats} runs (median shown)")  # fmt: skip
    header = f"{'faults':>7}{'ideal req/s':>13}{'req/s':>9}{'items/s':>9}{'ratio':>8}{'p50 ms':>8}{'p95 ms':>8}"
    print(header + f"{'s':>7}{'1-req ms':>10}")
    for row in rows:
        m = row["median"]
        print(
            f"{row['fault_rate']:>7.0%}{row['ideal_requests_per_s']:>13.1f}{m['requests_per_s']:>9.1f}"
            f"{m['items_per_s']:>9.1f}{row['ratio']:>8.1%}{1000 * m['latency_p50_s']:>8.1f}"
            f"{1000 * m['latency_p95_s']:>8.1f}{m['seconds']:>7.2f}{1000 * row['single_request_latency_s']:>10.1f}"
        )
    print("1-req ms: the p50 latency of one request at a time (the mock's sleep plus one round trip)")
    verdict = "meets" if rows[0]["ratio"] >= TARGET else "MISSES"
    print(f"no-fault throughput {rows[0]['ratio']:.1%} of the ideal: {verdict} the {TARGET:.0%} target")
    print(f"load average during the run: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} CPUs")
    result = {
        "benchmark": "instruct",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1min_after": os.getloadavg()[0],
        },
        "target_ratio": TARGET,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
