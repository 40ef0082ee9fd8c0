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

:func:`reference_modules` and :func:`msst_reference` run in the child (the tests' scripts,
and the benchmarks' reference runs, ``benchmarks/tracks/runs.py``).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import sys
import types
from pathlib import Path
from typing import Callable, Optional

import numpy as np

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


class ConfigDict(dict):
    """Attribute access over a dict, as ml_collections' ConfigDict reads a config."""

    def __init__(self, data: dict):
        super().__init__({key: ConfigDict(value) if isinstance(value, dict) else value
                          for key, value in data.items()})

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def reference_modules(oracle: Path = ORACLE_DIR) -> tuple[types.ModuleType, types.ModuleType]:
    """In a child process whose ``PYTHONPATH`` starts with ``oracle``: audio-separator
    0.47.1's ``bs_roformer`` and ``mel_band_roformer`` modules, and ``msst_demix`` made
    importable (its ``ml_collections`` only names a type: a stand-in is registered).

    audio_separator's and its separator package's ``__init__`` import every separator and
    its dependencies, which the oracle does not install: the parent packages are registered
    without running them, and the RoFormer modules import under their own names.
    """
    oracle = Path(oracle).resolve()
    if importlib.metadata.version("audio-separator") != "0.47.1":
        sys.exit("oracle: wrong audio-separator " + importlib.metadata.version("audio-separator"))
    for name in ("audio_separator", "audio_separator.separator",
                 "audio_separator.separator.uvr_lib_v5"):
        package = types.ModuleType(name)
        package.__path__ = [str(oracle.joinpath(*name.split(".")))]
        sys.modules[name] = package
    modules = tuple(importlib.import_module(f"audio_separator.separator.uvr_lib_v5.roformer.{name}")
                    for name in ("bs_roformer", "mel_band_roformer"))
    for module in modules:
        assert Path(module.__file__).resolve().is_relative_to(oracle), module.__file__
    collections = types.ModuleType("ml_collections")
    collections.ConfigDict = ConfigDict
    sys.modules["ml_collections"] = collections
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    return modules


def msst_reference(family: str, config: dict, state: dict, chunk_size: int,
                   num_overlap: int) -> Callable[[np.ndarray], list[np.ndarray]]:
    """The reference separation of a single-target (``vocals``) RoFormer, in the oracle's
    child: audio-separator's network built from ``config`` holding ``state``, MSST's
    ``demix`` with a batch of one, and the instrumental as the mix minus the vocals (MSST's
    ``--extract_instrumental``). Returns mix [2, n] -> [vocals, instrumental]."""
    import torch

    bs_roformer, mel_band_roformer = reference_modules()
    import msst_demix

    klass = (bs_roformer.BSRoformer if family == "bs_roformer"
             else mel_band_roformer.MelBandRoformer)
    model = klass(**config)
    model.load_state_dict(state, strict=True)
    model.eval()
    settings = ConfigDict(dict(audio=dict(chunk_size=chunk_size),
                               inference=dict(num_overlap=num_overlap, batch_size=1),
                               training=dict(target_instrument="vocals", use_amp=False,
                                             instruments=["vocals", "other"])))

    def separate(mix: np.ndarray) -> list[np.ndarray]:
        vocals = msst_demix.demix(settings, model, mix, torch.device("cpu"), family)["vocals"]
        return [vocals, mix - vocals]

    return separate


_PRELUDE = '''
import sys
from pathlib import Path

import torch

sys.path.insert(0, {tests!r})
from oracle_roformer import ConfigDict, reference_modules

bs_roformer, mel_band_roformer = reference_modules(Path({oracle!r}))
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
