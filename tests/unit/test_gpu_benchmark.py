"""benchmarks/gpu.py end to end on the CPU (--tiny: 2 gloo processes, FSDP, bf16 autocast, activation
checkpointing, then the evaluation worker captioning): the code path a GPU run takes, and a JSON
report whose figures are consistent with each other and with the plan's estimate."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tests.conftest import REPO


def test_tiny_run_reports_throughput_mfu_memory_and_captioning(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--tiny", "--steps", "3", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| MFU |" in done.stdout
    result = json.loads(out.read_text())
    train, memory, caption = result["train"], result["train"]["memory"], result["caption"]

    assert result["config"] == "tiny" and result["precision"] == "bf16"
    assert train["processes"] == 2 and train["steps"] == 3 and train["warmup"] == 1
    assert train["parameters"]["total"] > train["parameters"]["trainable"] > 0  # the vision tower is frozen
    assert len(train["losses_rank0"]) == 4 and all(math.isfinite(loss) for loss in train["losses_rank0"])
    # 1 + 16 image tokens + 23 text tokens per sample, 2 samples per process
    assert train["sequence"] == 40 and train["tokens_per_step"] == 2 * 2 * 40
    assert train["step_seconds"] > 0
    assert math.isclose(train["tokens_per_s"], train["tokens_per_step"] / train["step_seconds"])
    assert train["hardware_flops_per_step"] > train["model_flops_per_step"] > 0  # recomputation counted in HFU
    assert 0 < train["mfu"] < train["hfu"] < 1
    peak = train["peak_tflops_per_device"] * 1e12 * 2
    assert math.isclose(train["mfu"], train["model_flops_per_step"] / train["step_seconds"] / peak)

    assert len(memory["peak_bytes_per_rank"]) == 2 and min(memory["peak_bytes_per_rank"]) > 0
    assert memory["plan_bytes"] == memory["plan"]["total"] > 0
    assert 0.5 < memory["plan_over_measured"] < 2  # the plan's footprint tracks the measured tensor peak

    assert caption["images"] == 8 and caption["max_new_tokens"] == 16
    assert caption["images_per_s"] > 0


def test_peak_table_matches_device_names():
    from benchmarks.gpu import known_peak

    assert known_peak("NVIDIA H100 80GB HBM3") == ("H100", 989.0)  # SXM
    assert known_peak("NVIDIA H100 PCIe") == ("H100 PCIe", 756.0)
    assert known_peak("NVIDIA H200") == ("H200", 989.0)
    assert known_peak("NVIDIA A100-SXM4-80GB") == ("A100", 312.0)
    assert known_peak("NVIDIA L40S") == ("L40S", 362.0)  # not the L4's
    assert known_peak("NVIDIA L4") == ("L4", 121.0)
    assert known_peak("Tesla T4") is None
