"""Prompt texts shared by training and evaluation, so a model is asked as it was taught."""

from __future__ import annotations

from collections.abc import Sequence

CAPTION_PROMPT = "Describe the image."
CHOICE_TEMPLATE = "{question}\n{options}\nAnswer with the option's letter."
LETTERS = "ABCDEFGHIJ"


def choice_prompt(template: str, question: str, options: Sequence[tuple[str, str]]) -> str:
    """A multiple-choice question in `template` (fields: question, options), one `A. text` line per option."""
    return template.format(question=question, options="\n".join(f"{key}. {text}" for key, text in options))


Options = tuple[tuple[str, str], ...]


def options_of(raw: object) -> tuple[Options, str | None]:
    """A multiple-choice item's options as (letter, text) pairs: a list is lettered A, B, ...; a
    mapping keeps its keys. The second value says what is wrong (then the pairs are empty)."""
    if isinstance(raw, list) and len(raw) > len(LETTERS):
        return (), f"at most {len(LETTERS)} options"
    if isinstance(raw, dict):
        pairs = list(raw.items())
    elif isinstance(raw, list):
        pairs = list(zip(LETTERS, raw, strict=False))
    else:
        return (), "options must be a list or a mapping of letters to texts"
    if len(pairs) < 2 or not all(isinstance(v, str) and v.strip() for _, v in pairs):
        return (), "options must hold at least two non-empty texts"
    return tuple((str(k), v) for k, v in pairs), None


def check_choice_template(template: str) -> str:
    """A multiple-choice template fills `{question}` and `{options}` and no other field."""
    try:
        template.format(question="", options="")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"template {template!r} may use only the fields {{question}} and {{options}} ({exc})"
        ) from None
    if "{options}" not in template:
        raise ValueError(f"template {template!r} must hold {{options}}")
    return template


def choice_items(record: dict) -> list[tuple[str, Options, str]]:
    """A sample record's well-formed multiple-choice items as (question, (letter, text) options,
    answer letter). `choices` holds {question, options: [texts] or {letter: text}, answer: letter},
    as a multiple-choice JSONL line; an item with fewer than two options or an answer that is
    not one of them is not trained on."""
    found = []
    for item in record.get("choices") or []:
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            continue
        options, problem = options_of(item.get("options"))
        answer = str(item.get("answer", "")).strip()
        if problem is None and answer in dict(options):
            found.append((item["question"], options, answer))
    return found
