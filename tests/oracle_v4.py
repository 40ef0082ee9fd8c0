"""Runs the official demucs 4.0.1 (the oracle of the v3/v4 model tests) in a subprocess.

demucs 2.0.3 (the v2 oracle, installed in .venv) and 4.0.1 are the same package `demucs`,
so 4.0.1 is installed apart, in ``.oracle/demucs4`` (``.ci/oracle-v4.sh``), and runs in a
child Python whose ``PYTHONPATH`` starts with that folder.

:func:`run_oracle` runs any script there: tensors and values go in and out through
``torch.save`` files. :func:`official_forward` and friends build on it for model parity.
A missing oracle fails the tests when ``CI`` is set, and skips them otherwise.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ORACLE_DIR = REPO / ".oracle" / "demucs4"
INSTALL = ".ci/oracle-v4.sh"

_PRELUDE = '''
import sys
from pathlib import Path

import torch

import demucs

_HERE = Path(__file__).resolve().parent
if demucs.__version__ != "4.0.1" or not Path(demucs.__file__).resolve().is_relative_to(
        Path({oracle!r}).resolve()):
    sys.exit(f"oracle: wrong demucs {{demucs.__version__}} at {{demucs.__file__}}")
torch.set_num_threads({threads})
inputs = torch.load(_HERE / "oracle_inputs.pt", weights_only=False)
outputs = {{}}
'''

_EPILOGUE = '''
torch.save(outputs, _HERE / "oracle_outputs.pt")
'''


def oracle_available() -> bool:
    """Whether ``.ci/oracle-v4.sh`` has installed the oracle."""
    return (ORACLE_DIR / ".installed").is_file() and (ORACLE_DIR / "demucs").is_dir()


def require_installed(available: bool, message: str) -> None:
    """Fail (with ``CI`` set) or skip the calling test when an oracle is not installed."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_oracle() -> None:
    """Fail (with ``CI`` set) or skip the calling test when the oracle is not installed."""
    require_installed(oracle_available(), f"the demucs 4.0.1 oracle is not installed in "
                                          f"{ORACLE_DIR}: run {INSTALL}")


def run_script(prelude: str, script: str, oracle: Path, workdir: Path,
               inputs: Optional[dict] = None, timeout: float = 900, threads: int = 2) -> dict:
    """Run ``prelude`` (formatted with ``oracle`` and ``threads``, it loads ``inputs``) and
    ``script`` in a child Python whose ``PYTHONPATH`` starts with ``oracle``; return the
    ``outputs`` dict the script filled. Any oracle installed apart runs this way."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.save(inputs or {}, workdir / "oracle_inputs.pt")
    path = workdir / "oracle_script.py"
    path.write_text(prelude.format(oracle=str(oracle), threads=threads)
                    + textwrap.dedent(script) + _EPILOGUE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(oracle)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    done = subprocess.run([sys.executable, str(path)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"oracle script failed ({done.returncode}):\n{done.stderr[-6000:]}")
    return torch.load(workdir / "oracle_outputs.pt", weights_only=False)


def run_oracle(script: str, workdir: Path, inputs: Optional[dict] = None,
               timeout: float = 900, threads: int = 2) -> dict:
    """Run ``script`` with the official demucs 4.0.1 and return its ``outputs`` dict.

    The script sees ``inputs`` (the dict given here, through ``torch.save``: tensors,
    numbers, lists, ``Fraction`` ...) and fills ``outputs`` with what it returns; ``torch``
    and ``demucs`` (4.0.1) are imported. It runs in ``workdir``, a folder of the caller's
    (e.g. ``tmp_path``). Raises ``RuntimeError`` with the child's stderr if it fails.
    """
    require_oracle()
    return run_script(_PRELUDE, script, ORACLE_DIR, workdir, inputs, timeout, threads)


_CLASSES = {
    "HTDemucs": "demucs.htdemucs",
    "HDemucs": "demucs.hdemucs",
    "Demucs": "demucs.demucs",
}

_FORWARD = '''
import importlib
klass = getattr(importlib.import_module(inputs["module"]), inputs["klass"])
model = klass(**inputs["kwargs"])
outputs["keys"] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
model.load_state_dict(inputs["state"], strict=True)
model.eval()
with torch.no_grad():
    outputs["stems"] = [model(mix) for mix in inputs["mixes"]]
'''


def official_forward(workdir: Path, klass: str, kwargs: dict, state: dict,
                     mixes: list) -> dict:
    """Build the official ``klass`` (``HTDemucs``, ``HDemucs`` or ``Demucs``) with
    ``kwargs``, load ``state`` with ``strict=True`` and run it in eval mode on each mix.

    Returns ``{"keys": {state key: shape} of the freshly built official model,
    "stems": [output for each mix]}``.
    """
    inputs = dict(module=_CLASSES[klass], klass=klass, kwargs=kwargs, state=state,
                  mixes=list(mixes))
    return run_oracle(_FORWARD, workdir, inputs)


_SIGNATURES = '''
import importlib
import inspect
outputs["signatures"] = {}
for name, module in inputs["classes"].items():
    klass = getattr(importlib.import_module(module), name)
    outputs["signatures"][name] = [
        (p.name, p.kind.name, p.default) for p in inspect.signature(klass).parameters.values()]
'''


def official_signatures(workdir: Path) -> dict[str, list[tuple[str, str, Any]]]:
    """``{class name: [(name, kind, default) of each constructor parameter]}``."""
    return run_oracle(_SIGNATURES, workdir, {"classes": _CLASSES})["signatures"]
