"""Prompt templates (system prompt, query, few-shot examples per task), read from a folder.

The built-in folder is `specs/instruct_templates/` (see its README), installed as package data
of `vlmflow.builtin` (`vlmflow.recipes.builtin_dir`); a recipe's
`instruct.templates:` names another. `Templates.digest` hashes every file the prompts are
built from, so editing one changes the stage digest. The few-shot examples are chat turns:
user = the example context in the query, assistant = the example reply.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from vlmflow.artifacts import digest_of
from vlmflow.errors import UserError
from vlmflow.recipes import builtin_dir
from vlmflow.specs.instruct import TASKS

DEFAULT_TEMPLATES = builtin_dir("instruct_templates")
CONTEXT = "{context}"
PROBLEM = "{problem}"


@dataclass(frozen=True)
class TaskTemplate:
    system: str
    query: str
    examples: tuple[tuple[str, str], ...]  # (context text, reply text)


@dataclass(frozen=True)
class Templates:
    folder: Path
    tasks: dict[str, TaskTemplate]
    detail_questions: tuple[str, ...]
    reask: str
    digest: str

    def messages(self, task: str, context: str) -> list[dict[str, str]]:
        """The chat request for one item: system prompt, few-shot turns, then the query."""
        template = self.tasks[task]
        messages = [{"role": "system", "content": template.system}]
        for example_context, reply in template.examples:
            messages.append({"role": "user", "content": template.query.replace(CONTEXT, example_context)})
            messages.append({"role": "assistant", "content": reply})
        messages.append({"role": "user", "content": template.query.replace(CONTEXT, context)})
        return messages

    def reask_message(self, problem: str) -> dict[str, str]:
        return {"role": "user", "content": self.reask.replace(PROBLEM, problem)}

    def detail_question(self, seed: int, key: str) -> str:
        """One of the detail questions, chosen by (seed, key): stable across runs."""
        index = int(hashlib.sha256(f"{seed}:{key}:detail-question".encode()).hexdigest()[:12], 16)
        return self.detail_questions[index % len(self.detail_questions)]


def _read(path: Path, missing: list[str], folder: Path) -> str:
    if not path.is_file():
        missing.append(str(path.relative_to(folder)))
        return ""
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read template: {exc}") from None


def _examples(folder: Path, task: str) -> tuple[tuple[str, str], ...]:
    examples = []
    for context_file in sorted((folder / task / "examples").glob("*.context.txt")):
        reply_file = context_file.with_name(context_file.name.replace(".context.txt", ".response.json"))
        if not reply_file.is_file():
            raise UserError(f"{context_file}: no matching {reply_file.name}")
        examples.append((_read(context_file, [], folder), _read(reply_file, [], folder)))
    return tuple(examples)


def load_templates(folder: Path | None = None) -> Templates:
    """Read and check a templates folder; a UserError names every missing file."""
    folder = (folder or DEFAULT_TEMPLATES).resolve()
    if not folder.is_dir():
        raise UserError(f"instruct templates folder not found: {folder}")
    missing: list[str] = []
    tasks = {
        task: TaskTemplate(
            _read(folder / task / "system.txt", missing, folder),
            _read(folder / task / "query.txt", missing, folder),
            _examples(folder, task),
        )
        for task in TASKS
    }
    questions = tuple(q.strip() for q in _read(folder / "detail_questions.txt", missing, folder).splitlines())
    reask = _read(folder / "reask.txt", missing, folder)
    if missing:
        raise UserError(f"{folder}: missing template files: {', '.join(missing)}")
    for task, template in tasks.items():
        if CONTEXT not in template.query:
            raise UserError(f"{folder / task / 'query.txt'}: must contain {CONTEXT}")
    questions = tuple(q for q in questions if q)
    if not questions:
        raise UserError(f"{folder / 'detail_questions.txt'}: no questions")
    content = {
        "tasks": {t: [v.system, v.query, [list(e) for e in v.examples]] for t, v in tasks.items()},
        "detail_questions": questions,
        "reask": reask,
    }
    return Templates(folder, tasks, questions, reask, digest_of(content))
