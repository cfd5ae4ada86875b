"""A persistent response cache: one sqlite file, one row per accepted reply.

Key = sha256(backend, base_url, reply-format version, request body), the body being the
JSON sent to the server: model, prompt messages (system prompt, few-shot examples, the
image's context) and generation parameters (temperature, max_tokens, top_p, seed,
response_format). An item whose prompt and settings are unchanged is answered from here, so a rerun or a
resumed run makes no request for it. Only replies that passed validation are stored. Rows
are committed in small batches (the client flushes every `flush_s` seconds or `batch`
replies, and at the end; WAL journal): a crash loses at most the last batch, which a resumed
run asks for again.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

REPLY_FORMAT_VERSION = "1"


def cache_key(backend: str, base_url: str, body: bytes) -> str:
    """The cache key of one request: its body holds the model, the prompt and the generation params."""
    digest = hashlib.sha256(f"{backend}\n{base_url}\n{REPLY_FORMAT_VERSION}\n".encode())
    digest.update(body)
    return digest.hexdigest()


class ResponseCache:
    """`put` only queues a reply; `flush` commits the queue (from any thread: the instruct client
    flushes on a worker thread, so a slow disk never stalls its event loop)."""

    def __init__(self, path: Path, batch: int = 64, flush_s: float = 0.5):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.batch, self.flush_s = path, batch, flush_s
        self._pending: dict[str, str] = {}  # queued by put
        self._writing: dict[str, str] = {}  # being committed by flush
        self._lock = threading.Lock()  # guards the two dicts (held briefly)
        self._db_lock = threading.Lock()  # guards the connection
        self._db = sqlite3.connect(str(path), timeout=60, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL)")

    def _query(self, sql: str, args: tuple | list = ()) -> list[tuple]:
        with self._db_lock:
            return self._db.execute(sql, args).fetchall()

    def get(self, key: str) -> dict | None:
        with self._lock:
            text = self._pending.get(key) or self._writing.get(key)
        if text is None:
            rows = self._query("SELECT value FROM replies WHERE key = ?", (key,))
            text = rows[0][0] if rows else None
        return json.loads(text) if text is not None else None

    def keys(self) -> set[str]:
        """Every key stored (a set: a cheap membership test per item before any lookup)."""
        self.flush()
        return {row[0] for row in self._query("SELECT key FROM replies")}

    def get_many(self, keys: list[str]) -> dict[str, dict]:
        self.flush()
        found: dict[str, dict] = {}
        for start in range(0, len(keys), 500):
            part = keys[start : start + 500]
            marks = ",".join("?" * len(part))
            rows = self._query(f"SELECT key, value FROM replies WHERE key IN ({marks})", part)
            found.update((k, json.loads(v)) for k, v in rows)
        return found

    def put(self, key: str, value: dict) -> None:
        text = json.dumps(value, ensure_ascii=False, sort_keys=True)
        with self._lock:
            self._pending[key] = text

    def due(self) -> bool:
        return len(self._pending) >= self.batch

    def flush(self) -> None:
        """Commit the queued replies in one transaction."""
        with self._db_lock:
            with self._lock:
                self._writing, self._pending = self._pending, {}
            if self._writing:
                now = time.time()
                rows = [(k, v, now) for k, v in self._writing.items()]
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR REPLACE INTO replies (key, value, created) VALUES (?, ?, ?)", rows)
                self._db.execute("COMMIT")
            with self._lock:
                self._writing = {}

    def __len__(self) -> int:
        self.flush()
        return self._query("SELECT COUNT(*) FROM replies")[0][0]

    def close(self) -> None:
        self.flush()
        with self._db_lock:
            self._db.close()
