"""User-facing errors: the CLI prints these without a traceback."""

from __future__ import annotations

import errno
import os
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


# ---------------------------------------------------------------------------------------------
# Storage faults: a disk that fills, a read-only or unwritable workdir, a file-size limit

STORAGE_ERRNOS = {
    errno.ENOSPC: ("no space left on the device", "free space there and run again: finished stages are reused"),
    errno.EDQUOT: ("disk quota exceeded", "free space there and run again: finished stages are reused"),
    errno.EROFS: ("read-only file system", "give a writable --workdir"),
    errno.EACCES: ("permission denied", "give a --workdir this user can write"),
    errno.EFBIG: ("file too large (a file-size limit: ulimit -f)", "raise the limit and run again"),
}
# What sqlite (MLflow's and Prefect's stores) says instead of an errno.
SQLITE_FAULTS = {"database or disk is full": errno.ENOSPC, "attempt to write a readonly database": errno.EROFS}


class StorageError(UserError):
    """A write the storage refused (ENOSPC, EDQUOT, EROFS, EACCES, EFBIG): the path, what the
    system said and what to do, in one line; `run` says which run it ended (marked failed)."""

    def __init__(self, path: str | os.PathLike | None, code: int, run: str | None = None):
        self.path, self.errno, self.run = str(path or "?"), code, run
        reason, hint = STORAGE_ERRNOS[code]
        ended = f"run {run} failed; " if run else ""
        super().__init__(f"{self.path}: {reason} ({ended}{hint})")

    def __reduce__(self) -> tuple:  # Ray and Prefect may pickle it
        return StorageError, (self.path, self.errno, self.run)

    def of_run(self, run: str) -> StorageError:
        """The same fault, naming the run it ended."""
        return StorageError(self.path, self.errno, run)


def _causes(exc: BaseException) -> list[BaseException]:
    """What `exc` wraps: a Ray task error's own exception, the explicit and implicit chain, and
    an exception group's members."""
    found = [getattr(exc, "cause", None), exc.__cause__, exc.__context__, *getattr(exc, "exceptions", ())]
    return [e for e in found if isinstance(e, BaseException)]


def storage_fault(exc: BaseException | None, where: str | os.PathLike | None = None) -> StorageError | None:
    """The storage fault behind `exc` (anywhere in its chain, inside a Ray task error too), or
    None. Named: the failed write's path; where it names none (a write's own error, a full or
    read-only sqlite store), another fault in the chain that does, else `where`."""
    pending, seen, found = [exc] if exc is not None else [], set(), None
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, StorageError):
            return current
        code, path = None, None
        if isinstance(current, OSError) and current.errno in STORAGE_ERRNOS:
            code, path = current.errno, current.filename
        elif type(current).__name__ in ("OperationalError", "DatabaseError"):
            text = str(current).lower()
            code = next((c for phrase, c in SQLITE_FAULTS.items() if phrase in text), None)
        if code is not None:
            if path is not None:
                return StorageError(path, code)
            found = found or StorageError(where, code)
        pending += _causes(current)
    return found
