"""How a stage kind is declared: a `Component` says what it is called, which typed config it
takes, the artifacts it reads (input ports, each of an artifact type) and the one it writes,
and the function that does the work. Built-in components declare themselves in their own
modules under `vlmflow.components`; a user's plugin does the same in its package. The core
never imports a concrete component: it finds them by name through the `vlmflow.components`
entry-point group (built-ins are listed there too) or by `package.module:NAME`.

    COMPONENT = Component(
        name="dedup",
        config=DedupSpec,                        # what `with:` of a pipeline step holds
        reads={"data": Port("samples")},         # input ports -> artifact type
        writes="samples",
        run=run,                                 # run(ctx) -> StageResult; ctx.config is a DedupSpec
    )

A step's cache key is made of its config (fields declared `operational(...)` left out, every
`Path` replaced by the content of what it names), the recipe-wide settings the component
declares in `recipe_fields`, its inputs' digests and a hash of the component's code.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import pydantic
from pydantic import BaseModel, TypeAdapter

from vlmflow.registry import Registry

ENTRY_POINT_GROUP = "vlmflow.components"
BUILTIN = "vlmflow.components.builtin"  # also listed in the group; loaded by name should metadata be stale
# The artifact types of the built-in components; a plugin may name its own.
ARTIFACT_TYPES = ("samples", "tokenizer", "model", "captions", "metrics")


def operational(default: Any = ..., **kwargs: Any) -> Any:
    """A config field that changes how a step runs but not what it writes (actors, partitions,
    concurrency): left out of the step's cache key."""
    extra = dict(kwargs.pop("json_schema_extra", None) or {}) | {"digest": False}
    return pydantic.Field(default, json_schema_extra=extra, **kwargs)


def is_operational(info: pydantic.fields.FieldInfo) -> bool:
    extra = info.json_schema_extra
    return isinstance(extra, dict) and extra.get("digest") is False


# A component's function, or its name ("package.module:function"): a named one is imported when
# first called, so declaring a component (and validating or planning a recipe) imports none of
# the heavy libraries its work needs (torch, transformers, Ray Train).
Hook = Callable[..., Any] | str


def hooked(hook: Hook) -> Callable[..., Any]:
    if not isinstance(hook, str):
        return hook
    module, _, name = hook.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"component hook {hook!r}: {exc}") from exc


@dataclass(frozen=True)
class Port:
    """An input of a component: the artifact type it accepts; optional ports may stay unwired."""

    type: str
    optional: bool = False
    description: str = ""


@dataclass(frozen=True, eq=False)
class Component:
    """A stage kind. `reads` is a mapping of port name -> Port, or a function of the config
    that returns one (a training stage's data ports depend on its mixture)."""

    name: str
    config: Any  # a pydantic model class or any type a pydantic TypeAdapter validates
    writes: str
    run: Hook  # run(ctx: StageContext) -> StageResult
    reads: Mapping[str, Port] | Callable[[Any], Mapping[str, Port]] = field(default_factory=dict)
    recipe_fields: tuple[str, ...] = ()  # dotted recipe settings the output depends on ("seed", "model")
    description: str = ""
    fingerprint: Hook | None = None  # fingerprint(config): extra cache-key content, e.g. a templates folder
    plan: Hook | None = None  # plan(step, PlanContext): `vlmflow plan` details (entry[name])
    rows_estimate: Hook | None = None  # (step, PlanContext) -> (rows in, rows out) before it runs
    code: tuple[str, ...] = ()  # modules whose code the cache key covers; default: run's module

    def ports(self, config: Any) -> dict[str, Port]:
        return dict(self.reads(config) if callable(self.reads) else self.reads)

    def call(self, hook: str, *args: Any) -> Any:
        """Call hook `hook` ("run", "plan", "rows_estimate", "fingerprint"), importing its module
        first when it is declared by name ("package.module:function")."""
        return hooked(getattr(self, hook))(*args)

    @cached_property
    def adapter(self) -> TypeAdapter:
        return TypeAdapter(self.config)

    def validate(self, data: Any, context: dict | None = None) -> Any:
        """The typed config of a step (raises pydantic.ValidationError)."""
        return self.adapter.validate_python(data, context=context)

    def dump(self, config: Any, exclude_defaults: bool = False) -> Any:
        """The config as JSON-able data, as a spec would write it."""
        return self.adapter.dump_python(config, mode="json", exclude_defaults=exclude_defaults)

    @property
    def modules(self) -> tuple[str, ...]:
        return self.code or (self.run.partition(":")[0] if isinstance(self.run, str) else self.run.__module__,)


COMPONENTS: Registry[Component] = Registry("component")
_loaded = False
_lock = threading.Lock()


def register(component: Component) -> Component:
    """Add a component to the registry (a module declaring one calls this at import)."""
    if not isinstance(component, Component):
        raise TypeError(f"not a vlmflow Component: {component!r}")
    return COMPONENTS.register(component.name, component)


def load_components() -> None:
    """Import every module the `vlmflow.components` entry points name (the built-ins and the
    plugins installed in this environment); each registers its components. Runs once."""
    global _loaded
    with _lock:
        if _loaded:
            return
        entries = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
        values = [importlib.import_module(BUILTIN)] + [_load(e) for e in entries if e.value != BUILTIN]
        for value in values:
            for item in _declared(value):
                if item.name not in COMPONENTS.kinds() or COMPONENTS.get(item.name) is not item:
                    register(item)
        _loaded = True


def _load(entry: importlib.metadata.EntryPoint) -> Any:
    try:
        return entry.load()
    except Exception as exc:  # a broken plugin: say which, without a traceback
        from vlmflow.errors import UserError

        raise UserError(f"component plugin {entry.name} = {entry.value}: cannot load: {exc}") from None


def _declared(value: Any) -> list[Component]:
    """The components an entry point names: a Component, a list of them, or a module declaring
    `COMPONENT` / `COMPONENTS` (a module that registers its components itself names none)."""
    if isinstance(value, Component):
        return [value]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, Component)]
    found = getattr(value, "COMPONENTS", None) or [getattr(value, "COMPONENT", None)]
    return [c for c in found if isinstance(c, Component)]


class UnknownComponent(LookupError):
    pass


def resolve(uses: str) -> Component:
    """The component a step `uses`: a registered name, or `package.module:NAME` naming a
    Component object (imported on first use)."""
    if ":" in uses:
        module_name, _, attr = uses.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UnknownComponent(f"cannot import {module_name!r}: {exc}") from None
        value = getattr(module, attr, None)
        if value is None:
            raise UnknownComponent(f"module {module_name!r} has no {attr!r}")
        if not isinstance(value, Component):
            raise UnknownComponent(f"{uses} is a {type(value).__name__}, not a vlmflow Component")
        return value
    load_components()
    try:
        return COMPONENTS.get(uses)
    except KeyError:
        raise UnknownComponent(
            f"unknown component {uses!r}; known: {', '.join(COMPONENTS.kinds())} (or package.module:NAME for a plugin)"
        ) from None


def digest_view(value: Any) -> Any:
    """A config as it enters a cache key: models field by field without their operational
    fields, `Path`s kept as Paths (fingerprinted by content later), the rest JSON-able."""
    if isinstance(value, BaseModel):
        return {
            name: digest_view(getattr(value, name))
            for name, info in type(value).model_fields.items()
            if not is_operational(info)
        }
    if isinstance(value, dict):
        return {str(k): digest_view(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [digest_view(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    from pathlib import PurePath

    if isinstance(value, PurePath):
        return value
    return pydantic.TypeAdapter(type(value)).dump_python(value, mode="json")
