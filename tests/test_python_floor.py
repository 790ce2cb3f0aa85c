"""The lowest Python actcache supports is declared once and checked everywhere.

`requires-python`, ruff's `target-version` and mypy's `python_version` must name the same
version: a floor below what the code needs (``enum.StrEnum``, ``datetime.UTC`` and
``tomllib`` are 3.11) installs on an interpreter where no command imports, and a lint
target above the floor hides exactly that.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pipeline", "workers", "schemas", "tests", "benchmarks", "examples")


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def floor() -> tuple[int, int]:
    spec = _pyproject()["project"]["requires-python"]
    m = re.fullmatch(r">=\s*(\d+)\.(\d+)", spec.strip())
    assert m is not None, f"requires-python {spec!r} is not a plain `>=X.Y` floor"
    return int(m.group(1)), int(m.group(2))


def test_floor_is_311_the_version_the_code_needs() -> None:
    # enum.StrEnum (schemas/job.py, schemas/probe.py) and tomllib are new in 3.11.
    assert floor() == (3, 11)


def test_ruff_and_mypy_target_the_declared_floor() -> None:
    tools = _pyproject()["tool"]
    major, minor = floor()
    assert tools["ruff"]["target-version"] == f"py{major}{minor}"
    assert tools["mypy"]["python_version"] == f"{major}.{minor}"


def test_the_running_interpreter_satisfies_the_floor() -> None:
    assert sys.version_info[:2] >= floor()


def _python_files() -> list[Path]:
    return sorted(p for folder in SOURCES for p in (ROOT / folder).rglob("*.py")
                  if "data" not in p.relative_to(ROOT).parts)


def test_every_source_file_parses_with_the_floor_grammar_and_no_syntax_warning() -> None:
    # Syntax newer than the floor (PEP 695 `type` statements, 3.12 f-strings...) fails to
    # parse at the floor's feature version; an invalid escape sequence warns today and is
    # an error in a later Python.
    files = _python_files()
    assert len(files) > 50
    bad = []
    for path in files:
        source = path.read_text()
        with warnings.catch_warnings():
            warnings.simplefilter("error", SyntaxWarning)
            try:
                ast.parse(source, str(path), feature_version=floor())
                compile(source, str(path), "exec", dont_inherit=True)
            except (SyntaxError, SyntaxWarning) as e:
                bad.append(f"{path.relative_to(ROOT)}: {e}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", ["actcache", "actcache.cli", "actcache.schemas"])
def test_the_entry_modules_import_in_a_fresh_interpreter(module: str) -> None:
    # A fresh interpreter (-I: no user site, no PYTHONPATH, not this folder), as a user's
    # `actcache` command starts.
    done = subprocess.run(
        [sys.executable, "-I", "-W", "error::SyntaxWarning", "-c", f"import {module}"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
