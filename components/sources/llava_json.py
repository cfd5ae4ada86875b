"""`llava-json`: a LLaVA conversation JSON (a list of {id, image, conversations}) and its images.

One row per list entry. Roles map human -> user, gpt -> assistant, system -> system
(`user` / `assistant` are accepted as they are). Turn contents are kept verbatim (the
`<image>` placeholder included). An entry without an image (a text-only turn list) is
`no-image`; any other shape problem is `malformed-annotation` naming the field. An `image`
that resolves outside the `images` folder is `path-outside-dataset` (unless
`allow_outside_paths`); an image file over `max_image_bytes` is `too-large`.
"""

from __future__ import annotations

from collections.abc import Iterator

from vlmflow.components.sources.base import (
    SOURCES,
    RawRow,
    Rejected,
    SourceContext,
    SourceReader,
    Unit,
    chunk,
    load_json,
    read_dataset_image,
    safe_key,
    unique_keys,
)
from vlmflow.errors import UserError
from vlmflow.specs.data import LlavaJsonSource

MALFORMED = "malformed-annotation"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _conversations(turns: object) -> tuple[list[dict] | None, str | None]:
    if not isinstance(turns, list) or not turns:
        return None, "conversations: expected a non-empty list of {from, value}"
    result = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return None, f"conversations[{i}]: expected {{from, value}} with a string value"
        role = ROLES.get(turn.get("from")) if isinstance(turn.get("from"), str) else None
        if role is None:
            return None, f"conversations[{i}].from: unknown role {turn.get('from')!r}"
        result.append({"role": role, "content": turn["value"]})
    return result, None


def _entry(index: int, entry: object) -> tuple:
    """("row", name, image, conversations) or ("rejected", name, reason, detail); name is pre-safe_key."""
    where = f"entry {index}"
    if not isinstance(entry, dict):
        return ("rejected", f"entry-{index}", MALFORMED, f"{where}: expected an object")
    raw_id = entry.get("id", index)
    if not isinstance(raw_id, str | int) or isinstance(raw_id, bool) or raw_id == "":
        return ("rejected", f"entry-{index}", MALFORMED, f"{where}: id: not a string or int")
    image = entry.get("image")
    if image is None or image == "":
        return ("rejected", str(raw_id), "no-image", f"{where}: no image")
    if not isinstance(image, str):
        return ("rejected", str(raw_id), MALFORMED, f"{where}: image: expected one path string")
    turns, problem = _conversations(entry.get("conversations"))
    if problem:
        return ("rejected", str(raw_id), MALFORMED, f"{where}: {problem}")
    return ("row", str(raw_id), image, turns)


def plan(spec: LlavaJsonSource, ctx: SourceContext) -> list[Unit]:
    data = load_json(spec.path)
    if not isinstance(data, list):
        raise UserError(f"{spec.path}: expected a JSON list of {{id, image, conversations}} entries")
    entries = [_entry(i, e) for i, e in enumerate(data[: spec.limit] if spec.limit else data)]
    keys = unique_keys(safe_key(e[1]) for e in entries)
    items = [(e[0], key, *e[2:]) for key, e in zip(keys, entries, strict=True)]
    return [Unit(ctx.name, i, part, len(part)) for i, part in enumerate(chunk(items, ctx.shard_size))]


def read(spec: LlavaJsonSource, ctx: SourceContext, unit: Unit) -> Iterator[RawRow | Rejected]:
    for item in unit.payload:
        if item[0] == "rejected":
            yield Rejected(item[1], item[2], item[3])
            continue
        _, key, image_path, turns = item
        image, reason, detail = read_dataset_image(
            spec.images, image_path, spec.allow_outside_paths, spec.max_image_bytes
        )
        if image is None:
            yield Rejected(key, reason, detail)
            continue
        yield RawRow(key=key, image=image, captions=[], extra={"conversations": turns})


SOURCES.register("llava-json", SourceReader("llava-json", plan, read))
