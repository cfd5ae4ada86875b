"""The instruct stage against the real mock server on 127.0.0.1: faults, cache, resume, bad input.

- 10% mixed faults (429 + Retry-After, 500, slow past the timeout, cut-off bodies, prose
  replies, truncated replies): every item completed exactly once, none lost, none twice;
  the answers are true of the context the model was given; a rerun makes 0 requests.
- A run killed mid-way (SIGKILL) resumes with requests for the missing items only.
- Missing key variable, unreachable base_url, rejected model or key: a UserError before
  anything is written.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request

import polars as pl
import pytest

from tests.conftest import REPO
from tests.instruct_helpers import instruct_context, make_recipe, run_ingest, run_instruct
from vlmflow.artifacts import ArtifactStore
from vlmflow.components.instruct.cache import ResponseCache
from vlmflow.components.instruct.context import build_context, context_text, parse_context_text
from vlmflow.components.instruct.mock_server import FAULTS, MockConfig, running_mock
from vlmflow.components.instruct.stage import CACHE_PATH, run
from vlmflow.components.instruct.verify import check_answer
from vlmflow.errors import UserError
from vlmflow.samples import read_shard, sample_json

KEY_ENV = "VLMFLOW_TEST_LLM_KEY"


def generator(url: str, **extra: object) -> dict:
    return {
        "kind": "openai-compatible",
        "base_url": url,
        "model": "mock-llm",
        "api_key_env": KEY_ENV,
        "concurrency": 16,
        "timeout_s": 0.5,
        "backoff_base_s": 0.02,
        "backoff_max_s": 0.5,
        "max_retries": 8,
        "price_per_1k_input": 0.15,
        "price_per_1k_output": 0.6,
        **extra,
    }


def shapes_recipe(tmp_path, url: str, count: int, **extra: object):
    sources = [{"kind": "synthetic-shapes", "name": "shapes", "count": count, "max_objects": 5}]
    return make_recipe(tmp_path, {"generator": generator(url, **extra)}, sources=sources, shard_size=100, dedup=None)


def item_ids(out) -> list[str]:
    return [e["id"] for e in json.loads((out / "llava_instruct.json").read_text())]


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-mock-key-123")
    return "sk-mock-key-123"


def test_ten_percent_faults_every_item_once_and_rerun_makes_no_requests(tmp_path, key):
    config = MockConfig(fault_rate=0.1, slow_s=1.5, retry_after_s=0.1, api_key=key, seed=1)
    with running_mock(config) as mock:
        recipe = shapes_recipe(tmp_path, mock.base_url, 400)
        store = ArtifactStore(tmp_path / "artifacts")
        ingest = run_ingest(store, recipe)
        out, result = run_instruct(store, recipe, {"ingest": ingest})
        stats = dict(mock.server.stats)
        first = (out / "llava_instruct.json").read_bytes()

        planned = pl.read_parquet(ingest.path / "manifest.parquet")["key"].to_list()
        ids = item_ids(out)
        assert len(ids) == len(set(ids)) == len(planned) == 400  # none lost, none twice
        assert sorted(i.rsplit("-", 1)[0] for i in ids) == sorted(planned)
        assert (result.rows_in, result.rows_out, result.rows_quarantined) == (400, 400, 0)
        assert {f"fault.{f}" for f in FAULTS} <= set(stats), stats  # every kind of fault happened
        m = result.metrics
        assert m["calls.made"] == stats["requests"] > 400
        assert m["calls.reasked"] == stats["fault.truncated"] + stats["fault.bad-content"]
        assert m["calls.rate_limited"] == stats["fault.rate-limit"] and m["calls.timeouts"] >= stats["fault.slow"]
        assert m["calls.cached"] == 0 and m["tokens.in"] > 0 and m["tokens.out"] > 0
        expected_cost = m["tokens.in"] / 1000 * 0.15 + m["tokens.out"] / 1000 * 0.6
        assert m["cost.estimated_usd"] == pytest.approx(expected_cost)
        assert 0 < m["latency.p50_s"] <= m["latency.p95_s"] < 0.5
        assert len(ResponseCache(store.root.joinpath(*CACHE_PATH))) == 400

        _check_answers_against_contexts(store, out)

        out_again, again = run_instruct(store, recipe, {"ingest": ingest})  # a rerun: every reply cached
        assert mock.server.stats["requests"] == stats["requests"]  # 0 new requests
        assert again.metrics["calls.made"] == 0 and again.metrics["calls.cached"] == 400
        assert (out_again / "llava_instruct.json").read_bytes() == first


def _check_answers_against_contexts(store, out):
    """The mock answers from the context in the prompt: every sentence must be true of it."""
    shards = pl.read_parquet(out / "shards.parquet")
    checked = 0
    for shard in shards["shard"]:
        for sample in read_shard(out / "shards" / shard.rsplit("/", 1)[1]):
            record = sample_json(sample)
            seen = parse_context_text(context_text(build_context(record)))  # as the model saw it (3 decimals)
            for turn in record["conversations"][1::2]:
                assert check_answer(turn["content"], seen.objects) == []
                checked += 1
    assert checked >= 400


RESUME_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from tests.integration.test_instruct_mock import shapes_recipe
from tests.instruct_helpers import run_ingest, run_instruct
from vlmflow.artifacts import ArtifactStore
tmp = Path(sys.argv[2])
recipe = shapes_recipe(tmp, sys.argv[3], 120, concurrency=4)
store = ArtifactStore(tmp / "artifacts")
run_instruct(store, recipe, {"ingest": run_ingest(store, recipe)})
"""


def test_a_killed_run_resumes_with_only_the_missing_items(tmp_path, key):
    with running_mock(MockConfig(latency_ms=30, api_key=key)) as mock:
        recipe = shapes_recipe(tmp_path, mock.base_url, 120, concurrency=4)
        store = ArtifactStore(tmp_path / "artifacts")
        ingest = run_ingest(store, recipe)
        env = {**os.environ, KEY_ENV: key}
        child = subprocess.Popen(
            [sys.executable, "-c", RESUME_SCRIPT, str(REPO), str(tmp_path), mock.base_url], env=env, cwd=REPO
        )
        deadline = time.monotonic() + 60
        while _rows(store) < 30 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        assert child.returncode == -signal.SIGKILL
        killed_at = mock.server.stats["requests"]
        cached = len(ResponseCache(store.root.joinpath(*CACHE_PATH)))
        assert 30 <= cached < 120  # mid-way: some replies kept, some missing

        out, result = run_instruct(store, recipe, {"ingest": ingest})
        assert result.metrics["calls.cached"] == cached
        assert result.metrics["calls.made"] == mock.server.stats["requests"] - killed_at == 120 - cached
        ids = item_ids(out)
        assert len(ids) == len(set(ids)) == 120


def _rows(store: ArtifactStore) -> int:
    """Replies committed to the cache so far (read from outside the writing process)."""
    path = store.root.joinpath(*CACHE_PATH)
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:  # never creates the file
            return db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
    except sqlite3.Error:
        return 0  # not created yet


def test_missing_key_variable_fails_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with running_mock() as mock:
        recipe = shapes_recipe(tmp_path, mock.base_url, 10)
        store = ArtifactStore(tmp_path / "artifacts")
        ingest = run_ingest(store, recipe)
        ctx = instruct_context(store, recipe, {"ingest": ingest})
        with pytest.raises(UserError, match=rf"environment variable {KEY_ENV} is not set"):
            run(ctx)
        assert mock.server.stats["requests"] == 0
    assert list(ctx.out.iterdir()) == []
    assert not store.root.joinpath(*CACHE_PATH).exists()
    assert not store.is_complete("instruct", ctx.digest)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unreachable", "instruct.generator.base_url: cannot reach http://127.0.0.1:"),
        ("model", "instruct.generator.model: http://127.0.0.1:"),
        ("key", "refused the API key from $" + KEY_ENV),
    ],
)
def test_bad_server_settings_fail_before_anything_is_written(tmp_path, key, monkeypatch, case, message):
    with running_mock(MockConfig(api_key="sk-the-right-one")) as mock:
        url = f"http://127.0.0.1:{_free_port()}/v1" if case == "unreachable" else mock.base_url
        extra = {"model": "gpt-17"} if case == "model" else {}
        if case != "key":
            monkeypatch.setenv(KEY_ENV, "sk-the-right-one")
        recipe = shapes_recipe(tmp_path, url, 10, **extra)
        store = ArtifactStore(tmp_path / "artifacts")
        ctx = instruct_context(store, recipe, {"ingest": run_ingest(store, recipe)})
        with pytest.raises(UserError) as caught:
            run(ctx)
        assert message in str(caught.value)
        assert "sk-" not in str(caught.value)
        assert mock.server.stats["requests"] == 0  # stopped at the preflight: no chat request
    assert list(ctx.out.iterdir()) == []


def test_mock_llm_command_serves_and_rejects_unknown_models():
    port = _free_port()
    command = [sys.executable, "-m", "vlmflow.cli", "mock-llm", "--port", str(port), "--latency-ms", "5"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        base = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 60
        while True:
            try:
                models = json.load(urllib.request.urlopen(f"{base}/models", timeout=2))
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()
                time.sleep(0.2)
        assert [m["id"] for m in models["data"]] == ["mock-llm", "gpt-4o-mini"]
        prompt = "Objects (name: [x1, y1, x2, y2], coordinates as fractions of the image width and height, origin at the top left):\nred circle (small): [0.100, 0.100, 0.300, 0.300]\n\nTask: detail."  # noqa: E501
        reply = _post(
            f"{base}/chat/completions", {"model": "mock-llm", "messages": [{"role": "user", "content": prompt}]}
        )
        description = json.loads(reply["choices"][0]["message"]["content"])["description"]
        assert description.startswith("There is one object in the image. There is one red circle in the image.")
        with pytest.raises(urllib.error.HTTPError) as caught:
            _post(f"{base}/chat/completions", {"model": "gpt-17", "messages": []})
        assert caught.value.code == 404
        assert json.load(caught.value)["error"]["code"] == "model_not_found"
    finally:
        proc.terminate()
        proc.wait(30)


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    return json.load(urllib.request.urlopen(request, timeout=10))
