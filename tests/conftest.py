"""Shared fixtures: real images from scikit-image, the repo root."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def encode(array: np.ndarray, fmt: str = "PNG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photographs shipped with scikit-image (no network)."""
    from skimage import data

    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea(), "rocket": data.rocket()}


# The longest test files (minutes each, measured in CI) first: with two pytest workers taking
# whole files in this order (`make test`: -n 2 --dist loadfile --no-loadscope-reorder), the
# long ones start at once and the short ones fill the gaps, so neither worker idles at the end.
LONGEST_FIRST = (
    "test_train.py",
    "test_cluster_servers.py",
    "test_eval_cli.py",
    "test_recipe_cli.py",
    "test_faults.py",
    "test_s3_sources.py",
    "test_ui_browser.py",
    "test_capfilt_cli.py",
    "test_capfilt_rounds_cli.py",
    "test_schedule.py",
    "test_instruct_recipe_run.py",
    "test_plan.py",
    "test_concurrent_stages.py",
    "test_ui.py",
    "test_integrity.py",
    "test_fsdp.py",
    "test_url_list.py",
    "test_mlflow_model.py",
    "test_wheel.py",
    "test_plugins.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first (stable: each file's tests keep their order); tests marked `gpu`
    run only where torch sees a CUDA device (a lent GPU machine)."""
    import torch

    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def processes_named(text: str, root: int) -> list:
    """Processes whose command line holds `text` and that descend from process `root` (a Ray a
    test or its driver started, never another test's: the suite runs two tests at a time)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if text in " ".join(proc.info["cmdline"] or []) and root in {p.pid for p in proc.parents()}:
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found
