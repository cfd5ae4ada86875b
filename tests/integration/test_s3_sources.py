"""Sources read from an S3-compatible object store: moto's real S3 server on 127.0.0.1, started by
the test, holds WebDataset shards and a parquet URL list (whose URLs point at a local HTTP server
serving real images). The credentials and the endpoint are in the environment only."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from image_server import JPEG, PNG
from live_servers import clean_env, free_port
from mlflow.tracking import MlflowClient
from moto.server import ThreadedMotoServer
from PIL import Image

from tests.conftest import REPO
from vlmflow.components.sources.base import SOURCES, RawRow, Rejected, SourceContext
from vlmflow.errors import UserError
from vlmflow.fingerprint import fingerprint_value
from vlmflow.remote import URL
from vlmflow.specs.data import ParquetSource, UrlListSource, WebDatasetSource

KEY_ID = "AKIAVLMFLOWTESTKEY01"
SECRET = "vlmflow-test-secret-never-logged"
BUCKET = "vlm"
pytestmark = pytest.mark.slow


def photo(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    """A real PNG: noise over a gradient, different for every seed (dedup keeps them all)."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, seed * 37 % 255)], axis=-1)
    pixels = np.clip(base + rng.integers(0, 60, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def shard(samples: list[dict]) -> bytes:
    buffer = io.BytesIO()
    with wds.TarWriter(buffer) as writer:
        for sample in samples:
            writer.write(sample)
    return buffer.getvalue()


def shard_000() -> bytes:
    return shard([{"__key__": f"a{i}", "png": photo(i), "txt": f"picture number {i}"} for i in range(3)])


def shard_001(seed: int = 10) -> bytes:
    good = [{"__key__": f"b{i}", "png": photo(seed + i), "txt": f"second shard {i}"} for i in range(2)]
    return shard([*good, {"__key__": "b9", "txt": "a caption without its image"}])  # no-image


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server on a free port; AWS_* in this process's environment point at it."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client, env
    server.stop()


def put(client, key: str, data: bytes) -> None:
    client.put_object(Bucket=BUCKET, Key=key, Body=data)


def url_table(base: str) -> bytes:
    rows = {
        "url": [f"{base}/img.png", f"{base}/img.jpg", f"{base}/404", ""],
        "caption": ["a served png", "a served jpeg", "gone", "no url"],
    }
    buffer = io.BytesIO()
    pq.write_table(pa.table(rows), buffer)
    return buffer.getvalue()


RECIPE = """
name: s3-sources
seed: 5
pipeline:
  - name: ingest-shards
    uses: ingest
    with:
      sources: [{kind: webdataset, name: shards, path: "s3://vlm/shards/"}]
      filters: [{kind: min-size, width: 8, height: 8}, {kind: caption-length, min_chars: 1}]
      shard_size: 4
  - name: dedup-shards
    uses: dedup
    inputs: {data: ingest-shards}
    with: {exact: true, near: false, partitions: 1}
  - name: ingest-web
    uses: ingest
    with:
      sources: [{kind: url-list, name: web, path: "s3://vlm/lists/urls.parquet", timeout_s: 5, retries: 0}]
      filters: [{kind: min-size, width: 8, height: 8}, {kind: caption-length, min_chars: 1}]
  - name: dedup-web
    uses: dedup
    inputs: {data: ingest-web}
    with: {exact: true, near: false, partitions: 1}
runtime:
  ray: {num_cpus: 2}
"""


def vlmflow(env: dict, *args: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in clean_env().items() if not k.startswith("AWS_")}
    full = {**base, **env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    command = [sys.executable, "-m", "vlmflow.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=full, timeout=600, cwd=REPO)


def run(env: dict, spec: Path, workdir: Path) -> dict[str, dict]:
    result = vlmflow(env, "run", str(spec), "--workdir", str(workdir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert SECRET not in result.stdout + result.stderr and KEY_ID not in result.stdout + result.stderr
    summary = json.loads((workdir / "runs" / "latest" / "summary.json").read_text())
    return {s["name"]: s for s in summary["stages"]}


def outcome(workdir: Path, stage: dict) -> dict[str, str]:
    out = workdir / "artifacts" / stage["name"] / stage["artifact_digest"]
    manifest = pl.read_parquet(out / "manifest.parquet")
    quarantine = pl.read_parquet(out / "quarantine.parquet")
    return {**dict.fromkeys(manifest["key"], "row"), **dict(zip(quarantine["key"], quarantine["reason"], strict=True))}


def assert_no_credentials(workdir: Path) -> None:
    for path in (workdir / "runs").rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            assert SECRET.encode() not in text and KEY_ID.encode() not in text, path
    summary = json.loads((workdir / "runs" / "latest" / "summary.json").read_text())
    client = MlflowClient(tracking_uri=summary["mlflow_tracking_uri"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs
    for found in runs:
        recorded = json.dumps([found.data.params, found.data.tags])
        assert SECRET not in recorded and KEY_ID not in recorded
    params = {k: v for found in runs for k, v in found.data.params.items()}
    assert "s3://vlm/shards/" in params.values()  # the URL is recorded, the credentials are not


def test_ingest_from_s3_through_the_cli_cached_and_recomputed_on_change(tmp_path, s3, image_server):
    client, env = s3
    put(client, "shards/shard-000.tar", shard_000())
    put(client, "shards/shard-001.tar", shard_001())
    put(client, "shards/README.md", b"not a shard: not read")
    put(client, "lists/urls.parquet", url_table(image_server.base))
    spec = tmp_path / "s3.yaml"
    spec.write_text(RECIPE)
    workdir = tmp_path / "work"

    cold = run(env, spec, workdir)
    assert {name: s["status"] for name, s in cold.items()} == dict.fromkeys(cold, "computed")
    assert (cold["ingest-shards"]["rows_in"], cold["ingest-shards"]["rows_out"]) == (6, 5)
    assert (cold["ingest-web"]["rows_in"], cold["ingest-web"]["rows_out"]) == (4, 2)
    for stage in cold.values():
        assert stage["rows_in"] == stage["rows_out"] + stage["rows_quarantined"]
    assert outcome(workdir, cold["ingest-shards"]) == {
        **{f"shards-shard-000-a{i}": "row" for i in range(3)},
        **{f"shards-shard-001-b{i}": "row" for i in range(2)},
        "shards-shard-001-b9": "no-image",
    }
    assert outcome(workdir, cold["ingest-web"]) == {
        "web-000000000": "row",
        "web-000000001": "row",
        "web-000000002": "http-404",
        "web-000000003": "missing-url",
    }
    manifest = pl.read_parquet(
        workdir / "artifacts" / "ingest-web" / cold["ingest-web"]["artifact_digest"] / "manifest.parquet"
    )
    assert sorted(manifest["sha256"]) == sorted(hashlib.sha256(b).hexdigest() for b in (PNG, JPEG))
    resolved = (workdir / "runs" / "latest" / "resolved_spec.yaml").read_text()
    assert "s3://vlm/shards/" in resolved and "s3://vlm/lists/urls.parquet" in resolved
    assert_no_credentials(workdir)

    hits = sum(image_server.hits.values())
    warm = run(env, spec, workdir)
    assert {name: s["status"] for name, s in warm.items()} == dict.fromkeys(warm, "cached")
    assert {n: s["artifact_digest"] for n, s in warm.items()} == {n: s["artifact_digest"] for n, s in cold.items()}
    assert sum(image_server.hits.values()) == hits  # nothing downloaded again

    put(client, "shards/shard-001.tar", shard_001(seed=20))  # one object changes: new bytes, new ETag
    changed = run(env, spec, workdir)
    status = {name: s["status"] for name, s in changed.items()}
    assert status == {
        "ingest-shards": "computed",
        "dedup-shards": "computed",
        "ingest-web": "cached",
        "dedup-web": "cached",
    }
    assert changed["ingest-shards"]["artifact_digest"] != cold["ingest-shards"]["artifact_digest"]
    assert (changed["ingest-shards"]["rows_in"], changed["ingest-shards"]["rows_out"]) == (6, 5)
    assert sum(image_server.hits.values()) == hits
    assert_no_credentials(workdir)


def test_validate_is_offline_and_refuses_credentials_in_the_spec(tmp_path):
    """No store runs here: validate checks a URL's form only; credentials are located errors."""
    spec = tmp_path / "s3.yaml"
    spec.write_text(RECIPE)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}  # nobody listens
    result = vlmflow(env, "validate", str(spec))
    assert result.returncode == 0, result.stdout + result.stderr
    leaky = tmp_path / "leaky.yaml"
    leaky.write_text(
        RECIPE.replace('"s3://vlm/shards/"}', '"s3://vlm/shards/", storage_options: {key: AK1, secret: SK2}}')
    )
    result = vlmflow(env, "validate", str(leaky))
    assert result.returncode == 2, result.stdout + result.stderr
    line = RECIPE[: RECIPE.index("s3://vlm/shards/")].count("\n") + 1  # the source's line
    assert f"leaky.yaml:{line}:" in result.stderr and "storage_options" in result.stderr
    assert "AWS_PROFILE" in result.stderr and "AWS_ACCESS_KEY_ID" in result.stderr
    assert "SK2" not in result.stderr and "AK1" not in result.stderr


def source_rows(spec, name: str = "src") -> tuple[dict[str, RawRow], dict[str, Rejected]]:
    ctx = SourceContext(name, 0, 100)
    reader = SOURCES.get(spec.kind)
    rows, rejected = {}, {}
    for unit in reader.plan(spec, ctx):
        for item in reader.read(spec, ctx, unit):
            (rows if isinstance(item, RawRow) else rejected)[item.key] = item
    return rows, rejected


def test_remote_parquet_with_image_paths_and_a_change_between_plan_and_read(tmp_path, s3):
    client, _ = s3
    images = {"imgs/a.png": photo(1), "imgs/sub/b.png": photo(2), "big.png": photo(3, (300, 300))}
    for key, data in images.items():
        put(client, f"data/{key}", data)
    put(client, "outside.png", photo(4))
    table = {
        "image": ["imgs/a.png", "imgs/sub/b.png", "imgs/missing.png", "../outside.png", "big.png", None],
        "caption": ["a", "b", "missing", "escapes", "too big", "null"],
    }
    buffer = io.BytesIO()
    pq.write_table(pa.table(table), buffer)
    put(client, "data/table.parquet", buffer.getvalue())
    spec = ParquetSource.model_validate(
        {"kind": "parquet", "path": f"s3://{BUCKET}/data/", "max_image_bytes": 20_000}, context={"spec_dir": tmp_path}
    )
    rows, rejected = source_rows(spec)
    assert {k: r.image for k, r in rows.items()} == {
        "table-0": images["imgs/a.png"],
        "table-1": images["imgs/sub/b.png"],
    }
    assert {k: r.reason for k, r in rejected.items()} == {
        "table-2": "missing-image-file",
        "table-3": "path-outside-dataset",
        "table-4": "too-large",
        "table-5": "no-image",
    }
    # the cache key names each object by ETag and size, and moves when one changes
    before = fingerprint_value(spec.path)
    assert [name for name, _ in before["objects"]] == ["big.png", "imgs/a.png", "imgs/sub/b.png", "table.parquet"]
    assert all({"etag", "size"} <= set(ident) for _, ident in before["objects"])
    # a shard that changes after the plan listed it is refused, not read under the old key
    put(client, "shards/one.tar", shard_000())
    shards = WebDatasetSource.model_validate({"kind": "webdataset", "path": f"s3://{BUCKET}/shards/one.tar"})
    ctx = SourceContext("w", 0, 100)
    units = SOURCES.get("webdataset").plan(shards, ctx)
    assert [u.rows for u in units] == [0]  # a remote tar is not read to plan it
    put(client, "shards/one.tar", shard_001())
    produced = list(SOURCES.get("webdataset").read(shards, ctx, units[0]))
    assert [(r.key, r.reason) for r in produced] == [("one", "unreadable-shard")]
    assert "changed after the run listed it" in produced[0].detail
    # `limit` streams the remote tars to count their samples
    limited = WebDatasetSource.model_validate({"kind": "webdataset", "path": f"s3://{BUCKET}/shards/", "limit": 2})
    assert [u.rows for u in SOURCES.get("webdataset").plan(limited, ctx)] == [2]
    assert len(source_rows(limited)[0]) == 2
    with pytest.raises(UserError, match=r"s3://vlm/nothing/: no such object"):
        fingerprint_value(URL(f"s3://{BUCKET}/nothing/"))
    table_spec = UrlListSource.model_validate({"kind": "url-list", "path": f"s3://{BUCKET}/data/table.parquet"})
    with pytest.raises(UserError, match=r"no url column 'url'"):
        source_rows(table_spec)
