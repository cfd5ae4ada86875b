"""Load a recipe YAML into a validated `Recipe`, keeping file:line:col for every error.

YAML is composed into nodes (PyYAML keeps each node's start mark), turned into plain
Python data while recording the mark of every value by its path, then validated by
pydantic. Each pydantic error location is mapped back to the deepest recorded path,
so every problem is reported as `FILE:LINE:COL: field.path: message`.

A spec is a small file from anyone: composing it is bounded. Aliases share one node, so a
few hundred bytes of nested aliases ("billion laughs") would expand to billions of values;
the composer counts every node as it will be expanded and stops at `MAX_NODES`, naming the
alias that crossed the line. Plain scalars such as `1e-4` are floats (YAML 1.2), not strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import yaml

from vlmflow.errors import SpecError, SpecProblem
from vlmflow.specs.base import url_credentials
from vlmflow.specs.recipe import Recipe, cross_checks

Loc = tuple[str | int, ...]
# Values a spec may hold once aliases are expanded; the largest built-in recipe holds ~400.
MAX_NODES = 20_000
# YAML 1.1 reads `1e-4` and `1.0e5` as strings; YAML 1.2 (and every other tool) as floats.
_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_YAML_BASE: tuple[type, ...] = (
    (yaml.composer.Composer, yaml.CSafeLoader) if getattr(yaml, "__with_libyaml__", False) else (yaml.SafeLoader,)
)


class _TooLarge(Exception):
    def __init__(self, mark: yaml.Mark, path: list, through_alias: bool):
        self.mark, self.path, self.through_alias = mark, path, through_alias


class _BoundedLoader(*_YAML_BASE):  # type: ignore[misc]
    """A safe YAML composer (libyaml's parser when available) that counts every node, each alias
    as the size of what it repeats, and raises _TooLarge past MAX_NODES."""

    def __init__(self, stream: str):
        _YAML_BASE[-1].__init__(self, stream)
        self.anchors: dict = {}
        self._sizes: dict[int, int] = {}  # id(node) -> its size with aliases expanded
        self._total = 0
        self._path: list = []

    def _count(self, size: int, mark: yaml.Mark, through_alias: bool) -> None:
        self._total += size
        if self._total > MAX_NODES:
            path = [p for p in self._path if isinstance(p, str | int)]  # None: the root or a key
            raise _TooLarge(mark, path, through_alias)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._path.append(index.value if isinstance(index, yaml.ScalarNode) else index)
        try:
            mark = self.peek_event().start_mark
            if self.check_event(yaml.AliasEvent):
                node = super().compose_node(parent, index)
                self._count(self._sizes.get(id(node), 1), mark, True)  # unknown: a recursive alias
                return node
            self._count(1, mark, False)
            node = super().compose_node(parent, index)
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [child for pair in node.value for child in pair]
            else:
                children = []
            self._sizes[id(node)] = 1 + sum(self._sizes.get(id(child), 1) for child in children)
            return node
        finally:
            self._path.pop()


_BoundedLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def _compose(text: str) -> yaml.Node | None:
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


@dataclass
class Marked:
    """Plain data of a YAML document plus the (file, line, col) of every path in it."""

    data: Any
    marks: dict[Loc, tuple[str, int, int]] = field(default_factory=dict)  # where each value starts
    key_marks: dict[Loc, tuple[str, int, int]] = field(default_factory=dict)  # where each mapping key is


def _construct(
    node: yaml.Node, loc: Loc, source: str, marks: dict, key_marks: dict, active: frozenset = frozenset()
) -> Any:
    marks[loc] = (source, node.start_mark.line + 1, node.start_mark.column + 1)
    if id(node) in active:
        raise SpecError([_problem_at(node, source, loc, "recursive YAML alias")])
    active = active | {id(node)}
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise SpecError([_problem_at(key_node, source, loc, "mapping keys must be scalars")])
            key = key_node.value
            if key == "<<":
                raise SpecError([_problem_at(key_node, source, loc, "YAML merge keys are not supported")])
            if key in out:
                raise SpecError([_problem_at(key_node, source, (*loc, key), "duplicate key")])
            key_marks[(*loc, key)] = (source, key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = _construct(value_node, (*loc, key), source, marks, key_marks, active)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, (*loc, i), source, marks, key_marks, active) for i, item in enumerate(node.value)]
    try:
        return _scalar(node)
    except (yaml.YAMLError, ValueError, TypeError, AttributeError) as exc:
        message = getattr(exc, "problem", None) or str(exc)
        raise SpecError([_problem_at(node, source, loc, f"cannot read value {node.value!r}: {message}")]) from None


def _scalar(node: yaml.ScalarNode) -> Any:
    return yaml.constructor.SafeConstructor().construct_object(node, deep=True)


def _problem_at(node: yaml.Node, source: str, loc: Loc, message: str) -> SpecProblem:
    return SpecProblem(source, node.start_mark.line + 1, node.start_mark.column + 1, _dotted(loc), message)


def parse_yaml(text: str, source: str) -> Marked:
    """Parse one YAML document; syntax errors become a SpecError with line and column."""
    try:
        node = _compose(text)
    except _TooLarge as exc:
        message = (
            f"spec expands to more than {MAX_NODES:,} nodes through aliases (YAML alias bomb?)"
            if exc.through_alias
            else f"spec has more than {MAX_NODES:,} YAML nodes (keys, values, lists, mappings): too large for a spec"
        )
        line, col = exc.mark.line + 1, exc.mark.column + 1
        raise SpecError([SpecProblem(source, line, col, _dotted(exc.path), message)]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        lines = text.split("\n")
        if line > len(lines):  # libyaml places the end of a text without a final newline past it
            line, col = len(lines), len(lines[-1]) + 1
        message = " ".join(part for part in (exc.context, exc.problem) if part)
        raise SpecError([SpecProblem(source, line, col, "", f"YAML syntax error: {message}")]) from None
    except yaml.YAMLError as exc:
        raise SpecError([SpecProblem(source, 1, 1, "", f"YAML error: {exc}")]) from None
    except RecursionError:
        raise SpecError([SpecProblem(source, 1, 1, "", "YAML nested too deeply")]) from None
    if node is None:
        raise SpecError([SpecProblem(source, 1, 1, "", "the spec is empty")])
    marks: dict[Loc, tuple[str, int, int]] = {}
    key_marks: dict[Loc, tuple[str, int, int]] = {}
    try:
        data = _construct(node, (), source, marks, key_marks)
    except RecursionError:
        raise SpecError([SpecProblem(source, 1, 1, "", "YAML nested too deeply")]) from None
    if not isinstance(data, dict):
        raise SpecError([SpecProblem(source, 1, 1, "", "the spec must be a mapping at the top level")])
    return Marked(data, marks, key_marks)


def apply_override(marked: Marked, assignment: str, index: int) -> None:
    """Apply one `--set a.b.0.c=value` override (value parsed as a YAML scalar or flow)."""
    source = f"--set[{index}]"
    if "=" not in assignment:
        raise SpecError([SpecProblem(source, 1, 1, "", f"expected KEY=VALUE, got {assignment!r}")])
    dotted, raw = assignment.split("=", 1)
    parts: list[str | int] = [int(p) if p.isascii() and p.isdigit() else p for p in dotted.strip().split(".")]
    if not all(str(p) for p in parts):
        raise SpecError([SpecProblem(source, 1, 1, dotted, "empty path component")])
    try:
        value_marked = parse_yaml(f"v: {raw}", source) if raw.strip() else Marked({"v": None})
    except SpecError as exc:
        raise SpecError([SpecProblem(source, 1, 1, dotted, p.message) for p in exc.problems]) from None
    value = value_marked.data["v"]
    target: Any = marked.data
    for depth, part in enumerate(parts[:-1]):
        here = _dotted(parts[: depth + 1])
        if not isinstance(target, dict | list):
            raise SpecError([SpecProblem(source, 1, 1, here, "cannot set a field inside a scalar")])
        nxt = target[part] if _has(target, part) else None
        if nxt is None:
            if isinstance(target, list):
                raise SpecError([SpecProblem(source, 1, 1, here, "no such list item")])
            target[part] = nxt = {}
            marked.marks[tuple(parts[: depth + 1])] = (source, 1, 1)
        target = nxt
    last = parts[-1]
    if isinstance(target, list) and not _has(target, last):
        raise SpecError([SpecProblem(source, 1, 1, dotted, "no such list item")])
    if not isinstance(target, dict | list):
        raise SpecError([SpecProblem(source, 1, 1, dotted, "cannot set a field inside a scalar")])
    target[last] = value
    loc = tuple(parts)
    for marks in (marked.marks, marked.key_marks):
        for key in [k for k in marks if k[: len(loc)] == loc]:
            del marks[key]
        marks[loc] = (source, 1, 1)


def _has(container: Any, part: str | int) -> bool:
    if isinstance(container, dict):
        return part in container
    if isinstance(container, list):
        return isinstance(part, int) and 0 <= part < len(container)
    return False


def _dotted(loc: Loc | list) -> str:
    return ".".join(str(p) for p in loc)


def locate(
    marked: Marked, loc: Loc, at_key: bool = False, field_error: bool = False
) -> tuple[tuple[str, int, int], str]:
    """Map a pydantic error location to the YAML mark and a dotted path of real keys.

    Pydantic adds union tags (e.g. `synthetic-shapes`) and validator names to locations;
    those are not keys of the data and are skipped while walking it.
    """
    node: Any = marked.data
    real: list[str | int] = []
    for part in loc:
        if _has(node, part):
            node = node[part]
            real.append(part)
        elif field_error and isinstance(node, dict) and isinstance(part, str) and part == loc[-1]:
            real.append(part)  # a missing or unknown field: report it at its parent
            break
    if at_key and tuple(real) in marked.key_marks:
        return marked.key_marks[tuple(real)], _dotted(real)
    for depth in range(len(real), -1, -1):
        mark = marked.marks.get(tuple(real[:depth]))
        if mark:
            return mark, _dotted(real)
    return ("<spec>", 1, 1), _dotted(real)


def validate(marked: Marked, spec_path: Path) -> Recipe:
    """Validate plain data into a Recipe; errors carry the YAML marks."""
    leaks = credential_problems(marked)
    if leaks:  # reported alone: other messages could echo the secret
        raise SpecError(_sorted(leaks))
    raw_runtime = marked.data.get("runtime")
    allow_outside = isinstance(raw_runtime, dict) and raw_runtime.get("allow_outside_paths") is True
    context = {"spec_dir": spec_path.resolve().parent, "allow_outside_paths": allow_outside}
    try:
        recipe = Recipe.model_validate(marked.data, context=context)
    except pydantic.ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = tuple(err["loc"])
            if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
                loc = (*loc, err.get("ctx", {}).get("discriminator", "'kind'").strip("'"))
            kind = err["type"]
            field_error = kind in ("extra_forbidden", "missing") or loc != tuple(err["loc"])
            at_key = kind == "extra_forbidden" or loc[-1:] == ("[key]",)  # a bad key of a free-form mapping
            (source, line, col), dotted = locate(marked, loc, at_key, field_error)
            problems.append(SpecProblem(source, line, col, dotted, _message(err)))
        raise SpecError(_sorted(problems)) from None
    recipe.with_context(context)
    found = cross_checks(recipe)
    if not found and recipe.pipeline is not None:
        found = pipeline_problems(recipe)
    problems = []
    for loc, message in found:
        (source, line, col), dotted = locate(marked, loc, False, True)
        problems.append(SpecProblem(source, line, col, dotted, message))
    if problems:
        raise SpecError(_sorted(problems))
    return recipe


def credential_problems(marked: Marked) -> list[SpecProblem]:
    """Every string (value or key) of the spec holding a URL with credentials, at its place."""
    problems = []
    stack: list[tuple[Loc, Any]] = [((), marked.data)]
    while stack:
        loc, value = stack.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            for text, at_key in ((key, True), (item, False)):
                if isinstance(text, str) and (masked := url_credentials(text)):
                    problems.append(_leak(marked, (*loc, key), at_key, masked))
            stack.append(((*loc, key), item))
    return problems


def _leak(marked: Marked, loc: Loc, at_key: bool, masked: str) -> SpecProblem:
    (source, line, col), dotted = locate(marked, loc, at_key=at_key)
    shown = masked if len(masked) <= 120 else masked[:117] + "..."
    message = (
        f"{shown!r}: a URL with credentials would be saved in resolved_spec.yaml, MLflow params and the "
        "Prefect database; keep the secret in an environment variable (the instruct generator's "
        "`api_key_env` names the one holding its key; MLflow reads MLFLOW_TRACKING_USERNAME, "
        "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN)"
    )
    return SpecProblem(source, line, col, url_credentials(dotted) or dotted, message)


def pipeline_problems(recipe: Recipe) -> list[tuple[Loc, str]]:
    """An explicit pipeline's problems: components, their configs and the wiring."""
    from vlmflow.pipeline import GraphError, recipe_graph

    try:
        recipe_graph(recipe)
    except GraphError as exc:
        return exc.problems
    return []


def _sorted(problems: list[SpecProblem]) -> list[SpecProblem]:
    return sorted(problems, key=lambda p: (p.source.startswith("--set"), p.source, p.line, p.col))


def _message(err: dict) -> str:
    kind = err.get("type")
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "field required"
    message = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if kind in ("int_type", "float_type") and isinstance(value, bool | str):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        what = "a boolean" if isinstance(value, bool) else "a string (write numbers without quotes)"
        return f"{message}, got {what}: {shown}"
    return message


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe spec file. Raises SpecError on any problem."""
    spec_path = Path(path)
    try:
        text = spec_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([SpecProblem(str(spec_path), 1, 1, "", "spec file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([SpecProblem(str(spec_path), 1, 1, "", f"cannot read spec: {exc}")]) from None
    marked = parse_yaml(text, str(spec_path))
    for index, assignment in enumerate(overrides):
        apply_override(marked, assignment, index)
    return validate(marked, spec_path)


def located(path: str | Path, overrides: list[str] | tuple[str, ...], loc: Loc, message: str) -> SpecProblem:
    """A problem found after loading (e.g. by `vlmflow plan`), placed at its field in the spec."""
    marked = parse_yaml(Path(path).read_text(encoding="utf-8"), str(path))
    for index, assignment in enumerate(overrides):
        apply_override(marked, assignment, index)
    (source, line, col), dotted = locate(marked, loc, False, True)
    return SpecProblem(source, line, col, dotted, message)
