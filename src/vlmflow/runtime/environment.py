"""What a run ran with: Python, platform and the version of every installed distribution.

Saved beside the resolved spec of every run (`runs/RUN/environment.json`, also an artifact of
the recipe's MLflow run), so a result can be reproduced with the same package set."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import Any


def environment() -> dict[str, Any]:
    packages = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            packages[name.lower()] = dist.version
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages": dict(sorted(packages.items())),
    }
