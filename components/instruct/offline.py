"""The offline generator: LLaVA's three task types written from the scene graph alone.

Every answer is a sequence of sentences from a small set of statement forms (counts,
colours, shapes, sizes, positions, relations, extremes, comparisons), each stated only when
`scene` says it holds; `verify.check_answer` parses them back and re-checks them. Objects
whose colour+noun is shared with another object are only counted, never described one by
one (a definite "the red circle" must refer to exactly one object). Captions are never used:
they can be the corrupted ones CapFilt has to find.

Deterministic: the choices come from a `random.Random` seeded by the caller (seed, key, task).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from vlmflow.components.instruct import scene
from vlmflow.components.instruct.scene import REGIONS, Obj, article, number_word, plural
from vlmflow.components.sources.synthetic import COLORS, SHAPES

Turn = tuple[str, str]
Candidate = tuple[str, list[str]]  # a question and the sentences of its answer


def np(color: str | None, noun: str) -> str:
    return f"{color} {noun}" if color else noun


def np_plural(color: str | None, noun: str) -> str:
    return f"{color} {plural(noun)}" if color else plural(noun)


def count_sentence(n: int, color: str | None, noun: str) -> str:
    if n == 1:
        return f"There is one {np(color, noun)} in the image."
    return f"There are {number_word(n)} {np_plural(color, noun)} in the image."


def objects_phrase(n: int) -> str:
    return "one object" if n == 1 else f"{number_word(n)} objects"


def position_sentence(obj: Obj) -> str:
    return f"The {obj.label} is {REGIONS[scene.region(obj)]}."


class Writer:
    """Question/answer candidates for one scene; `vocab` nouns/colours allow "no X" answers."""

    def __init__(self, objects: list[Obj], rng: random.Random, nouns: tuple[str, ...], colors: tuple[str, ...]):
        self.objects = list(objects)
        self.rng = rng
        self.unique = [o for o in self.objects if scene.is_unique(self.objects, o)]
        present_nouns = [o.noun for o in self.objects]
        self.nouns = list(dict.fromkeys([*present_nouns, *(nouns if self._has_vocab(nouns) else ())]))
        self.colors = list(dict.fromkeys([o.color for o in self.objects if o.color]))
        self.all_colors = list(dict.fromkeys([*self.colors, *(colors if self.colors else ())]))

    def _has_vocab(self, nouns: tuple[str, ...]) -> bool:
        return all(o.noun in nouns for o in self.objects)

    def count(self, color: str | None, noun: str) -> int:
        return len(scene.matching(self.objects, color, noun))

    def pick(self, *variants: str) -> str:
        return self.rng.choice(variants)

    # --- conversation -----------------------------------------------------------------

    def conversation_candidates(self) -> list[Candidate]:
        total = self.pick("How many objects are there in the image?", "How many objects can you see in total?")
        out: list[Candidate] = [(total, [count_sentence(len(self.objects), None, "object")])]
        groups = list(dict.fromkeys((o.color, o.noun) for o in self.objects))
        for color, noun in groups:
            question = self.pick("How many {} are there in the image?", "How many {} can you see?")
            out.append(
                (question.format(np_plural(color, noun)), [count_sentence(self.count(color, noun), color, noun)])
            )
        for noun in self.nouns:
            if any(c is not None for c, _ in groups):
                out.append((f"How many {plural(noun)} are there in the image?", [self._count(None, noun)]))
        for color in self.colors:
            out.append((f"How many {color} objects are in the image?", [self._count(color, "object")]))
        out += self._existence()
        for obj in self.unique:
            out += self._about(obj)
        for a in self.unique:
            for b in self.unique:
                rel = scene.relation(a, b) if a is not b else None
                if rel:
                    question = self.pick(
                        f"Where is the {a.label} relative to the {b.label}?",
                        f"How is the {a.label} positioned with respect to the {b.label}?",
                    )
                    out.append((question, [f"The {a.label} is {rel} the {b.label}."]))
        return out

    def _count(self, color: str | None, noun: str) -> str:
        return count_sentence(self.count(color, noun), color, noun)

    def _existence(self) -> list[Candidate]:
        out = []
        present = self.rng.choice(self.objects)
        label = present.label
        yes = f"Yes, there is {article(label)} {label} in the image."
        out.append((f"Is there {article(label)} {label} in the image?", [yes]))
        colors = self.all_colors or [None]
        absent = [(c, n) for n in self.nouns for c in colors if self.count(c, n) == 0]
        if absent:
            color, noun = self.rng.choice(absent)
            phrase = np(color, noun)
            no = f"No, there are no {np_plural(color, noun)} in the image."
            out.append((f"Is there {article(phrase)} {phrase} in the image?", [no]))
        return out

    def _about(self, obj: Obj) -> list[Candidate]:
        where = self.pick(f"Where is the {obj.label} located?", f"In which part of the image is the {obj.label}?")
        out = [(where, [position_sentence(obj)])]
        if obj.color and len(scene.matching(self.objects, None, obj.noun)) == 1:
            out.append((f"What color is the {obj.noun}?", [f"The {obj.noun} is {obj.color}."]))
        if obj.color and len(scene.matching(self.objects, obj.color, None)) == 1:
            shape = f"The {obj.color} object is {article(obj.noun)} {obj.noun}."
            out.append((f"What shape is the {obj.color} object?", [shape]))
        if obj.size:
            out.append((f"Is the {obj.label} small or large?", [f"The {obj.label} is {obj.size}."]))
        return out

    def conversation(self, min_turns: int, max_turns: int) -> list[Turn]:
        candidates = list({q: (q, a) for q, a in self.conversation_candidates()}.values())
        k = min(len(candidates), self.rng.randint(min_turns, max_turns))
        return [(q, " ".join(a)) for q, a in self.rng.sample(candidates, k)]

    # --- detailed description -------------------------------------------------------

    def description(self) -> str:
        sentences = [count_sentence(len(self.objects), None, "object")]
        groups = list(dict.fromkeys((o.color, o.noun) for o in self.objects))
        if len(groups) > 1 or groups[0][0] is not None:
            sentences += [self._count(c, n) for c, n in groups]
        for obj in self.unique:
            sentences.append(position_sentence(obj))
            if obj.size:
                sentences.append(f"The {obj.label} is {obj.size}.")
        pairs = [(a, b, scene.relation(a, b)) for a in self.unique for b in self.unique if a is not b]
        pairs = [p for p in pairs if p[2] is not None]
        for a, b, rel in self.rng.sample(pairs, min(2, len(pairs))):
            sentences.append(f"The {a.label} is {rel} the {b.label}.")
        return " ".join(sentences)

    # --- complex reasoning ----------------------------------------------------------

    def reasoning_candidates(self) -> list[Candidate]:
        total = len(self.objects)
        out: list[Candidate] = []
        for color in self.colors:
            k = self.count(color, "object")
            counts = [count_sentence(total, None, "object"), count_sentence(k, color, "object")]
            left = objects_phrase(total - k) if total > k else "no objects"
            removed = f"If all the {color} objects were removed from the image, how many objects would remain?"
            out.append((removed, [*counts, f"So removing the {color} objects would leave {left}."]))
            if total > k:
                verb = "is" if total - k == 1 else "are"
                verdict = f"So {objects_phrase(total - k)} {verb} not {color}."
                out.append((f"How many objects in the image are not {color}?", [*counts, verdict]))
        common = scene.most_common_color(self.objects)
        if common:
            counts = [count_sentence(n, c, "object") for c, n in scene.color_counts(self.objects).items()]
            verdict = f"So {common} is the most common color in the image."
            out.append(("Which color appears most often among the objects in the image?", [*counts, verdict]))
        out += self._comparisons()
        out += self._extremes()
        return out

    def _comparisons(self) -> list[Candidate]:
        out = []
        nouns = self.nouns
        for i, a in enumerate(nouns):
            for b in nouns[i + 1 :]:
                na, nb = self.count(None, a), self.count(None, b)
                if na + nb == 0:
                    continue
                if na == nb:
                    verdict = f"So there are as many {plural(a)} as {plural(b)}."
                else:
                    verdict = f"So there are {'more' if na > nb else 'fewer'} {plural(a)} than {plural(b)}."
                answer = [count_sentence(na, None, a), count_sentence(nb, None, b), verdict]
                out.append((f"Are there more {plural(a)} than {plural(b)} in the image?", answer))
        return out

    def _extremes(self) -> list[Candidate]:
        questions = {
            "leftmost": "Which object is the farthest to the left?",
            "rightmost": "Which object is the farthest to the right?",
            "topmost": "Which object is the closest to the top of the image?",
            "bottommost": "Which object is the closest to the bottom of the image?",
            "closest to the center": "Which object is the closest to the center of the image?",
        }
        out = []
        for which, question in questions.items():
            obj = scene.extreme(self.objects, which)
            if obj is None or obj not in self.unique:
                continue
            claim = (
                f"The {obj.label} is the object closest to the center of the image."
                if which == "closest to the center"
                else f"The {obj.label} is the {which} object in the image."
            )
            out.append((question, [position_sentence(obj), claim]))
        return out

    def reasoning(self) -> list[Turn]:
        candidates = self.reasoning_candidates() or self.conversation_candidates()[:1]
        question, answer = self.rng.choice(candidates)
        return [(question, " ".join(answer))]


GENERATORS: dict[str, Callable[[Writer, int, int], list[Turn]]] = {
    "conversation": lambda w, lo, hi: w.conversation(lo, hi),
    "detail": lambda w, lo, hi: [("", w.description())],
    "complex_reasoning": lambda w, lo, hi: w.reasoning(),
}


def generate(
    task: str,
    objects: list[Obj] | tuple[Obj, ...],
    rng: random.Random,
    min_turns: int = 2,
    max_turns: int = 5,
    nouns: tuple[str, ...] = SHAPES,
    colors: tuple[str, ...] = tuple(COLORS),
) -> list[Turn]:
    """(question, answer) turns for `task`; a detail task's question is "" (the caller picks one)."""
    if not objects:
        raise ValueError("the offline generator needs at least one object with a box")
    writer = Writer(list(objects), rng, nouns, colors)
    return GENERATORS[task](writer, min_turns, max_turns)
