"""An OpenAI-compatible chat client (aiohttp): one request with retries, rate limits, accounting.

- Retries: 408/409/429/5xx, timeouts, dropped connections and unparseable bodies are retried
  up to `max_retries` times with jittered exponential backoff; a `retry-after-ms` /
  `Retry-After` header (seconds or an HTTP date) sets the wait instead.
- Rate limits: token buckets for requests/min and tokens/min (a request reserves its prompt
  estimate + max_tokens and is trued up with the reported usage).
- User errors (no retry, the run stops with one clear line): the server rejects the key
  (401/403), the model (404 or a model error), the quota (429 insufficient_quota); the
  base_url cannot be reached (`preflight`, before anything is written).
The key is only ever put in the Authorization header: never in messages, logs or errors.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

import aiohttp

from vlmflow.errors import UserError
from vlmflow.specs.instruct import OpenAICompatibleGenerator

RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
MAX_RETRY_AFTER_S = 300.0
PREFLIGHT_TIMEOUT_S = 30.0
_MODEL_ERROR = re.compile(
    r"\bmodel\b.*\b(not found|does not exist|not exist|unknown|not available|not supported|invalid)\b"
    r"|\b(unknown|invalid) model\b",
    re.IGNORECASE,
)


class TransientError(Exception):
    def __init__(self, kind: str, detail: str, retry_after: float | None = None):
        self.kind, self.detail, self.retry_after = kind, detail, retry_after
        super().__init__(f"{kind}: {detail}")


class RetriesExhausted(Exception):
    """A request still failed after max_retries retries."""


class RequestRejected(Exception):
    """The server refused this one request (400/422): not worth retrying as it is."""


@dataclass
class Completion:
    content: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    model: str | None = None


@dataclass
class CallStats:
    """What the calls cost and how they went (MLflow metrics of the stage)."""

    made: int = 0  # chat requests sent
    succeeded: int = 0
    failed: int = 0  # requests that failed (each retry of a request counts)
    retried: int = 0
    rate_limited: int = 0
    timeouts: int = 0
    server_errors: int = 0
    bad_bodies: int = 0
    connection_errors: int = 0
    reasked: int = 0
    cached: int = 0  # items answered from the cache
    tokens_in: int = 0
    tokens_out: int = 0
    latencies: list[float] = field(default_factory=list)

    def count_failure(self, kind: str) -> None:
        self.failed += 1
        attribute = {
            "rate-limited": "rate_limited",
            "timeout": "timeouts",
            "server-error": "server_errors",
            "bad-body": "bad_bodies",
            "connection": "connection_errors",
        }.get(kind)
        if attribute:
            setattr(self, attribute, getattr(self, attribute) + 1)


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    if "retry-after-ms" in lowered:
        try:
            return max(0.0, float(lowered["retry-after-ms"]) / 1000)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(
    attempt: int, base: float, cap: float, retry_after: float | None, rng: random.Random | None = None
) -> float:
    """Wait before retry `attempt` (0-based): the server's Retry-After (+ up to 10% jitter),
    else equal-jitter exponential backoff: d/2 + U(0, d/2), d = min(cap, base * 2^attempt)."""
    rng = rng or random
    if retry_after is not None:
        wait = min(retry_after, MAX_RETRY_AFTER_S)
        return wait + rng.uniform(0, 0.1 * wait)
    delay = min(cap, base * 2**attempt)
    return delay / 2 + rng.uniform(0, delay / 2)


class TokenBucket:
    """`per_minute` units refilled continuously; bursts up to 10 seconds' worth (at least 1)."""

    def __init__(self, per_minute: int):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, per_minute / 6.0)
        self.tokens = self.capacity
        self.updated = time.monotonic()
        self.lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    async def take(self, amount: float) -> None:
        amount = min(amount, self.capacity)
        async with self.lock:  # first come, first served
            self._refill()
            while self.tokens < amount:
                await asyncio.sleep((amount - self.tokens) / self.rate)
                self._refill()
            self.tokens -= amount

    def give_back(self, amount: float) -> None:
        """Return (amount > 0) or charge (amount < 0) the difference to the reserved estimate."""
        self._refill()
        self.tokens = min(self.capacity, self.tokens + amount)


def estimate_tokens(messages: list[dict]) -> int:
    return sum(len(m.get("content") or "") for m in messages) // 4 + 4 * len(messages)


def _error_message(body: str) -> tuple[str, str | None]:
    """The message and code of an OpenAI-style error body ({"error": {...}} or vLLM's flat shape)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, TypeError):
        return body[:300], None
    error = data.get("error", data) if isinstance(data, dict) else {}
    if isinstance(error, str):
        return error[:300], None
    if not isinstance(error, dict):
        return body[:300], None
    code = error.get("code")
    return str(error.get("message") or body)[:300], str(code) if code is not None else None


PACE = 0.8  # pacing interval as a fraction of the steady-state spacing (median latency / concurrency)


class Pacer:
    """Spaces request starts by at least PACE x (recent median latency) / concurrency.

    Requests that once went out together come back together and go out together again: they
    travel in bunches, each waiting behind the others' processing on both sides, and the
    server sees bursts. Pacing a little faster than the steady rate (so it does not bind in
    steady state) spreads a bunch over the round trip. The latency window adapts to the server."""

    def __init__(self, concurrency: int, window: int = 64):
        self.concurrency = concurrency
        self.latencies: deque[float] = deque(maxlen=window)
        self.next_at = 0.0

    def observe(self, latency: float) -> None:
        self.latencies.append(latency)

    async def wait(self) -> None:
        if len(self.latencies) < 8:
            return
        interval = PACE * sorted(self.latencies)[len(self.latencies) // 2] / self.concurrency
        now = time.monotonic()
        start = max(now, self.next_at)
        self.next_at = start + interval
        if start > now:
            await asyncio.sleep(start - now)


class ChatClient:
    """Use as `async with ChatClient(spec, key, stats) as client: await client.complete(messages)`."""

    def __init__(self, spec: OpenAICompatibleGenerator, api_key: str | None, stats: CallStats, seed: int = 0):
        self.spec = spec
        self.stats = stats
        self.rng = random.Random(seed)
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self.requests = TokenBucket(spec.requests_per_minute) if spec.requests_per_minute else None
        self.tokens = TokenBucket(spec.tokens_per_minute) if spec.tokens_per_minute else None
        self.session: aiohttp.ClientSession | None = None
        self.any_succeeded = False
        self.timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
        self.pacer = Pacer(spec.concurrency)

    async def __aenter__(self) -> ChatClient:
        connector = aiohttp.TCPConnector(limit=self.spec.concurrency, limit_per_host=self.spec.concurrency)
        self.session = aiohttp.ClientSession(connector=connector, headers=self._headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    def url(self, path: str) -> str:
        return f"{self.spec.base_url}/{path.lstrip('/')}"

    async def preflight(self) -> list[str] | None:
        """Reach GET /models before any work: unreachable, key refused and an unknown model are
        user errors. Returns the served model ids (None when the server has no /models)."""
        assert self.session is not None
        url = self.url("models")
        try:
            timeout = aiohttp.ClientTimeout(total=min(self.spec.timeout_s, PREFLIGHT_TIMEOUT_S))
            async with self.session.get(url, timeout=timeout) as response:
                body = await response.text()
                status = response.status
        except TimeoutError:
            reason = f"no answer within {min(self.spec.timeout_s, PREFLIGHT_TIMEOUT_S):g}s"
            raise UserError(f"instruct.generator.base_url: cannot reach {self.spec.base_url}: {reason}") from None
        except aiohttp.ClientError as exc:
            reason = str(exc) or type(exc).__name__
            raise UserError(f"instruct.generator.base_url: cannot reach {self.spec.base_url}: {reason}") from None
        if status in (401, 403):
            raise UserError(self._key_refused(body))
        if status != 200:
            return None  # no /models here: the first chat request tells
        try:
            served = [m["id"] for m in json.loads(body)["data"] if isinstance(m, dict) and "id" in m]
        except (json.JSONDecodeError, KeyError, TypeError):
            return None
        model = self.spec.model
        if served and model not in served and f"{model}:latest" not in served:
            raise UserError(self._model_refused(f"not in the models it serves ({', '.join(served[:20])})"))
        return served

    def _key_refused(self, body: str) -> str:
        message, _ = _error_message(body)
        return f"instruct.generator: {self.spec.base_url} refused the API key from ${self.spec.api_key_env}: {message}"

    def _model_refused(self, message: str) -> str:
        return f"instruct.generator.model: {self.spec.base_url} rejected model {self.spec.model!r}: {message}"

    def payload(self, messages: list[dict]) -> dict:
        spec = self.spec
        data: dict = {
            "model": spec.model,
            "messages": messages,
            "temperature": spec.temperature,
            "max_tokens": spec.max_tokens,
        }
        if spec.top_p is not None:
            data["top_p"] = spec.top_p
        if spec.seed is not None:
            data["seed"] = spec.seed
        if spec.json_mode:
            data["response_format"] = {"type": "json_object"}
        return data

    def body(self, messages: list[dict]) -> bytes:
        """The request body (JSON): model, messages and generation parameters, in a fixed order."""
        return json.dumps(self.payload(messages), ensure_ascii=False).encode()

    async def complete(self, messages: list[dict], body: bytes | None = None) -> Completion:
        """One chat completion, retried on transient failures; raises RetriesExhausted at the end.
        `body`: the encoded request when the caller has it already (`body(messages)`)."""
        body = body if body is not None else self.body(messages)
        reserve = estimate_tokens(messages) + self.spec.max_tokens
        for attempt in range(self.spec.max_retries + 1):
            if self.requests:
                await self.requests.take(1)
            if self.tokens:
                await self.tokens.take(reserve)
            await self.pacer.wait()
            try:
                completion = await self._post(body)
            except TransientError as exc:
                self.stats.count_failure(exc.kind)
                if self.tokens:
                    self.tokens.give_back(reserve)
                if attempt == self.spec.max_retries:
                    raise RetriesExhausted(f"{exc} (after {attempt} retries)") from None
                self.stats.retried += 1
                delay = backoff_delay(
                    attempt, self.spec.backoff_base_s, self.spec.backoff_max_s, exc.retry_after, self.rng
                )
                await asyncio.sleep(delay)
                continue
            if self.tokens:
                self.tokens.give_back(reserve - completion.prompt_tokens - completion.completion_tokens)
            return completion
        raise AssertionError("unreachable")

    async def _post(self, body: bytes) -> Completion:
        assert self.session is not None
        self.stats.made += 1
        started = time.monotonic()
        try:
            async with self.session.post(self.url("chat/completions"), data=body, timeout=self.timeout) as response:
                body = await response.text()
                status, headers = response.status, response.headers
        except TimeoutError:
            raise TransientError("timeout", f"no reply within {self.spec.timeout_s:g}s") from None
        except aiohttp.ClientError as exc:
            raise TransientError("connection", str(exc) or type(exc).__name__) from None
        latency = time.monotonic() - started
        if status != 200:
            self._raise_for(status, body, headers)
        return self._completion(body, latency)

    def _raise_for(self, status: int, body: str, headers: Mapping[str, str]) -> None:
        message, code = _error_message(body)
        if status == 429 and code == "insufficient_quota":
            raise UserError(f"instruct.generator: {self.spec.base_url}: quota exhausted: {message}")
        if status in RETRYABLE_STATUS or status >= 500:
            kind = "rate-limited" if status == 429 else "server-error"
            raise TransientError(kind, f"HTTP {status}: {message}", parse_retry_after(headers))
        if status in (401, 403):
            raise UserError(self._key_refused(body))
        model_error = code == "model_not_found" or bool(_MODEL_ERROR.search(message))
        if status == 404 or model_error:
            if status == 404 and not model_error:
                raise UserError(f"instruct.generator.base_url: {self.url('chat/completions')}: HTTP 404: {message}")
            raise UserError(self._model_refused(message))
        if not self.any_succeeded:
            where = self.spec.base_url
            raise UserError(f"instruct.generator: {where} rejected the first request: HTTP {status}: {message}")
        raise RequestRejected(f"HTTP {status}: {message}")

    def _completion(self, body: str, latency: float) -> Completion:
        try:
            data = json.loads(body)
            choice = data["choices"][0]
            message = choice["message"]
            content = message.get("content")
            if content is not None and not isinstance(content, str):
                raise TypeError("content is not a string")
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise TransientError("bad-body", f"unreadable response body ({type(exc).__name__})") from None
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or math.ceil(len(content or "") / 4))
        self.stats.succeeded += 1
        self.stats.tokens_in += prompt_tokens
        self.stats.tokens_out += completion_tokens
        self.stats.latencies.append(latency)
        self.pacer.observe(latency)
        self.any_succeeded = True
        finish = choice.get("finish_reason")
        return Completion(content, finish, prompt_tokens, completion_tokens, latency, data.get("model"))
