"""The built-in `synthetic-shapes` source: procedural scenes with a known scene graph.

Each image is drawn from its own generator seeded by (seed, index), so the same spec gives
the same pixels however the rows are cut into units. A row carries the scene graph
(objects with shape, color, size, normalised box), a caption (corrupted in color, shape or
count for a `caption_noise` fraction, the truth kept in `extra["truth"]`), VQA pairs whose
answers are true of the scene, the same questions as multiple-choice items, and a class
label (the shape of the largest object, or its color with `label: color`).
"""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vlmflow.components.sources.base import SOURCES, RawRow, Rejected, SourceContext, SourceReader, Unit, chunk
from vlmflow.prompts import LETTERS
from vlmflow.specs.data import SyntheticShapesSource

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
SIZES = {"small": 0.12, "large": 0.22}  # radius as a fraction of the image side
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"]
CORRUPTIONS = ("color", "shape", "count")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    box: tuple[float, float, float, float]  # x, y, w, h in [0, 1]

    def as_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "bbox": [round(v, 4) for v in self.box]}


def sample_scene(rng: np.random.Generator, min_objects: int, max_objects: int) -> list[SceneObject]:
    """Objects placed with little overlap (rejection sampling, bounded tries)."""
    count = int(rng.integers(min_objects, max_objects + 1))
    objects: list[SceneObject] = []
    for _ in range(count):
        size = str(rng.choice(list(SIZES)))
        radius = SIZES[size]
        for _attempt in range(30):
            cx, cy = rng.uniform(radius, 1 - radius, size=2)
            if all(_far_enough(cx, cy, radius, other) for other in objects):
                break
        box = (float(cx - radius), float(cy - radius), 2 * radius, 2 * radius)
        objects.append(SceneObject(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), size, box))
    return objects


def _far_enough(cx: float, cy: float, radius: float, other: SceneObject) -> bool:
    ox, oy, ow, _ = other.box
    other_r = ow / 2
    return (cx - ox - other_r) ** 2 + (cy - oy - other_r) ** 2 >= (0.8 * (radius + other_r)) ** 2


def render(objects: list[SceneObject], image_size: int, background: tuple[int, int, int]) -> bytes:
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        x, y, w, h = (v * image_size for v in obj.box)
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([x, y, x + w, y + h], fill=fill)
        elif obj.shape == "square":
            inset = w * 0.1
            draw.rectangle([x + inset, y + inset, x + w - inset, y + h - inset], fill=fill)
        else:
            draw.polygon([(x + w / 2, y), (x, y + h), (x + w, y + h)], fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _phrase(count: int, color: str, shape: str) -> str:
    if count == 1:
        return f"{_article(color)} {color} {shape}"
    return f"{NUMBER_WORDS[count]} {color} {shape}s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def groups(objects: list[SceneObject]) -> list[tuple[str, str, int]]:
    """(color, shape, count) groups in first-appearance order."""
    counts = Counter((o.color, o.shape) for o in objects)
    seen: list[tuple[str, str]] = []
    for obj in objects:
        if (obj.color, obj.shape) not in seen:
            seen.append((obj.color, obj.shape))
    return [(color, shape, counts[(color, shape)]) for color, shape in seen]


def caption(scene_groups: list[tuple[str, str, int]]) -> str:
    return "an image with " + _join([_phrase(n, c, s) for c, s, n in scene_groups]) + "."


def parse_caption(text: str) -> list[tuple[str, str, int]] | None:
    """The (color, shape, count) groups a caption in `caption()`'s form states, or None when the
    text is not in that form (a generated caption that does not parse is not a true one)."""
    text = " ".join(text.lower().split()).rstrip(".").strip()
    prefix = "an image with "
    if not text.startswith(prefix):
        return None
    found = []
    for phrase in re.split(r", | and ", text[len(prefix) :]):
        match = re.fullmatch(r"(\w+) (\w+) (\w+)", phrase)
        if match is None:
            return None
        number, color, shape = match.groups()
        count = 1 if number in ("a", "an") else NUMBER_WORDS.index(number) if number in NUMBER_WORDS else 0
        plural = shape.endswith("s") and shape[:-1] in SHAPES
        shape = shape[:-1] if plural else shape
        if color not in COLORS or shape not in SHAPES or count < 1 or plural != (count > 1):
            return None
        found.append((color, shape, count))
    return found


def describes(text: str, objects: list[dict]) -> bool:
    """Scene-graph check: the caption states exactly the scene's (color, shape, count) groups, in any order."""
    stated = parse_caption(text)
    truth = Counter((o["color"], o["shape"]) for o in objects)
    return stated is not None and sorted(stated) == sorted((c, s, n) for (c, s), n in truth.items())


def corrupt(rng: np.random.Generator, scene_groups: list[tuple[str, str, int]]) -> tuple[str, list]:
    """Change one group's color, shape or count so the caption is false of the scene."""
    kind = str(rng.choice(CORRUPTIONS))
    index = int(rng.integers(len(scene_groups)))
    color, shape, count = scene_groups[index]
    present = {(c, s) for c, s, _ in scene_groups}
    changed = list(scene_groups)
    if kind == "color":
        options = [c for c in COLORS if (c, shape) not in present]
        if options:
            changed[index] = (str(rng.choice(options)), shape, count)
    elif kind == "shape":
        options = [s for s in SHAPES if (color, s) not in present]
        if options:
            changed[index] = (color, str(rng.choice(options)), count)
    if kind != "count" and not options:  # every alternative is in the scene: change the count instead
        kind = "count"
    if kind == "count":
        changed[index] = (color, shape, count + 1 if count == 1 or rng.random() < 0.5 else count - 1)
    return kind, changed


def questions(objects: list[SceneObject]) -> list[dict[str, str]]:
    """VQA pairs whose answers are true of the scene."""
    shape_counts = Counter(o.shape for o in objects)
    color_counts = Counter(o.color for o in objects)
    qa = [{"question": f"How many {s}s are there?", "answer": str(shape_counts.get(s, 0))} for s in SHAPES]
    for obj in objects:
        if shape_counts[obj.shape] == 1:
            qa.append({"question": f"What color is the {obj.shape}?", "answer": obj.color})
        if color_counts[obj.color] == 1:
            qa.append({"question": f"What shape is the {obj.color} object?", "answer": obj.shape})
    absent = [c for c in COLORS if c not in color_counts]
    present = objects[0].color
    qa.append({"question": f"Is there {_article(present)} {present} object?", "answer": "yes"})
    if absent:
        qa.append({"question": f"Is there {_article(absent[0])} {absent[0]} object?", "answer": "no"})
    return qa


def answer_vocabulary(question: str, max_objects: int) -> list[str]:
    """Every answer a synthetic question of this kind can have."""
    if question.startswith("How many"):
        return [str(n) for n in range(max(4, max_objects + 1))]
    if question.startswith("What color"):
        return list(COLORS)
    if question.startswith("What shape"):
        return list(SHAPES)
    return ["yes", "no"]


def choice_items(qa: list[dict[str, str]], rng: np.random.Generator, max_objects: int) -> list[dict]:
    """Each VQA pair as a multiple-choice item (A-OKVQA / ScienceQA style): the true answer and up to
    three other answers of its kind, shuffled; the answer is the true option's letter."""
    items = []
    for pair in qa:
        others = [a for a in answer_vocabulary(pair["question"], max_objects) if a != pair["answer"]]
        picked = [pair["answer"], *rng.choice(others, size=min(3, len(others)), replace=False).tolist()]
        order = rng.permutation(len(picked))
        options = [picked[j] for j in order]
        answer = LETTERS[int(np.flatnonzero(order == 0)[0])]
        items.append({"question": pair["question"], "options": options, "answer": answer})
    return items


def make_row(spec: SyntheticShapesSource, seed: int, index: int) -> RawRow:
    rng = np.random.default_rng([seed, index])
    background = tuple(int(v) for v in rng.integers(200, 256, size=3))
    objects = sample_scene(rng, spec.min_objects, spec.max_objects)
    scene_groups = groups(objects)
    true_caption = caption(scene_groups)
    corruption = None
    shown = true_caption
    if rng.random() < spec.caption_noise:
        corruption, changed = corrupt(rng, scene_groups)
        shown = caption(changed)
    u = rng.random()
    split = "test" if u < spec.test_fraction else "val" if u < spec.test_fraction + spec.val_fraction else None
    label = getattr(max(objects, key=lambda o: o.box[2]), spec.label)
    qa = questions(objects)
    extra = {
        "objects": [o.as_dict() for o in objects],
        "qa": qa,
        "choices": choice_items(qa, np.random.default_rng([seed, index, 2]), spec.max_objects),
        "truth": {"caption": true_caption, "corrupted": corruption is not None, "corruption": corruption},
    }
    image = render(objects, spec.image_size, background)
    return RawRow(key=f"{index:08d}", image=image, captions=[shown], label=label, extra=extra, split=split)


def plan(spec: SyntheticShapesSource, ctx: SourceContext) -> list[Unit]:
    total = min(spec.count, spec.limit or spec.count)
    ranges = chunk(list(range(total)), ctx.shard_size)
    return [Unit(ctx.name, i, (r[0], r[-1] + 1), len(r)) for i, r in enumerate(ranges)]


def read(spec: SyntheticShapesSource, ctx: SourceContext, unit: Unit) -> Iterator[RawRow | Rejected]:
    seed = ctx.seed if spec.seed is None else spec.seed
    start, stop = unit.payload
    for index in range(start, stop):
        yield make_row(spec, seed, index)


SOURCES.register("synthetic-shapes", SourceReader("synthetic-shapes", plan, read))
