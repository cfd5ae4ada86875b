"""`vlmflow plan` and the pre-flight check of `vlmflow run` (through the CLI where the exit and
the printed errors are the point; in process otherwise).

The full-size LLaVA-1.5 is planned from the published config.json files alone (no weights):
its parameter counts must match the published sizes and its stage 2 must fit the published
8 x 80 GB setup. A tiny recipe that cannot fit its declared memory, or whose mixture asks
for more rows than its data has, stops before any stage runs, at the field to change.
"""

from __future__ import annotations

import json

import pytest
from test_recipe_cli import REPO, vlmflow

from vlmflow.plan import build_plan, check, render
from vlmflow.specs import load_recipe
from vlmflow.specs.loader import located

CONFIGS = REPO / "tests" / "data" / "configs"
RECIPES = REPO / "specs" / "recipes"
FULL_SIZE = [
    "--set", f"model.vision.path={CONFIGS / 'clip-vit-large-patch14-336'}",
    "--set", f"model.language.path={CONFIGS / 'vicuna-7b-v1.5'}",
    "--set", f"tokenizer.path={CONFIGS / 'vicuna-7b-v1.5'}",
    "--set", "instruct.generator={kind: offline}",
]  # fmt: skip


def plan_json(spec: str, workdir, *extra: str) -> dict:
    result = vlmflow("plan", str(RECIPES / spec), "--workdir", str(workdir), "--json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def training(plan: dict) -> dict[str, dict]:
    return {e["stage"]: e["train"] for e in plan["stages"] if "train" in e}


def test_full_size_llava_15_matches_the_published_sizes_and_setup(tmp_path):
    """One plan under DDP: it cannot fit 80 GB, and its fixes include the published FSDP setup."""
    args = ["plan", str(RECIPES / "llava-1.5.yaml"), "--workdir", str(tmp_path), "--json", *FULL_SIZE]
    result = vlmflow(*args, "--set", "runtime.train.strategy=ddp")
    assert result.returncode == 2
    plan = json.loads(result.stdout)
    assert plan["device"]["kind"] == "gpu" and plan["device"]["memory_per_worker_gb"] == 80
    align, instruct = training(plan).values()
    params = instruct["trace"]["params"]
    assert 6.6e9 < params["language_total"] < 6.9e9  # Vicuna-7B (LLaMA-2 7B: 6.74B)
    assert 0.29e9 < params["vision_total"] < 0.31e9  # CLIP ViT-L/14-336 vision tower: 0.30B
    assert 20e6 < params["connector_total"] < 22e6  # 2-layer MLP 1024 -> 4096 -> 4096: 21M
    assert align["trace"]["params"]["trainable"] == params["connector_total"]  # stage 1: projector only
    assert params["trainable"] == params["connector_total"] + params["language_total"]
    assert instruct["trace"]["image_tokens"] == 576  # (336 / 14)^2 patches, CLS dropped
    assert instruct["memory"]["optimizer_gb"] == pytest.approx(8 * params["trainable"] / 2**30, rel=1e-6)
    # ~6 FLOPs per parameter per token for the trained LM (4 without weight gradients: frozen tower).
    tokens = 128 * instruct["trace"]["sequence"]
    assert 5 * params["language_total"] * tokens < instruct["flops_per_step"] < 7 * params["total"] * tokens
    assert align["fits"] and not instruct["fits"] and instruct["memory"]["total_gb"] > 120
    fsdp = next(f for f in instruct["fixes"] if f["change"] == "runtime.train.strategy: fsdp")
    # The published 8 x 80 GB: weights, gradients (reduce-scattered every micro-batch) and optimizer sharded per
    # block, the root and two blocks gathered, bf16 activations of 2048-token samples: about 60 GiB.
    assert instruct["trace"]["sequence"] == 2049  # <bos>, 576 image tokens, 1472 text tokens
    assert fsdp["fits"] and 50 < fsdp["need_gb"] <= 70
    errors = [line for line in result.stderr.splitlines() if "llava-1.5.yaml:" in line]
    assert len(errors) == 1 and ": stages.1.micro_batch_size: train-instruct needs about" in errors[0]
    assert "more than the 80.00 GiB it may use (runtime.train.memory_per_worker_gb)" in errors[0]
    assert "Would fit: " in errors[0] and "runtime.train.strategy: fsdp" in errors[0]


def test_run_stops_before_any_stage_when_a_stage_cannot_fit_or_be_placed(tmp_path):
    result = vlmflow(
        "run", str(RECIPES / "shapes-tiny.yaml"), "--workdir", str(tmp_path),
        "--set", "runtime.train.memory_per_worker_gb=0.66", "--set", "runtime.ray.num_cpus=1",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    line = (RECIPES / "shapes-tiny.yaml").read_text().splitlines().index("    micro_batch_size: 16") + 1
    assert f"shapes-tiny.yaml:{line}:23: stages.0.micro_batch_size: train-align needs about" in result.stderr
    assert "Would fit: micro_batch_size: " in result.stderr
    assert "runtime.train.num_workers: the training workers need 2 CPU, but the local Ray has 1 CPU" in result.stderr
    # No run, no artifact: only the digests' cache (the components' parsed code) may be written.
    assert not (tmp_path / "runs").exists()
    assert {p.name for p in (tmp_path / "artifacts").glob("*")} <= {"_cache"}


def test_a_mixture_asking_for_more_rows_than_exist_is_located(tmp_path):
    overrides = ["stages.1.data.mixture.1={data: dedup, format: qa, count: 5000}"]
    spec = RECIPES / "shapes-tiny.yaml"
    (error,) = check(build_plan(load_recipe(spec, overrides), tmp_path))
    problem = str(located(spec, overrides, error.field, error.message))
    assert problem == (
        "--set[0]:1:1: stages.1.data.mixture.1.count: 5000 samples of dedup/qa per epoch, but it has 2048; "
        "lower the count (or total), or set replacement: true"
    )


def test_tiny_plan_counts_rows_steps_and_mixture_from_the_sources(tmp_path):
    planned = build_plan(load_recipe(RECIPES / "shapes-tiny.yaml"), tmp_path)
    plan = planned.as_json()  # what `vlmflow plan --json` prints
    assert {e["status"] for e in plan["stages"]} == {"runs"}
    align, instruct = training(plan).values()
    assert align["mixture"]["counts"] == [2048] and align["steps"] == 600
    assert instruct["mixture"]["labels"] == ["instruct/conversations", "dedup/qa", "dedup/choice", "dedup/caption"]
    assert instruct["mixture"]["counts"] == [683, 2048, 683, 683]  # weights 1 : 3 : 1 : 1, before splits and dedup
    assert instruct["fits"] and instruct["memory"]["total_gb"] < 1.0
    assert plan["device"]["kind"] == "cpu" and plan["device"]["tflops_per_worker"] > 0
    assert "train-instruct" in render(planned) and "[fits]" in render(planned)
    assert planned.stage("train-instruct").detail.tracked()["plan_memory_gb"] == instruct["memory"]["total_gb"]


def test_blip_plan_estimates_source_subsets_and_capfilt_pairs(tmp_path):
    plan = build_plan(load_recipe(RECIPES / "blip-tiny.yaml"), tmp_path).as_json()
    rows = {e["stage"]: e["rows_in"] for e in plan["stages"]}
    train = training(plan)
    assert train["train-captioner"]["mixture"]["counts"] == [2048]  # sources: [coco] of 8192 web + 2048 coco
    assert rows["capfilt-caption"] == 8192  # capfilt.sources: [web]
    assert rows["capfilt-filter"] == 8192 * 3  # each image's web caption and k=2 synthetic ones
    assert rows["train-retrain"] == 10240  # the capfilt artifact's images, not its pairs
