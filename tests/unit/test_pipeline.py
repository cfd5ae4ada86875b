"""The pipeline language: the concise and explicit forms give one graph, every wiring mistake is
reported at its place in the file, and a step's digest follows its component's code."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vlmflow.errors import SpecError
from vlmflow.pipeline import graph_digests, recipe_graph
from vlmflow.specs import load_recipe

ROOT = Path(__file__).resolve().parents[2]
CONCISE = ROOT / "specs" / "recipes" / "shapes-tiny.yaml"
EXPLICIT = ROOT / "specs" / "examples" / "shapes-tiny-pipeline.yaml"

HEAD = """\
name: wiring
model:
  vision: {kind: tiny-vit, image_size: 32, patch_size: 16, hidden_size: 32, layers: 1, heads: 2}
  connector: {kind: linear}
  language: {kind: tiny-llama, hidden_size: 32, layers: 1, heads: 2, intermediate_size: 64}
pipeline:
  - name: ingest
    uses: ingest
    with: {sources: [{kind: synthetic-shapes, count: 16}]}
"""


def test_the_concise_recipe_and_its_explicit_form_have_the_same_steps_and_digests():
    concise, explicit = load_recipe(CONCISE), load_recipe(EXPLICIT)
    a, b = recipe_graph(concise), recipe_graph(explicit)
    assert [(s.name, s.component.name, s.inputs) for s in a] == [(s.name, s.component.name, s.inputs) for s in b]
    assert graph_digests(a, concise) == graph_digests(b, explicit)
    assert [s.name for s in a if s.register] == ["train-instruct"]  # the last model-writing step


def test_plan_pipeline_prints_an_explicit_form_that_loads_to_the_same_digests(tmp_path):
    from click.testing import CliRunner

    from vlmflow.cli import cli

    result = CliRunner().invoke(cli, ["plan", str(CONCISE), "--pipeline"])
    assert result.exit_code == 0, result.output
    text = CONCISE.read_text()
    head = text[: text.index("data:\n")]
    model = text[text.index("model:\n") : text.index("stages:\n")]
    runtime = text[text.index("runtime:\n") :]
    spec = tmp_path / "printed.yaml"
    spec.write_text(head + model + result.output + runtime)
    printed = load_recipe(spec)
    assert graph_digests(recipe_graph(printed), printed) == graph_digests(
        recipe_graph(load_recipe(CONCISE)), load_recipe(CONCISE)
    )


def problems(tmp_path: Path, steps: str) -> list[str]:
    spec = tmp_path / "spec.yaml"
    spec.write_text(HEAD + textwrap.indent(textwrap.dedent(steps), "  "))
    with pytest.raises(SpecError) as caught:
        load_recipe(spec)
    return [str(p).removeprefix(str(spec)) for p in caught.value.problems]


def test_an_unknown_component_is_named_with_the_known_ones(tmp_path):
    (found,) = problems(tmp_path, "- {name: d, uses: dedupe, inputs: {data: ingest}}\n")
    assert found.startswith(":10:21: pipeline.1.uses: unknown component 'dedupe'; known: ")
    assert "dedup" in found and "package.module:NAME" in found


def test_a_misspelled_input_step_gets_a_suggestion(tmp_path):
    (found,) = problems(tmp_path, "- {name: d, uses: dedup, inputs: {data: ingets}}\n")
    assert found == ":10:43: pipeline.1.inputs.data: unknown step 'ingets'; did you mean 'ingest'?"


def test_an_input_of_the_wrong_artifact_type(tmp_path):
    found = problems(
        tmp_path,
        """\
        - {name: tok, uses: tokenizer, inputs: {data: ingest}, with: {kind: bpe, vocab_size: 300}}
        - {name: d, uses: dedup, inputs: {data: tok}}
        """,
    )
    assert found == [
        ":11:43: pipeline.2.inputs.data: step 'tok' writes tokenizer, but input 'data' of dedup reads samples"
    ]


def test_an_unknown_port_and_an_unwired_port(tmp_path):
    found = problems(tmp_path, "- {name: d, uses: dedup, inputs: {source: ingest}}\n")
    assert found == [
        ":10:36: pipeline.1.inputs: input 'data' (samples) is not wired to a step",
        ":10:45: pipeline.1.inputs.source: dedup has no input 'source'; its inputs: data (samples)",
    ]


def test_a_cycle_and_a_repeated_name(tmp_path):
    found = problems(
        tmp_path,
        """\
        - {name: a, uses: dedup, inputs: {data: b}}
        - {name: b, uses: dedup, inputs: {data: a}}
        """,
    )
    assert found == [":10:36: pipeline.1.inputs: the steps form a cycle: a -> b -> a"]
    found = problems(tmp_path, "- {name: ingest, uses: dedup, inputs: {data: ingest}}\n")
    assert ":10:12: pipeline.1.name: step name 'ingest' is used twice" in found


def test_a_config_error_is_placed_inside_with(tmp_path):
    (found,) = problems(tmp_path, "- {name: d, uses: dedup, inputs: {data: ingest}, with: {hamming_threshold: 99}}\n")
    assert found == ":10:78: pipeline.1.with.hamming_threshold: Input should be less than or equal to 16"


def test_concise_sections_beside_a_pipeline_are_refused(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(HEAD + "tokenizer: {kind: bpe}\n")
    with pytest.raises(SpecError, match=r"spec.yaml:10:12: tokenizer: pipeline: states the whole graph"):
        load_recipe(spec)


def test_operational_fields_stay_out_of_the_digest():
    base = load_recipe(CONCISE)
    digests = graph_digests(recipe_graph(base), base)
    tuned = load_recipe(CONCISE, ["data.dedup.partitions=7", "evaluate.0.actors=2"])
    assert graph_digests(recipe_graph(tuned), tuned) == digests
    changed = load_recipe(CONCISE, ["data.dedup.hamming_threshold=3"])
    after = graph_digests(recipe_graph(changed), changed)
    assert [n for n in digests if after[n] == digests[n]] == ["ingest"]


DIGESTS = """
import json, sys
from vlmflow.pipeline import graph_digests, recipe_graph
from vlmflow.specs import load_recipe
recipe = load_recipe(sys.argv[1])
print(json.dumps(graph_digests(recipe_graph(recipe), recipe)))
"""


@pytest.mark.slow
def test_editing_a_components_code_recomputes_exactly_it_and_its_descendants(tmp_path):
    """A copy of the package where dedup's code changes: dedup and every step after it get new
    digests, ingest keeps its own; a comment alone changes nothing."""
    import json

    tree = tmp_path / "site" / "vlmflow"
    shutil.copytree(ROOT / "src" / "vlmflow", tree, ignore=shutil.ignore_patterns("__pycache__"))
    for package in ("components", "flows"):
        shutil.copytree(ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def digests() -> dict[str, str]:
        out = subprocess.run([sys.executable, "-c", DIGESTS, str(CONCISE)], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    before = digests()
    dedup = tree / "components" / "dedup.py"
    assert "vlmflow/components" not in (out := subprocess.run(
        [sys.executable, "-c", "import vlmflow.components.dedup as m; print(m.__file__)"],
        env=env, capture_output=True, text=True,
    )).stdout or str(tmp_path) in out.stdout  # fmt: skip
    dedup.write_text(dedup.read_text() + "\n# a comment only\n")
    assert digests() == before
    dedup.write_text(dedup.read_text().replace("def band_masks(", "SLACK = 1\n\n\ndef band_masks("))
    after = digests()
    assert after["ingest"] == before["ingest"]
    assert {n for n in before if after[n] != before[n]} == set(before) - {"ingest"}  # every step reads dedup
