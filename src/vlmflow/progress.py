"""Progress for long work: a bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("vlmflow")


class Progress:
    """Counts finished units of a stage; `mode` is auto | bar | log."""

    def __init__(self, desc: str, total: int, mode: str = "auto", unit: str = "unit", every_s: float = 5.0):
        self.desc, self.total, self.done, self.unit = desc, total, 0, unit
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr) if use_bar else None
        self.every_s, self.last_log, self.started = every_s, 0.0, time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.done == self.total or now - self.last_log >= self.every_s:
            self.last_log = now
            log.info("%s: %d/%d %ss%s", self.desc, self.done, self.total, self.unit, self.pace(now))

    def pace(self, now: float) -> str:
        """` (2.5 units/s, 12 s left)`: the rate so far and, while unfinished, the time left at it."""
        elapsed = now - self.started
        if self.done <= 0 or elapsed <= 0:
            return ""
        rate = self.done / elapsed
        left = "" if self.done >= self.total else f", {(self.total - self.done) / rate:.0f} s left"
        return f" ({rate:.3g} {self.unit}s/s{left})"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
