"""The built-in components, found by the `vlmflow.components` entry point `builtin`: every module
of this package that declares `COMPONENT = ...` or `COMPONENTS = [...]` at its top level is
imported (and only those), so a new built-in stage is its module and its test, nothing more.
Importing this module also registers the concise recipe sections' expansion."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from vlmflow.component import Component

DECLARES = re.compile(r"^COMPONENTS? = ", re.MULTILINE)


def discover() -> list[Component]:
    here = Path(__file__).resolve()
    root, found = here.parent, []
    for path in sorted(root.rglob("*.py")):
        if path == here or not DECLARES.search(path.read_text(encoding="utf-8")):
            continue
        parts = path.relative_to(root).with_suffix("").parts
        module = importlib.import_module(".".join((__package__, *parts)))
        declared = getattr(module, "COMPONENTS", None) or [module.COMPONENT]
        found += [c for c in declared if isinstance(c, Component)]
    return found


COMPONENTS = discover()
importlib.import_module(f"{__package__}.concise")
