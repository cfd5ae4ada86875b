"""The symbolic context of one image, as LLaVA fed it to a text-only GPT-4: captions + boxes.

`build_context` reads a sample's JSON (any ingested source: synthetic-shapes scene graphs
with shape/colour/size, COCO instances with category names, user JSON with
category/name/label) into a `Context`; `context_text` writes it as the prompt block;
`parse_context_text` reads that block back (the mock server answers from it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vlmflow.components.instruct.scene import Obj
from vlmflow.components.sources.synthetic import COLORS

NOUN_FIELDS = ("shape", "category", "name", "label")
CAPTIONS_HEADER = "Captions:"
OBJECTS_HEADER = (
    "Objects (name: [x1, y1, x2, y2], coordinates as fractions of the image width and height, origin at the top left):"
)
_OBJECT_LINE = re.compile(
    r"^(?P<label>[^:()\[\]]+?)(?: \((?P<size>[a-z]+)\))?: "
    r"\[(?P<x1>-?[0-9.]+), (?P<y1>-?[0-9.]+), (?P<x2>-?[0-9.]+), (?P<y2>-?[0-9.]+)\]$"
)


@dataclass(frozen=True)
class Context:
    captions: tuple[str, ...] = ()
    objects: tuple[Obj, ...] = field(default_factory=tuple)

    @property
    def empty(self) -> bool:
        return not self.captions and not self.objects


def _object(raw: object, size: tuple[int, int] | None) -> Obj | None:
    if not isinstance(raw, dict):
        return None
    noun = next((raw[f] for f in NOUN_FIELDS if isinstance(raw.get(f), str) and raw[f].strip()), None)
    box = raw.get("bbox")
    if noun is None or not isinstance(box, list | tuple) or len(box) != 4:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box):
        return None
    x, y, w, h = (float(v) for v in box)
    if max(x + w, y + h) > 1.5 and size:  # absolute pixels: normalise with the image size
        x, w, y, h = x / size[0], w / size[0], y / size[1], h / size[1]
    if w < 0 or h < 0:
        return None
    color = raw.get("color") if isinstance(raw.get("color"), str) else None
    obj_size = raw.get("size") if isinstance(raw.get("size"), str) else None
    return Obj(noun=noun.strip().lower(), box=(x, y, w, h), color=color, size=obj_size)


def build_context(record: dict, image_size: tuple[int, int] | None = None) -> Context:
    """Captions and objects of a sample's JSON; malformed objects are left out."""
    captions = tuple(" ".join(c.split()) for c in record.get("captions") or [] if isinstance(c, str) and c.strip())
    raw_objects = record.get("objects") or []
    objects = tuple(o for o in (_object(r, image_size) for r in raw_objects) if o is not None)
    return Context(captions, objects)


def _coords(obj: Obj) -> list[float]:
    x, y, w, h = obj.box
    return [x, y, x + w, y + h]


def context_text(context: Context) -> str:
    lines: list[str] = []
    if context.captions:
        lines += [CAPTIONS_HEADER, *context.captions]
    if context.objects:
        if lines:
            lines.append("")
        lines.append(OBJECTS_HEADER)
        for obj in context.objects:
            size = f" ({obj.size})" if obj.size else ""
            coords = ", ".join(f"{v:.3f}" for v in _coords(obj))
            lines.append(f"{obj.label}{size}: [{coords}]")
    return "\n".join(lines)


def _split_label(label: str) -> tuple[str | None, str]:
    first, _, rest = label.partition(" ")
    if rest and first in COLORS:
        return first, rest
    return None, label


def parse_context_text(text: str) -> Context | None:
    """The Context written by `context_text`, or None when `text` holds no context block."""
    lines = text.splitlines()
    if CAPTIONS_HEADER not in lines and OBJECTS_HEADER not in lines:
        return None
    captions: list[str] = []
    objects: list[Obj] = []
    section = None
    for line in lines:
        if line in (CAPTIONS_HEADER, OBJECTS_HEADER):
            section = line
        elif not line.strip():
            section = None  # a blank line ends a block
        elif section == CAPTIONS_HEADER:
            captions.append(line.strip())
        elif section == OBJECTS_HEADER and (match := _OBJECT_LINE.match(line.strip())):
            color, noun = _split_label(match["label"])
            x1, y1, x2, y2 = (float(match[k]) for k in ("x1", "y1", "x2", "y2"))
            objects.append(Obj(noun=noun, box=(x1, y1, x2 - x1, y2 - y1), color=color, size=match["size"]))
    return Context(tuple(captions), tuple(objects))
