"""`url-list`: a table of image URLs and captions, downloaded by the ingest tasks.

img2dataset does not install beside the pinned stack, so this is a small downloader of our own
(httpx, pinned) that takes img2dataset's input: a .parquet, .csv or .jsonl table whose `url` and
`caption` columns (names configurable) give each row. It honours img2dataset's opt-out: a
response whose `X-Robots-Tag` holds `noai`, `noimageai`, `noindex` or `noimageindex` (for any
user agent, `X-Robots-Tag: otherbot: noai` included) is `opted-out`, and its body is not read.

The table may be an fsspec URL (`s3://bucket/urls.parquet`), read through fsspec like a local file.
The plan reads the table on the driver and cuts its rows into units of `shard_size` rows; a
unit's payload carries its rows' (key, url, captions), so a worker never opens the table. Keys
are the row's index in the table, zero-padded to 9 digits: a rerun gives the same keys. A
worker downloads its unit with `concurrency` threads sharing one connection pool and yields
the rows in table order.

Every row is a RawRow (the image's bytes, re-encoded only when `resize` is set; the caption;
extra = url, original_width, original_height, status) or a Rejected row:
- `missing-url` (an empty cell), `bad-url` (not http(s), no host, unparseable; a redirect to such
  a URL too), `malformed-annotation` (a jsonl line that is no JSON object, a caption that is
  neither text nor a list of texts);
- `http-<status>` for an answer other than 2xx / a redirect (`http-404`...), `http-429` and
  `http-5xx` once the retries are spent, `timeout` likewise, `connection-error` (refused, reset,
  DNS, TLS: not retried);
- `redirect-loop` (more than `max_redirects` redirects, or one back to a URL already visited);
- `opted-out` (X-Robots-Tag, above); `too-large` (a Content-Length or the bytes streamed over
  `max_bytes`: reading stops there); `truncated` (fewer bytes than the Content-Length);
- `not-an-image` (Pillow cannot open and verify the bytes, whatever the Content-Type says),
  `decompression-bomb` (over Pillow's pixel limit).
An empty caption is no rejection: the row has no captions (the caption-length filter decides).

Retries: a 429, a 5xx or a timeout is retried `retries` times, waiting the response's
`Retry-After` (seconds or an HTTP date, at most 30 s) or else 0.5 s, 1 s, 2 s...
"""

from __future__ import annotations

import csv
import email.utils
import io
import json
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime
from urllib.parse import urljoin, urlsplit

import httpx
import pyarrow as pa
from PIL import Image, ImageOps

from vlmflow.components.sources.base import (
    SOURCES,
    RawRow,
    Rejected,
    SourceContext,
    SourceReader,
    Unit,
    chunk,
    open_input,
)
from vlmflow.components.sources.parquet import check_caption_column, parquet_file
from vlmflow.errors import UserError
from vlmflow.images import to_rgb
from vlmflow.specs.data import UrlListSource, UrlResize

OPT_OUT = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_RETRY_AFTER_S = 30.0
BACKOFF_S = 0.5  # the first retry's wait without Retry-After; doubled for each next one
ATTEMPT_FACTOR = 6  # an attempt may take at most this many timeout_s in all (a trickling server)
KEY_DIGITS = 9

# (key, url or None, captions, problem or None): one planned row, small and picklable
Item = tuple[str, str | None, tuple[str, ...], str | None]


# ---------------------------------------------------------------- the table (driver)


def _key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def _captions(value: object) -> tuple[tuple[str, ...], str | None]:
    """(captions, None) or ((), problem): a string (empty: none) or a list of strings."""
    if value is None:
        return (), None
    if isinstance(value, str):
        return ((value.strip(),) if value.strip() else ()), None
    if isinstance(value, list | tuple) and all(isinstance(c, str) or c is None for c in value):
        return tuple(c.strip() for c in value if c is not None and c.strip()), None
    return (), f"caption {value!r:.80}: expected a string or a list of strings"


def _item(index: int, url: object, caption: object, where: str) -> Item:
    captions, problem = _captions(caption)
    if url is not None and not isinstance(url, str):
        problem = problem or f"url {url!r:.80}: expected a string"
        url = None
    return _key(index), url, captions, (f"{where}: {problem}" if problem else None)


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)


def _parquet_items(spec: UrlListSource) -> list[Item]:
    columns = [spec.url_column] + ([spec.caption_column] if spec.caption_column else [])
    with ExitStack() as stack:
        try:
            parquet = stack.enter_context(parquet_file(spec.path))
        except (pa.ArrowException, OSError) as exc:
            raise UserError(f"{spec.path}: cannot read parquet metadata: {exc}") from None
        schema = parquet.schema_arrow
        _check_columns(spec, schema.names)
        url_type = schema.field(spec.url_column).type
        if not _is_text(url_type):
            raise UserError(f"{spec.path}: url column {spec.url_column!r} has type {url_type}; expected string")
        if spec.caption_column:
            check_caption_column(spec.path, schema, spec.caption_column, _is_text)
        try:
            table = parquet.read(columns=list(dict.fromkeys(columns)))
        except (pa.ArrowException, OSError) as exc:
            raise UserError(f"{spec.path}: cannot read the table: {exc}") from None
    if spec.limit is not None:
        table = table.slice(0, spec.limit)
    urls = table.column(spec.url_column).to_pylist()
    captions = table.column(spec.caption_column).to_pylist() if spec.caption_column else [None] * len(urls)
    return [_item(i, u, c, f"row {i}") for i, (u, c) in enumerate(zip(urls, captions, strict=True))]


def _check_columns(spec: UrlListSource, names: list[str]) -> None:
    for what, name in (("url", spec.url_column), ("caption", spec.caption_column)):
        if name is not None and name not in names:
            raise UserError(f"{spec.path}: no {what} column {name!r} (columns: {', '.join(map(str, names))})")


def _csv_items(spec: UrlListSource) -> list[Item]:
    items: list[Item] = []
    try:
        with open_input(spec.path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            _check_columns(spec, list(reader.fieldnames or []))
            for row in reader:
                if spec.limit is not None and len(items) >= spec.limit:
                    break
                caption = row.get(spec.caption_column) if spec.caption_column else None
                items.append(_item(len(items), row.get(spec.url_column), caption, f"line {reader.line_num}"))
    except csv.Error as exc:
        raise UserError(f"{spec.path}: not a readable CSV table: {exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{spec.path}: not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot read {spec.path}: {exc.strerror or exc}") from None
    return items


def _jsonl_items(spec: UrlListSource) -> list[Item]:
    """One row per non-blank line; a line that is no JSON object is a malformed-annotation row."""
    items: list[Item] = []
    try:
        with open_input(spec.path) as raw:
            lines = raw.read().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise UserError(f"{spec.path}: not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot read {spec.path}: {exc.strerror or exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if spec.limit is not None and len(items) >= spec.limit:
            break
        where = f"line {number}"
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            items.append((_key(len(items)), None, (), f"{where}: invalid JSON: {exc}"))
            continue
        if not isinstance(entry, dict):
            items.append((_key(len(items)), None, (), f"{where}: expected a JSON object, got {type(entry).__name__}"))
            continue
        caption = entry.get(spec.caption_column) if spec.caption_column else None
        items.append(_item(len(items), entry.get(spec.url_column), caption, where))
    return items


def table_items(spec: UrlListSource) -> list[Item]:
    """Every row of the table, in order (cut at `limit`)."""
    suffix = spec.path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_items(spec)
    if suffix == ".csv":
        return _csv_items(spec)
    return _jsonl_items(spec)


def plan(spec: UrlListSource, ctx: SourceContext) -> list[Unit]:
    parts = chunk(table_items(spec), ctx.shard_size)
    return [Unit(ctx.name, i, part, len(part)) for i, part in enumerate(parts)]


# ---------------------------------------------------------------- the download (worker)


class _Refused(Exception):
    """A row's outcome: its reason code and detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


class _Retry(_Refused):
    """A 429, a 5xx or a timeout: worth another attempt (after `wait` seconds when the server said)."""

    def __init__(self, reason: str, detail: str, wait: float | None = None):
        super().__init__(reason, detail)
        self.wait = wait


def _short(url: str) -> str:
    return url if len(url) <= 200 else url[:197] + "..."


def _url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        return f"{_short(url)!r}: {exc}"
    if parts.scheme.lower() not in ("http", "https"):
        return f"{_short(url)!r}: only http and https URLs are downloaded"
    if not host:
        return f"{_short(url)!r}: no host"
    return None


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (a number or an HTTP date), at most MAX_RETRY_AFTER_S; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def opted_out(values: list[str]) -> str | None:
    """The X-Robots-Tag value that opts out of AI use (for any agent), or None."""
    for value in values:
        for part in value.split(","):
            if part.rsplit(":", 1)[-1].strip().lower() in OPT_OUT:
                return value.strip()
    return None


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    try:
        return int(value) if value is not None and int(value) >= 0 else None
    except ValueError:
        return None


def _body(response: httpx.Response, spec: UrlListSource, url: str, deadline: float) -> bytes:
    expected = _content_length(response)
    if expected is not None and expected > spec.max_bytes:
        raise _Refused("too-large", f"{_short(url)}: Content-Length {expected} is over max_bytes {spec.max_bytes}")
    chunks, size = [], 0
    try:
        for part in response.iter_bytes():
            size += len(part)
            if size > spec.max_bytes:
                raise _Refused("too-large", f"{_short(url)}: over max_bytes {spec.max_bytes} (stopped reading)")
            if time.monotonic() > deadline:
                raise _Retry("timeout", f"{_short(url)}: the body took over {ATTEMPT_FACTOR} x {spec.timeout_s}s")
            chunks.append(part)
    except httpx.TimeoutException as exc:
        detail = f"{_short(url)}: {type(exc).__name__} after {spec.timeout_s}s reading the body"
        raise _Retry("timeout", detail) from None
    except httpx.TransportError as exc:
        if expected is not None and response.num_bytes_downloaded < expected:
            raise _Refused(
                "truncated",
                f"{_short(url)}: {response.num_bytes_downloaded} of {expected} bytes (Content-Length) "
                "before the connection closed",
            ) from None
        raise _Refused("connection-error", f"{_short(url)}: {str(exc) or type(exc).__name__}") from None
    if expected is not None and response.num_bytes_downloaded < expected:
        raise _Refused("truncated", f"{_short(url)}: {response.num_bytes_downloaded} of {expected} bytes")
    return b"".join(chunks)


def _attempt(client: httpx.Client, spec: UrlListSource, url: str) -> tuple[bytes, int]:
    """One attempt: the redirects followed, the final response's body read."""
    deadline = time.monotonic() + ATTEMPT_FACTOR * spec.timeout_s
    visited, current = [url], url
    while True:
        try:
            with client.stream("GET", current) as response:
                status = response.status_code
                if status in REDIRECTS and response.headers.get("location"):
                    try:
                        target = urljoin(current, response.headers["location"].strip())
                    except ValueError as exc:
                        raise _Refused("bad-url", f"{_short(current)} redirects to an unreadable URL: {exc}") from None
                elif status == 429 or 500 <= status <= 599:
                    reason = "http-429" if status == 429 else "http-5xx"
                    wait = _retry_after(response.headers.get("retry-after"))
                    raise _Retry(reason, f"{_short(current)}: HTTP {status} {response.reason_phrase}", wait)
                elif not 200 <= status <= 299:
                    raise _Refused(f"http-{status}", f"{_short(current)}: HTTP {status} {response.reason_phrase}")
                else:
                    tag = opted_out(response.headers.get_list("x-robots-tag"))
                    if tag is not None:
                        raise _Refused("opted-out", f"{_short(current)}: X-Robots-Tag {tag!r}")
                    return _body(response, spec, current, deadline), status
        except httpx.TimeoutException as exc:
            raise _Retry("timeout", f"{_short(current)}: {type(exc).__name__} after {spec.timeout_s}s") from None
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            raise _Refused("bad-url", f"{_short(current)!r}: {exc}") from None
        except (httpx.HTTPError, OSError) as exc:
            raise _Refused("connection-error", f"{_short(current)}: {str(exc) or type(exc).__name__}") from None
        if target in visited:
            raise _Refused("redirect-loop", f"{_short(current)} redirects back to {_short(target)}")
        if len(visited) > spec.max_redirects:
            raise _Refused("redirect-loop", f"{_short(url)}: more than {spec.max_redirects} redirects")
        problem = _url_problem(target)
        if problem is not None:
            raise _Refused("bad-url", f"{_short(current)} redirects to {problem}")
        if time.monotonic() > deadline:
            raise _Retry("timeout", f"{_short(url)}: the redirects took over {ATTEMPT_FACTOR} x {spec.timeout_s}s")
        visited.append(target)
        current = target


def download(client: httpx.Client, spec: UrlListSource, url: str) -> tuple[bytes, int]:
    """(body, final status), or _Refused(reason, detail) once the retries are spent."""
    for attempt in range(spec.retries + 1):
        try:
            return _attempt(client, spec, url)
        except _Retry as retry:
            if attempt == spec.retries:
                tries = f" ({attempt + 1} attempts)" if attempt else ""
                raise _Refused(retry.reason, retry.detail + tries) from None
            time.sleep(retry.wait if retry.wait is not None else min(BACKOFF_S * 2**attempt, MAX_RETRY_AFTER_S))
    raise AssertionError("unreachable")


def _open_image(data: bytes) -> tuple[int, int]:
    """The image's (width, height) once Pillow has verified it; _Refused when it cannot."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _Refused("decompression-bomb", str(exc)) from None
    except Exception as exc:  # any decoder exception is a property of the bytes
        detail = "not an image format Pillow can identify" if isinstance(exc, Image.UnidentifiedImageError) else exc
        raise _Refused("not-an-image", f"{type(exc).__name__}: {detail}") from None


def resized(data: bytes, resize: UrlResize) -> bytes:
    """The image resized the img2dataset way, as JPEG (a JPEG source) or PNG (anything else)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                fmt, rgb = image.format, to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _Refused("decompression-bomb", str(exc)) from None
    except Exception as exc:  # e.g. a truncated file that verified
        raise _Refused("not-an-image", f"cannot decode it to resize: {type(exc).__name__}: {exc}") from None
    size, (width, height) = resize.size, rgb.size
    lanczos = Image.Resampling.LANCZOS
    if resize.mode == "center-crop":
        out = ImageOps.fit(rgb, (size, size), lanczos)
    elif resize.mode == "border":
        out = ImageOps.pad(rgb, (size, size), lanczos, color=(0, 0, 0))
    else:  # keep-ratio: the smaller side becomes `size`
        scale = size / min(width, height)
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        if target[0] * target[1] > (Image.MAX_IMAGE_PIXELS or float("inf")):
            detail = f"{width}x{height} resized to {target[0]}x{target[1]}: too many pixels"
            raise _Refused("decompression-bomb", detail)
        out = rgb.resize(target, lanczos)
    buffer = io.BytesIO()
    if fmt == "JPEG":
        out.save(buffer, format="JPEG", quality=95)
    else:
        out.save(buffer, format="PNG")
    return buffer.getvalue()


def fetch_row(client: httpx.Client, spec: UrlListSource, item: Item) -> RawRow | Rejected:
    key, url, captions, problem = item
    if problem is not None:
        return Rejected(key, "malformed-annotation", problem)
    url = (url or "").strip()
    if not url:
        return Rejected(key, "missing-url", f"the {spec.url_column} cell is empty")
    bad = _url_problem(url)
    if bad is not None:
        return Rejected(key, "bad-url", bad)
    try:
        data, status = download(client, spec, url)
        width, height = _open_image(data)
        if spec.resize is not None:
            data = resized(data, spec.resize)
    except _Refused as refused:
        return Rejected(key, refused.reason, refused.detail)
    extra = {"url": url, "original_width": width, "original_height": height, "status": status}
    return RawRow(key=key, image=data, captions=list(captions), extra=extra)


def client_for(spec: UrlListSource) -> httpx.Client:
    return httpx.Client(
        follow_redirects=False,
        timeout=httpx.Timeout(spec.timeout_s),
        headers={"User-Agent": spec.user_agent, "Accept-Encoding": "identity"},
        limits=httpx.Limits(max_connections=spec.concurrency, max_keepalive_connections=spec.concurrency),
    )


def read(spec: UrlListSource, ctx: SourceContext, unit: Unit) -> Iterator[RawRow | Rejected]:
    payload = list(unit.payload)
    if not payload:
        return
    with client_for(spec) as client, ThreadPoolExecutor(min(spec.concurrency, len(payload))) as pool:
        yield from pool.map(lambda item: fetch_row(client, spec, item), payload)


SOURCES.register("url-list", SourceReader("url-list", plan, read))
