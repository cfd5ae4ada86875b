"""The package list, found from the folders (setuptools reads everything else from pyproject.toml).

vlmflow's packages live in four folders mapped into one namespace ([tool.setuptools.package-dir]):
src/vlmflow -> vlmflow, components -> vlmflow.components, flows -> vlmflow.flows, specs ->
vlmflow.builtin (data only). Every folder with an __init__.py below the first three is a package, so
a new component package (components/NAME/) ships without a line here or in pyproject.toml."""

from setuptools import find_packages, setup

ROOTS = {"vlmflow": "src/vlmflow", "vlmflow.components": "components", "vlmflow.flows": "flows"}


def packages() -> list[str]:
    found = [*ROOTS, "vlmflow.builtin"]
    for name, folder in ROOTS.items():
        found += [f"{name}.{sub}" for sub in find_packages(folder)]
    return sorted(set(found))


setup(packages=packages())
