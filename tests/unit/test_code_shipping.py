"""The code a cluster job ships (runtime_env py_modules): a complete, importable vlmflow package."""

from __future__ import annotations

import os
import subprocess
import sys

from vlmflow.runtime.ray import stage_package


def test_staged_package_holds_components_and_flows_and_is_what_python_imports(tmp_path):
    package = stage_package(tmp_path / "code")
    assert package == tmp_path / "code" / "vlmflow"
    for part in ("__init__.py", "components/capfilt/stage.py", "components/train/loop.py", "flows/recipe.py"):
        assert (package / part).is_file(), part
    assert not list(package.rglob("__pycache__"))
    # As on a Ray worker: py_modules come first on PYTHONPATH, ahead of any installed vlmflow.
    probe = (
        "import vlmflow, vlmflow.components.train.data as d, vlmflow.flows as f;"
        "print(vlmflow.__file__, d.__file__, f.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "code")}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    files = done.stdout.split()
    assert len(files) == 3 and all(path.startswith(str(package)) for path in files), files
    assert stage_package(tmp_path / "code") == package  # a second run replaces the copy
    assert (package / "flows" / "recipe.py").is_file()
