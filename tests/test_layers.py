"""Imports only run downward: defaults, core, models, backends, serving, front ends.

Every import in the package, at module level or inside a function, is checked against the
layer table of ``../shared/notes/architecture.md`` (and of docs/architecture.md): a module may import its own layer and the ones below, never one above. The Triton
repository's python model templates (``model_repository/cpu/demucs/1/model.py``), loaded by
Triton by path rather than imported as modules, are checked too: they run in the server, so
they import the serving layer and below, and nothing of the client.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each import name lives in the source tree (the package-dir mapping of pyproject).
FOLDERS = {"stemserve.client": ROOT / "client", "stemserve.export": ROOT / "export",
           "stemserve.model_repository": ROOT / "model_repository", "stemserve": ROOT / "stemserve"}
LAYERS = [  # bottom to top; a module is in the first layer one of whose prefixes it has
    ("defaults", ["stemserve.defaults"]),
    ("core", ["stemserve.errors", "stemserve.untrusted", "stemserve.files", "stemserve.releases",
              "stemserve.cpu", "stemserve.precision", "stemserve.connection", "stemserve.spec",
              "stemserve.audio", "stemserve.pipes", "stemserve.pipeline"]),
    ("models", ["stemserve.model", "stemserve.models", "stemserve.checkpoints",
                "stemserve.export", "stemserve.runtime"]),
    ("backends", ["stemserve.client.backends", "stemserve.client.models"]),
    ("serving", ["stemserve.model_repository"]),
    ("front ends", ["stemserve.client", "stemserve.cli", "stemserve.web", "stemserve.__main__"]),
]


def layer_of(module: str) -> int:
    if module == "stemserve":  # the package's own __init__: a docstring and __version__
        return 0
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer: add it to the table")


def _sources() -> tuple[dict[str, Path], dict[str, Path]]:
    """Every stemserve module by import name, and every file of the source tree that is no
    module (a path part is not an identifier: a repository template such as
    ``cpu/demucs/1/model.py``) by a dotted name under its package."""
    found: dict[str, Path] = {}
    data: dict[str, Path] = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder).with_suffix("")
            parts = [part for part in relative.parts if part != "__init__"]
            name = ".".join([package, *parts])
            if any(not part.isidentifier() for part in parts):
                data.setdefault(name, path)  # a repository template is data, not a module
            else:
                found.setdefault(name, path)
    return found, data


def modules() -> dict[str, Path]:
    """Every stemserve module by import name, from the source tree."""
    return _sources()[0]


def templates() -> dict[str, Path]:
    """The Triton repository's python model templates (``model.py`` files Triton's python
    backend loads by path), by a dotted name under ``stemserve.model_repository``."""
    return {name: path for name, path in _sources()[1].items()
            if name.startswith("stemserve.model_repository.")}


def imports(path: Path, module: str) -> set[str]:
    """The stemserve modules ``path`` imports, anywhere in it."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names.add(base)
    return {name for name in names if name == "stemserve" or name.startswith("stemserve.")}


ALL = modules()
TEMPLATES = templates()
SERVING = [name for name, _ in LAYERS].index("serving")


@pytest.mark.parametrize("module", sorted(ALL))
def test_imports_only_run_downward(module):
    mine = layer_of(module)
    upward = {name: LAYERS[layer_of(name)][0] for name in imports(ALL[module], module)
              if name != "stemserve" and layer_of(name) > mine}
    assert not upward, f"{module} ({LAYERS[mine][0]}) imports from above: {upward}"


def test_the_table_covers_every_module():
    for module in ALL:
        layer_of(module)


def test_the_repository_templates_are_found():
    # A template moved or renamed must not leave the check below with nothing to check.
    assert "stemserve.model_repository.cpu.demucs.1.model" in TEMPLATES


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_repository_templates_import_only_serving_and_below(template):
    """A python model runs inside tritonserver: the serving layer and below, no client."""
    names = imports(TEMPLATES[template], template)
    upward = {name: LAYERS[layer_of(name)][0] for name in names
              if name != "stemserve" and layer_of(name) > SERVING}
    assert not upward, f"{template} (serving) imports from above: {upward}"
    client = sorted(name for name in names
                    if name == "stemserve.client" or name.startswith("stemserve.client."))
    assert not client, f"{template} imports the client: {client}"
