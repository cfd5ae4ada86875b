"""The two generator backends: items (image, task, context) -> turns or a reason.

- `generate_offline`: the scene-graph generator, in process (deterministic, no cache needed).
- `OpenAIBackend`: every item not in the response cache becomes one chat request (plus
  re-asks), `concurrency` of them in flight on one asyncio loop. The workers start spread
  over the first reply's latency: requests that all start together stay bunched (each
  waits behind the others' processing on every round trip) and a burst at start is what
  a server's per-second limits punish. Accepted replies are
  cached as they come (committed every half second), so a crash loses little. Items whose requests keep
  failing are reported back as `request-failed` (the stage then fails, resumably); when
  many items in a row fail the run stops early: the server is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from vlmflow.components.instruct import offline
from vlmflow.components.instruct.cache import ResponseCache, cache_key
from vlmflow.components.instruct.client import CallStats, ChatClient, RequestRejected, RetriesExhausted
from vlmflow.components.instruct.context import Context, context_text
from vlmflow.components.instruct.replies import Rejected, Turn, parse_reply
from vlmflow.components.instruct.templates import Templates
from vlmflow.components.sources.synthetic import SHAPES
from vlmflow.errors import UserError
from vlmflow.progress import Progress
from vlmflow.specs.instruct import OfflineGenerator, OpenAICompatibleGenerator

RAMP_MAX_S = 5.0  # the ramp-up spreads the first requests over at most this long


@dataclass(frozen=True)
class Item:
    id: str  # IMAGE_KEY-TASK: the output sample's key
    image_key: str
    task: str
    context: Context


@dataclass
class Outcome:
    turns: list[Turn] | None  # a detail item's question is "" here; the stage adds its own
    reason: str | None = None  # why there are no turns (quarantine reason)
    detail: str = ""
    cached: bool = False


def item_rng(seed: int, image_key: str, task: str) -> random.Random:
    return random.Random(int(hashlib.sha256(f"{seed}:{image_key}:{task}".encode()).hexdigest()[:16], 16))


def generate_offline(items: list[Item], spec: OfflineGenerator, seed: int) -> dict[str, Outcome]:
    results: dict[str, Outcome] = {}
    for item in items:
        objects = item.context.objects
        if not objects:
            results[item.id] = Outcome(None, "no-objects", "the offline generator needs objects with boxes")
            continue
        nouns = SHAPES if all(o.noun in SHAPES for o in objects) else ()
        rng = item_rng(seed, item.image_key, item.task)
        turns = offline.generate(item.task, objects, rng, spec.min_turns, spec.max_turns, nouns=nouns)
        results[item.id] = Outcome(turns)
    return results


def run_async(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine on a fresh loop in its own thread (the caller may be inside a running loop)."""
    box: dict[str, Any] = {}

    def main() -> None:
        try:
            box["value"] = asyncio.run(coroutine)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=main, name="instruct-client")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def resolve_api_key(spec: OpenAICompatibleGenerator) -> str | None:
    """The key from the environment variable the spec names (None when api_key_env is null)."""
    if spec.api_key_env is None:
        return None
    key = os.environ.get(spec.api_key_env, "").strip()
    if not key:
        raise UserError(
            f"instruct.generator.api_key_env: the environment variable {spec.api_key_env} is not set; it must hold "
            f"the API key for {spec.base_url} (for a server without keys, set api_key_env: null)"
        )
    return key


class OpenAIBackend:
    def __init__(
        self,
        spec: OpenAICompatibleGenerator,
        templates: Templates,
        cache: ResponseCache,
        api_key: str | None,
        progress: str = "auto",
        seed: int = 0,
    ):
        self.spec, self.templates, self.cache, self.api_key = spec, templates, cache, api_key
        self.progress, self.seed = progress, seed
        self.stats = CallStats()
        self.known: set[str] = set()  # keys in the cache when generate() started
        self.failed_in_a_row = 0

    def messages(self, item: Item) -> list[dict]:
        return self.templates.messages(item.task, context_text(item.context))

    def preflight(self) -> list[str] | None:
        """Reachability, key and model checks before anything is read or written."""

        async def check() -> list[str] | None:
            async with ChatClient(self.spec, self.api_key, self.stats) as client:
                return await client.preflight()

        return run_async(check())

    def generate(self, items: list[Item]) -> dict[str, Outcome]:
        """Outcomes of all items: cached replies first looked up by each worker, then requests."""
        results: dict[str, Outcome] = {}
        todo = []
        for item in items:
            if item.context.empty:
                results[item.id] = Outcome(None, "no-context", "the image has neither captions nor objects")
            else:
                todo.append(item)
        if todo:
            self.known = self.cache.keys()
            try:
                results.update(run_async(self._generate(todo)))
            finally:
                self.cache.flush()
        return results

    async def _generate(self, todo: list[Item]) -> dict[str, Outcome]:
        queue: asyncio.Queue[Item] = asyncio.Queue()
        for item in todo:
            queue.put_nowait(item)
        results: dict[str, Outcome] = {}
        workers_n = min(self.spec.concurrency, len(todo))
        spacing = asyncio.get_running_loop().create_future()  # seconds between worker starts
        with Progress("instruct: generate", len(todo), mode=self.progress, unit="item") as bar:
            async with ChatClient(self.spec, self.api_key, self.stats, seed=self.seed) as client:

                async def worker(index: int) -> None:
                    if index:  # ramp up: spread the first requests over the first reply's latency
                        with contextlib.suppress(TimeoutError):
                            await asyncio.sleep(index * await asyncio.wait_for(asyncio.shield(spacing), RAMP_MAX_S))
                    while not queue.empty():
                        item = queue.get_nowait()
                        started = time.monotonic()
                        results[item.id] = await self._one(client, item)
                        if not spacing.done():
                            spacing.set_result(min(time.monotonic() - started, RAMP_MAX_S) / workers_n)
                        bar.update()

                async def flusher() -> None:  # on a thread: a slow disk never stalls the requests
                    while True:
                        for _ in range(10):
                            await asyncio.sleep(self.cache.flush_s / 10)
                            if self.cache.due():
                                break
                        await asyncio.to_thread(self.cache.flush)

                flushing = asyncio.create_task(flusher())
                workers = [asyncio.create_task(worker(i)) for i in range(workers_n)]
                done, pending = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
                for task in [*pending, flushing]:
                    task.cancel()
                await asyncio.gather(*pending, flushing, return_exceptions=True)
                for task in done:
                    if task.exception() is not None:
                        raise task.exception()
        return results

    async def _one(self, client: ChatClient, item: Item) -> Outcome:
        messages = self.messages(item)
        body = client.body(messages)
        key = cache_key(self.spec.kind, self.spec.base_url, body)
        hit = self.cache.get(key) if key in self.known else None
        if hit is not None:
            self.stats.cached += 1
            return Outcome([tuple(t) for t in hit["turns"]], cached=True)
        rejected: Rejected | None = None
        for ask in range(self.spec.max_reasks + 1):
            try:
                completion = await client.complete(messages, body if ask == 0 else None)
            except (RetriesExhausted, RequestRejected) as exc:
                return self._failed(exc)
            self.failed_in_a_row = 0
            try:
                turns = parse_reply(item.task, completion.content, completion.finish_reason)
            except Rejected as exc:
                rejected = exc
                if ask < self.spec.max_reasks:
                    self.stats.reasked += 1
                    reply = {"role": "assistant", "content": completion.content or ""}
                    messages = [*messages, reply, self.templates.reask_message(exc.detail)]
                continue
            usage = {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens}
            value = {"turns": turns, "content": completion.content, "usage": usage, "reasks": ask}
            self.cache.put(key, {**value, "model": completion.model})
            self.known.add(key)
            return Outcome(turns)
        assert rejected is not None
        return Outcome(None, f"invalid-reply:{rejected.reason}", rejected.detail)

    def _failed(self, exc: Exception) -> Outcome:
        if isinstance(exc, RequestRejected):
            return Outcome(None, "request-rejected", str(exc))
        self.failed_in_a_row += 1
        if self.failed_in_a_row >= max(8, self.spec.concurrency):
            raise UserError(
                f"instruct.generator: {self.spec.base_url} keeps failing ({self.failed_in_a_row} items in a row "
                f"after {self.spec.max_retries} retries each; last: {exc}); finished replies are cached, run again "
                "to resume"
            )
        return Outcome(None, "request-failed", str(exc))
