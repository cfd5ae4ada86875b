"""The OpenAI-compatible client: Retry-After, backoff, rate limits, response cache keys, and its
behaviour against a scripted server on 127.0.0.1 (retries, timeouts, user errors)."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from aiohttp import web

from vlmflow.components.instruct.cache import ResponseCache, cache_key
from vlmflow.components.instruct.client import (
    CallStats,
    ChatClient,
    Pacer,
    RetriesExhausted,
    TokenBucket,
    backoff_delay,
    parse_retry_after,
)
from vlmflow.components.instruct.mock_server import running_app
from vlmflow.errors import UserError
from vlmflow.specs.instruct import OpenAICompatibleGenerator

MESSAGES = [{"role": "user", "content": "hello"}]
OK = {"choices": [{"message": {"role": "assistant", "content": "{}"}, "finish_reason": "stop"}], "usage": {}}


def test_retry_after_headers():
    assert parse_retry_after({"Retry-After": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "0.5"}) == 0.5
    assert parse_retry_after({"retry-after-ms": "250", "Retry-After": "1"}) == 0.25  # ms wins
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 28 <= parse_retry_after({"Retry-After": when}) <= 30
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({}) is None


def test_backoff_is_jittered_exponential_capped_and_honours_retry_after():
    rng = random.Random(0)
    for attempt in range(8):
        ceiling = min(8.0, 0.5 * 2**attempt)
        delays = [backoff_delay(attempt, 0.5, 8.0, None, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 10  # jittered
    retry_after = [backoff_delay(0, 0.5, 8.0, 4.0, rng) for _ in range(100)]
    assert all(4.0 <= d <= 4.4 for d in retry_after)  # the server's wait, not the exponential one
    assert backoff_delay(0, 0.5, 8.0, 20.0, rng) >= 20.0  # longer than the cap: still honoured


def _body(messages=MESSAGES, **spec: object) -> bytes:
    generator = OpenAICompatibleGenerator(kind="openai-compatible", **{"model": "m", **spec})
    return ChatClient(generator, None, CallStats()).body(messages)


def test_cache_keys_cover_backend_model_prompt_and_params(tmp_path):
    base = cache_key("openai-compatible", "http://a/v1", _body())
    assert base == cache_key("openai-compatible", "http://a/v1", _body([dict(m) for m in MESSAGES]))
    others = [
        cache_key("other", "http://a/v1", _body()),
        cache_key("openai-compatible", "http://b/v1", _body()),
        cache_key("openai-compatible", "http://a/v1", _body(model="m2")),
        cache_key("openai-compatible", "http://a/v1", _body([{"role": "user", "content": "hello!"}])),
        cache_key("openai-compatible", "http://a/v1", _body(temperature=0.3)),
        cache_key("openai-compatible", "http://a/v1", _body(max_tokens=99)),
        cache_key("openai-compatible", "http://a/v1", _body(seed=1)),
        cache_key("openai-compatible", "http://a/v1", _body(json_mode=True)),
    ]
    assert len({base, *others}) == 9
    # operational knobs are not part of the request: same key
    assert base == cache_key("openai-compatible", "http://a/v1", _body(concurrency=3, timeout_s=9, max_retries=1))
    cache = ResponseCache(tmp_path / "c.sqlite")
    cache.put(base, {"turns": [["q", "a"]]})
    cache.close()
    again = ResponseCache(tmp_path / "c.sqlite")  # persistent
    assert again.get(base) == {"turns": [["q", "a"]]}
    assert again.get_many([base, others[0]]) == {base: {"turns": [["q", "a"]]}}
    assert len(again) == 1


def test_token_bucket_holds_the_rate():
    async def take_all() -> float:
        bucket = TokenBucket(per_minute=600)  # 10/s, bursts of 100
        started = time.monotonic()
        for _ in range(105):
            await bucket.take(1)
        return time.monotonic() - started

    assert 0.4 <= asyncio.run(take_all()) <= 2.0


def test_pacer_spreads_bunched_requests_over_the_round_trip():
    async def starts() -> list[float]:
        pacer = Pacer(concurrency=4)
        await pacer.wait()  # no latency seen yet: no pacing
        for _ in range(8):
            pacer.observe(0.04)
        times = []
        for _ in range(10):  # ten requests ready at once
            await pacer.wait()
            times.append(time.monotonic())
        return times

    times = asyncio.run(starts())
    interval = 0.8 * 0.04 / 4  # PACE x median latency / concurrency
    # Slots are booked back to back, so a late wake-up shortens the next gap but never moves a
    # start before its slot: the k-th start is at least k intervals after the first.
    for k, at in enumerate(times):
        assert at - times[0] >= k * interval - 0.002, (k, at - times[0])
    assert times[-1] - times[0] < 0.2


# --- against a scripted server -----------------------------------------------------------------


class Script:
    """Answers chat requests from a list of (status, headers, body, delay_s); records arrival times."""

    def __init__(self, steps: list[tuple[int, dict, object, float]], models: object = None):
        self.steps, self.models, self.arrivals, self.authorization = list(steps), models, [], []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.list_models)
        return app

    async def chat(self, request: web.Request) -> web.Response:
        self.arrivals.append(time.monotonic())
        self.authorization.append(request.headers.get("Authorization"))
        status, headers, body, delay = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        await asyncio.sleep(delay)
        text = body if isinstance(body, str) else json.dumps(body)
        return web.Response(status=status, headers=headers, text=text, content_type="application/json")

    async def list_models(self, request: web.Request) -> web.Response:
        if self.models is None:
            return web.Response(status=404, text="not here")
        if isinstance(self.models, int):
            return web.json_response({"error": {"message": "Incorrect API key provided"}}, status=self.models)
        return web.json_response({"object": "list", "data": [{"id": m} for m in self.models]})


def call(script: Script, key: str | None = None, **spec: object) -> tuple[object, CallStats]:
    with running_app(script.app()) as port:
        generator = OpenAICompatibleGenerator(
            kind="openai-compatible",
            base_url=f"http://127.0.0.1:{port}/v1",
            model="m",
            **{"backoff_base_s": 0.05, "timeout_s": 2.0, **spec},
        )
        stats = CallStats()

        async def go() -> object:
            async with ChatClient(generator, key, stats) as client:
                await client.preflight()
                return await client.complete(MESSAGES)

        try:
            return asyncio.run(go()), stats
        except Exception as exc:  # returned for the assertions
            return exc, stats


def test_429_waits_for_retry_after_then_succeeds():
    script = Script([(429, {"retry-after-ms": "400"}, {"error": {"message": "slow down"}}, 0), (200, {}, OK, 0)])
    completion, stats = call(script, key="sk-test")
    assert completion.content == "{}"
    assert script.arrivals[1] - script.arrivals[0] >= 0.4
    assert (stats.made, stats.rate_limited, stats.retried, stats.succeeded) == (2, 1, 1, 1)
    assert script.authorization == ["Bearer sk-test"] * 2


def test_5xx_timeouts_and_bad_bodies_are_retried_with_backoff():
    script = Script(
        [
            (500, {}, {"error": {"message": "boom"}}, 0),
            (200, {}, OK, 1.0),  # past the 0.3 s timeout
            (200, {}, '{"choices": [', 0),  # cut-off body
            (503, {}, "unavailable", 0),
            (200, {}, OK, 0),
        ]
    )
    completion, stats = call(script, timeout_s=0.3)
    assert completion.content == "{}"
    assert (stats.server_errors, stats.timeouts, stats.bad_bodies, stats.retried) == (2, 1, 1, 4)
    gaps = [b - a for a, b in itertools.pairwise(script.arrivals)]
    assert gaps[0] >= 0.025  # backoff after the first 500: at least base/2


def test_retries_run_out():
    result, stats = call(Script([(500, {}, "boom", 0)]), max_retries=2)
    assert isinstance(result, RetriesExhausted) and "after 2 retries" in str(result)
    assert stats.made == 3


@pytest.mark.parametrize(
    ("script", "message"),
    [
        (Script([(200, {}, OK, 0)], models=["other", "more"]), "rejected model 'm': not in the models it serves"),
        (
            Script([(404, {}, {"error": {"message": "The model `m` does not exist", "code": "model_not_found"}}, 0)]),
            "rejected model 'm'",
        ),
        (Script([(401, {}, {"error": {"message": "Incorrect API key provided"}}, 0)]), "refused the API key"),
        (Script([(200, {}, OK, 0)], models=401), "refused the API key"),
        (
            Script([(429, {}, {"error": {"message": "You exceeded your quota", "code": "insufficient_quota"}}, 0)]),
            "quota exhausted",
        ),
        (
            Script([(400, {}, {"error": {"message": "response_format is not supported"}}, 0)]),
            "rejected the first request",
        ),
    ],
)
def test_user_errors_are_clear_and_never_show_the_key(script, message):
    result, stats = call(script, key="sk-very-secret")
    assert isinstance(result, UserError)
    assert message in str(result)
    assert "sk-very-secret" not in str(result)
    assert stats.made <= 1  # at the first request at the latest


def test_unreachable_base_url():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    generator = OpenAICompatibleGenerator(kind="openai-compatible", base_url=f"http://127.0.0.1:{port}/v1")

    async def go() -> None:
        async with ChatClient(generator, None, CallStats()) as client:
            await client.preflight()

    with pytest.raises(UserError, match=rf"cannot reach http://127.0.0.1:{port}/v1"):
        asyncio.run(go())
