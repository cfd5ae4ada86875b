"""Property-based fuzzing of everything a user hands vlmflow: recipe specs and annotation files.

Real recipes from specs/recipes are mutated (keys deleted or added, values of the wrong type,
bad enum values, odd paths), their YAML text is damaged and random `--set` overrides are
applied; COCO / LLaVA / image-folder captions files and the evaluation readers (COCO
captions, VQAv2, multiple-choice JSONL, class folders) get random and broken records. Whatever
comes in, the only exception allowed out is the user-facing one: a `SpecError` whose
problems read `FILE:LINE:COL: field: message` (specs), or a `UserError` naming the file
(annotations). Anything else (KeyError, TypeError, RecursionError...) is a bug. And no row is
lost: every record of an annotation file that is read is an output row or a quarantined one.

Each case's outcome is a hypothesis event: `--hypothesis-show-statistics` prints, per fuzzer,
the cases generated and the share that loaded, were quarantined, or stopped at a clear error.

The `@example`s pin inputs that once crashed the readers with a raw traceback.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import pickle
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlmflow.components.evaluate import datasets
from vlmflow.components.sources.base import SOURCES, RawRow, Rejected, SourceContext, safe_key
from vlmflow.components.sources.image_folder import items as image_folder_items
from vlmflow.errors import SpecError, UserError
from vlmflow.specs import Recipe, load_recipe
from vlmflow.specs.data import CocoSource, ImageFolderSource, LlavaJsonSource

REPO = Path(__file__).resolve().parents[2]
RECIPE_FILES = sorted((REPO / "specs" / "recipes").glob("*.yaml"))
RECIPE_TEXTS = {p.name: p.read_text(encoding="utf-8") for p in RECIPE_FILES}
RECIPES = {name: yaml.safe_load(text) for name, text in RECIPE_TEXTS.items()}
# Fast by default (the file runs in well under 20 s on a loaded 2-core machine); fuzz longer with
# VLMFLOW_FUZZ_EXAMPLES=5000. No deadline: a shared CI machine's pauses are not bugs.
EXAMPLES = int(os.environ.get("VLMFLOW_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))

# ------------------------------------------------------------------------------ shared strategies

safe_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
junk_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    safe_text,
)
junk = st.recursive(
    junk_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(safe_text, inner, max_size=3), max_leaves=6
)
ODD_PATHS = [
    "~no-such-user-vlmflow/x.png",  # ~user of an unknown user: pathlib raises RuntimeError
    "a\x00b.png",  # NUL: the OS refuses the name (ValueError)
    "x" * 300 + ".png",  # longer than a file name may be (OSError ENAMETOOLONG)
    "../outside.png",
    "/",
    "",
    ".",
    "sub",
    "sub/",
    "a.png/",
]
odd_path = st.sampled_from(ODD_PATHS)


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


# ================================================================================== spec loader

PROBLEM_HEAD = r"^{source}:{line}:{col}: "


def walk(doc: object, parts: tuple) -> object:
    for part in parts:
        doc = doc[part]
    return doc


def paths_of(doc: object, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys / indexes) to a node of the document, the root excluded."""
    found = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for key, value in items:
        found.append((*prefix, key))
        found += paths_of(value, (*prefix, key))
    return found


def key_line(text: str, parts: tuple) -> int:
    """1-based line of the key at `parts` (its last part) in the YAML text, found by walking nodes."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    line = 0
    for part in parts:
        if isinstance(node, yaml.MappingNode):
            key_node, node = next((k, v) for k, v in node.value if k.value == str(part))
            line = key_node.start_mark.line + 1
        else:
            node = node.value[part]
    return line


def check_spec_outcome(path: Path, overrides: tuple[str, ...] = ()) -> list:
    """Load; a Recipe, or a SpecError with well-formed located problems (returned). Nothing else."""
    try:
        recipe = load_recipe(path, overrides)
    except SpecError as exc:
        event("outcome: clear error (located SpecError)")
        lines = path.read_text(encoding="utf-8", errors="replace").count("\n") + 1
        assert exc.problems
        for problem in exc.problems:
            text = str(problem)
            assert text.startswith(f"{problem.source}:{problem.line}:{problem.col}: "), text
            assert problem.line >= 1 and problem.col >= 1 and problem.message.strip(), text
            if problem.field:
                assert f": {problem.field}: " in text, text
            if problem.source == str(path):
                assert problem.line <= lines, (text, lines)
            else:
                assert problem.source.startswith("--set["), text
                assert int(problem.source[6:-1]) < len(overrides), text
        return exc.problems
    assert isinstance(recipe, Recipe)
    event("outcome: valid spec, loaded")
    return []


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-specs")


def write_spec(folder: Path, text: str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


unknown_key = st.text("abcdefghijklmnopqrstuvwxyz_-0123456789", min_size=1, max_size=10).map(lambda k: f"zz{k}")
BAD_ENUMS = ["", "nope", "LM", "Bpe", "synthetic_shapes", "ddp ", "cosine2", "fp16", "held_out", "mlp3"]
EDGE_NUMBERS = [0, -1, 2**64, 1e308, float("nan"), float("inf"), -0.0, True, "12", "1e3", None]


@st.composite
def mutated_recipe(draw) -> tuple[str, object]:
    """A real recipe with one to three random mutations."""
    name = draw(st.sampled_from(sorted(RECIPES)))
    doc = copy.deepcopy(RECIPES[name])
    for _ in range(draw(st.integers(1, 3))):
        paths = paths_of(doc)
        if not paths:
            break
        parts = draw(st.sampled_from(paths))
        parent, last = walk(doc, parts[:-1]), parts[-1]
        op = draw(st.sampled_from(["delete", "wrong-type", "bad-enum", "unknown-key", "odd-path", "edge-number"]))
        if op == "delete":
            del parent[last]
        elif op == "wrong-type":
            parent[last] = draw(junk)
        elif op == "bad-enum":
            parent[last] = draw(st.sampled_from(BAD_ENUMS) | safe_text)
        elif op == "unknown-key" and isinstance(parent[last], dict):
            parent[last][draw(unknown_key)] = draw(junk)
        elif op == "unknown-key":
            parent[last] = {draw(unknown_key): draw(junk)}
        elif op == "odd-path":
            parent[last] = draw(odd_path)
        else:
            parent[last] = draw(st.sampled_from(EDGE_NUMBERS))
    return name, doc


@FUZZ
@given(case=mutated_recipe())
@example(case=("shapes-tiny.yaml", {**RECIPES["shapes-tiny.yaml"], "runtime": {"workdir": "~no-such-user-vlmflow/w"}}))
def test_mutated_recipes_raise_only_located_spec_errors(spec_dir, case):
    _, doc = case
    path = write_spec(spec_dir, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    check_spec_outcome(path)


@FUZZ
@given(name=st.sampled_from(sorted(RECIPES)), data=st.data())
def test_an_unknown_key_is_reported_at_its_own_line(spec_dir, name, data):
    doc = copy.deepcopy(RECIPES[name])
    mappings = [p for p in paths_of(doc) if isinstance(walk(doc, p), dict)]
    parts = data.draw(st.sampled_from(mappings))
    key = data.draw(unknown_key)
    walk(doc, parts)[key] = data.draw(junk)
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    path = write_spec(spec_dir, text)
    problems = check_spec_outcome(path)
    dotted = ".".join(str(p) for p in (*parts, key))
    hits = [p for p in problems if p.field == dotted]
    assert hits, [str(p) for p in problems]
    assert any(p.line == key_line(text, (*parts, key)) for p in hits), [str(p) for p in hits]


SYNTAX_NOISE = [*":-[]{},\t&*!%@`'\"#|>?\n\x00\ufeff=~", ": ", "- ", "  ", "&a ", "*a", "!!int ", "<<: "]


@st.composite
def damaged_text(draw) -> str:
    """A real recipe's YAML text with one to three pieces of syntax damage."""
    text = RECIPE_TEXTS[draw(st.sampled_from(sorted(RECIPE_TEXTS)))]
    for _ in range(draw(st.integers(1, 3))):
        lines = text.split("\n")
        at = draw(st.integers(0, max(len(text) - 1, 0)))
        op = draw(st.sampled_from(["insert", "delete", "indent", "duplicate-line", "truncate", "swap-lines"]))
        if op == "insert":
            noise = draw(st.lists(st.sampled_from(SYNTAX_NOISE) | safe_text, min_size=1, max_size=3))
            text = text[:at] + "".join(noise) + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 40)) :]
        elif op == "truncate":
            text = text[:at]
        else:
            i = draw(st.integers(0, len(lines) - 1))
            if op == "indent":
                lines[i] = draw(st.sampled_from([" ", "   ", "\t", ""])) + lines[i].lstrip(" " * draw(st.booleans()))
            elif op == "duplicate-line":
                lines.insert(i, lines[i])
            else:
                j = draw(st.integers(0, len(lines) - 1))
                lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
    return text


@FUZZ
@given(text=damaged_text())
@example(text=RECIPE_TEXTS["shapes-tiny.yaml"] + "deep: " + deep_json(1000) + "\n")
@example(text=RECIPE_TEXTS["shapes-tiny.yaml"] + "loop: &x [*x]\nmerge: {<<: {a: 1}}\n")
def test_damaged_yaml_raises_only_located_spec_errors(spec_dir, text):
    check_spec_outcome(write_spec(spec_dir, text))


override_path = st.sampled_from(
    sorted({".".join(str(p) for p in path) for doc in RECIPES.values() for path in paths_of(doc)})
) | st.text(st.characters(exclude_categories=["Cs"], exclude_characters="="), max_size=15)
override_value = (
    st.sampled_from(
        [
            "",
            "null",
            "[",
            "{a: 1",
            "[1, 2]",
            "{kind: x}",
            "!!int x",
            "&a [*a]",
            "~",
            "- a",
            "a: b",
            "'",
            "1e999",
            "0x1f",
        ]
    )
    | safe_text
)


@FUZZ
@given(
    name=st.sampled_from(sorted(RECIPES)),
    assignments=st.lists(st.tuples(override_path, override_value, st.booleans()), min_size=1, max_size=3),
)
@example(name="shapes-tiny.yaml", assignments=[("stages.\u00b2.name", "x", True)])  # '²'.isdigit() but not int()
@example(name="shapes-tiny.yaml", assignments=[("runtime.workdir", "~no-such-user-vlmflow/w", True)])
def test_random_overrides_raise_only_located_spec_errors(spec_dir, name, assignments):
    path = write_spec(spec_dir, RECIPE_TEXTS[name])
    overrides = tuple(f"{key}={value}" if with_equals else key for key, value, with_equals in assignments)
    check_spec_outcome(path, overrides)


# ============================================================================ annotation files


def png(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A folder of images: readable ones, an unreadable one, an empty one, a sub-folder."""
    root = tmp_path_factory.mktemp("fuzz-files")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    (images / "a.png").write_bytes(png())
    (images / "b.jpg").write_bytes(png((10, 200, 10)))
    (images / "sub" / "c.png").write_bytes(png((10, 10, 200)))
    (images / "bad.png").write_bytes(b"not an image")
    (images / "empty.png").write_bytes(b"")
    for name in ("cat", "dog"):
        (root / "classes" / name).mkdir(parents=True)
    return root


IMAGE_NAMES = ["a.png", "b.jpg", "sub/c.png", "bad.png", "empty.png", "missing.png"]
DISK_IMAGES = IMAGE_NAMES[:5]  # the images the `files` fixture writes
file_name = st.sampled_from(IMAGE_NAMES) | odd_path | safe_text | junk_scalar
ident = st.one_of(
    st.integers(-2, 4),
    st.sampled_from(["1", "2", "", "a.b", "x/y", "0"]),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(safe_text, st.integers(), max_size=1),
)
caption = st.sampled_from(["a red square", "  ", ""]) | safe_text | junk
size = st.integers(-2, 64) | st.floats(allow_nan=True, allow_infinity=True) | junk_scalar


def records(fields: dict) -> st.SearchStrategy:
    """Objects with any subset of these fields, or something that is not an object at all."""
    return st.fixed_dictionaries({}, optional=fields) | junk


def json_list_of(fields: dict) -> st.SearchStrategy:
    return st.lists(records(fields), max_size=6)


@st.composite
def json_file(draw, document: st.SearchStrategy) -> bytes:
    """A JSON document, sometimes damaged: truncated, nested too deeply, not UTF-8, empty."""
    text = json.dumps(draw(document), allow_nan=True, ensure_ascii=draw(st.booleans()))
    damage = draw(st.sampled_from(["none"] * 6 + ["truncate", "deep", "latin-1", "empty", "bom"]))
    if damage == "truncate":
        text = text[: draw(st.integers(0, max(len(text) - 1, 0)))]
    elif damage == "deep":
        return deep_json(draw(st.integers(500, 5000))).encode()
    elif damage == "latin-1":
        return text.encode("utf-8") + b"\xff\xfe"
    elif damage == "empty":
        return b""
    elif damage == "bom":
        return b"\xef\xbb\xbf" + text.encode("utf-8")
    return text.encode("utf-8")


def check_user_error(exc: UserError, *paths: Path) -> None:
    event("outcome: clear error (UserError naming the file)")
    message = str(exc)
    assert message.strip()
    assert any(p.name in message for p in paths) or "image_pattern" in message, message


SOURCE_REASONS = ("malformed-annotation", "missing-image-file", "no-image", "path-outside-dataset", "too-large")


def record_rows(rows: int, quarantined: int) -> None:
    """The outcome of a case whose file was read (all its rows accounted for by the caller)."""
    event("outcome: read, some rows quarantined" if quarantined else "outcome: read, no row quarantined")


def run_source(spec, ctx: SourceContext) -> list[RawRow | Rejected]:
    """plan + read of every unit, as ingest runs them; checks what ingest relies on."""
    reader = SOURCES.get(spec.kind)
    units = reader.plan(spec, ctx)
    assert pickle.loads(pickle.dumps(units)) == units  # payloads go to Ray workers
    produced = []
    for unit in units:
        out = list(reader.read(spec, ctx, unit))
        assert len(out) == unit.rows
        produced += out
    keys = [item.key for item in produced]
    assert len(set(keys)) == len(keys)
    assert all(key and "." not in key and "/" not in key for key in keys)
    for item in produced:
        if isinstance(item, RawRow):
            assert isinstance(item.image, bytes) and all(isinstance(c, str) for c in item.captions)
            json.dumps(item.extra)  # written into the sample's JSON
        else:
            assert isinstance(item, Rejected) and item.reason in SOURCE_REASONS
    rejected = sum(isinstance(item, Rejected) for item in produced)
    record_rows(len(produced) - rejected, rejected)
    return produced


CTX = SourceContext(name="src", seed=0, shard_size=4)
coco_captions_doc = (
    st.fixed_dictionaries(
        {},
        optional={
            "images": json_list_of({"id": ident, "file_name": file_name, "width": size, "height": size}) | junk,
            "annotations": json_list_of({"image_id": ident, "caption": caption, "id": ident}) | junk,
        },
    )
    | junk
)
coco_instances_doc = (
    st.fixed_dictionaries(
        {},
        optional={
            "annotations": json_list_of(
                {"image_id": ident, "category_id": ident, "bbox": st.lists(size, max_size=5) | junk}
            )
            | junk,
            "categories": json_list_of({"id": ident, "name": caption}) | junk,
        },
    )
    | junk
)
NUL_NAME = json.dumps({"images": [{"id": 1, "file_name": "a\x00b.png", "width": 4, "height": 4}], "annotations": []})


@FUZZ
@given(captions=json_file(coco_captions_doc), instances=st.none() | json_file(coco_instances_doc))
@example(captions=NUL_NAME.encode(), instances=None)
def test_coco_source_rejects_rows_or_raises_a_user_error(files, captions, instances):
    (files / "captions.json").write_bytes(captions)
    fields = {"kind": "coco", "captions": "captions.json", "images": "images"}
    if instances is not None:
        (files / "instances.json").write_bytes(instances)
        fields["instances"] = "instances.json"
    spec = CocoSource.model_validate(fields, context={"spec_dir": files})
    try:
        produced = run_source(spec, CTX)
    except UserError as exc:
        check_user_error(exc, files / "captions.json", files / "instances.json")
        return
    document = json.loads(captions.decode("utf-8-sig"))
    # rows lost = 0: one row (kept or rejected) per image entry, plus one per malformed annotation
    annotation_rows = [
        i for i in produced if isinstance(i, Rejected) and i.key.startswith(("annotation-", "instance-"))
    ]
    assert len(produced) - len(annotation_rows) == len(document["images"])
    assert all(i.reason == "malformed-annotation" for i in annotation_rows)


role = st.sampled_from(["human", "gpt", "system", "user", "assistant", "bot"]) | junk_scalar
turn = records({"from": role, "value": caption})
llava_entry = records(
    {
        "id": ident,
        "image": file_name | st.lists(file_name, max_size=2),
        "conversations": st.lists(turn, max_size=3) | junk,
    }
)
llava_doc = st.lists(llava_entry, max_size=6) | junk
NUL_LLAVA = json.dumps([{"id": 1, "image": "a\x00b.png", "conversations": [{"from": "human", "value": "hi"}]}])


@FUZZ
@given(document=json_file(llava_doc))
@example(document=NUL_LLAVA.encode())
def test_llava_source_rejects_rows_or_raises_a_user_error(files, document):
    (files / "llava.json").write_bytes(document)
    spec = LlavaJsonSource.model_validate(
        {"kind": "llava-json", "path": "llava.json", "images": "images"}, context={"spec_dir": files}
    )
    try:
        produced = run_source(spec, CTX)
    except UserError as exc:
        check_user_error(exc, files / "llava.json")
        return
    assert len(produced) == len(json.loads(document.decode("utf-8-sig")))  # one row per entry: none lost


csv_cell = st.sampled_from(IMAGE_NAMES) | odd_path | safe_text
jsonl_record = records({"file": file_name, "caption": caption, "captions": st.lists(caption, max_size=2) | junk})


HEADERS = [["file", "caption"], ["caption", "file"], ["file"], [], ["file", "caption", "x"]]


@st.composite
def captions_file(draw) -> tuple[str, bytes]:
    """(suffix, bytes) of a captions csv or jsonl, records random, lines sometimes broken."""
    if draw(st.booleans()):
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        header = draw(st.sampled_from(HEADERS))
        writer.writerow(header)
        for row in draw(st.lists(st.lists(csv_cell, max_size=4), max_size=6)):
            writer.writerow(row)
        text = buffer.getvalue() + draw(st.sampled_from(["", '"unclosed,quote\n', "a.png,\x00\n", "\n\n"]))
        return ".csv", text.encode("utf-8")
    lines = [json.dumps(r, allow_nan=True) for r in draw(st.lists(jsonl_record, max_size=6))]
    lines += draw(st.lists(st.sampled_from(["{", "[]", "", "null", '"a.png"', deep_json(5000)]), max_size=2))
    return ".jsonl", "\n".join(lines).encode("utf-8") + draw(st.sampled_from([b"", b"\n", b"\xff"]))


@FUZZ
@given(table=st.none() | captions_file(), sidecar=st.none() | st.binary(max_size=20))
@example(table=(".jsonl", json.dumps({"file": "a\x00b.png", "caption": "x"}).encode()), sidecar=None)
@example(table=(".jsonl", deep_json(5000).encode()), sidecar=None)
def test_image_folder_source_rejects_rows_or_raises_a_user_error(files, table, sidecar):
    sidecar_path = files / "images" / "a.txt"
    sidecar_path.unlink(missing_ok=True)
    if sidecar is not None:
        sidecar_path.write_bytes(sidecar)
    fields: dict = {"kind": "image-folder", "path": "images"}
    if table is not None:
        suffix, content = table
        (files / f"caps{suffix}").write_bytes(content)
        fields["captions_file"] = f"caps{suffix}"
    spec = ImageFolderSource.model_validate(fields, context={"spec_dir": files})
    try:
        produced = run_source(spec, CTX)
    except UserError as exc:
        check_user_error(exc, files / "caps.csv", files / "caps.jsonl", files / "images")
        return
    # rows lost = 0: every planned row came out, and every image on disk is planned: as a row
    # with its path, or (its captions line malformed) a malformed-annotation row under its name
    planned = image_folder_items(spec, CTX)
    assert [item.key for item in produced] == [item[1] for item in planned]
    rows = {item[2] for item in planned if item[0] == "row"}
    malformed = [item[1] for item in planned if item[0] == "rejected" and item[2] == "malformed-annotation"]
    for rel in DISK_IMAGES:
        stem = safe_key(Path(rel).with_suffix(""))
        assert rel in rows or any(key == stem or key.startswith(f"{stem}-") for key in malformed), rel


# ------------------------------------------------------------------------- evaluation readers


def check_loaded(loaded: datasets.Loaded, records: int) -> None:
    """Items and quarantine are well formed, and no record is lost: each of the file's RECORDS is an
    item or a quarantined entry, up to the limit (`samples`: the records after it are not read)."""
    for item in loaded.items:
        assert isinstance(item.id, str) and isinstance(item.image, bytes) and item.image
        assert item.references and all(isinstance(r, str) for r in item.references)
    for entry in loaded.quarantine:
        assert set(entry) == {"id", "source", "reason"} and all(isinstance(v, str) for v in entry.values())
    loaded.quarantine_frame()  # written as parquet
    accounted = len(loaded.items) + len(loaded.quarantine)
    if loaded.full():
        assert len(loaded.items) == loaded.limit and accounted <= records
    else:
        assert accounted == records
    record_rows(len(loaded.items), len(loaded.quarantine))


def records_of(path: Path, name: str) -> list:
    """The records list NAME of a JSON file the reader accepted."""
    return json.loads(path.read_text(encoding="utf-8"))[name]


LONG_NAME_CAPTIONS = json.dumps(
    {"images": [{"id": 1, "file_name": "x" * 300}], "annotations": [{"image_id": 1, "caption": "a"}]}
).encode()


REPEATED_ID = json.dumps(
    {
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 1, "caption": "a"}],
    }
).encode()  # the second image replaced the first: two records in, one item out


@FUZZ
@given(document=json_file(coco_captions_doc), limit=st.integers(1, 8))
@example(document=LONG_NAME_CAPTIONS, limit=4)
@example(document=REPEATED_ID, limit=4)
def test_eval_coco_captions_quarantine_or_user_error(files, document, limit):
    path = files / "eval-captions.json"
    path.write_bytes(document)
    try:
        loaded = datasets.coco_captions(path, files / "images", limit)
    except UserError as exc:
        check_user_error(exc, path)
    else:
        check_loaded(loaded, len(records_of(path, "images")))


vqa_questions = (
    st.fixed_dictionaries(
        {}, optional={"questions": json_list_of({"question_id": ident, "image_id": ident, "question": caption}) | junk}
    )
    | junk
)
vqa_answer = records({"answer": caption}) | caption
vqa_record = {"question_id": ident, "answers": st.lists(vqa_answer, max_size=3) | junk}
vqa_annotations = st.fixed_dictionaries({}, optional={"annotations": json_list_of(vqa_record) | junk}) | junk
PATTERNS = ["{image_id}", "{image_id}.png", "sub/{image_id}.png", "{image_id:012d}.jpg", "{image_id[0]}"]
PATTERNS += ["{image_id.real}", "{other}", "{}", "{0}", "{", "}", "{image_id!r}", "{image_id!x}", "{image_id:%}"]
pattern = st.sampled_from(PATTERNS) | st.text("{}:!.[]dimage_xrs", max_size=14)
VQA_Q = json.dumps({"questions": [{"question_id": 1, "image_id": "a", "question": "q?"}]}).encode()
VQA_A = json.dumps({"annotations": [{"question_id": 1, "answers": ["x"]}]}).encode()


@FUZZ
@given(questions=json_file(vqa_questions), annotations=json_file(vqa_annotations), pattern=pattern)
@example(questions=VQA_Q, annotations=VQA_A, pattern="{image_id.real}")  # str has no .real
@example(questions=VQA_Q, annotations=VQA_A, pattern="{image_id[0][0][0]}")
@example(questions=VQA_Q, annotations=VQA_A, pattern="x" * 300 + "{image_id}")
def test_eval_vqav2_quarantine_or_user_error(files, questions, annotations, pattern):
    q_path, a_path = files / "vqa-questions.json", files / "vqa-annotations.json"
    q_path.write_bytes(questions)
    a_path.write_bytes(annotations)
    try:
        loaded = datasets.vqav2(q_path, a_path, files / "images", pattern, 8)
    except UserError as exc:
        check_user_error(exc, q_path, a_path)
    else:
        check_loaded(loaded, len(records_of(q_path, "questions")))


choice_record = records(
    {
        "id": ident,
        "image": file_name,
        "question": caption,
        "options": st.lists(caption, max_size=12)
        | st.dictionaries(st.sampled_from("ABCDE"), caption, max_size=4)
        | junk,
        "answer": st.sampled_from(["A", "B", "C", "a", " B ", "", 0, 1]) | junk_scalar,
    }
)
choice_line = choice_record.map(lambda r: json.dumps(r, allow_nan=True)) | st.sampled_from(["{", "", "  ", "[]"])


@FUZZ
@given(lines=st.lists(choice_line, max_size=5), tail=st.sampled_from([b"", b"\n", b"\xff", deep_json(5000).encode()]))
@example(lines=[json.dumps({"image": "x" * 300, "question": "q", "options": ["a", "b"], "answer": "A"})], tail=b"")
def test_eval_multiple_choice_jsonl_quarantine_or_user_error(files, lines, tail):
    path = files / "choice.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8") + tail)
    try:
        loaded = datasets.choice_jsonl(path, files / "images", 8)
    except UserError as exc:
        check_user_error(exc, path)
    else:
        check_loaded(loaded, sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip()))


@FUZZ
@given(
    contents=st.lists(
        st.tuples(
            st.sampled_from(["cat", "dog", "bird"]),
            st.sampled_from(["x.png", "y.jpg", "z.txt", ".hidden.png", "w.PNG"]),
            st.sampled_from([png(), b"", b"junk"]),
        ),
        max_size=6,
    )
)
def test_eval_image_folder_classes_quarantine_or_user_error(tmp_path_factory, contents):
    root = tmp_path_factory.mktemp("classes")
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for label, name, payload in contents:
        (root / label).mkdir(exist_ok=True)
        (root / label / name).write_bytes(payload)
    loaded, classes = datasets.image_folder(root, 8)
    check_loaded(loaded, sum(1 for p in root.glob("*/*") if not p.name.startswith(".")))
    assert set(classes) >= {"cat", "dog"} and all(i.references[0] in classes for i in loaded.items)
