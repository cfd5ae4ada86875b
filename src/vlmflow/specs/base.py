"""Shared building blocks of spec models: strict models and spec-relative paths."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo


class StrictModel(BaseModel):
    """Unknown keys are errors; models are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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
