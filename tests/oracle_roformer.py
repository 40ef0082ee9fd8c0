"""Runs the RoFormer oracle in a subprocess: audio-separator 0.47.1's copy of MSST's
RoFormers and MSST's own ``demix`` (``tests/msst_demix.py``, copied at a pinned commit).

audio-separator is installed by ``.ci/oracle-roformer.sh`` in ``.oracle/roformer`` with
``--no-deps`` and runs in a child Python whose ``PYTHONPATH`` starts there (never on this
process's path, so it cannot shadow stemserve). Its RoFormer files are imported by path as
a package of their own: audio-separator's ``separator`` package imports onnxruntime and the
rest of its separators, which the oracle does not install. Its own separation (the MDXC
path: a Hamming window, no reflected borders) is not MSST's ``demix``, which the
checkpoints' configs were written for, so the reference separation is MSST's, fetched from
its repository at the commit named in ``msst_demix.py`` and run with audio-separator's
networks. ``ml_collections`` (a type hint there) is a small stand-in.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from oracle_v4 import require_installed, run_script

REPO = Path(__file__).resolve().parents[1]
ORACLE_DIR = REPO / ".oracle" / "roformer"
INSTALL = ".ci/oracle-roformer.sh"
TESTS = Path(__file__).resolve().parent


def oracle_available() -> bool:
    """Whether ``.ci/oracle-roformer.sh`` has installed the oracle."""
    return (ORACLE_DIR / ".installed").is_file() and (ORACLE_DIR / "audio_separator").is_dir()


def require_oracle() -> None:
    """Fail (with ``CI`` set) or skip the calling test when the oracle is not installed."""
    require_installed(oracle_available(), f"the audio-separator 0.47.1 RoFormer oracle is not "
                                          f"installed in {ORACLE_DIR}: run {INSTALL}")


_PRELUDE = '''
import importlib
import importlib.metadata
import sys
import types
from pathlib import Path

import torch

ORACLE = Path({oracle!r}).resolve()
if importlib.metadata.version("audio-separator") != "0.47.1":
    sys.exit("oracle: wrong audio-separator " + importlib.metadata.version("audio-separator"))
# audio_separator's and its separator package's __init__ import every separator and its
# dependencies, which the oracle does not install: the parent packages are registered
# without running them, and the RoFormer modules import under their own names.
for _name in ("audio_separator", "audio_separator.separator",
              "audio_separator.separator.uvr_lib_v5"):
    _package = types.ModuleType(_name)
    _package.__path__ = [str(ORACLE.joinpath(*_name.split(".")))]
    sys.modules[_name] = _package
bs_roformer = importlib.import_module("audio_separator.separator.uvr_lib_v5.roformer.bs_roformer")
mel_band_roformer = importlib.import_module(
    "audio_separator.separator.uvr_lib_v5.roformer.mel_band_roformer")
for _module in (bs_roformer, mel_band_roformer):
    assert Path(_module.__file__).resolve().is_relative_to(ORACLE), _module.__file__
# MSST's demix, beside these tests; ml_collections only names its config's type there.
sys.path.insert(0, {tests!r})
_collections = types.ModuleType("ml_collections")


class ConfigDict(dict):
    """Attribute access over a dict, as ml_collections' ConfigDict reads a config."""

    def __init__(self, data):
        super().__init__({{key: ConfigDict(value) if isinstance(value, dict) else value
                          for key, value in data.items()}})

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


_collections.ConfigDict = ConfigDict
sys.modules["ml_collections"] = _collections
torch.set_num_threads({threads})
_HERE = Path(__file__).resolve().parent
inputs = torch.load(_HERE / "oracle_inputs.pt", weights_only=False)
outputs = {{}}
'''

def run_oracle(script: str, workdir: Path, inputs: Optional[dict] = None,
               timeout: float = 900, threads: int = 2) -> dict:
    """Run ``script`` with the reference RoFormers and return its ``outputs`` dict.

    The script sees ``inputs`` (through ``torch.save``), the modules ``bs_roformer`` and
    ``mel_band_roformer`` (audio-separator 0.47.1's), ``ConfigDict`` and ``torch``, and can
    ``import msst_demix``; it fills ``outputs``.
    """
    require_oracle()
    return run_script(_PRELUDE.replace("{tests!r}", repr(str(TESTS))), script, ORACLE_DIR,
                      workdir, inputs, timeout, threads)
