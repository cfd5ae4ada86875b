"""Multiple-choice answer extraction (MMBench / ScienceQA style) from free-form generated text."""

from __future__ import annotations

import re
from collections.abc import Mapping

_ANSWER_LEAD = r"(?:answer|option|choice)(?:\s+is)?\s*(?:[:\-]\s*)?"
_SPACES = re.compile(r"\s+")
_NON_WORD = re.compile(r"[^\w\s]")


def _normalized(text: str) -> str:
    return _SPACES.sub(" ", _NON_WORD.sub(" ", text.lower())).strip()


def _letter_pattern(keys: list[str]) -> str:
    return "|".join(re.escape(key) for key in sorted(keys, key=len, reverse=True))


def _unique(found: list[str]) -> str | None:
    distinct = list(dict.fromkeys(found))
    return distinct[0] if len(distinct) == 1 else None


def _by_letter(text: str, options: Mapping[str, str]) -> str | None:
    keys = list(options)
    by_upper = {key.upper(): key for key in keys}
    letters = _letter_pattern(list(by_upper))
    stripped = text.strip()
    bare = re.fullmatch(rf"[\s\"'*(\[]*({letters})[\s\"'*)\].:]*", stripped, flags=re.IGNORECASE)
    if bare:
        return by_upper[bare.group(1).upper()]
    stated = re.search(rf"\b{_ANSWER_LEAD}\(?({letters})\b(?!['\w])", stripped, flags=re.IGNORECASE)
    if stated:
        return by_upper[stated.group(1).upper()]
    bracketed = list(dict.fromkeys(by_upper[m.upper()] for m in re.findall(rf"[(\[]({letters})[)\]]", stripped)))
    if len(bracketed) > 1:
        return None  # "(A) or (B)": ambiguous, let the option text decide
    leading = re.match(rf"[\s*]*\(?({letters})[.):]\s", stripped + " ") or re.match(
        rf"[\s*]*\(?({letters})\)\s", stripped + " ", flags=re.IGNORECASE
    )
    if leading:
        return by_upper[leading.group(1).upper()]
    return bracketed[0] if bracketed else None


def _by_text(text: str, options: Mapping[str, str]) -> str | None:
    response = f" {_normalized(text)} "
    normalized = {key: _normalized(value) for key, value in options.items() if _normalized(value)}
    equal = [key for key, value in normalized.items() if response.strip() == value]
    if equal:
        return _unique(equal)
    contained = [key for key, value in normalized.items() if f" {value} " in response]
    if not contained:
        return None
    longest = max(contained, key=lambda key: len(normalized[key]))
    others = [key for key in contained if key != longest]
    if all(f" {normalized[key]} " in f" {normalized[longest]} " for key in others):
        return longest
    return None


def extract_choice(text: str, options: Mapping[str, str]) -> str | None:
    """The option key a generated answer picks, or None when it cannot be told (count those as failures).

    Tried in order, the first that decides wins:
      1. the text is just a key, possibly decorated: "B", "(B)", "B.", "b)", "**B**";
      2. a stated key: "Answer: B", "The answer is (B).", "option C";
      3. a leading key: "B. a red cube", "(B) because ...", "b) blue" (lowercase only with ")");
      4. exactly one distinct key in parentheses/brackets anywhere: "... so (C) is right";
      5. the option text: the whole answer equals one option's text (case and punctuation
         ignored), or contains exactly one option's text as whole words (if several are contained
         and one contains all the others, e.g. "red" and "dark red", the longest wins).

    Args:
        text: the model's generated answer.
        options: option key (e.g. "A") -> option text.

    Returns:
        The matching key of ``options``, or None.
    """
    if not options:
        raise ValueError("extract_choice needs at least one option")
    if not text or not text.strip():
        return None
    return _by_letter(text, options) or _by_text(text, options)
