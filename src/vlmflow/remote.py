"""Inputs named by fsspec URLs (`s3://bucket/prefix`, `gs://bucket/file.parquet`...): the spec
type, listings with each object's identity, and opening one object.

Credentials never go in a spec: it is saved in resolved_spec.yaml, MLflow params and the Prefect
database. A URL with user info (`s3://KEY:SECRET@bucket`) or a secret query parameter is refused
when the spec is validated. fsspec's own configuration reads them: for `s3://`, botocore's chain
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE or a source's
`storage_options.profile` naming a profile of ~/.aws/credentials, an instance role), and the
endpoint of an S3-compatible store (MinIO, moto) from AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 or
`storage_options.endpoint_url`. On a Ray cluster the workers need the same environment.

Validating a spec checks a URL's form and that fsspec knows its protocol (the package that
implements it imports), with no network call: `vlmflow validate` works offline, and a store
that is down or a prefix that is empty is reported when the run lists it (`list_objects`), with
the URL named, before any stage starts.

Identity: an object enters cache keys by what its store says of its content, from the listing
(fsspec `info` for one object, `find(detail=True)` for a prefix), never by downloading it: its
ETag (S3: the MD5 of a single-part upload, the MD5 of the parts' MD5s for a multipart one: both
change when the bytes do), its size, and its version id where the store reports one. A store
that reports neither an ETag nor a checksum has its objects read once and hashed (sha256).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO, Any

from pydantic_core import core_schema

from vlmflow.errors import UserError

CREDENTIALS_HELP = (
    "credentials never go in a spec (it is saved in resolved_spec.yaml, MLflow params and the Prefect "
    "database): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) in the environment, "
    "or name a profile of ~/.aws/credentials with AWS_PROFILE or storage_options.profile"
)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)
_CHAINED = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*::")
LOCAL_PROTOCOLS = frozenset({"file", "local"})
# info() keys naming an object's content, in the order they are preferred (s3fs, gcsfs, adlfs, http)
_ETAG_KEYS = ("ETag", "etag", "md5Hash", "content_md5", "crc32c", "checksum")
_VERSION_KEYS = ("VersionId", "version_id", "generation")


def looks_like_url(text: str) -> bool:
    """Whether TEXT is written as a URL (`scheme://...`) rather than a path."""
    return _SCHEME.match(text) is not None or _CHAINED.match(text) is not None


class URL(str):
    """An fsspec URL of an input, with the (non-secret) fsspec options that reach it in `options`."""

    options: dict[str, Any]

    def __new__(cls, text: str, options: dict[str, Any] | None = None) -> URL:
        url = super().__new__(cls, text)
        url.options = dict(options or {})
        return url

    def __reduce__(self) -> tuple:  # Ray ships specs to workers: keep the options
        return (URL, (str(self), self.options))

    @classmethod
    def parse(cls, text: str) -> URL:
        """The URL, or ValueError saying what is wrong with it (its form only: no network)."""
        from vlmflow.specs.base import url_credentials

        if _CHAINED.match(text):
            raise ValueError(f"{text[:200]!r}: chained fsspec URLs (a::b://...) are not supported")
        match = _SCHEME.match(text)
        if match is None:
            raise ValueError(f"{text[:200]!r} is not a URL (scheme://...)")
        protocol, rest = match.group(1).lower(), match.group(2)
        if url_credentials(text) is not None or "@" in rest.split("/", 1)[0]:
            raise ValueError(f"{url_credentials(text) or protocol + '://***@...'!r}: {CREDENTIALS_HELP}")
        if protocol in LOCAL_PROTOCOLS:
            raise ValueError(f"{text[:200]!r}: write a local file as a path (relative to the spec's folder)")
        if not rest.strip("/"):
            raise ValueError(f"{text[:200]!r}: no bucket or path after {protocol}://")
        import fsspec

        try:
            fsspec.get_filesystem_class(protocol)
        except ValueError:
            raise ValueError(f"{text[:200]!r}: fsspec knows no protocol {protocol!r}") from None
        except ImportError as exc:
            raise ValueError(f"{text[:200]!r}: the {protocol}:// filesystem is not installed: {exc}") from None
        return cls(f"{protocol}://{rest}")

    @property
    def protocol(self) -> str:
        return self.split("://", 1)[0]

    @property
    def path(self) -> str:
        """The path its fsspec filesystem names it by (s3: bucket/key), without trailing slashes."""
        import fsspec

        return fsspec.get_filesystem_class(self.protocol)._strip_protocol(str(self)).rstrip("/")

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.path).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.path).stem

    @property
    def parent(self) -> URL:
        return self.at(posixpath.dirname(self.path))

    def at(self, path: str) -> URL:
        """The URL of PATH (an fsspec path: bucket/key) in the same store, with the same options."""
        return URL(f"{self.protocol}://{path}", self.options)

    def with_options(self, options: dict[str, Any]) -> URL:
        return URL(str(self), options)

    def filesystem(self) -> Any:  # an fsspec AbstractFileSystem
        """The fsspec filesystem, listings never cached (a rerun sees a changed object)."""
        import fsspec

        extra = {"use_listings_cache": False} if self.protocol in ("s3", "s3a") else {}
        return fsspec.filesystem(self.protocol, **extra, **self.options)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        def validate(value: Any) -> URL:
            if isinstance(value, URL):
                return value
            if not isinstance(value, str):
                raise ValueError("expected a URL string")
            return cls.parse(value)

        return core_schema.no_info_plain_validator_function(
            validate, serialization=core_schema.plain_serializer_function_ser_schema(str, when_used="json")
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> dict:
        return {"type": "string", "format": "uri"}


@dataclass(frozen=True)
class RemoteObject:
    url: URL
    name: str  # relative to the URL listed, posix; "" when the URL names this object itself
    identity: dict[str, Any]  # {"size", "etag", "version"} (or "sha256" for a store without ETags)


def identity(info: dict[str, Any], url: URL | None = None) -> dict[str, Any]:
    """What the store says of an object's content (see the module's docstring); a store that gives
    no ETag or checksum has URL read and hashed."""
    etag = next((info[k] for k in _ETAG_KEYS if info.get(k)), None)
    version = next((info[k] for k in _VERSION_KEYS if info.get(k)), None)
    found: dict[str, Any] = {"size": info.get("size")}
    if etag is not None:
        found["etag"] = str(etag)
    elif url is not None:
        found["sha256"] = _sha256(url)
    if version is not None:
        found["version"] = str(version)
    return found


def _sha256(url: URL) -> str:
    digest = hashlib.sha256()
    with url.filesystem().open(url.path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def list_objects(url: URL) -> list[RemoteObject]:
    """The object URL names, or every object under it as a prefix (recursively), sorted by name;
    a UserError naming the URL when there is none or the store cannot be reached."""
    try:
        fs = url.filesystem()
        try:
            info = fs.info(url.path)
        except FileNotFoundError:
            info = {"type": "missing"}
        if info.get("type") == "file":
            return [RemoteObject(url, "", identity(info, url))]
        found = fs.find(url.path, detail=True) if info.get("type") == "directory" else {}
        objects = [
            RemoteObject(url.at(name), name[len(url.path) + 1 :], identity(entry, url.at(name)))
            for name, entry in sorted(found.items())
            if entry.get("type") == "file" and name.startswith(url.path + "/")
        ]
    except UserError:
        raise
    except Exception as exc:  # the store's client raises its own types (botocore, aiohttp...)
        raise UserError(f"{url}: cannot list it: {type(exc).__name__}: {exc}") from None
    if not objects:
        raise UserError(f"{url}: no such object, and no object under it as a prefix")
    return objects


def open_object(url: URL, expected: dict[str, Any] | None = None) -> IO[bytes]:
    """The object opened for reading; OSError when it cannot be, or when its identity is no longer
    EXPECTED (it changed after the run listed it: the cache key would not describe what is read)."""
    try:
        handle = url.filesystem().open(url.path, "rb")
    except OSError:
        raise
    except Exception as exc:  # the store's client raises its own types
        raise OSError(f"{url}: cannot open it: {type(exc).__name__}: {exc}") from None
    if expected is not None:
        details = getattr(handle, "details", None) or url.filesystem().info(url.path)
        now = identity(details)
        if any(now.get(k) != v for k, v in expected.items() if k != "sha256"):
            handle.close()
            raise OSError(f"{url} changed after the run listed it (was {expected}, now {now}); run again")
    return handle
