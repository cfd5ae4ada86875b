"""The data stages of data-tiny through the CLI on both executors, into two workdirs: the same
digests and byte-identical artifacts (manifests, shards, quarantine, tokenizer), and the
in-process run (`--set runtime.executor=local`) never starts Ray: summary.json says so, and
RAY_ADDRESS points at no cluster, so anything that tried to start or join Ray would fail the run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from live_servers import clean_env

from tests.conftest import REPO

SPEC = Path(__file__).with_name("data-tiny.yaml")
pytestmark = pytest.mark.slow


def run(workdir: Path, *options: str, env: dict[str, str] | None = None) -> tuple[dict, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "vlmflow.cli", "run", str(SPEC), "--workdir", str(workdir), *options],
        capture_output=True,
        text=True,
        env={**clean_env(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(env or {})},
        timeout=600,
        cwd=REPO,
    )
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((workdir / "runs" / "latest" / "summary.json").read_text()), seconds


def files_of(artifact: Path) -> dict[str, bytes]:
    """Every file of an artifact but _SUCCESS (it holds the build's timings)."""
    return {
        str(p.relative_to(artifact)): p.read_bytes() for p in sorted(artifact.rglob("*")) if p.is_file()
        if p.name != "_SUCCESS"
    }  # fmt: skip


def test_local_and_ray_executors_write_the_same_artifacts_and_local_starts_no_ray(tmp_path):
    # port 9 (discard) on this machine: no Ray there, so a run that started or joined Ray fails
    local, local_s = run(tmp_path / "local", "--set", "runtime.executor=local", env={"RAY_ADDRESS": "127.0.0.1:9"})
    on_ray, ray_s = run(tmp_path / "ray")
    print(f"data-tiny cold run: local executor {local_s:.1f}s, Ray executor {ray_s:.1f}s")
    assert local["ray"].startswith("ray: not started") and on_ray["ray"].startswith("ray: local")
    stages = {s["name"]: s for s in local["stages"]}, {s["name"]: s for s in on_ray["stages"]}
    assert list(stages[0]) == list(stages[1]) == ["ingest", "dedup", "tokenizer"]
    for name, mine in stages[0].items():
        theirs = stages[1][name]
        assert mine["status"] == theirs["status"] == "computed"
        assert mine["artifact_digest"] == theirs["artifact_digest"], name
        counts = ("rows_in", "rows_out", "rows_quarantined")
        assert [mine[c] for c in counts] == [theirs[c] for c in counts], name
        built = files_of(Path(mine["artifact_path"])), files_of(Path(theirs["artifact_path"]))
        assert "manifest.parquet" in built[0] or "tokenizer.json" in built[0]
        assert sorted(built[0]) == sorted(built[1]), name
        differ = [f for f in built[0] if built[0][f] != built[1][f]]
        assert not differ, f"{name}: {differ} differ"
    shards = [f for f in files_of(Path(stages[0]["ingest"]["artifact_path"])) if f.endswith(".tar")]
    assert shards, "ingest wrote no shards to compare"
