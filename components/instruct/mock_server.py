"""A mock OpenAI-compatible server (aiohttp) for tests, benchmarks and trying a recipe offline.

`POST /v1/chat/completions` answers from the scene context in the prompt: it reads the last
user message that holds a context block (captions + boxes, as `context.context_text`
writes it) and its `Task: NAME.` line, and replies with the offline generator's turns in
the task's JSON reply format. `GET /v1/models` lists the served models; an unknown model
gets OpenAI's 404 `model_not_found` error. With `fault_rate`, that fraction of chat
requests gets one fault drawn from `faults`:

  rate-limit    429 with Retry-After / retry-after-ms     server-error  500
  slow          the reply comes after `slow_s` seconds    bad-body      200 with a cut-off JSON body
  bad-content   200, the reply is prose, not JSON        truncated     200, half the reply, finish_reason "length"

In-process (tests): `with running_mock(MockConfig(...)) as mock: mock.base_url, mock.server.stats`.
Command line: `vlmflow mock-llm --port 8000 --fault-rate 0.1 --latency-ms 50`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from aiohttp import web

from vlmflow.components.instruct import offline
from vlmflow.components.instruct.context import Context, parse_context_text
from vlmflow.components.instruct.replies import reply_of

FAULTS = ("rate-limit", "server-error", "slow", "bad-body", "bad-content", "truncated")
DEFAULT_MODELS = ("mock-llm", "gpt-4o-mini")
_TASK = re.compile(r"\bTask: (conversation|detail|complex_reasoning)\b")


@dataclass(frozen=True)
class MockConfig:
    models: tuple[str, ...] = DEFAULT_MODELS
    fault_rate: float = 0.0
    faults: tuple[str, ...] = FAULTS
    latency_ms: float = 0.0
    slow_s: float = 30.0
    retry_after_s: float = 1.0
    api_key: str | None = None  # when set, requests must carry `Authorization: Bearer KEY`
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError("fault_rate must be in [0, 1]")


def _error(status: int, message: str, kind: str, code: str | None, headers: dict | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def find_prompt(messages: list) -> tuple[str, Context | None, str]:
    """(task, context, message text) from the last user message that holds a context block."""
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        text = message.get("content") if isinstance(message.get("content"), str) else ""
        context = parse_context_text(text)
        if context is not None:
            found = _TASK.search(text)
            return (found.group(1) if found else "conversation"), context, text
    return "conversation", None, ""


def answer(task: str, context: Context | None, seed: str) -> str:
    """The reply content for a prompt: offline turns when there are objects, else from captions."""
    if context is not None and context.objects:
        rng = random.Random(int(hashlib.sha256(seed.encode()).hexdigest()[:16], 16))
        return reply_of(task, offline.generate(task, context.objects, rng))
    if context is not None and context.captions:
        caption = context.captions[0].rstrip(".")
        described = f"The image shows the following scene: {caption}."
        turns = [("What does the image show?", described)]
        return reply_of(task, turns if task != "complex_reasoning" else [("What is happening here?", described)])
    return json.dumps({"turns": [{"question": "What is in the image?", "answer": "I cannot see any image."}]})


class MockLLM:
    def __init__(self, config: MockConfig | None = None):
        self.config = config or MockConfig()
        self.rng = random.Random(self.config.seed)
        self.stats: Counter[str] = Counter()
        self.served = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/_mock/stats", self.report)
        return app

    async def report(self, request: web.Request) -> web.Response:
        return web.json_response(dict(self.stats))

    async def models(self, request: web.Request) -> web.Response:
        self.stats["models_requests"] += 1
        if (refused := self._auth(request)) is not None:
            return refused
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "vlmflow-mock"} for m in self.config.models]
        return web.json_response({"object": "list", "data": data})

    def _auth(self, request: web.Request) -> web.Response | None:
        if self.config.api_key is None or request.headers.get("Authorization") == f"Bearer {self.config.api_key}":
            return None
        self.stats["unauthorized"] += 1
        return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")

    async def chat(self, request: web.Request) -> web.Response:
        self.stats["requests"] += 1
        if (refused := self._auth(request)) is not None:
            return refused
        try:
            body = await request.json()
            messages, model = body["messages"], body["model"]
            assert isinstance(messages, list) and isinstance(model, str)
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
            return _error(400, "Invalid request body: expected model and messages.", "invalid_request_error", None)
        if model not in self.config.models:
            self.stats["unknown_model"] += 1
            message = f"The model `{model}` does not exist or you do not have access to it."
            return _error(404, message, "invalid_request_error", "model_not_found")
        if self.config.latency_ms:
            await asyncio.sleep(self.config.latency_ms / 1000)
        fault = None
        if self.config.fault_rate and self.rng.random() < self.config.fault_rate:
            fault = self.rng.choice(self.config.faults)
            self.stats[f"fault.{fault}"] += 1
        task, context, prompt = find_prompt(messages)
        if fault == "rate-limit":
            wait = self.config.retry_after_s
            headers = {"Retry-After": str(max(1, math.ceil(wait))), "retry-after-ms": str(int(wait * 1000))}
            return _error(429, "Rate limit reached; try again later.", "requests", "rate_limit_exceeded", headers)
        if fault == "server-error":
            return _error(500, "The server had an error while processing your request.", "server_error", None)
        if fault == "slow":
            await asyncio.sleep(self.config.slow_s)
        content = answer(task, context, f"{self.config.seed}:{task}:{prompt}")
        finish = "stop"
        if fault == "bad-content":
            content = "Sure! Here is what I see: " + content.replace("{", "(").replace("}", ")")
        elif fault == "truncated":
            content, finish = content[: len(content) // 2], "length"
        payload = self._completion(model, messages, content, finish)
        if fault == "bad-body":
            text = json.dumps(payload)
            return web.Response(text=text[: len(text) // 2], content_type="application/json")
        self.stats["completions"] += 1
        self.stats[f"task.{task}"] += 1
        return web.json_response(payload)

    def _completion(self, model: str, messages: list, content: str, finish: str) -> dict:
        self.served += 1
        prompt_tokens = sum(len(m.get("content") or "") for m in messages if isinstance(m, dict)) // 4
        return {
            "id": f"chatcmpl-mock-{self.served}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(content) // 4 + 1,
                "total_tokens": prompt_tokens + len(content) // 4 + 1,
            },
        }


@dataclass
class RunningMock:
    server: MockLLM
    host: str
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"


@contextmanager
def running_mock(config: MockConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> Iterator[RunningMock]:
    """Serve a MockLLM on a background thread (port 0: an ephemeral port) until the block ends."""
    server = MockLLM(config)
    with running_app(server.app(), host, port) as bound:
        yield RunningMock(server, host, bound)


@contextmanager
def running_app(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> Iterator[int]:
    """Serve any aiohttp app on a background thread; yields the bound port."""
    loop = asyncio.new_event_loop()
    started: dict = {}
    ready = threading.Event()

    async def start() -> web.AppRunner:
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, shutdown_timeout=0.2)
        await site.start()
        started["port"] = runner.addresses[0][1]
        return runner

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            started["runner"] = loop.run_until_complete(start())
        except BaseException as exc:  # surfaced in the caller's thread below
            started["error"] = exc
        ready.set()
        if "runner" in started:
            loop.run_forever()

    thread = threading.Thread(target=main, name="mock-llm", daemon=True)
    thread.start()
    ready.wait(30)
    if "error" in started:
        raise started["error"]
    try:
        yield started["port"]
    finally:
        asyncio.run_coroutine_threadsafe(started["runner"].cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def serve(config: MockConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (the `vlmflow mock-llm` command)."""
    app = server_app(config)
    web.run_app(app, host=host, port=port, print=None, access_log=None, shutdown_timeout=0.5, handler_cancellation=True)


def server_app(config: MockConfig) -> web.Application:
    return MockLLM(config).app()
