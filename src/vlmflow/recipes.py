"""The built-in recipes and instruct templates, shipped as package data.

The source is the repository's top-level `specs/` folder; pyproject.toml maps it to the package
`vlmflow.builtin`, so an editable install and a built wheel both read it through
`importlib.resources`. `vlmflow run NAME` takes a built-in recipe's name where a spec file is
expected (`resolve_spec`); `vlmflow recipes` lists them (`builtin_recipes`, `describe`).
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

import yaml

from vlmflow.errors import UserError

PACKAGE = "vlmflow.builtin"
SUFFIX = ".yaml"


def builtin_dir(name: str) -> Path:
    """The folder `specs/NAME` as installed: a real directory (pip unpacks wheels), not a zip entry."""
    found = files(PACKAGE) / name
    if not isinstance(found, Path):
        raise UserError(f"the built-in {name!r} folder of {PACKAGE} is not a folder on disk ({found!r})")
    return found


def builtin_recipes() -> dict[str, Path]:
    """Every built-in recipe by name (the file's stem, e.g. `llava-1.5-tiny`), sorted."""
    folder = builtin_dir("recipes")
    return dict(sorted((path.stem, path) for path in folder.glob(f"*{SUFFIX}")))


def describe(path: Path) -> str:
    """One line about a recipe: the first sentence of its `description:` (empty if it has none)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return ""
    description = data.get("description") if isinstance(data, dict) else None
    if not isinstance(description, str):
        return ""
    first_line = next((line.strip() for line in description.splitlines() if line.strip()), "")
    return re.split(r"(?<=\.)\s+", first_line, maxsplit=1)[0]


def resolve_spec(arg: str) -> Path:
    """A spec argument as a file: an existing file path as given, else the built-in recipe it
    names (with or without `.yaml`), else the path unchanged (the loader says it is not found)."""
    path = Path(arg)
    if path.is_file():
        return path
    if "/" not in arg and "\\" not in arg:
        found = builtin_recipes().get(arg.removesuffix(SUFFIX))
        if found is not None:
            return found
    return path
