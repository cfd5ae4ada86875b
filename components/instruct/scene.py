"""A scene graph as the instruct stage sees it, and the geometry both the offline generator
and the checker use: what a noun phrase refers to, where an object is, how two relate.

One definition of every predicate (region, left of, larger than...) is shared by the
generator (which only states what holds) and the checker (which re-derives it), so "true of
the scene" means the same on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
IRREGULAR_PLURALS = {
    "person": "people",
    "mouse": "mice",
    "sheep": "sheep",
    "skis": "skis",
    "scissors": "scissors",
    "knife": "knives",
    "child": "children",
}
RELATION_MARGIN = 0.15  # centres this far apart (image fraction) on an axis: left/right, above/below
LARGER_RATIO = 1.5  # box area ratio for "larger than"
EXTREME_MARGIN = 0.05  # the leftmost (etc.) object beats the runner-up by at least this much
REGIONS = {
    ("top", "left"): "in the top left part of the image",
    ("top", "center"): "at the top of the image",
    ("top", "right"): "in the top right part of the image",
    ("middle", "left"): "on the left side of the image",
    ("middle", "center"): "in the center of the image",
    ("middle", "right"): "on the right side of the image",
    ("bottom", "left"): "in the bottom left part of the image",
    ("bottom", "center"): "at the bottom of the image",
    ("bottom", "right"): "in the bottom right part of the image",
}


@dataclass(frozen=True)
class Obj:
    """One object: a noun (shape or category), optional colour and size, box x, y, w, h in [0, 1]."""

    noun: str
    box: tuple[float, float, float, float]
    color: str | None = None
    size: str | None = None

    @property
    def label(self) -> str:
        return f"{self.color} {self.noun}" if self.color else self.noun

    @property
    def center(self) -> tuple[float, float]:
        x, y, w, h = self.box
        return x + w / 2, y + h / 2

    @property
    def area(self) -> float:
        return self.box[2] * self.box[3]


def plural(noun: str) -> str:
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    words = noun.split(" ")
    last = words[-1]
    if last in IRREGULAR_PLURALS:
        last = IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join([*words[:-1], last])


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def parse_number(word: str) -> int | None:
    if word in NUMBER_WORDS:
        return NUMBER_WORDS.index(word)
    if word == "zero":
        return 0
    return int(word) if word.isdigit() else None


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def matching(objects: list[Obj], color: str | None, noun: str | None) -> list[Obj]:
    """Objects a noun phrase refers to; noun None or "object" means any noun."""
    return [
        o
        for o in objects
        if (color is None or o.color == color) and (noun in (None, "object", "objects") or o.noun == noun)
    ]


def is_unique(objects: list[Obj], obj: Obj) -> bool:
    return len(matching(objects, obj.color, obj.noun)) == 1


def region(obj: Obj) -> tuple[str, str]:
    cx, cy = obj.center
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    vertical = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    return vertical, horizontal


def relation(a: Obj, b: Obj) -> str | None:
    """The clearest of "to the left of" / "to the right of" / "above" / "below" that holds, or None."""
    (ax, ay), (bx, by) = a.center, b.center
    dx, dy = bx - ax, by - ay
    if abs(dx) >= abs(dy) and abs(dx) >= RELATION_MARGIN:
        return "to the left of" if dx > 0 else "to the right of"
    if abs(dy) >= RELATION_MARGIN:
        return "above" if dy > 0 else "below"
    return None


def holds(a: Obj, rel: str, b: Obj) -> bool:
    """Whether `a REL b` holds (each direction on its own: a can be both left of and above b)."""
    (ax, ay), (bx, by) = a.center, b.center
    return {
        "to the left of": bx - ax >= RELATION_MARGIN,
        "to the right of": ax - bx >= RELATION_MARGIN,
        "above": by - ay >= RELATION_MARGIN,
        "below": ay - by >= RELATION_MARGIN,
    }[rel]


def larger(a: Obj, b: Obj) -> bool:
    return a.area >= LARGER_RATIO * b.area


EXTREMES = {
    "leftmost": lambda o: o.center[0],
    "rightmost": lambda o: -o.center[0],
    "topmost": lambda o: o.center[1],
    "bottommost": lambda o: -o.center[1],
    "closest to the center": lambda o: ((o.center[0] - 0.5) ** 2 + (o.center[1] - 0.5) ** 2) ** 0.5,
}


def extreme(objects: list[Obj], which: str) -> Obj | None:
    """The object that is clearly the leftmost (etc.): beats the runner-up by EXTREME_MARGIN."""
    if len(objects) < 2:
        return None
    ranked = sorted(objects, key=EXTREMES[which])
    if EXTREMES[which](ranked[1]) - EXTREMES[which](ranked[0]) < EXTREME_MARGIN:
        return None
    return ranked[0]


def color_counts(objects: list[Obj]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in objects:
        if o.color:
            counts[o.color] = counts.get(o.color, 0) + 1
    return counts


def most_common_color(objects: list[Obj]) -> str | None:
    """The colour with strictly the most objects, or None (a tie, or no colours)."""
    counts = sorted(color_counts(objects).items(), key=lambda kv: -kv[1])
    if len(counts) < 2 or counts[0][1] == counts[1][1]:
        return None
    return counts[0][0]
