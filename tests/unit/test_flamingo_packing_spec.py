"""Packing lays samples side by side with their image tokens spliced into the text; a Flamingo
model cross-attends to its images instead, so the spec refuses the combination where it is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmflow.errors import SpecError
from vlmflow.recipes import builtin_dir
from vlmflow.specs import load_recipe

STAGE = "  - name: flamingo\n"


def recipe_with_packing(folder: Path) -> tuple[Path, int]:
    """The flamingo-tiny recipe with `packing: true` in its flamingo stage, and that line's number."""
    text = (builtin_dir("recipes") / "flamingo-tiny.yaml").read_text(encoding="utf-8")
    assert text.count(STAGE) == 1
    head, tail = text.split(STAGE)
    path = folder / "flamingo-packed.yaml"
    path.write_text(head + STAGE + "    packing: true\n" + tail, encoding="utf-8")
    return path, head.count("\n") + 2


def test_packing_with_a_flamingo_connector_is_a_located_spec_error(tmp_path):
    path, line = recipe_with_packing(tmp_path)
    with pytest.raises(SpecError) as info:
        load_recipe(path)
    [problem] = info.value.problems
    assert (problem.source, problem.line, problem.field) == (str(path), line, "stages.1.packing")
    assert "cross-attends" in problem.message


def test_the_same_recipe_without_packing_loads(tmp_path):
    path, _ = recipe_with_packing(tmp_path)
    path.write_text(path.read_text(encoding="utf-8").replace("    packing: true\n", ""), encoding="utf-8")
    assert load_recipe(path).stages[1].packing is False
