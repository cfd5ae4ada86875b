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
        self.every_s, self.last_log = every_s, 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.done == self.total or now - self.last_log >= self.every_s:
            self.last_log = now
            log.info("%s: %d/%d %ss", self.desc, self.done, self.total, self.unit)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
