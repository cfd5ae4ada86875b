"""Prompt texts shared by training and evaluation, so a model is asked as it was taught."""

from __future__ import annotations

from collections.abc import Sequence

CAPTION_PROMPT = "Describe the image."
CHOICE_TEMPLATE = "{question}\n{options}\nAnswer with the option's letter."
LETTERS = "ABCDEFGHIJ"


def choice_prompt(template: str, question: str, options: Sequence[tuple[str, str]]) -> str:
    """A multiple-choice question in `template` (fields: question, options), one `A. text` line per option."""
    return template.format(question=question, options="\n".join(f"{key}. {text}" for key, text in options))


def lettered(options: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Options as (letter, text) pairs, A first."""
    if len(options) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} options, got {len(options)}")
    return tuple(zip(LETTERS, options, strict=False))


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
