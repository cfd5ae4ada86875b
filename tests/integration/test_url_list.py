"""The url-list source against a real HTTP server on 127.0.0.1 that serves real PNG / JPEG images
and misbehaves on chosen paths: every table row is a row or a rejection with its reason."""

from __future__ import annotations

import io
import json
import socket
import time

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from image_server import JPEG, MAX_BYTES, PNG, TIMEOUT_S
from PIL import Image
from pydantic import ValidationError

from vlmflow.artifacts import ArtifactStore
from vlmflow.component import digest_view
from vlmflow.components import ingest
from vlmflow.components.sources.base import SOURCES, RawRow, Rejected, SourceContext
from vlmflow.components.sources.url_list import opted_out
from vlmflow.errors import UserError
from vlmflow.fingerprint import HashCache
from vlmflow.pipeline import Step, step_digest
from vlmflow.specs.data import UrlListSource
from vlmflow.specs.recipe import Recipe
from vlmflow.stage import run_stage


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cases(base: str) -> list[tuple[str | None, str, str]]:
    """(url, caption, expected: "row" or the rejection reason), in table order."""
    return [
        (f"{base}/img.png", "a png", "row"),
        (f"{base}/img.jpg", " a jpeg ", "row"),
        (f"{base}/404", "gone", "http-404"),
        (f"{base}/410", "gone for good", "http-410"),
        (f"{base}/500", "broken", "http-5xx"),
        (f"{base}/flaky", "retried", "row"),
        (f"{base}/busy", "retry-after", "row"),
        (f"{base}/always-busy", "rate limited", "http-429"),
        (f"{base}/slow", "too slow", "timeout"),
        (f"{base}/truncated", "cut", "truncated"),
        (f"{base}/html", "html as png", "not-an-image"),
        (f"{base}/loop-a", "loop", "redirect-loop"),
        (f"{base}/chain/5", "max_redirects redirects", "row"),
        (f"{base}/chain/9", "too many redirects", "redirect-loop"),
        (f"{base}/to-ftp", "redirect to ftp", "bad-url"),
        (f"{base}/huge-declared", "big", "too-large"),
        (f"{base}/huge-streamed", "big, no length", "too-large"),
        (f"{base}/noai", "opted out", "opted-out"),
        (f"{base}/otherbot", "opted out for another bot", "opted-out"),
        (f"{base}/noarchive", "", "row"),  # an empty caption: a row without captions
        ("ftp://127.0.0.1/img.png", "ftp", "bad-url"),
        ("file:///etc/passwd", "a file", "bad-url"),
        ("http:///img.png", "no host", "bad-url"),
        (f"http://127.0.0.1:{closed_port()}/img.png", "nobody listens", "connection-error"),
        ("", "no url", "missing-url"),
        ("   ", "blank url", "missing-url"),
    ]


SERVED = {"/img.png": PNG, "/img.jpg": JPEG, "/flaky": PNG, "/busy": JPEG, "/chain/5": JPEG, "/noarchive": PNG}


def key(index: int) -> str:
    return f"{index:09d}"


def spec_of(tmp_path, table: str, **fields) -> UrlListSource:
    values = {"kind": "url-list", "path": table, "timeout_s": TIMEOUT_S, "max_bytes": MAX_BYTES, "concurrency": 32}
    return UrlListSource.model_validate({**values, **fields}, context={"spec_dir": tmp_path})


def run_source(spec: UrlListSource, shard_size: int = 100) -> tuple[dict[str, RawRow], dict[str, Rejected], list]:
    context = SourceContext(name="web", seed=0, shard_size=shard_size)
    reader = SOURCES.get("url-list")
    units = reader.plan(spec, context)
    assert units == reader.plan(spec, context)  # the same keys and rows on a rerun
    rows: dict[str, RawRow] = {}
    rejected: dict[str, Rejected] = {}
    for unit in units:
        produced = list(reader.read(spec, context, unit))
        assert len(produced) == unit.rows
        for item in produced:
            assert item.key not in rows and item.key not in rejected
            (rows if isinstance(item, RawRow) else rejected)[item.key] = item
    return rows, rejected, units


def check_accounting(table: list[tuple], rows: dict, rejected: dict, base: str) -> None:
    expected = {key(i): want for i, (_, _, want) in enumerate(table)}
    got = {**dict.fromkeys(rows, "row"), **{k: r.reason for k, r in rejected.items()}}
    assert got == expected
    assert len(rows) + len(rejected) == len(table)
    assert all(r.detail for r in rejected.values())
    for index, (url, caption, want) in enumerate(table):
        if want != "row":
            continue
        row = rows[key(index)]
        path = url.removeprefix(base)
        assert row.image == SERVED[path], path  # the bytes as served (no resize)
        assert row.captions == ([caption.strip()] if caption.strip() else [])
        width, height = Image.open(io.BytesIO(SERVED[path])).size
        assert row.extra == {"url": url, "original_width": width, "original_height": height, "status": 200}


def test_parquet_table_every_row_accounted(tmp_path, image_server):
    table = cases(image_server.base)
    urls = [u for u, _, _ in table]
    urls[-2] = None  # a null cell is missing-url too
    pq.write_table(pa.table({"url": urls, "caption": [c for _, c, _ in table]}), tmp_path / "urls.parquet")
    started = time.monotonic()
    rows, rejected, units = run_source(spec_of(tmp_path, "urls.parquet"), shard_size=10)
    assert time.monotonic() - started < 20
    assert [u.rows for u in units] == [10, 10, 6]
    table[-2] = (None, table[-2][1], "missing-url")
    check_accounting(table, rows, rejected, image_server.base)
    # retried: 429 / 5xx / timeouts (1 + retries attempts); not retried: 404, opt-out, too-large
    assert image_server.hits["/500"] == 3 and image_server.hits["/always-busy"] == 3 and image_server.hits["/slow"] == 3
    assert image_server.hits["/flaky"] == 2 and image_server.hits["/busy"] == 2
    assert (
        image_server.hits["/404"] == 1 and image_server.hits["/noai"] == 1 and image_server.hits["/huge-declared"] == 1
    )
    first, second = image_server.times["/busy"]
    assert second - first >= 0.9  # Retry-After: 1 was honoured
    # /chain/5 follows its 5 redirects; /chain/9 follows 5 (to /chain/4), then stops
    assert [image_server.hits[f"/chain/{n}"] for n in range(11)] == [1, 1, 1, 1, 2, 2, 1, 1, 1, 1, 0]
    details = {k: r.detail for k, r in rejected.items()}
    assert "HTTP 500" in details[key(4)] and "3 attempts" in details[key(4)]
    assert "Content-Length 300000" in details[key(15)] and "stopped reading" in details[key(16)]
    assert "noai" in details[key(17)] and "otherbot" in details[key(18)]
    assert "more than 5 redirects" in details[key(13)] and "redirects back" in details[key(11)]
    assert f"{len(PNG) // 2} of {len(PNG)} bytes" in details[key(9)]


def test_csv_table_with_its_own_column_names(tmp_path, image_server):
    table = cases(image_server.base)
    table[0] = (table[0][0], 'a png, "quoted"\nover two lines', "row")  # CSV quoting survives
    columns = {"id": list(range(len(table))), "URL": [u for u, _, _ in table], "TEXT": [c for _, c, _ in table]}
    pl.DataFrame(columns).write_csv(tmp_path / "urls.csv")
    rows, rejected, _ = run_source(spec_of(tmp_path, "urls.csv", url_column="URL", caption_column="TEXT"))
    check_accounting(table, rows, rejected, image_server.base)
    with pytest.raises(UserError, match=r"no url column 'url' \(columns: id, URL, TEXT\)"):
        run_source(spec_of(tmp_path, "urls.csv"))


def test_jsonl_table_with_malformed_lines_and_limit(tmp_path, image_server):
    base = image_server.base
    lines = [
        {"url": f"{base}/img.png", "caption": ["first", "  ", "second"]},
        {"url": f"{base}/html", "caption": "html"},
        {"caption": "no url key"},
        {"url": 42, "caption": "a number"},
        {"url": f"{base}/img.jpg", "caption": {"not": "text"}},
        {"url": f"{base}/img.jpg"},  # no caption key
    ]
    text = "\n".join(json.dumps(line) for line in lines[:3]) + "\n\n{broken\n[1, 2]\n"
    text += "\n".join(json.dumps(line) for line in lines[3:]) + "\n"
    (tmp_path / "urls.jsonl").write_text(text)
    rows, rejected, _ = run_source(spec_of(tmp_path, "urls.jsonl"), shard_size=3)
    assert {k: r.reason for k, r in rejected.items()} == {
        key(1): "not-an-image",
        key(2): "missing-url",
        key(3): "malformed-annotation",
        key(4): "malformed-annotation",
        key(5): "malformed-annotation",
        key(6): "malformed-annotation",
    }
    assert sorted(rows) == [key(0), key(7)]
    assert len(rows) + len(rejected) == 8  # the non-blank lines
    assert rows[key(0)].captions == ["first", "second"] and rows[key(7)].captions == []
    assert "line 5" in rejected[key(3)].detail and "line 6" in rejected[key(4)].detail
    assert "url 42" in rejected[key(5)].detail and "caption" in rejected[key(6)].detail
    rows, rejected, _ = run_source(spec_of(tmp_path, "urls.jsonl", limit=2))
    assert sorted(rows) == [key(0)] and sorted(rejected) == [key(1)]


@pytest.mark.parametrize(
    ("mode", "png_size", "jpeg_size"),
    [("keep-ratio", (21, 16), (32, 16)), ("center-crop", (16, 16), (16, 16)), ("border", (16, 16), (16, 16))],
)
def test_resize_modes_reencode_and_keep_the_original_size(tmp_path, image_server, mode, png_size, jpeg_size):
    (tmp_path / "urls.jsonl").write_text(
        json.dumps({"url": f"{image_server.base}/img.png", "caption": "p"})
        + "\n"
        + json.dumps({"url": f"{image_server.base}/img.jpg", "caption": "j"})
    )
    rows, rejected, _ = run_source(spec_of(tmp_path, "urls.jsonl", resize={"mode": mode, "size": 16}))
    assert rejected == {}
    png, jpeg = Image.open(io.BytesIO(rows[key(0)].image)), Image.open(io.BytesIO(rows[key(1)].image))
    assert (png.format, png.size, jpeg.format, jpeg.size) == ("PNG", png_size, "JPEG", jpeg_size)
    assert (rows[key(0)].extra["original_width"], rows[key(0)].extra["original_height"]) == (64, 48)
    assert (rows[key(1)].extra["original_width"], rows[key(1)].extra["original_height"]) == (64, 32)
    if mode == "border":  # 64x48 -> 16x12 on a black 16x16 square
        assert np.asarray(png)[:2].max() == 0 and np.asarray(png)[2:14].max() > 0


def test_spec_fields_and_the_opt_out_rule(tmp_path):
    (tmp_path / "urls.csv").write_text("url,caption\n")
    (tmp_path / "urls.txt").write_text("")
    spec = spec_of(tmp_path, "urls.csv", timeout_s=10, max_bytes=10 * 2**20, concurrency=8)
    assert (spec.url_column, spec.caption_column, spec.retries, spec.max_redirects, spec.resize) == (
        "url", "caption", 2, 5, None,
    )  # fmt: skip
    assert "vlmflow" in spec.user_agent
    assert "concurrency" not in digest_view(spec) and "timeout_s" in digest_view(spec)  # threads: same output
    assert SOURCES.get("url-list").plan(spec, SourceContext("web", 0, 10)) == []
    for bad in ({"path": "urls.txt"}, {"resize": {"mode": "stretch", "size": 16}}, {"retries": -1}, {"proxy": "x"}):
        with pytest.raises(ValidationError):
            spec_of(tmp_path, "urls.csv", **bad)
    assert opted_out(["noindex"]) and opted_out(["otherbot: noimageindex"]) and opted_out(["NOAI"])
    assert opted_out(["noarchive", "googlebot: nofollow"]) is None
    assert opted_out(["unavailable_after: 25 Jun 2010 15:00:00 PST"]) is None


@pytest.fixture
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def test_ingest_stage_downloads_through_ray(tmp_path, image_server, local_ray):
    """The real ingest stage (its Ray tasks download): rows_in = out + quarantined, with the
    caption-length filter quarantining the row whose caption is empty."""
    table = cases(image_server.base)
    columns = {"url": [u for u, _, _ in table], "caption": [c for _, c, _ in table]}
    pq.write_table(pa.table(columns), tmp_path / "u.parquet")
    source = {"kind": "url-list", "name": "web", "path": "u.parquet", "timeout_s": TIMEOUT_S, "max_bytes": MAX_BYTES}
    recipe = Recipe.model_validate(
        {"name": "url-list-test", "seed": 3, "data": {"sources": [source], "shard_size": 9}},
        context={"spec_dir": tmp_path},
    )
    step = Step("ingest", ingest.COMPONENT, recipe.data.ingest(), {}, ("data",))
    digest = step_digest(step, recipe, {}, HashCache(None), recipe.spec_dir())
    store = ArtifactStore(tmp_path / "artifacts")
    status, stats = run_stage(step, digest, {}, recipe, store, "log")
    assert status == "computed"
    assert stats["rows_in"] == len(table) == stats["rows_out"] + stats["rows_quarantined"]
    out = store.path("ingest", digest)
    manifest = pl.read_parquet(out / "manifest.parquet")
    quarantine = pl.read_parquet(out / "quarantine.parquet")
    expected = {f"web-{key(i)}": want for i, (_, _, want) in enumerate(table)}
    expected[f"web-{key(19)}"] = "missing-caption"  # /noarchive: downloaded, no caption, filtered
    got = {**dict.fromkeys(manifest["key"], "row"), **dict(zip(quarantine["key"], quarantine["reason"], strict=True))}
    assert got == expected
    assert pl.read_parquet(out / "shards.parquet")["samples"].sum() == manifest.height == 5
