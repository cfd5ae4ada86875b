"""The spec reference, rendered from the pydantic models: `vlmflow schema` prints it and
docs/spec.md holds it (a unit test fails when the two differ).

Every model a recipe can hold is a section, in the order a reader meets it from the top of a
recipe (a discriminated union's members, `kind: ...`, each a section of its own), then the
built-in components a `pipeline:` step `uses`, with the config its `with:` holds. Each field is a
row: its name, type (with constraints), default and description. Plugins installed in this
environment are left out, so the text is the same on every machine.
"""

from __future__ import annotations

import importlib
import inspect
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from vlmflow.component import BUILTIN, Component, is_operational
from vlmflow.specs import base
from vlmflow.specs.recipe import Recipe

COMMAND = "vlmflow schema --output docs/spec.md"

INTRO = f"""# Spec reference

Generated from the pydantic models (`src/vlmflow/specs/`) and the built-in components by
`{COMMAND}`; do not edit by hand (a unit test checks that it is current).
`vlmflow schema --json` prints the same models as JSON Schema.

How every field reads:

- Unknown keys are errors, and so is a value of the wrong type: numbers are strict (`seed: true`
  or `count: "1_000"` are errors, not 1 and 1000), finite, and integers fit in 64 bits.
- Paths are relative to the spec file's folder and must stay inside it unless
  `runtime.allow_outside_paths: true`; an *existing* file or folder must be there when the spec is
  validated.
- A `kind:` field picks one member of a family (a source, a filter, a connector...); each member is
  a section below.
- *operational* fields change how a step runs but not what it writes, so they are left out of its
  cache key.
"""


@dataclass
class _Section:
    model: type[BaseModel]
    anchor: str
    title: str
    where: list[str] = field(default_factory=list)


def _members(annotation: Any) -> list[Any]:
    """The types an annotation may hold: Annotated and Optional unwrapped, unions flattened."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models an annotation names, at any depth (list items, dict values), in order."""
    found: list[type[BaseModel]] = []
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            found.append(member)
        else:
            for arg in typing.get_args(member):
                found += _models_in(arg)
    return found


def _kind(model: type[BaseModel]) -> str | None:
    info = model.model_fields.get("kind")
    if info is None or typing.get_origin(info.annotation) is not typing.Literal:
        return None
    return " | ".join(str(value) for value in typing.get_args(info.annotation))


def _item_path(path: str, annotation: Any) -> str:
    """`path[]` where the field holds a list of models, `path.KEY` for a map of them."""
    for member in _members(annotation):
        origin = typing.get_origin(member)
        if origin in (list, tuple) and _models_in(member):
            return f"{path}[]"
        if origin is dict and _models_in(member):
            return f"{path}.NAME"
    return path


class _Sections:
    """Every model reachable from the roots, in reading order, each with the paths it is used at."""

    def __init__(self) -> None:
        self.by_model: dict[type[BaseModel], _Section] = {}

    def visit(self, model: type[BaseModel], path: str) -> None:
        section = self.by_model.get(model)
        if section is not None:
            if path not in section.where:
                section.where.append(path)
            return
        kind = _kind(model)
        title = f"`{path}`" + (f": `kind: {kind}`" if kind else "")
        anchor = f"{model.__module__.rsplit('.', 1)[-1]}-{model.__name__}".lower()
        self.by_model[model] = _Section(model, anchor, title, [path])
        for name, info in model.model_fields.items():
            child = _item_path(f"{path}.{info.alias or name}" if path else (info.alias or name), info.annotation)
            for sub in _models_in(info.annotation):
                self.visit(sub, child)

    def link(self, model: type[BaseModel]) -> str:
        """A link to the model's section: its kind, or the path it is first used at."""
        section = self.by_model[model]
        return f"[`{_kind(model) or section.where[0] or 'recipe'}`](#{section.anchor})"


def _path_kind(validators: list[Any]) -> str | None:
    functions = {getattr(v, "func", None) for v in validators}
    if base._must_be_dir in functions:
        return "existing folder"
    if base._must_be_file in functions:
        return "existing file"
    if base._must_exist in functions:
        return "existing path"
    return "path" if base._resolve in functions else None


def _constraints(metadata: list[Any]) -> list[str]:
    words = []
    for item in metadata:
        if isinstance(item, FieldInfo):
            words += _constraints(item.metadata)
            continue
        for attr, word in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("multiple_of", "multiple of")):
            if getattr(item, attr, None) is not None:
                words.append(f"{word} {getattr(item, attr)}")
        if getattr(item, "min_length", None) is not None:
            words.append(f"at least {item.min_length} long")
        if getattr(item, "max_length", None) is not None:
            words.append(f"at most {item.max_length} long")
        if getattr(item, "pattern", None) is not None:
            words.append(f"matches `{item.pattern}`")
    return words


SCALARS = {bool: "bool", int: "int", float: "number", str: "string", type(None): "null", typing.Any: "any"}


def _type(annotation: Any, sections: _Sections, metadata: list[Any] = ()) -> str:
    """A type in words, with the constraints its Annotated metadata (and METADATA) carry."""
    metadata = list(metadata)
    while typing.get_origin(annotation) is typing.Annotated:
        annotation, *more = typing.get_args(annotation)
        metadata += more
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        words = " or ".join(_type(arg, sections) for arg in args)
    elif origin is typing.Literal:
        values = [f"`{a}`" if isinstance(a, str) else f"`{json.dumps(a)}`" for a in args]
        words = values[0] if len(values) == 1 else "one of " + ", ".join(values)
    elif origin in (list, tuple, set, frozenset):
        words = "list of " + (_type(args[0], sections) if args else "any")
    elif origin is dict:
        words = f"map of {_type(args[0], sections)} to {_type(args[1], sections)}" if args else "map"
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        words = sections.link(annotation)
    elif isinstance(annotation, type) and issubclass(annotation, PurePath):
        words = _path_kind(metadata) or "path"
    else:
        words = SCALARS.get(annotation, getattr(annotation, "__name__", str(annotation)))
    constraints = _constraints(metadata)
    return f"{words} ({', '.join(constraints)})" if constraints else words


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_defaults=True, by_alias=True)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, PurePath):
        return str(value)
    return value


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True, validated_data={})
    return f"`{json.dumps(_plain(value), ensure_ascii=False)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _doc(model: type[BaseModel]) -> str:
    doc = model.__dict__.get("__doc__")
    return inspect.cleandoc(doc) if doc else ""


def _section(section: _Section, sections: _Sections) -> list[str]:
    model = section.model
    lines = [f'<a id="{section.anchor}"></a>', "", f"### {section.title}", ""]
    if doc := _doc(model):
        lines += [" ".join(doc.split()), ""]
    if len(section.where) > 1:
        lines += ["Also at: " + ", ".join(f"`{w}`" for w in section.where[1:]) + ".", ""]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        description = info.description or ""
        if is_operational(info):
            description = f"*operational.* {description}".strip()
        row = [f"`{info.alias or name}`", _type(info.annotation, sections, info.metadata), _default(info), description]
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return [*lines, ""]


def builtin_components() -> list[Component]:
    """The built-in components (not the plugins of this environment), in their declaration order."""
    return list(importlib.import_module(BUILTIN).COMPONENTS)


def _ports(component: Component) -> str:
    if callable(component.reads):
        doc = inspect.getdoc(component.reads)
        return "from its config" + (f": {doc}" if doc else "")
    ports = [f"`{name}` ({port.type}{', optional' if port.optional else ''})" for name, port in component.reads.items()]
    return ", ".join(ports) or "none"


def _component_rows(components: list[Component], sections: _Sections) -> list[str]:
    lines = ["| `uses:` | `inputs:` ports | writes | `with:` |", "|---|---|---|---|"]
    for component in components:
        config = _type(component.config, sections)
        row = [f"`{component.name}`", _ports(component), component.writes, config]
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return lines


def reference() -> str:
    """The whole reference as markdown."""
    sections = _Sections()
    sections.visit(Recipe, "")
    components = builtin_components()
    for component in components:
        for model in _models_in(component.config):
            sections.visit(model, f"pipeline[uses: {component.name}].with")
    recipe, *rest = sections.by_model.values()
    recipe.title = "The recipe (top level)"
    lines = [INTRO, "## Sections", ""]
    for section in (recipe, *rest):
        lines += _section(section, sections)
    lines += [
        "## Components",
        "",
        "A `pipeline:` step names one in `uses:`, wires its input ports in `inputs:` (port: an "
        "upstream step) and gives its config in `with:`.",
        "",
        *_component_rows(components, sections),
    ]
    return "\n".join(lines).rstrip() + "\n"


def json_schema() -> dict[str, Any]:
    """The recipe's JSON Schema (what pydantic makes of the models)."""
    return Recipe.model_json_schema()
