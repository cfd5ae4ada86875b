"""The spec reference (`vlmflow schema`, docs/spec.md): current, complete and right about each field."""

from __future__ import annotations

import json
import typing
from pathlib import Path

from click.testing import CliRunner

from vlmflow.cli import cli
from vlmflow.spec_reference import COMMAND, builtin_components, reference
from vlmflow.specs.data import Filter, ImageFolderSource, Source
from vlmflow.specs.recipe import Recipe

DOC = Path(__file__).resolve().parents[2] / "docs" / "spec.md"


def test_docs_spec_md_is_current():
    assert DOC.is_file(), f"docs/spec.md is missing: run `{COMMAND}`"
    assert DOC.read_text(encoding="utf-8") == reference(), f"docs/spec.md is out of date: run `{COMMAND}`"


def rows(text: str, heading: str) -> dict[str, list[str]]:
    """The field rows of the section under HEADING: field -> [type, default, description]."""
    lines = text.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0].splitlines()
    found = {}
    for line in lines:
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            found[cells[0].strip("`")] = cells[1:]
    return found


def kinds(union: object) -> list[str]:
    members = typing.get_args(typing.get_args(union)[0])
    return [typing.get_args(m.model_fields["kind"].annotation)[0] for m in members]


def test_every_source_and_filter_kind_has_every_field():
    text = reference()
    for union, path in ((Source, "data.sources[]"), (Filter, "data.filters[]")):
        for member, kind in zip(typing.get_args(typing.get_args(union)[0]), kinds(union), strict=True):
            assert list(rows(text, f"`{path}`: `kind: {kind}`")) == list(member.model_fields), kind
    assert list(rows(text, "The recipe (top level)")) == list(Recipe.model_fields)


def test_fields_show_type_constraints_default_and_description():
    text = reference()
    folder = rows(text, "`data.sources[]`: `kind: image-folder`")
    assert folder["path"][:2] == ["existing folder", "required"]
    assert folder["captions_file"][:2] == ["existing file or null", "`null`"]
    assert folder["captions_file"][2] == " ".join(ImageFolderSource.model_fields["captions_file"].description.split())
    assert folder["limit"][0] == "int or null (>= 1)"
    shapes = rows(text, "`data.sources[]`: `kind: synthetic-shapes`")
    assert shapes["image_size"][:2] == ["int (>= 16, <= 1024)", "`64`"]
    assert shapes["seed"][0] == "int (>= 0) or null"
    assert rows(text, "`data.dedup`")["partitions"][2].startswith("*operational.*")
    assert rows(text, "`pipeline[]`")["with"][0] == "map of string to any"  # by its alias


def test_every_builtin_component_is_listed_with_its_config():
    text = reference().split("## Components\n", 1)[1]
    for component in builtin_components():
        line = next(row for row in text.splitlines() if row.startswith(f"| `{component.name}` |"))
        assert line.endswith("|") and "](#" in line, line


def test_schema_command_prints_writes_and_gives_json(tmp_path):
    runner = CliRunner()
    printed = runner.invoke(cli, ["schema"])
    assert printed.exit_code == 0 and printed.output == reference()
    out = tmp_path / "spec.md"
    written = runner.invoke(cli, ["schema", "--output", str(out)])
    assert written.exit_code == 0 and out.read_text(encoding="utf-8") == reference()
    schema = json.loads(runner.invoke(cli, ["schema", "--json"]).output)
    assert set(schema["properties"]) == set(Recipe.model_fields)
    assert "ImageFolderSource" in schema["$defs"]
