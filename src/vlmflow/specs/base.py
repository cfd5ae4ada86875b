"""Shared building blocks of spec models: strict models, strict numbers and spec-relative paths."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, AllowInfNan, BaseModel, ConfigDict, Field, Strict, ValidationInfo

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class StrictModel(BaseModel):
    """Unknown keys are errors; models are immutable once validated; floats are finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _int64(value: int) -> int:
    if not INT64_MIN <= value <= INT64_MAX:
        digits = len(str(abs(value)))
        raise ValueError(f"a {digits}-digit number does not fit in a 64-bit integer")
    return value


# Spec numbers. Strict: a YAML bool is not a number and neither is a string ("1_000", "1e-4"):
# coercing them would hide a mistake. An int is fine where a float is expected. Ints fit in
# int64 (they reach numpy, torch and the MLflow/Prefect databases); floats are finite.
Int = Annotated[int, Strict(), AfterValidator(_int64)]
Seed = Annotated[int, Strict(), Field(ge=0), AfterValidator(_int64)]  # 0 <= seed < 2**63
Float = Annotated[float, Strict(), AllowInfNan(False)]


def _resolve(value: Path, info: ValidationInfo) -> Path:
    context = info.context or {}
    spec_dir = Path(context.get("spec_dir", Path.cwd()))
    try:
        resolved = (spec_dir / value.expanduser()).resolve()
    except RuntimeError as exc:  # `~user` of an unknown user, a symlink loop
        raise ValueError(f"cannot resolve path {str(value)[:200]!r}: {exc}") from None
    outside = not resolved.is_relative_to(spec_dir.resolve())
    if outside and not context.get("allow_outside_paths", False):
        raise ValueError(
            f"path {str(value)!r} resolves outside the spec's folder ({resolved}); "
            "set runtime.allow_outside_paths: true to allow it"
        )
    return resolved


def _must_exist(value: Path) -> Path:
    try:
        exists = value.exists()
    except OSError as exc:
        raise ValueError(f"cannot check path {str(value)[:200]!r}: {exc.strerror or exc}") from None
    if not exists:
        raise ValueError(f"path does not exist: {value}")
    return value


def _must_be_dir(value: Path) -> Path:
    if not value.is_dir():
        raise ValueError(f"not a folder: {value}")
    return value


def _must_be_file(value: Path) -> Path:
    if not value.is_file():
        raise ValueError(f"not a file: {value}")
    return value


# A path relative to the spec file's folder; may not exist yet (outputs).
SpecPath = Annotated[Path, AfterValidator(_resolve)]
# An input path that must exist (a file or a folder).
ExistingPath = Annotated[Path, AfterValidator(_resolve), AfterValidator(_must_exist)]
ExistingDir = Annotated[Path, AfterValidator(_resolve), AfterValidator(_must_exist), AfterValidator(_must_be_dir)]
ExistingFile = Annotated[Path, AfterValidator(_resolve), AfterValidator(_must_exist), AfterValidator(_must_be_file)]


# `scheme://user:password@host` (any scheme) or `http(s)://token@host`: userinfo before the host.
_URL_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*)://([^/?#\s@]*)@")
# A secret passed as a query parameter: `?api_key=...`, `&token=...`, a signed URL's signature.
_URL_SECRET_PARAM = re.compile(
    r"(?<=[?&;])(api[_-]?key|access[_-]?token|auth[_-]?token|token|password|passwd|secret|client[_-]?secret"
    r"|sig|signature|x-amz-signature|x-amz-credential|x-goog-signature)=([^&#\s]+)",
    re.IGNORECASE,
)


def url_credentials(text: str) -> str | None:
    """`text` with the credentials of any URL in it masked, when it holds some; else None.

    A spec is saved in resolved_spec.yaml, MLflow params and the Prefect database, so a secret in
    it leaks to everyone who can read those; secrets belong in environment variables."""
    found = False

    def userinfo(match: re.Match) -> str:
        nonlocal found
        scheme, info = match.group(1).lower(), match.group(2)
        user, _, password = info.partition(":")
        if password or (user and scheme in ("http", "https", "ws", "wss")):
            found = True
            return f"{match.group(1)}://***@"
        return match.group(0)

    def param(match: re.Match) -> str:
        nonlocal found
        found = True
        return f"{match.group(1)}=***"

    masked = _URL_SECRET_PARAM.sub(param, _URL_USERINFO.sub(userinfo, text))
    return masked if found else None
