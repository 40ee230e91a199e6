"""The module convention of ``docs/contributing.rst``, checked.

A top-level module or a package is public; every module inside a package is
private and re-exported by the package's ``__init__``. Every public name
resolves and carries a docstring, and the top-level package offers what a
program needs, not the demo's tools or internals.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import trioflow

ROOT = Path(trioflow.__file__).parent

PACKAGES = sorted(
    f"trioflow.{info.name}" for info in pkgutil.iter_modules([str(ROOT)]) if info.ispkg
)
PUBLIC_MODULES = sorted(
    f"trioflow.{info.name}"
    for info in pkgutil.iter_modules([str(ROOT)])
    if not info.name.startswith("_")
)


def test_the_packages_are_the_ones_the_contributing_page_names():
    page = (ROOT.parent / "docs" / "contributing.rst").read_text()
    for package in PACKAGES:
        assert f"``{package.removeprefix('trioflow.')}/``" in page, package


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_inside_a_package_is_private(package):
    path = ROOT / package.removeprefix("trioflow.")
    public = [
        info.name for info in pkgutil.iter_modules([str(path)]) if not info.name.startswith("_")
    ]
    assert public == [], f"{package}: modules {public} should be private (_name.py)"


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_resolves_and_is_documented(module_name):
    module = importlib.import_module(module_name)
    assert module.__doc__, f"{module_name} has no docstring"
    names = getattr(module, "__all__", None)
    assert names is not None, f"{module_name} has no __all__"
    for name in names:
        value = getattr(module, name)  # lazy names (PEP 562) import here
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), f"{module_name}.{name} has no docstring"


def test_the_top_level_surface_leaves_the_demo_and_internals_in_their_modules():
    for name in ("calculator", "evaluate", "CalculationError", "format_duration"):
        assert name not in trioflow.__all__
    from trioflow.builtin import calculator

    assert calculator.name == "calculator"
    from trioflow import web

    assert "RunHub" not in web.__all__
    assert "hub_of" not in web.__all__
    assert len(trioflow.__all__) <= 65  # 64 at #12, + ToolContext
