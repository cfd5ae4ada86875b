"""Progress for long work: a bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from tqdm import tqdm

log = logging.getLogger("vlmflow")
# Where a stage's progress also goes (its MLflow run): set around a stage's work by the runtime,
# read by each Progress made in that context (the stage's own thread).
Sink = Callable[[str, int, int], None]  # (desc, done, total)
_sink: ContextVar[Sink | None] = ContextVar("vlmflow_progress_sink", default=None)


@contextmanager
def reporting_to(sink: Sink) -> Iterator[None]:
    """Progress made inside this block is also given to `sink`, at the pace of the log lines
    (every `every_s` seconds and when done), whatever the console shows."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)


class Progress:
    """Counts finished units of a stage; `mode` is auto | bar | log."""

    def __init__(
        self, desc: str, total: int, mode: str = "auto", unit: str = "unit", every_s: float = 5.0, initial: int = 0
    ):
        """initial: units done before this process looked (a resumed stage); not counted in the rate."""
        self.desc, self.total, self.done, self.initial, self.unit = desc, total, initial, initial, unit
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr) if use_bar else None
        self.every_s, self.last_log, self.started = every_s, 0.0, time.monotonic()
        self.sink, self.last_sunk = _sink.get(), float("-inf")  # the first update is given at once

    def update(self, n: int = 1, note: str = "") -> None:
        """`n` more units done; `note` (e.g. `loss 0.52`) follows the count."""
        self.done += n
        self._to_sink()
        if self.bar is not None:
            self.bar.update(n)
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            return
        now = time.monotonic()
        if self.done == self.total or now - self.last_log >= self.every_s:
            self.last_log = now
            shown = f", {note}" if note else ""
            log.info("%s: %d/%d %ss%s%s", self.desc, self.done, self.total, self.unit, shown, self.pace(now))

    def _to_sink(self) -> None:
        now = time.monotonic()
        if self.sink is None or (self.done < self.total and now - self.last_sunk < self.every_s):
            return
        self.last_sunk = now
        try:
            self.sink(self.desc, self.done, self.total)
        except Exception as exc:  # a tracking server that is down never stops the work
            log.debug("progress of %s not recorded: %s", self.desc, exc)

    def pace(self, now: float) -> str:
        """` (2.5 units/s, 12 s left)`: the rate so far and, while unfinished, the time left at it."""
        elapsed = now - self.started
        if self.done <= self.initial or elapsed <= 0:
            return ""
        rate = (self.done - self.initial) / elapsed
        left = "" if self.done >= self.total else f", {(self.total - self.done) / rate:.0f} s left"
        return f" ({rate:.3g} {self.unit}s/s{left})"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StepProgress:
    """A training stage's progress on the driver's console, from the rows of its step history
    (`step`, `total_steps`, `loss`, `resumed_from`) as the driver reads them: the workers print nothing."""

    def __init__(self, desc: str, mode: str = "auto", every_s: float = 30.0):
        """every_s: seconds between log lines (a stage of minutes: a line every half minute)."""
        self.desc, self.mode, self.every_s = desc, mode, every_s
        self.progress: Progress | None = None
        self.resumes: set[float] = set()

    def __call__(self, rows: list[dict]) -> None:
        last = rows[-1]
        total = last.get("total_steps")
        if not isinstance(total, int):
            return
        if self.progress is None:
            # The steps of the first look were done before it: the rate counts only the steps after it.
            first = int(last["step"])
            self.progress = Progress(self.desc, total, self.mode, unit="step", every_s=self.every_s, initial=first)
        loss = last.get("loss")
        note = f"loss {loss:.4f}" if isinstance(loss, float) else ""
        self.progress.update(int(last["step"]) - self.progress.done, note)

    def resumed(self, row: dict) -> None:
        """The first step after the workers went back to a checkpoint (an interrupted build run
        again, or a worker died and Ray Train restarted them); said once per resume."""
        when = row.get("time", row["step"])
        if when not in self.resumes:
            self.resumes.add(when)
            log.info("%s: resumed from its checkpoint at step %d", self.desc, row["resumed_from"])

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
