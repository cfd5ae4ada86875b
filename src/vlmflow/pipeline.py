"""The recipe as a graph of steps, and each step's cache key.

A recipe states its graph in one of two forms that validate to the same steps:
- concise: the sections `data`, `tokenizer`, `instruct`, `stages`, `capfilt`, `evaluate`,
  which the built-in components expand (vlmflow.components.concise);
- explicit: `pipeline:`, a list of named steps, each `uses: COMPONENT` with its typed config
  under `with:` and `inputs:` wiring its input ports to upstream steps by name.

`recipe_graph` gives the steps in an order where every step comes after its inputs;
`vlmflow run`, `vlmflow plan`, the refresh flow and `vlmflow evaluate --model` all walk it.
`graph_digests` gives every step's digest: its component, its config (operational fields
left out, files by content), the recipe settings the component declares, its inputs'
digests and the code it is built from.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic

from vlmflow.artifacts import digest_of
from vlmflow.component import Component, UnknownComponent, digest_view, load_components, resolve
from vlmflow.errors import UserError
from vlmflow.fingerprint import HashCache, code_digest, fingerprint_value, remembering_code

Loc = tuple[str | int, ...]


@dataclass(frozen=True, eq=False)
class Step:
    """One stage of a run: `inputs` maps each wired port to the upstream step's name; `field`
    is where the spec declares it (or the settings it runs with); `register`: the run registers
    the model this step writes (the last step writing a model)."""

    name: str
    component: Component
    config: Any
    inputs: dict[str, str] = field(default_factory=dict)
    field: Loc = ()
    register: bool = False

    @property
    def writes(self) -> str:
        return self.component.writes


class GraphError(UserError):
    """Problems of a pipeline: (spec location, message) pairs, placed in the file by the loader."""

    def __init__(self, problems: list[tuple[Loc, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{'.'.join(map(str, loc))}: {message}" for loc, message in problems))


# The concise form's expansion, registered by the built-in components (vlmflow.components.concise).
_concise: Callable[[Any], list[Step]] | None = None


def register_concise(expand: Callable[[Any], list[Step]]) -> None:
    global _concise
    _concise = expand


def recipe_graph(recipe: Any) -> list[Step]:
    """The recipe's steps, inputs first. Raises GraphError on a pipeline that does not wire up."""
    if recipe.pipeline is None:
        load_components()
        if _concise is None:
            raise GraphError([((), "no component package provides the concise recipe sections")])
        steps = _concise(recipe)
    else:
        steps = compile_pipeline(recipe.pipeline, recipe, recipe.validation_context())
    ordered = topological(steps)
    models = [s for s in ordered if s.writes == "model"]
    last = models[-1].name if models else None
    return [_with_register(s, s.name == last) for s in ordered]


def _with_register(step: Step, register: bool) -> Step:
    if step.register == register:
        return step
    return Step(step.name, step.component, step.config, step.inputs, step.field, register)


def compile_pipeline(specs: list[Any], recipe: Any, context: dict | None) -> list[Step]:
    """The explicit form's steps, every problem collected (GraphError) before any is raised."""
    problems: list[tuple[Loc, str]] = []
    steps: list[Step] = []
    names = [s.name for s in specs]
    for i, spec in enumerate(specs):
        loc: Loc = ("pipeline", i)
        if names.index(spec.name) != i:
            problems.append(((*loc, "name"), f"step name {spec.name!r} is used twice"))
        try:
            component = resolve(spec.uses)
        except UnknownComponent as exc:
            problems.append(((*loc, "uses"), str(exc)))
            continue
        try:
            config = component.validate(spec.with_, context)
        except pydantic.ValidationError as exc:
            for err in exc.errors(include_url=False):
                message = err["msg"].removeprefix("Value error, ")
                message = "unknown field" if err["type"] == "extra_forbidden" else message
                problems.append(((*loc, "with", *err["loc"]), message))
            continue
        problems += _recipe_field_problems(component, recipe, loc)
        step = Step(spec.name, component, config, dict(spec.inputs), loc)
        steps.append(step)
    known: dict[str, Component | None] = dict.fromkeys(names)  # a step that did not compile: type unknown
    known |= {step.name: step.component for step in reversed(steps)}
    for step in steps:
        problems += wiring_problems(step, known)
    if not problems:
        try:
            topological(steps)
        except GraphError as exc:
            problems += exc.problems
    if problems:
        raise GraphError(problems)
    return steps


def _recipe_field_problems(component: Component, recipe: Any, loc: Loc) -> list[tuple[Loc, str]]:
    missing = [f for f in component.recipe_fields if _dotted(recipe, f) is None]
    return [((*loc, "uses"), f"{component.name} needs the recipe's {f}: section") for f in missing]


def wiring_problems(step: Step, components: dict[str, Component | None]) -> list[tuple[Loc, str]]:
    """An input port the component lacks, a required port left unwired, an unknown upstream
    step, or an upstream step writing another artifact type than the port reads."""
    problems: list[tuple[Loc, str]] = []
    ports = step.component.ports(step.config)
    loc = (*step.field, "inputs")
    for port, upstream in step.inputs.items():
        if port not in ports:
            known = ", ".join(f"{p} ({v.type})" for p, v in ports.items()) or "none"
            problems.append(((*loc, port), f"{step.component.name} has no input {port!r}; its inputs: {known}"))
        elif upstream not in components:
            hint = difflib.get_close_matches(upstream, list(components), n=1)
            message = f"unknown step {upstream!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
            problems.append(((*loc, port), message))
        elif upstream == step.name:
            problems.append(((*loc, port), "a step cannot read its own output"))
        elif components[upstream] is not None and components[upstream].writes != ports[port].type:
            problems.append(
                (
                    (*loc, port),
                    f"step {upstream!r} writes {components[upstream].writes}, "
                    f"but input {port!r} of {step.component.name} reads {ports[port].type}",
                )
            )
    for port, spec in ports.items():
        if port not in step.inputs and not spec.optional:
            problems.append((loc, f"input {port!r} ({spec.type}) is not wired to a step"))
    return problems


def topological(steps: list[Step]) -> list[Step]:
    """Steps ordered so that each comes after its inputs (declaration order otherwise kept)."""
    by_name = {s.name: s for s in steps}
    done: dict[str, None] = {}
    visiting: list[str] = []

    def visit(step: Step) -> None:
        if step.name in done:
            return
        if step.name in visiting:
            cycle = [*visiting[visiting.index(step.name) :], step.name]
            raise GraphError([((*step.field, "inputs"), f"the steps form a cycle: {' -> '.join(cycle)}")])
        visiting.append(step.name)
        for upstream in step.inputs.values():
            if upstream in by_name:
                visit(by_name[upstream])
        visiting.pop()
        done[step.name] = None

    for step in steps:
        visit(step)
    return [by_name[name] for name in done]


def _dotted(value: Any, path: str) -> Any:
    for part in path.split("."):
        value = getattr(value, part, None)
    return value


def step_digest(step: Step, recipe: Any, inputs: dict[str, str], hashes: HashCache, base: Path | None) -> str:
    """hash(component, config without operational fields, declared recipe settings, input
    digests by port, component code); every Path is replaced by the content it names."""
    component = step.component
    payload = {
        "component": component.name,
        "config": fingerprint_value(digest_view(step.config), base, hashes),
        "recipe": {
            f: fingerprint_value(digest_view(_dotted(recipe, f)), base, hashes) for f in component.recipe_fields
        },
        "inputs": dict(sorted(inputs.items())),
        "code": code_digest(component.modules),
    }
    if component.fingerprint is not None:
        payload["extra"] = fingerprint_value(component.call("fingerprint", step.config), base, hashes)
    return digest_of(payload)


def graph_digests(steps: list[Step], recipe: Any, hashes: HashCache | None = None) -> dict[str, str]:
    """Every step's digest, in graph order (what a run would reuse or build)."""
    hashes = hashes or HashCache(None)
    base = recipe.spec_dir()
    digests: dict[str, str] = {}
    with remembering_code(hashes), hashes.batch():  # the components' parsed code, for the next process
        for step in steps:
            inputs = {port: digests[up] for port, up in step.inputs.items()}
            digests[step.name] = step_digest(step, recipe, inputs, hashes, base)
    return digests


def descendants(steps: list[Step], roots: set[str]) -> set[str]:
    """The steps that read, directly or not, one of `roots`."""
    found = set(roots)
    for step in steps:  # graph order: inputs first
        if set(step.inputs.values()) & found:
            found.add(step.name)
    return found - roots


def ancestors(steps: list[Step], names: set[str]) -> set[str]:
    """The steps `names` read, directly or not."""
    by_name = {s.name: s for s in steps}
    found: set[str] = set()
    todo = [up for n in names for up in by_name[n].inputs.values()]
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo += by_name[name].inputs.values()
    return found


def evaluate_graph(steps: list[Step], model: Step) -> list[Step]:
    """`vlmflow evaluate --model`: every step that writes metrics from a `model` input, reading
    `model` instead, after the steps their other inputs need (which must need no training)."""
    evals = [s for s in steps if s.writes == "metrics" and "model" in s.inputs]
    if not evals:
        raise GraphError([((), "the recipe has no evaluation step (a step writing metrics from a model)")])
    data = {up for s in evals for port, up in s.inputs.items() if port != "model"}
    needed = data | ancestors(steps, data)
    trained = sorted(s.name for s in steps if s.name in needed and s.writes == "model")
    if trained:
        raise GraphError([((), (
            f"vlmflow evaluate --model reads data that needs no training; this recipe's evaluation reads "
            f"{', '.join(sorted(data))}, made after training {', '.join(trained)}"
        ))])  # fmt: skip
    rewired = [Step(s.name, s.component, s.config, s.inputs | {"model": model.name}, s.field) for s in evals]
    return [s for s in steps if s.name in needed] + [model, *rewired]


def explicit_form(steps: list[Step], spec_dir: Path | None) -> list[dict]:
    """The steps as a `pipeline:` list (what a concise recipe expands to): configs without their
    default values, paths relative to the spec."""

    def relative(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: relative(v) for k, v in value.items()}
        if isinstance(value, list):
            return [relative(v) for v in value]
        if isinstance(value, str) and spec_dir is not None and value.startswith("/"):
            path = Path(value)
            return path.relative_to(spec_dir).as_posix() if path.is_relative_to(spec_dir) else value
        return value

    return [
        {"name": s.name, "uses": s.component.name, **({"inputs": dict(s.inputs)} if s.inputs else {}),
         "with": relative(s.component.dump(s.config, exclude_defaults=True))}
        for s in steps
    ]  # fmt: skip
