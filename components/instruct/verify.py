"""Check generated answers against a scene graph, sentence by sentence.

Every sentence must parse as one of the statement forms the offline generator writes (a
sentence that does not parse is a problem too: nothing unverified passes) and be true of
the objects. Definite descriptions ("the red circle") must refer to exactly one object.
`Yes, ...` must introduce a positive claim and `No, ...` a negative one.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from vlmflow.components.instruct import scene
from vlmflow.components.instruct.scene import REGIONS, Obj, parse_number, plural
from vlmflow.components.sources.synthetic import COLORS, SHAPES, SIZES

REGION_NAMES = {phrase: key for key, phrase in REGIONS.items()}
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")


class Checker:
    def __init__(
        self,
        objects: list[Obj] | tuple[Obj, ...],
        nouns: tuple[str, ...] = SHAPES,
        colors: tuple[str, ...] = tuple(COLORS),
    ):
        self.objects = list(objects)
        self.colors = set(colors) | {o.color for o in self.objects if o.color}
        self.sizes = set(SIZES) | {o.size for o in self.objects if o.size}
        vocabulary = set(nouns) | {o.noun for o in self.objects} | {"object"}
        self.nouns = {n: n for n in vocabulary} | {plural(n): n for n in vocabulary}
        self.forms: list[tuple[re.Pattern, Callable[[re.Match], str | None]]] = [
            (re.compile(r"^There are (?P<cmp>more|fewer) (?P<a>.+) than (?P<b>.+)\.$"), self._compare),
            (re.compile(r"^There are as many (?P<a>.+) as (?P<b>.+)\.$"), self._as_many),
            (re.compile(r"^There (?:is|are) (?P<num>\w+) (?P<np>.+) in the image\.$"), self._count),
            (re.compile(r"^Removing the (?P<np>.+) would leave (?P<num>\w+) objects?\.$"), self._remove),
            (re.compile(r"^(?P<num>\w+) objects? (?:is|are) not (?P<color>\w+)\.$"), self._not_color),
            (re.compile(r"^(?P<color>\w+) is the most common color in the image\.$"), self._most_common),
            (
                re.compile(
                    r"^The (?P<np>.+) is the (?P<which>leftmost|rightmost|topmost|bottommost) object in the image\.$"
                ),
                self._extreme,
            ),
            (
                re.compile(r"^The (?P<np>.+) is the object (?P<which>closest to the center) of the image\.$"),
                self._extreme,
            ),
            (
                re.compile(r"^The (?P<a>.+) is (?P<rel>to the left of|to the right of|above|below) the (?P<b>.+)\.$"),
                self._relation,
            ),
            (re.compile(r"^The (?P<a>.+) is larger than the (?P<b>.+)\.$"), self._larger),
            (re.compile(r"^The (?P<np>.+) is (?P<region>(?:in|at|on) the .+ of the image)\.$"), self._position),
            (re.compile(r"^The (?P<np>.+) is (?:a|an) (?P<noun>.+)\.$"), self._shape),
            (re.compile(r"^The (?P<np>.+) is (?P<attr>\w+)\.$"), self._attribute),
        ]

    # --- noun phrases -----------------------------------------------------------------

    def parse_np(self, text: str) -> tuple[str | None, str] | None:
        first, _, rest = text.partition(" ")
        if rest and first in self.colors and rest in self.nouns:
            return first, self.nouns[rest]
        return (None, self.nouns[text]) if text in self.nouns else None

    def refers(self, text: str) -> list[Obj] | None:
        parsed = self.parse_np(text)
        return None if parsed is None else scene.matching(self.objects, *parsed)

    def the(self, text: str) -> tuple[Obj | None, str | None]:
        """The one object `the TEXT` refers to, or a problem."""
        found = self.refers(text)
        if found is None:
            return None, f"unknown noun phrase {text!r}"
        if len(found) != 1:
            return None, f"'the {text}' refers to {len(found)} objects"
        return found[0], None

    # --- statement forms: each returns None when true, else the problem -------------------

    def _count(self, m: re.Match) -> str | None:
        found = self.refers(m["np"])
        if found is None:
            return f"unknown noun phrase {m['np']!r}"
        if m["num"] in ("a", "an"):
            return None if found else f"there is no {m['np']}"
        n = parse_number(m["num"])
        if n is None:
            return f"not a number: {m['num']!r}"
        return None if len(found) == n else f"{m['np']}: {len(found)} in the scene, not {n}"

    def _compare(self, m: re.Match) -> str | None:
        a, b = self.refers(m["a"]), self.refers(m["b"])
        if a is None or b is None:
            return "unknown noun phrase"
        holds = len(a) > len(b) if m["cmp"] == "more" else len(a) < len(b)
        return None if holds else f"{len(a)} {m['a']} vs {len(b)} {m['b']}"

    def _as_many(self, m: re.Match) -> str | None:
        a, b = self.refers(m["a"]), self.refers(m["b"])
        if a is None or b is None:
            return "unknown noun phrase"
        return None if len(a) == len(b) else f"{len(a)} {m['a']} vs {len(b)} {m['b']}"

    def _remove(self, m: re.Match) -> str | None:
        found = self.refers(m["np"])
        n = parse_number(m["num"])
        if found is None or n is None:
            return "unparsed removal"
        left = len(self.objects) - len(found)
        return None if left == n else f"removing {m['np']} leaves {left}, not {n}"

    def _not_color(self, m: re.Match) -> str | None:
        n = parse_number(m["num"].lower())
        if n is None or m["color"] not in self.colors:
            return "unparsed 'not COLOR'"
        actual = sum(o.color != m["color"] for o in self.objects)
        return None if actual == n else f"{actual} objects are not {m['color']}, not {n}"

    def _most_common(self, m: re.Match) -> str | None:
        color = m["color"].lower()
        actual = scene.most_common_color(self.objects)
        return None if actual == color else f"the most common color is {actual}, not {color}"

    def _extreme(self, m: re.Match) -> str | None:
        obj, problem = self.the(m["np"])
        if problem:
            return problem
        actual = scene.extreme(self.objects, m["which"])
        return None if actual is obj else f"the {m['np']} is not clearly the {m['which']} object"

    def _relation(self, m: re.Match) -> str | None:
        (a, pa), (b, pb) = self.the(m["a"]), self.the(m["b"])
        if pa or pb:
            return pa or pb
        return None if scene.holds(a, m["rel"], b) else f"the {m['a']} is not {m['rel']} the {m['b']}"

    def _larger(self, m: re.Match) -> str | None:
        (a, pa), (b, pb) = self.the(m["a"]), self.the(m["b"])
        if pa or pb:
            return pa or pb
        return None if scene.larger(a, b) else f"the {m['a']} is not larger than the {m['b']}"

    def _position(self, m: re.Match) -> str | None:
        obj, problem = self.the(m["np"])
        if problem:
            return problem
        if m["region"] not in REGION_NAMES:
            return f"unknown region {m['region']!r}"
        actual = scene.region(obj)
        return None if actual == REGION_NAMES[m["region"]] else f"the {m['np']} is {REGIONS[actual]}"

    def _shape(self, m: re.Match) -> str | None:
        obj, problem = self.the(m["np"])
        if problem:
            return problem
        noun = self.nouns.get(m["noun"])
        return None if noun == obj.noun else f"the {m['np']} is a {obj.noun}, not a {m['noun']}"

    def _attribute(self, m: re.Match) -> str | None:
        obj, problem = self.the(m["np"])
        if problem:
            return problem
        attr = m["attr"]
        if attr in self.colors:
            return None if obj.color == attr else f"the {m['np']} is {obj.color}, not {attr}"
        if attr in self.sizes:
            return None if obj.size == attr else f"the {m['np']} is {obj.size}, not {attr}"
        return f"unknown attribute {attr!r}"

    # --- sentences --------------------------------------------------------------------

    def check_sentence(self, sentence: str) -> str | None:
        polarity = None
        for prefix, value in (("Yes, ", True), ("No, ", False)):
            if sentence.startswith(prefix):
                polarity, sentence = value, sentence[len(prefix) :]
        sentence = sentence.removeprefix("So ")
        sentence = sentence[:1].upper() + sentence[1:]
        for pattern, check in self.forms:
            match = pattern.match(sentence)
            if match:
                if polarity is not None and (check != self._count or (match["num"] == "no") == polarity):
                    return "Yes/No does not agree with the statement"
                return check(match)
        return "unparsed statement"


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def check_answer(
    text: str, objects: list[Obj] | tuple[Obj, ...], nouns: tuple[str, ...] = SHAPES
) -> list[tuple[str, str]]:
    """(sentence, problem) for every sentence of `text` that does not parse or is false."""
    checker = Checker(objects, nouns)
    problems = []
    for sentence in sentences(text):
        problem = checker.check_sentence(sentence)
        if problem is not None:
            problems.append((sentence, problem))
    return problems
