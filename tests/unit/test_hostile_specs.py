"""Spec validation under hostile input: alias bombs, numbers that overflow or are coerced, and
credentials in URLs. Each is stopped at validation with a located problem (file, line, field),
quickly and in little memory; ordinary specs (anchors and aliases included) still load.

Many members of each class are generated (hypothesis); fuzz longer with VLMFLOW_FUZZ_EXAMPLES=5000.
"""

from __future__ import annotations

import copy
import math
import os
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmflow.errors import SpecError, SpecProblem
from vlmflow.specs import Recipe, load_recipe
from vlmflow.specs.base import url_credentials
from vlmflow.specs.loader import MAX_NODES, parse_yaml

REPO = Path(__file__).resolve().parents[2]
TINY = sorted((REPO / "specs" / "recipes").glob("*-tiny.yaml"))
SHAPES = REPO / "specs" / "recipes" / "shapes-tiny.yaml"
EXAMPLES = int(os.environ.get("VLMFLOW_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
MAX_SECONDS, MAX_BYTES = 2.0, 200 * 2**20


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile-specs")


def write(folder: Path, text: str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path, overrides: tuple[str, ...] = ()) -> list[SpecProblem]:
    with pytest.raises(SpecError) as caught:
        load_recipe(path, overrides)
    problems = caught.value.problems
    assert problems and all(p.line >= 1 and p.col >= 1 and p.message.strip() for p in problems)
    return problems


def measured(path: Path, overrides: tuple[str, ...] = ()) -> tuple[list[SpecProblem], float, int]:
    """Problems, seconds and peak traced bytes of validating one spec (time taken untraced), after
    a valid spec has loaded once: the first load in a process imports the components (about a
    second, more on a busy machine), which is no cost of the hostile input."""
    load_recipe(SHAPES)
    start = time.monotonic()
    problems_of(path, overrides)
    seconds = time.monotonic() - start
    tracemalloc.start()
    try:
        problems = problems_of(path, overrides)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return problems, seconds, peak


def value_line(text: str, parts: tuple) -> int:
    """1-based line of the value at `parts`, found by walking PyYAML's own nodes."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    for part in parts:
        if isinstance(node, yaml.MappingNode):
            node = next(v for k, v in node.value if k.value == str(part))
        else:
            node = node.value[part]
    return node.start_mark.line + 1


def dotted(parts: tuple) -> str:
    return ".".join(str(p) for p in parts)


class QuotedDumper(yaml.SafeDumper):
    """Every string double-quoted: a string stays a string whatever it looks like (`1e3`)."""


QuotedDumper.add_representer(
    str, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style='"')
)


def dump(doc: dict) -> str:
    return yaml.dump(doc, Dumper=QuotedDumper, sort_keys=False, allow_unicode=True)


# ================================================================================== alias bombs


def bomb_lines(depth: int, width: int, flow: bool, mapping: bool) -> list[str]:
    """`a0` .. `aDEPTH`, each repeating the one before `width` times (width**depth leaves)."""
    lines = ["a0: &a0 [lol]" if not mapping else "a0: &a0 {lol: lol}"]
    for level in range(1, depth + 1):
        items = [f"*a{level - 1}"] * width
        if mapping and flow:
            lines.append(f"a{level}: &a{level} {{" + ", ".join(f"k{i}: {a}" for i, a in enumerate(items)) + "}")
        elif mapping:
            lines += [f"a{level}: &a{level}"] + [f"  k{i}: {a}" for i, a in enumerate(items)]
        elif flow:
            lines.append(f"a{level}: &a{level} [" + ", ".join(items) + "]")
        else:
            lines += [f"a{level}: &a{level}"] + [f"  - {a}" for a in items]
    return lines


def expanded_size(depth: int, width: int, mapping: bool) -> int:
    size = 3 if mapping else 2
    for _ in range(depth):
        size = 1 + width * (size + (1 if mapping else 0))
    return size


bombs = st.tuples(st.integers(2, 12), st.integers(2, 40), st.booleans(), st.booleans()).filter(
    lambda c: expanded_size(*c[:2], c[3]) > 4 * MAX_NODES
)
# where the last level is used: a new top-level key, a typed field, a list of the spec, free text
PLACES = ["bomb: *{a}", "description: *{a}", "evaluate: *{a}", "runtime: {{ray: {{address: *{a}}}}}"]


@FUZZ
@given(case=bombs, place=st.sampled_from(PLACES), before=st.booleans())
def test_alias_bombs_stop_fast_with_a_located_error(spec_dir, case, place, before):
    depth, width, flow, mapping = case
    recipe = SHAPES.read_text(encoding="utf-8")
    use = place.format(a=f"a{depth}")
    lines = bomb_lines(depth, width, flow, mapping)
    text = "\n".join([*lines, use, recipe] if before else [recipe, *lines, use]) + "\n"
    assert len(text) < 2**20
    path = write(spec_dir, text)
    problems, seconds, peak = measured(path)
    assert seconds < MAX_SECONDS and peak < MAX_BYTES, (seconds, peak)
    [problem] = problems
    assert problem.source == str(path)
    assert f"more than {MAX_NODES:,} nodes through aliases (YAML alias bomb?)" in problem.message
    assert text.splitlines()[problem.line - 1][problem.col - 1] == "*", str(problem)  # at the alias
    assert problem.field, str(problem)


def test_an_alias_bomb_in_an_override_is_located_at_the_override(spec_dir):
    levels = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    override = "description={" + ", ".join(levels) + "}"
    problems, seconds, peak = measured(write(spec_dir, SHAPES.read_text()), (override,))
    assert seconds < MAX_SECONDS and peak < MAX_BYTES
    [problem] = problems
    assert problem.source == "--set[0]" and problem.field == "description" and "alias bomb" in problem.message


@pytest.mark.parametrize(
    "tail",
    [
        "extra: [" + ", ".join(["0"] * 300_000) + "]\n",  # ~900 KB of values
        "extra:\n" + "".join(f"  k{i}: v\n" for i in range(80_000)),
        "extra: " + "[" * 200_000 + "]" * 200_000 + "\n",  # nested too deeply
    ],
    ids=["flat-list", "big-mapping", "deep"],
)
def test_a_large_spec_without_aliases_stops_fast_with_a_located_error(spec_dir, tail):
    text = SHAPES.read_text() + tail
    assert len(text) < 2**20
    problems, seconds, peak = measured(write(spec_dir, text))
    assert seconds < MAX_SECONDS and peak < MAX_BYTES, (seconds, peak)
    [problem] = problems
    assert "too large for a spec" in problem.message or "nested too deeply" in problem.message


def test_a_megabyte_of_comment_or_text_validates_fast(spec_dir):
    text = SHAPES.read_text() + "# " + "x" * 1_000_000 + "\n"
    start = time.monotonic()
    assert isinstance(load_recipe(write(spec_dir, text)), Recipe)
    assert time.monotonic() - start < MAX_SECONDS


def anchored(text: str) -> str:
    """shapes-tiny with its repeated blocks written once, as anchors and aliases."""
    for block, name in [
        ("optimizer: {lr: 0.001}", "opt"),
        ("schedule: {warmup_steps: 20}", "sched"),
        ("objectives: [{kind: lm}]", "objectives"),
        ("batch_size: 32", "batch"),
    ]:
        key, value = block.split(": ", 1)
        assert text.count(block) >= 2, block
        text = text.replace(block, f"{key}: &{name} {value}", 1).replace(block, f"{key}: *{name}")
    return text


def test_ordinary_anchors_and_aliases_still_load(spec_dir):
    text = anchored(SHAPES.read_text())
    assert text.count("*") >= 4
    recipe = load_recipe(write(spec_dir, text))
    assert recipe.stages[0].optimizer == recipe.stages[1].optimizer and recipe.stages[1].optimizer.lr == 0.001
    assert recipe.model_dump() == load_recipe(write(spec_dir, SHAPES.read_text())).model_dump()


@pytest.mark.parametrize("name", [p.name for p in TINY])
def test_every_tiny_recipe_repeated_through_aliases_is_not_a_bomb(spec_dir, name):
    """A spec reusing a whole recipe a few dozen times stays far below the limit."""
    data = parse_yaml((REPO / "specs" / "recipes" / name).read_text(), name).data
    text = (
        "x: &r " + yaml.safe_dump(data, default_flow_style=True, width=10**9) + "y: [" + ", ".join(["*r"] * 20) + "]\n"
    )
    marked = parse_yaml(text, "t")
    assert len(marked.data["y"]) == 20


# ====================================================================================== numbers


def numeric_leaves(doc: object, prefix: tuple = ()) -> list[tuple[tuple, int | float]]:
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    found = []
    for key, value in items:
        if isinstance(value, int | float) and not isinstance(value, bool):
            found.append(((*prefix, key), value))
        found += numeric_leaves(value, (*prefix, key))
    return found


DOCS = {p.name: parse_yaml(p.read_text(encoding="utf-8"), p.name).data for p in TINY}
LEAVES = sorted((name, parts, value) for name, doc in DOCS.items() for parts, value in numeric_leaves(doc))


def field_value(recipe: Recipe, parts: tuple) -> object:
    value: object = recipe
    for part in parts:
        value = value[part] if isinstance(value, list | dict) else getattr(value, part)
    return value


RECIPES = {p.name: load_recipe(p) for p in TINY}
INT_LEAVES = [leaf for leaf in LEAVES if type(field_value(RECIPES[leaf[0]], leaf[1])) is int]  # not float fields
SEEDS = [leaf for leaf in LEAVES if leaf[1][-1] == "seed"]

coerced = st.one_of(
    st.booleans(),
    st.integers(-(10**6), 10**6).map(str),
    st.sampled_from(["1_000", "1e3", "0x10", ".inf", "nan", "inf", "-1", " 7 ", "12.5", "", "true"]),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr),
)
non_finite = st.sampled_from([math.inf, -math.inf, math.nan])
too_big = st.one_of(st.integers(2**63, 10**40), st.integers(-(10**40), -(2**63) - 1), st.just(10**26))


def assert_located_at(problems: list[SpecProblem], path: Path, text: str, parts: tuple) -> None:
    hits = [p for p in problems if p.field == dotted(parts)]
    assert hits, [str(p) for p in problems]
    assert any(p.source == str(path) and p.line == value_line(text, parts) for p in hits), [str(p) for p in hits]


def mutated(name: str, parts: tuple, value: object) -> dict:
    doc = copy.deepcopy(DOCS[name])
    target = doc
    for part in parts[:-1]:
        target = target[part]
    target[parts[-1]] = value
    return doc


@FUZZ
@given(leaf=st.sampled_from(LEAVES), value=st.one_of(coerced, non_finite))
def test_bools_strings_and_non_finite_numbers_are_rejected_at_their_field(spec_dir, leaf, value):
    name, parts, _ = leaf
    if parts[-1] == "interval" and isinstance(value, str):
        return  # schedule.interval reads durations ("90", "15m") on purpose
    text = dump(mutated(name, parts, value))
    path = write(spec_dir, text)
    assert_located_at(problems_of(path), path, text, parts)


@FUZZ
@given(leaf=st.sampled_from(INT_LEAVES), value=too_big)
def test_integers_beyond_int64_are_rejected_at_their_field(spec_dir, leaf, value):
    name, parts, _ = leaf
    text = dump(mutated(name, parts, value))
    path = write(spec_dir, text)
    problems = problems_of(path)
    assert_located_at(problems, path, text, parts)


@FUZZ
@given(leaf=st.sampled_from(SEEDS), value=st.integers(-(2**63), -1))
def test_a_negative_seed_is_rejected(spec_dir, leaf, value):
    name, parts, _ = leaf
    text = dump(mutated(name, parts, value))
    path = write(spec_dir, text)
    assert_located_at(problems_of(path), path, text, parts)


@pytest.mark.parametrize(
    ("line", "field", "words"),
    [
        ("seed: 123456789012345678901234567", "seed", "27-digit number does not fit in a 64-bit integer"),
        ("seed: -1", "seed", "greater than or equal to 0"),
        ("seed: true", "seed", "got a boolean"),
        ('seed: "7"', "seed", "got a string"),
        ("seed: 1.5", "seed", "valid integer"),
    ],
)
def test_number_messages_say_what_is_wrong(spec_dir, line, field, words):
    text = SHAPES.read_text().replace("seed: 17", line)
    path = write(spec_dir, text)
    [problem] = problems_of(path)
    seed_line = text.splitlines().index(line) + 1
    assert problem.field == field and problem.line == seed_line and words in problem.message, str(problem)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("seed=true", "seed"),
        ("seed=-3", "seed"),
        ("seed=99999999999999999999999999", "seed"),
        ("data.sources.0.count='1_000'", "data.sources.0.count"),
        ("data.sources.0.count=.inf", "data.sources.0.count"),
        ("stages.0.optimizer.lr=.nan", "stages.0.optimizer.lr"),
        ("stages.0.optimizer.lr=-.inf", "stages.0.optimizer.lr"),
        ("stages.0.optimizer.lr=1e999", "stages.0.optimizer.lr"),
        ("stages.0.optimizer.lr=1" + "0" * 400, "stages.0.optimizer.lr"),
        ("stages.0.optimizer.lr=yes", "stages.0.optimizer.lr"),
        ('stages.0.optimizer.lr="1e-4"', "stages.0.optimizer.lr"),
    ],
)
def test_bad_numbers_in_overrides_are_located_at_the_override(spec_dir, override, field):
    problems = problems_of(write(spec_dir, SHAPES.read_text()), (override,))
    assert any(p.source == "--set[0]" and p.field == field for p in problems), [str(p) for p in problems]


def test_numbers_still_work_as_yaml_and_as_overrides(spec_dir):
    path = write(spec_dir, SHAPES.read_text().replace("lr: 0.001", "lr: 1e-3", 1))
    recipe = load_recipe(path)
    assert recipe.stages[0].optimizer.lr == 1e-3
    overrides = (
        "seed=42",
        "stages.0.optimizer.lr=2e-05",
        "stages.1.optimizer.lr=1",  # an int where a float is expected
        "data.sources.0.count=1_024",
        "data.sources.0.caption_noise=0",
        "stages.0.optimizer.betas=[0.9, 0.95]",
        f"runtime.ray.num_cpus={2**63 - 1}",
    )
    recipe = load_recipe(path, overrides)
    assert recipe.seed == 42 and recipe.stages[0].optimizer.lr == 2e-05 and recipe.stages[1].optimizer.lr == 1.0
    assert recipe.data.sources[0].count == 1024 and recipe.runtime.ray.num_cpus == 2**63 - 1
    assert load_recipe(path, ("seed=0",)).seed == 0


def test_every_spec_number_is_strict():
    """No int or float of the Recipe schema coerces: every one is declared with base.Int / Float."""
    lax = []

    def walk(schema: object, at: tuple) -> None:
        if isinstance(schema, dict):
            if schema.get("type") in ("int", "float") and not schema.get("strict"):
                lax.append(at)
            for key, value in schema.items():
                walk(value, (*at, key))
        elif isinstance(schema, list):
            for i, value in enumerate(schema):
                walk(value, (*at, i))

    walk(Recipe.__pydantic_core_schema__, ())
    assert not lax, lax[:5]


# =========================================================================== credentials in URLs

secret = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~!$", min_size=6, max_size=24)
user = st.text("abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=12)
host = st.sampled_from(["api.example.com", "127.0.0.1:8000", "mlflow.internal:5000", "[::1]:9000", "h"])
scheme = st.sampled_from(["http", "https", "HTTPS", "postgresql", "mysql+pymysql", "s3", "redis", "ftp", "wss"])
tail = st.sampled_from(["", "/", "/v1", "/api/2.0?x=1", "#frag"])


@st.composite
def leaky_url(draw) -> tuple[str, str]:
    """A URL carrying a secret, and the secret."""
    key = "sk" + draw(secret)
    form = draw(st.sampled_from(["user:key", "token-user", "query"]))
    if form == "user:key":
        url = f"{draw(scheme)}://{draw(user)}:{key}@{draw(host)}{draw(tail)}"
    elif form == "token-user":
        url = f"{draw(st.sampled_from(['http', 'https']))}://{key}@{draw(host)}{draw(tail)}"
    else:
        param = draw(
            st.sampled_from(["api_key", "apikey", "access_token", "token", "password", "sig", "X-Amz-Signature"])
        )
        url = f"{draw(scheme)}://{draw(host)}/v1?a=1&{param}={key}"
    return url, key


GENERATOR = {"kind": "openai-compatible", "base_url": "http://127.0.0.1:8000/v1", "api_key_env": "OPENAI_API_KEY"}
URL_FIELDS = [
    ("instruct", "generator", "base_url"),
    ("runtime", "mlflow", "tracking_uri"),
    ("runtime", "ray", "address"),
    ("description",),
    ("data", "sources", 0, "name"),
    ("stages", 1, "name"),
    ("evaluate", 0, "name"),
    ("zz_unknown",),
]


def with_value(parts: tuple, value: str) -> dict:
    doc = copy.deepcopy(DOCS["shapes-tiny.yaml"])
    doc["instruct"]["generator"] = dict(GENERATOR)
    doc.setdefault("runtime", {}).setdefault("mlflow", {})
    target = doc
    for part in parts[:-1]:
        target = target.setdefault(part, {}) if isinstance(target, dict) else target[part]
    target[parts[-1]] = value
    return doc


@FUZZ
@given(case=leaky_url(), parts=st.sampled_from(URL_FIELDS), prefix=st.sampled_from(["", "see "]))
def test_credentials_in_a_url_are_rejected_at_their_field(spec_dir, case, parts, prefix):
    url, key = case
    text = dump(with_value(parts, prefix + url))
    path = write(spec_dir, text)
    problems = problems_of(path)
    assert_located_at(problems, path, text, parts)
    for problem in problems:
        assert key not in str(problem), str(problem)  # the error does not print the secret
        assert "api_key_env" in problem.message and "environment variable" in problem.message


@FUZZ
@given(case=leaky_url(), parts=st.sampled_from(URL_FIELDS[:3]))
def test_credentials_in_an_override_are_rejected_at_the_override(spec_dir, case, parts):
    url, key = case
    path = write(spec_dir, dump(with_value(("instruct", "generator", "kind"), "openai-compatible")))
    problems = problems_of(path, (f"{dotted(parts)}='{url}'",))
    assert [(p.source, p.field) for p in problems] == [("--set[0]", dotted(parts))], [str(p) for p in problems]
    assert key not in str(problems[0])


def test_a_url_with_credentials_as_a_key_is_rejected(spec_dir):
    text = SHAPES.read_text() + "zz:\n  'https://u:sk-secret@h/v1': 1\n"
    problems = problems_of(write(spec_dir, text))
    assert [(p.field, p.line) for p in problems] == [("zz.https://***@h/v1", text.count("\n"))]
    assert "sk-secret" not in str(problems[0])


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/v1",
        "https://api.openai.com/v1",
        "https://medium.com/@someone/post",
        "ssh://git@github.com/org/repo",
        "postgresql://mlflow@db:5432/mlflow",
        "someone@example.com",
        "s3://bucket/prefix?versionId=3",
        "http://[::1]:5000/?page_token=abc",
        "file:///tmp/mlruns",
    ],
)
def test_urls_without_credentials_still_load(spec_dir, url):
    assert url_credentials(url) is None
    for parts in URL_FIELDS[:3] if url.startswith("http") else URL_FIELDS[1:3]:
        assert isinstance(load_recipe(write(spec_dir, dump(with_value(parts, url)))), Recipe)


def test_url_credentials_masks_the_secret():
    assert url_credentials("http://user:pa55@host/v1") == "http://***@host/v1"
    assert url_credentials("x https://tok@github.com/a and s3://b") == "x https://***@github.com/a and s3://b"
    assert url_credentials("https://h/v1?key=1&api_key=abc&b=2") == "https://h/v1?key=1&api_key=***&b=2"
