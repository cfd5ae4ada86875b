"""The built-in recipes and templates as package data: listed, described, named on the command line."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest
from click.testing import CliRunner

from vlmflow.cli import cli
from vlmflow.components.instruct.templates import DEFAULT_TEMPLATES, load_templates
from vlmflow.recipes import builtin_recipes, describe, resolve_spec

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted((REPO / "specs" / "recipes").glob("*.yaml"))


def test_every_recipe_in_specs_is_a_builtin_with_a_description():
    found = builtin_recipes()
    assert list(found) == sorted(p.stem for p in SOURCES)
    for source in SOURCES:
        path = found[source.stem]
        assert isinstance(path, Path) and path.read_bytes() == source.read_bytes()
        line = describe(path)
        assert line and "\n" not in line, source


def test_describe_is_the_first_sentence_of_the_description(tmp_path):
    spec = tmp_path / "r.yaml"
    spec.write_text("name: r\ndescription: |\n  Tiny LLaVA-1.5 on CPU. Trains in minutes.\n  More text.\n")
    assert describe(spec) == "Tiny LLaVA-1.5 on CPU."
    spec.write_text("name: r\n")
    assert describe(spec) == ""


def test_default_templates_are_the_package_data_folder():
    assert isinstance(DEFAULT_TEMPLATES, Path) and DEFAULT_TEMPLATES.is_dir()
    assert files("vlmflow.builtin") / "instruct_templates" == DEFAULT_TEMPLATES
    assert load_templates().folder == DEFAULT_TEMPLATES.resolve()


@pytest.mark.parametrize("arg", ["llava-1.5-tiny", "llava-1.5-tiny.yaml"])
def test_resolve_spec_by_name(arg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_spec(arg) == builtin_recipes()["llava-1.5-tiny"]


def test_resolve_spec_prefers_an_existing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "llava-1.5-tiny.yaml").write_text("name: mine\n")
    assert resolve_spec("llava-1.5-tiny.yaml") == Path("llava-1.5-tiny.yaml")
    assert resolve_spec(str(tmp_path / "llava-1.5-tiny.yaml")) == tmp_path / "llava-1.5-tiny.yaml"
    (tmp_path / "clip-tiny").mkdir()  # a folder is not a spec: the name still means the built-in
    assert resolve_spec("clip-tiny") == builtin_recipes()["clip-tiny"]


@pytest.mark.parametrize("arg", ["no-such-recipe", "no-such-recipe.yaml", "elsewhere/llava-1.5-tiny.yaml"])
def test_resolve_spec_leaves_other_args_unchanged(arg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_spec(arg) == Path(arg)


def test_cli_recipes_lists_every_name_with_its_description():
    result = CliRunner().invoke(cli, ["recipes"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines] == sorted(p.stem for p in SOURCES)
    starts = {line.index(line.split()[1], len(line.split()[0])) for line in lines}
    assert len(starts) == 1  # descriptions aligned in one column
    recipes = builtin_recipes()
    assert all(line.endswith(describe(recipes[line.split()[0]])) for line in lines)


def test_cli_takes_a_builtin_name_where_a_spec_file_goes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clip-tiny").mkdir()
    result = CliRunner().invoke(cli, ["validate", "clip-tiny", "--set", "seed=3"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{builtin_recipes()['clip-tiny']}: ok: recipe 'clip-tiny' (seed 3)")


def test_cli_unknown_name_is_not_found_and_points_at_recipes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["validate", "no-such-recipe"])
    assert result.exit_code == 2
    assert "no-such-recipe:1:1: spec file not found" in result.stderr
    assert "`vlmflow recipes`" in result.stderr
