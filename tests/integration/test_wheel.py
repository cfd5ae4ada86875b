"""The built wheel is a working product on its own: installed (not editable) into a fresh venv and
run from outside the checkout, `vlmflow` lists, validates and plans the built-in recipes by name.

The fresh venv gets only the wheel (`pip install --no-deps`); the dependencies come from the
running venv through a `.pth` file naming its site-packages. A plain path line in a `.pth` only
appends that folder to sys.path: the `.pth` files inside it are not run, so the editable install's
finder (`__editable___vlmflow_*_finder`) is not installed there, and the wheel's vlmflow is the
one imported. `test_the_wheel_runs_not_the_checkout` proves it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.stem for p in (REPO / "specs" / "recipes").glob("*.yaml"))
PLANNED = "llava-tiny"  # has an instruct: section on the built-in templates, so plan reads them
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "src", "components", "flows", "specs")

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


class Installed:
    def __init__(self, venv: Path, site: Path, home: Path, env: dict[str, str]):
        self.venv, self.site, self.home, self.env = venv, site, home, env

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return _run([str(self.venv / "bin" / args[0]), *args[1:]], cwd=self.home, env=self.env)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    assert not root.resolve().is_relative_to(REPO), "the test must run outside the checkout"

    # Build from a copy of the build inputs, so build/ and *.egg-info never land in the checkout.
    source = root / "source"
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    wheels = root / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _ok(_run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(source)], root))
    (wheel,) = wheels.glob("vlmflow-*.whl")

    venv = root / "venv"
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root))
    python = venv / "bin" / "python"
    _ok(_run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], root))
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_ok(_run([str(python), "-c", purelib], root)).stdout.strip())
    (site / "zz-dev-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    home = root / "elsewhere"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return Installed(venv, site.resolve(), home, env)


PROBE = """
import json, sys
from importlib.resources import files
import vlmflow, vlmflow.components, vlmflow.flows
from vlmflow.components.instruct.templates import DEFAULT_TEMPLATES
print(json.dumps({
    "files": [vlmflow.__file__, vlmflow.components.__file__, vlmflow.flows.__file__,
              str(files("vlmflow.builtin")), str(DEFAULT_TEMPLATES)],
    "meta_path": [repr(finder) for finder in sys.meta_path],
    "sys_path": sys.path,
}))
"""


def test_the_wheel_runs_not_the_checkout(installed):
    probe = json.loads(_ok(installed.run("python", "-c", PROBE)).stdout)
    for path in probe["files"]:
        assert Path(path).resolve().is_relative_to(installed.site), f"{path} is not the wheel's copy"
    assert not any("editable" in finder.lower() for finder in probe["meta_path"]), probe["meta_path"]
    dev_site = Path(sysconfig.get_paths()["purelib"]).resolve()
    for entry in probe["sys_path"]:
        resolved = (installed.home / entry).resolve()  # "" (python -c) is the cwd
        assert resolved == dev_site or not resolved.is_relative_to(REPO), f"sys.path leaks the checkout: {entry}"


def test_recipes_lists_every_builtin(installed):
    lines = _ok(installed.run("vlmflow", "recipes")).stdout.splitlines()
    assert [line.split()[0] for line in lines] == RECIPES
    assert all(len(line.split()) > 1 for line in lines), lines  # every name has a description


def test_validate_every_builtin_by_name(installed):
    for name in RECIPES:
        out = _ok(installed.run("vlmflow", "validate", name)).stdout
        path, _, rest = out.splitlines()[0].partition(": ")
        assert rest.startswith(f"ok: recipe {name!r}"), out
        assert Path(path).resolve() == installed.site / "vlmflow" / "builtin" / "recipes" / f"{name}.yaml"


def test_plan_by_name_reads_the_builtin_templates(installed):
    out = _ok(installed.run("vlmflow", "plan", PLANNED, "--workdir", str(installed.home / "work"))).stdout
    assert f"plan for {PLANNED}" in out
    stages = {line.split()[0] for line in out.splitlines() if "runs" in line.split()}  # the stage table's rows
    assert {"ingest", "dedup", "tokenizer", "instruct", "train-align", "train-instruct"} <= stages, out


def test_an_unknown_name_points_at_recipes(installed):
    result = installed.run("vlmflow", "validate", "no-such-recipe")
    assert result.returncode == 2
    assert "spec file not found" in result.stderr and "vlmflow recipes" in result.stderr
