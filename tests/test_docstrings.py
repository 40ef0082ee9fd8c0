"""No docstring in the library quotes a measured time, memory or ratio.

A figure measured on one machine is false on the next, and a docstring cannot say which
machine it came from; the docstring states the contract and points to the decision record
(``docs/decisions/``) that holds the figure, its benchmark and its machine.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("stemserve", "client", "export", "model_repository")

MEASURED = re.compile(
    r"\b\d+\.\d+\s?(?:s|ms|seconds|x|×|GB|MB|MiB|GiB|kB|dB)(?![\w/])"  # 0.87 s, 1.5x, 5.8 GB
    r"|\b\d+(?:\.\d+)?\s?%"                                             # 13 %
    r"|\b\d{1,3}(?:,\d{3})+\s?(?:MiB|MB|GiB|GB)\b"                      # 1,865 MiB
    r"|\b\d+(?:\.\d+)?x (?:faster|slower|less|more)\b"                  # 2x faster
    r"|benchmarks/results")
"""What a quoted measurement looks like."""

FACTS = {"7.8 s"}
"""Figures that are properties of a model, not measurements: the released HT Demucs' segment."""


def docstrings(tree: ast.Module) -> list[tuple[int, str]]:
    """Module, class and function docstrings, and attribute docstrings (a string literal right
    after an assignment), with their line numbers."""
    found = []
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for index, statement in enumerate(body):
            is_doc = (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
                      and isinstance(statement.value.value, str))
            if is_doc and (index == 0 or isinstance(body[index - 1], (ast.Assign, ast.AnnAssign))):
                found.append((statement.lineno, statement.value.value))
    return found


def quoted_figures(text: str) -> list[str]:
    return [match.group(0) for match in MEASURED.finditer(text) if match.group(0) not in FACTS]


def library_files() -> list[Path]:
    return sorted(path for package in LIBRARY for path in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", library_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_no_docstring_quotes_a_measurement(path):
    offending = [f"line {line}: {figure!r}"
                 for line, text in docstrings(ast.parse(path.read_text()))
                 for figure in quoted_figures(text)]
    assert not offending, (f"{path.relative_to(ROOT)} quotes measured figures in docstrings "
                           f"(move them to docs/decisions/): {offending}")


def test_the_check_finds_the_figures_it_was_written_for():
    tree = ast.parse('"""Measured: 0.87 s against 2.16 s, 1,865 MiB, 9 to 13 % less, 1.5x."""\n'
                     'LIMIT = 2\n"""At most 2 GiB, a 7.8 s segment (benchmarks/results/x.md)."""\n')
    found = [figure for _, text in docstrings(tree) for figure in quoted_figures(text)]
    assert found == ["0.87 s", "2.16 s", "1,865 MiB", "13 %", "1.5x", "benchmarks/results"]
