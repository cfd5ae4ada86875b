"""`coco`: COCO captions JSON (+ optional instances JSON for boxes) and its image folder.

One row per image entry (JSON order), its captions gathered from the caption annotations.
Malformed image entries become `malformed-annotation` rows keyed `image-INDEX`; malformed
caption / instance annotations become one row each keyed `annotation-INDEX` /
`instance-INDEX`, placed after the images. Annotations of a rejected image go with it.
A `file_name` that resolves outside the `images` folder is `path-outside-dataset` (unless
`allow_outside_paths`); an image file over `max_image_bytes` is `too-large`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
from vlmflow.specs.data import CocoSource

MALFORMED = "malformed-annotation"


def _is_id(value: object) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value != "")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _lists(path: Path, data: object, fields: tuple[str, ...]) -> list[list]:
    if not isinstance(data, dict) or not all(isinstance(data.get(f), list) for f in fields):
        wanted = ", ".join(f'"{f}": [...]' for f in fields)
        raise UserError(f"{path}: expected a COCO JSON object with {wanted}")
    return [data[f] for f in fields]


def _image_problem(entry: object, need_size: bool) -> str | None:
    if not isinstance(entry, dict):
        return "expected an object"
    if not _is_id(entry.get("id")):
        return "id: missing or not an int/string"
    if not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
        return "file_name: missing or not a string"
    for field in ("width", "height"):
        if field in entry or need_size:
            value = entry.get(field)
            if not _is_number(value) or value <= 0:
                return f"{field}: missing or not a positive number"
    return None


def _categories(path: Path, entries: list) -> dict[object, str]:
    names = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not _is_id(entry.get("id")) or not isinstance(entry.get("name"), str):
            raise UserError(f"{path}: categories[{index}]: expected {{id, name}}")
        names[entry["id"]] = entry["name"]
    return names


class _Plan:
    def __init__(self, spec: CocoSource):
        self.spec = spec
        self.images: dict[object, dict] = {}  # id -> {"file", "size", "captions", "objects"}
        self.order: list[tuple[str, object]] = []  # ("image", id) or ("bad", (key, detail))
        self.bad_ids: set[object] = set()

    def add_images(self, entries: list) -> None:
        for index, entry in enumerate(entries):
            problem = _image_problem(entry, need_size=self.spec.instances is not None)
            if problem is None and entry["id"] in self.images:
                problem = f"id: duplicate image id {entry['id']!r}"
            if problem is not None:
                if isinstance(entry, dict) and _is_id(entry.get("id")) and entry["id"] not in self.images:
                    self.bad_ids.add(entry["id"])
                self.order.append(("bad", (f"image-{index}", f"images[{index}]: {problem}")))
                continue
            self.bad_ids.discard(entry["id"])
            size = (entry.get("width"), entry.get("height"))
            self.images[entry["id"]] = {"file": entry["file_name"], "size": size, "captions": [], "objects": []}
            self.order.append(("image", entry["id"]))

    def _target(self, entry: object) -> tuple[dict | None, str | None]:
        if not isinstance(entry, dict):
            return None, "expected an object"
        image_id = entry.get("image_id")
        if _is_id(image_id) and image_id in self.bad_ids:
            return None, None  # belongs to a rejected image: rejected with it
        if not _is_id(image_id) or image_id not in self.images:
            return None, f"image_id: unknown image id {image_id!r}"
        return self.images[image_id], None

    def add_captions(self, entries: list) -> None:
        for index, entry in enumerate(entries):
            image, problem = self._target(entry)
            if image is not None and not isinstance(entry.get("caption"), str):
                problem = "caption: missing or not a string"
            if problem:
                self.order.append(("bad", (f"annotation-{index}", f"annotations[{index}]: {problem}")))
            elif image is not None:
                image["captions"].append(entry["caption"].strip())

    def add_instances(self, entries: list, categories: dict[object, str]) -> None:
        for index, entry in enumerate(entries):
            image, problem = self._target(entry)
            if image is not None:
                problem = _instance_problem(entry, categories)
            if problem:
                self.order.append(("bad", (f"instance-{index}", f"instances annotations[{index}]: {problem}")))
            elif image is not None:
                (x, y, w, h), (width, height) = entry["bbox"], image["size"]
                box = [x / width, y / height, w / width, h / height]
                image["objects"].append({"category": categories[entry["category_id"]], "bbox": box})


def _instance_problem(entry: dict, categories: dict[object, str]) -> str | None:
    bbox = entry.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return "bbox: expected [x, y, width, height] numbers"
    if bbox[2] < 0 or bbox[3] < 0:
        return "bbox: negative width or height"
    if not _is_id(entry.get("category_id")) or entry["category_id"] not in categories:
        return f"category_id: unknown category {entry.get('category_id')!r}"
    return None


def plan(spec: CocoSource, ctx: SourceContext) -> list[Unit]:
    images, annotations = _lists(spec.captions, load_json(spec.captions), ("images", "annotations"))
    state = _Plan(spec)
    state.add_images(images)
    state.add_captions(annotations)
    if spec.instances is not None:
        boxes, categories = _lists(spec.instances, load_json(spec.instances), ("annotations", "categories"))
        state.add_instances(boxes, _categories(spec.instances, categories))
    keys = unique_keys(safe_key(value) if kind == "image" else safe_key(value[0]) for kind, value in state.order)
    items: list[tuple] = []
    for key, (kind, value) in zip(keys, state.order, strict=True):
        if kind == "bad":
            items.append(("rejected", key, MALFORMED, value[1]))
            continue
        image = state.images[value]
        objects = image["objects"] if spec.instances is not None else None
        items.append(("row", key, image["file"], image["captions"], objects))
    if spec.limit is not None:
        items = items[: spec.limit]
    return [Unit(ctx.name, i, part, len(part)) for i, part in enumerate(chunk(items, ctx.shard_size))]


def read(spec: CocoSource, ctx: SourceContext, unit: Unit) -> Iterator[RawRow | Rejected]:
    for item in unit.payload:
        if item[0] == "rejected":
            yield Rejected(item[1], item[2], item[3])
            continue
        _, key, file_name, captions, objects = item
        image, reason, detail = read_dataset_image(
            spec.images, file_name, spec.allow_outside_paths, spec.max_image_bytes
        )
        if image is None:
            yield Rejected(key, reason, detail)
            continue
        extra = {"objects": objects} if objects is not None else {}
        yield RawRow(key=key, image=image, captions=list(captions), extra=extra)


SOURCES.register("coco", SourceReader("coco", plan, read))
