"""The package as pip builds it: no warnings at install, every data file shipped; its
requirements are ranges that the CI lock satisfies; the bare client installs alone."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from test_layers import FOLDERS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_builds_without_warnings_and_ships_its_data(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in (done.stdout + done.stderr).splitlines()
                if "warning" in line.lower() and "Location 'file:" not in line]
    assert not warnings, "\n".join(warnings)
    (wheel,) = tmp_path.glob("stemserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for data in ("stemserve/model_repository/cpu/demucs/config.pbtxt",
                 "stemserve/model_repository/cpu/demucs/1/model.py",
                 "stemserve/model_repository/gpu/demucs/config.pbtxt",
                 "stemserve/model_repository/gpu-trt/demucs/config.pbtxt",
                 "stemserve/model_repository/separate/config.pbtxt",
                 "stemserve/model_repository/separate/1/model.py",
                 "stemserve/web/static/index.html"):
        assert data in names, data
    assert not any(name.startswith(("client/", "export/", "tests/")) for name in names)
    # Every module of the source tree is in it (pyproject lists packages one by one).
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            if "__pycache__" not in path.parts:
                shipped = "/".join([*package.split("."), *path.relative_to(folder).parts])
                assert shipped in names, f"{path.relative_to(ROOT)} is not in the wheel"


CONSTRAINTS = ROOT / ".ci" / "constraints.txt"


def _requirements() -> list[str]:
    """Every requirement of pyproject.toml's [project]: dependencies and all extras."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"],
            *(req for reqs in project["optional-dependencies"].values() for req in reqs)]


def _lock() -> dict[str, Version]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{CONSTRAINTS.name}: not an exact pin: {line}"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_requirements_are_tested_ranges_that_the_lock_satisfies():
    """pyproject states ranges (a lower and an upper end each), never pins; the CI lock
    pins every one of them to a version inside its range."""
    lock = _lock()
    for text in _requirements():
        req = Requirement(text)
        if canonicalize_name(req.name) == "stemserve":  # all/dev name other extras
            continue
        operators = {spec.operator for spec in req.specifier}
        assert operators & {">=", ">"} and operators & {"<", "<="} and "==" not in operators, \
            f"{text}: give a tested range (>=lower,<upper), not a pin or an open end"
        name = canonicalize_name(req.name)
        if name == "onnxruntime-gpu":  # the gpu extra is not in the dev environment
            continue
        assert name in lock, f"{text} is not in {CONSTRAINTS.name}"
        assert req.specifier.contains(lock[name], prereleases=True), \
            f"{CONSTRAINTS.name} pins {name}=={lock[name]}, outside {text}"
    assert "demucs" not in lock and "stemserve" not in lock


@pytest.mark.slow
def test_bare_client_installs_in_a_fresh_venv_and_runs_without_torch(tmp_path):
    """`pip install stemserve` (no extras) into a new venv: the client imports without torch
    and the console script answers. About 15 s here (10 s of it pip), also with a cold pip
    cache; deselect it with `-m "not slow"`."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python, script = venv / "bin" / "python", venv / "bin" / "stemserve"
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        # Outside the source tree, so its stemserve/ folder cannot shadow the installed one.
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              cwd=tmp_path, env=env)

    start = time.perf_counter()
    done = run(str(python), "-m", "pip", "install", "--quiet", "-c", str(CONSTRAINTS),
               str(ROOT), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    print(f"bare client installed in {time.perf_counter() - start:.1f} s")

    done = run(str(python), "-c", "import importlib.util, sys, stemserve.client; "
                                  "assert 'torch' not in sys.modules, 'torch imported'; "
                                  "assert importlib.util.find_spec('torch') is None, "
                                  "'torch installed'")
    assert done.returncode == 0, done.stderr
    done = run(str(script), "--version")
    assert done.returncode == 0 and done.stdout.startswith("stemserve "), done.stderr
    done = run(str(script), "separate", "--help")
    assert done.returncode == 0 and "usage: stemserve separate" in done.stdout, done.stderr
