"""The docs' Reliability page names only tests that exist, and names every test of the fault suite."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "reliability.rst"
FAULTS = ROOT / "tests" / "faults"


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.name.startswith("test_")
    }


def named_on_page() -> set[tuple[str, str]]:
    text = PAGE.read_text(encoding="utf-8")
    return set(re.findall(r"``(test_\w+\.py)::(test_\w+)``", text))


def test_every_test_the_page_names_exists() -> None:
    named = named_on_page()
    assert len(named) > 40
    missing = sorted(
        f"{file}::{name}"
        for file, name in named
        if not (FAULTS / file).is_file() or name not in defined_tests(FAULTS / file)
    )
    assert not missing, f"docs/reliability.rst names tests that do not exist: {missing}"


def test_the_page_covers_every_file_of_the_fault_suite() -> None:
    files = {file for file, _ in named_on_page()}
    suite = {p.name for p in FAULTS.glob("test_*.py")} - {Path(__file__).name}
    assert suite <= files, f"not on docs/reliability.rst: {sorted(suite - files)}"
