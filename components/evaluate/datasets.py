"""Evaluation items from a held-out split of a data artifact or from user files.

Every task reads `Item`s: an image plus what the task scores against (`references`: caption
references, human answers, the class label, or the correct option key). User files are
checked record by record: a malformed file or record is a `UserError` naming the file and
the record; a record whose image is missing or unreadable goes to the quarantine with a
reason (nothing is silently dropped). An image path that resolves (symlinks followed) outside
its dataset folder (an absolute path, a `..` chain, a symlink elsewhere) is quarantined as
`path-outside-dataset` before any existence check, so the reason says nothing about the host,
unless the data sets `allow_outside_paths`. An image over the data's `max_image_bytes` is
`too-large`, refused before it is read (or decoded) whole.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from PIL import Image

from vlmflow.components.sources.base import OUTSIDE, TOO_LARGE, contained_path, read_dataset_image
from vlmflow.components.train.data import ShardSamples
from vlmflow.errors import UserError
from vlmflow.grounding import refer_items
from vlmflow.prompts import LETTERS, choice_items, options_of
from vlmflow.samples import IMAGE_EXTS
from vlmflow.specs.data import DEFAULT_MAX_IMAGE_BYTES


@dataclass(frozen=True)
class Item:
    id: str
    image: bytes
    references: tuple[str, ...]  # captions | human answers | (class label,) | (correct option key,)
    question: str = ""
    options: tuple[tuple[str, str], ...] = ()  # (key, text) of a multiple-choice question
    context: tuple[tuple[bytes, str, str], ...] = ()  # few-shot: in-context (image, question, answer) examples
    mismatched: str = ""  # image-text matching: a caption of another image, the balanced negative


@dataclass(frozen=True)
class ImageFiles:
    """How a user file's images are read: paths contained to the dataset folder unless
    `allow_outside` (the data's allow_outside_paths), at most `max_bytes` each (max_image_bytes)."""

    allow_outside: bool = False
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES

    @classmethod
    def of(cls, data: Any) -> ImageFiles:
        """The rules a data spec sets (the defaults for what it does not set: a TSV has no paths)."""
        allow_outside = getattr(data, "allow_outside_paths", False)
        return cls(allow_outside, getattr(data, "max_image_bytes", DEFAULT_MAX_IMAGE_BYTES))


CONTAINED = ImageFiles()


@dataclass
class Loaded:
    items: list[Item] = field(default_factory=list)
    quarantine: list[dict[str, str]] = field(default_factory=list)  # id, source, reason
    limit: int | None = None

    def full(self) -> bool:
        return self.limit is not None and len(self.items) >= self.limit

    def add(self, item: Item) -> None:
        if not self.full():
            self.items.append(item)

    def reject(self, id_: str, source: str, reason: str) -> None:
        if not self.full():
            self.quarantine.append({"id": id_, "source": source, "reason": reason})

    def quarantine_frame(self) -> pl.DataFrame:
        schema = {"id": pl.String, "source": pl.String, "reason": pl.String}
        return pl.DataFrame(self.quarantine, schema=schema, orient="row")


# ------------------------------------------------------------------------------ held-out split


def held_out(samples: ShardSamples, kind: str, limit: int, source: str) -> Loaded:
    """Items of a task kind from a data artifact's held-out samples (synthetic shapes: truth known)."""
    loaded = Loaded(limit=limit)
    records = []
    for i in range(len(samples)):
        if loaded.full():
            break
        key, image, record = samples.read(i)
        if kind in ("captioning", "retrieval", "image-text-matching"):
            truth = (record.get("truth") or {}).get("caption")
            refs = [truth] if truth else [c for c in record.get("captions") or [] if c]
            _add_or_reject(loaded, key, source, image, refs, "no-caption")
        elif kind == "zero-shot-classification":
            label = record.get("label")
            _add_or_reject(loaded, key, source, image, [label] if label else [], "no-label")
        elif kind == "vqa":
            pairs = record.get("qa") or []
            if not pairs:
                loaded.reject(key, source, "no-qa")
            for j, qa in enumerate(pairs):
                loaded.add(Item(f"{key}/{j}", image, (qa["answer"],), qa["question"]))
        elif kind == "grounding":
            refer = refer_items(record)
            if not refer:
                loaded.reject(key, source, "no-unique-object-with-box")
            for j, (question, answer, _) in enumerate(refer):
                loaded.add(Item(f"{key}/{j}", image, (answer,), question))
        else:
            records.append((key, image, record))
    if kind == "multiple-choice":
        _choices_from_qa(loaded, records, source)
    return loaded


def _add_or_reject(loaded: Loaded, key: str, source: str, image: bytes, refs: list[str], reason: str) -> None:
    if refs:
        loaded.add(Item(key, image, tuple(refs)))
    else:
        loaded.reject(key, source, reason)


def _choices_from_qa(loaded: Loaded, records: list[tuple[str, bytes, dict]], source: str) -> None:
    """One multiple-choice question per sample: one of its own `choices` items when it has them,
    else one from its VQA pairs, the true answer plus up to three distractors drawn from the
    answers of the same kind of question ("What color", "How many")."""
    pools: dict[str, set[str]] = defaultdict(set)
    for _, _, record in records:
        for qa in record.get("qa") or []:
            pools[_family(qa["question"])].add(qa["answer"])
    for key, image, record in records:
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        own = choice_items(record)
        if own:
            question, options, answer = own[int(rng.integers(len(own)))]
            loaded.add(Item(key, image, (answer,), question, options))
            continue
        usable = [qa for qa in record.get("qa") or [] if len(pools[_family(qa["question"])]) > 1]
        if not usable:
            loaded.reject(key, source, "no-qa-with-alternatives")
            continue
        qa = usable[int(rng.integers(len(usable)))]
        others = sorted(pools[_family(qa["question"])] - {qa["answer"]})
        chosen = [qa["answer"], *rng.choice(others, size=min(3, len(others)), replace=False).tolist()]
        order = rng.permutation(len(chosen))
        options = tuple((LETTERS[i], chosen[j]) for i, j in enumerate(order))
        answer = LETTERS[int(np.flatnonzero(order == 0)[0])]
        loaded.add(Item(key, image, (answer,), qa["question"], options))


def _family(question: str) -> str:
    return " ".join(question.lower().split()[:2])


# ---------------------------------------------------------------------------------- user files


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply") from None


def _list_of_records(data: Any, path: Path, name: str) -> list[dict]:
    if not isinstance(data, dict) or not isinstance(data.get(name), list):
        raise UserError(f"{path}: expected a JSON object with a {name!r} list")
    for i, record in enumerate(data[name]):
        if not isinstance(record, dict):
            raise UserError(f"{path}: {name}[{i}]: expected an object, got {type(record).__name__}")
    return data[name]


def _field(record: dict, key: str, types: type | tuple, path: Path, where: str) -> Any:
    value = record.get(key)
    if value is None or not isinstance(value, types) or isinstance(value, bool):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise UserError(f"{path}: {where}: field {key!r} is {got}")
    return value


def _new_key(seen: dict, key: Any, path: Path, where: str) -> Any:
    """KEY, when no earlier record of the file has it: a second record under the same id would
    replace the first (one item silently lost), so it is a UserError naming the record."""
    if key in seen:
        raise UserError(f"{path}: {where}: id {key!r} is used by an earlier record")
    return key


def dataset_image(root: Path, name: str | Path, rules: ImageFiles) -> tuple[bytes | None, str | None]:
    """(bytes, None) for a readable image NAME under the dataset folder ROOT, else (None, reason):
    `path-outside-dataset` when NAME resolves outside ROOT (whether or not it exists), then
    `missing-image-file`, `too-large` or an image check's reason (the sources' reader)."""
    data, reason, _ = read_dataset_image(root, name, rules.allow_outside, rules.max_bytes)
    if data is None:
        return None, reason
    return verified(data)


def verified(data: bytes) -> tuple[bytes | None, str | None]:
    """(bytes, None) when they decode as an image (to RGB, as the model's preprocessing does),
    else (None, reason): whatever a decoder raises on a hostile file is `unreadable-image`."""
    if not data:
        return None, "zero-byte-image"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            image.convert("RGB")
    except Exception:  # any decoder exception (struct.error, EOFError, ZeroDivisionError...) or a bomb
        return None, "unreadable-image"
    return data, None


def coco_captions(annotations: Path, images: Path, limit: int, rules: ImageFiles = CONTAINED) -> Loaded:
    data = read_json(annotations)
    files: dict[Any, str] = {}
    for i, record in enumerate(_list_of_records(data, annotations, "images")):
        where = f"images[{i}]"
        image_id = _new_key(files, _field(record, "id", (int, str), annotations, where), annotations, where)
        files[image_id] = _field(record, "file_name", str, annotations, where)
    refs: dict[Any, list[str]] = defaultdict(list)
    for i, record in enumerate(_list_of_records(data, annotations, "annotations")):
        where = f"annotations[{i}]"
        image_id = _field(record, "image_id", (int, str), annotations, where)
        if image_id not in files:
            raise UserError(f"{annotations}: {where}: image_id {image_id!r} is not in images")
        refs[image_id].append(_field(record, "caption", str, annotations, where))
    loaded = Loaded(limit=limit)
    for image_id, name in files.items():
        if loaded.full():
            break
        captions = [c for c in refs.get(image_id, []) if c.strip()]
        data_, reason = dataset_image(images, name, rules)
        if not captions:
            loaded.reject(str(image_id), str(annotations), "no-caption")
        elif reason:
            loaded.reject(str(image_id), str(images / name), reason)
        else:
            loaded.add(Item(str(image_id), data_, tuple(captions)))
    return loaded


def vqav2(
    questions: Path, annotations: Path, images: Path, pattern: str, limit: int, rules: ImageFiles = CONTAINED
) -> Loaded:
    answers: dict[Any, list[str]] = {}
    for i, record in enumerate(_list_of_records(read_json(annotations), annotations, "annotations")):
        where = f"annotations[{i}]"
        qid = _new_key(answers, _field(record, "question_id", (int, str), annotations, where), annotations, where)
        listed = _field(record, "answers", list, annotations, where)
        answers[qid] = [_field(a, "answer", str, annotations, f"{where}.answers[{j}]") if isinstance(a, dict)
                        else _field({"answer": a}, "answer", str, annotations, f"{where}.answers[{j}]")
                        for j, a in enumerate(listed)]  # fmt: skip
    loaded = Loaded(limit=limit)
    for i, record in enumerate(_list_of_records(read_json(questions), questions, "questions")):
        if loaded.full():
            break
        where = f"questions[{i}]"
        qid = _field(record, "question_id", (int, str), questions, where)
        image_id = _field(record, "image_id", (int, str), questions, where)
        question = _field(record, "question", str, questions, where)
        if not answers.get(qid):
            loaded.reject(str(qid), str(annotations), "no-answers")
            continue
        try:
            name = pattern.format(image_id=image_id)
        except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
            raise UserError(f"image_pattern {pattern!r} cannot name image {image_id!r}: {exc}") from None
        data, reason = dataset_image(images, name, rules)
        if reason:
            loaded.reject(str(qid), str(images / name), reason)
        else:
            loaded.add(Item(str(qid), data, tuple(answers[qid]), question))
    return loaded


def image_folder(root: Path, limit: int, rules: ImageFiles = CONTAINED) -> tuple[Loaded, list[str]]:
    """Items from ROOT/CLASS/IMAGE files, taken round-robin over the classes (so a limit keeps
    every class); returns the class names (sorted folder names) too. A class folder that is a
    symlink leading outside ROOT is not listed (unless `rules.allow_outside`): it is one
    `path-outside-dataset` entry; a symlink among the images (dangling or not) is an entry too,
    checked like any image."""
    entries = sorted((p for p in root.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    outside = [p.name for p in entries if p.is_symlink() and not _contained(root, p.name, rules)]
    classes = [p.name for p in entries if p.name not in outside and p.is_dir()]
    if len(classes) < 2:
        raise UserError(f"{root}: an image-folder classification set needs at least two class sub-folders")
    files = {
        c: sorted(p for p in (root / c).iterdir() if (p.is_file() or p.is_symlink()) and not p.name.startswith("."))
        for c in classes
    }
    loaded = Loaded(limit=limit)
    for name in outside:
        loaded.reject(name, str(root / name), OUTSIDE)
    for rank in range(max(len(v) for v in files.values())):
        for name in classes:
            if rank >= len(files[name]) or loaded.full():
                continue
            path = files[name][rank]
            if path.suffix.lower().lstrip(".") not in IMAGE_EXTS:
                loaded.reject(f"{name}/{path.name}", str(path), "not-an-image-file")
                continue
            data, reason = dataset_image(root, path.relative_to(root), rules)
            if reason:
                loaded.reject(f"{name}/{path.name}", str(path), reason)
            else:
                loaded.add(Item(f"{name}/{path.name}", data, (name,)))
    return loaded, classes


def _contained(root: Path, name: str, rules: ImageFiles) -> bool:
    return contained_path(root, name, rules.allow_outside)[0] is not None


def choice_jsonl(path: Path, images: Path, limit: int, rules: ImageFiles = CONTAINED) -> Loaded:
    loaded = Loaded(limit=limit)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None
    for number, line in enumerate(lines, 1):
        if loaded.full():
            break
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}:{exc.colno}: not valid JSON: {exc.msg}") from None
        except RecursionError:
            raise UserError(f"{path}:{number}:1: JSON nested too deeply") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}: {where}: expected a JSON object")
        options = _options(_field(record, "options", (dict, list), path, where), path, where)
        answer = str(_field(record, "answer", (str, int), path, where)).strip()
        if answer not in dict(options):
            known = ", ".join(k for k, _ in options)
            raise UserError(f"{path}: {where}: answer {answer!r} is not an option key ({known})")
        id_ = str(record.get("id", number))
        image_name = _field(record, "image", str, path, where)
        image_path = images / image_name
        data, reason = dataset_image(images, image_name, rules)
        if reason:
            loaded.reject(id_, str(image_path), reason)
        else:
            loaded.add(Item(id_, data, (answer,), _field(record, "question", str, path, where), options))
    return loaded


TSV_COLUMNS = ("index", "question", "answer", "image")


def choice_tsv(path: Path, limit: int, rules: ImageFiles = CONTAINED) -> Loaded:
    """MMBench TSV rows: the hint (when given) goes before the question; options are the letter
    columns a row fills; a row whose image does not decode goes to the quarantine."""
    loaded = Loaded(limit=limit)
    try:
        frame = pl.read_csv(path, separator="\t", infer_schema=False, quote_char=None, truncate_ragged_lines=False)
    except (OSError, pl.exceptions.PolarsError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read as TSV: {str(exc).splitlines()[0]}") from None
    missing = [c for c in TSV_COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(frame.columns)})")
    letters = [c for c in LETTERS if c in frame.columns]
    for number, row in enumerate(frame.iter_rows(named=True), 2):  # line 1 is the header
        if loaded.full():
            break
        where = f"line {number}"
        options = tuple((k, row[k].strip()) for k in letters if row[k] and row[k].strip() and row[k] != "nan")
        if len(options) < 2:
            raise UserError(f"{path}: {where}: options must hold at least two non-empty texts")
        answer = (row["answer"] or "").strip()
        if answer not in dict(options):
            raise UserError(f"{path}: {where}: answer {answer!r} is not an option key ({', '.join(dict(options))})")
        question = (row["question"] or "").strip()
        hint = (row.get("hint") or "").strip()
        if hint and hint != "nan":
            question = f"{hint}\n{question}"
        id_ = str(row["index"])
        data, reason = _base64_image(row["image"] or "", rules.max_bytes)
        if reason:
            loaded.reject(id_, f"{path}:{number}", reason)
        else:
            loaded.add(Item(id_, data, (answer,), question, options))
    return loaded


def _base64_image(text: str, max_bytes: int) -> tuple[bytes | None, str | None]:
    """The decoded, verified image; `too-large` when the base64 holds over MAX_BYTES (from its
    length, before decoding)."""
    if len(text) // 4 * 3 - text[-2:].count("=") > max_bytes:
        return None, TOO_LARGE
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None, "unreadable-image"
    return verified(data)


def _options(raw: dict | list, path: Path, where: str) -> tuple[tuple[str, str], ...]:
    options, problem = options_of(raw)
    if problem is not None:
        raise UserError(f"{path}: {where}: {problem}")
    return options
