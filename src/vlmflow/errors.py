"""User-facing errors: the CLI prints these without a traceback."""

from __future__ import annotations

from dataclasses import dataclass


class UserError(Exception):
    """A mistake the user can fix (bad spec, missing file, bad option)."""


@dataclass(frozen=True)
class SpecProblem:
    source: str
    line: int
    col: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}:{self.col}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class SpecError(UserError):
    """One or more problems in a recipe spec, each with file, line, column and field."""

    def __init__(self, problems: list[SpecProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class StageError(Exception):
    """A stage failed; carries the stage name for the run summary."""

    def __init__(self, stage: str, message: str):
        self.stage = stage
        super().__init__(f"stage {stage!r} failed: {message}")
