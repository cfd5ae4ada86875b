"""Replies of a chat model -> (question, answer) turns, or the reason they cannot be used.

Reply formats (asked for in each task's query.txt): conversation `{"turns": [{"question",
"answer"}, ...]}`, detail `{"description"}`, complex_reasoning `{"question", "answer"}`.
A reply is rejected (and re-asked) when it is empty, truncated (finish_reason "length"),
not JSON, the wrong shape, or off task (a refusal, talk about captions/boxes/coordinates
instead of the image, too short to be a description or a reasoned answer).
"""

from __future__ import annotations

import json
import re

Turn = tuple[str, str]
MAX_TURNS = 20
MIN_DESCRIPTION_WORDS = 8
MIN_REASONING_WORDS = 5
_OFF_TASK = re.compile(
    r"\b(?:(?P<refusal>I'm sorry|I am sorry|I cannot|I can't|I am unable|I'm unable|as an AI)"
    r"|(?P<leak>bounding box(?:es)?|coordinates|the captions?))\b",
    re.IGNORECASE,
)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


class Rejected(Exception):
    """An unusable reply; `reason` is a stable code (empty, truncated, malformed-json, wrong-format, off-task)."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def _json(content: str) -> object:
    text = content.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    if not text.startswith("{") and "{" in text:
        text = text[text.index("{") : text.rindex("}") + 1] if "}" in text else text
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise Rejected("malformed-json", f"the reply is not a JSON object ({exc.msg} at char {exc.pos})") from None


def _text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Rejected("wrong-format", f"{where}: expected a non-empty string")
    return " ".join(value.split())


def _on_task(text: str, where: str) -> str:
    found = _OFF_TASK.search(text)
    if found is None:
        return text
    if found["refusal"]:
        raise Rejected("off-task", f"{where}: reads as a refusal")
    raise Rejected("off-task", f"{where}: talks about the {found['leak']} instead of the image")


def _pair(raw: object, where: str) -> Turn:
    if not isinstance(raw, dict):
        raise Rejected("wrong-format", f"{where}: expected an object with question and answer")
    question = _on_task(_text(raw.get("question"), f"{where}.question"), f"{where}.question")
    answer = _on_task(_text(raw.get("answer"), f"{where}.answer"), f"{where}.answer")
    return question, answer


def _conversation(data: dict) -> list[Turn]:
    turns = data.get("turns")
    if not isinstance(turns, list) or not turns:
        raise Rejected("wrong-format", 'expected {"turns": [{"question": ..., "answer": ...}, ...]}')
    if len(turns) > MAX_TURNS:
        raise Rejected("off-task", f"{len(turns)} turns; at most {MAX_TURNS}")
    return [_pair(t, f"turns[{i}]") for i, t in enumerate(turns)]


def _detail(data: dict) -> list[Turn]:
    description = _on_task(_text(data.get("description"), "description"), "description")
    if len(description.split()) < MIN_DESCRIPTION_WORDS:
        raise Rejected("off-task", f"description: {len(description.split())} words is not a detailed description")
    return [("", description)]


def _reasoning(data: dict) -> list[Turn]:
    question, answer = _pair(data, "reply")
    if len(answer.split()) < MIN_REASONING_WORDS:
        raise Rejected("off-task", f"answer: {len(answer.split())} words is not a reasoned answer")
    return [(question, answer)]


PARSERS = {"conversation": _conversation, "detail": _detail, "complex_reasoning": _reasoning}


def parse_reply(task: str, content: str | None, finish_reason: str | None = "stop") -> list[Turn]:
    """The reply's turns (a detail reply's question is "": the caller asks one of its own)."""
    if finish_reason == "length":
        raise Rejected("truncated", "the reply was cut off at max_tokens")
    if content is None or not content.strip():
        raise Rejected("empty", "the reply is empty")
    data = _json(content)
    if not isinstance(data, dict):
        raise Rejected("wrong-format", "expected a JSON object")
    return PARSERS[task](data)


def reply_of(task: str, turns: list[Turn]) -> str:
    """The reply a model should give for `turns` (the mock server and few-shot checks use it)."""
    if task == "conversation":
        data: dict = {"turns": [{"question": q, "answer": a} for q, a in turns]}
    elif task == "detail":
        data = {"description": turns[0][1]}
    else:
        data = {"question": turns[0][0], "answer": turns[0][1]}
    return json.dumps(data, ensure_ascii=False)
