#!/usr/bin/env bash
# Installs audio-separator 0.47.1 into .oracle/roformer: the reference of the band-split
# RoFormer tests (tests/test_roformer.py) only; stemserve never imports it.
#
# audio-separator vendors MSST's BS-RoFormer and Mel-Band RoFormer as
# audio_separator/separator/uvr_lib_v5/roformer/ (with device_utils.py beside it). The
# package's __init__ imports its Separator and every separator's dependencies (onnxruntime,
# onnx2torch, pydub, requests ...): the tests, in a child Python whose PYTHONPATH starts with
# this folder, register the three parent packages without running their __init__ and import
# the RoFormer modules under their own names. --no-deps: only what those files import,
# pinned, at the versions audio-separator 0.47.1 asks for; torch, numpy, scipy, soxr,
# soundfile, requests, typing_extensions and packaging come from .venv.
#
# librosa: mel_band_roformer imports `librosa.filters` for its mel filterbank, which imports
# numba (a compiler with LLVM, for functions the filterbank never calls). The oracle gets a
# stub package `numba` (in this folder only) whose decorators return the function unchanged
# and whose other attributes raise; librosa's other imports are installed.
#
# Idempotent: does nothing when the folder holds this exact list. Usage: .ci/oracle-roformer.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=.ci/oracle-lib.sh
source .ci/oracle-lib.sh

NAME=oracle-roformer

PYTHON=${PYTHON:-.venv/bin/python}
TARGET=.oracle/roformer
REQUIREMENTS=(
    audio-separator==0.47.1
    einops==0.8.1                   # bs_roformer, mel_band_roformer, attend
    beartype==0.18.5                # bs_roformer, mel_band_roformer
    rotary-embedding-torch==0.6.5   # bs_roformer, mel_band_roformer
    librosa==0.11.0                 # mel_band_roformer: librosa.filters.mel
    lazy_loader==0.4                # librosa
    joblib==1.5.1                   # librosa._cache
    decorator==5.2.1                # librosa._cache
    msgpack==1.1.0                  # librosa.core.intervals
    pooch==1.8.2                    # librosa.util.files
    platformdirs==4.3.8             # pooch
)
STUB_VERSION=1
WANT="${REQUIREMENTS[*]} numba-stub-$STUB_VERSION"

if oracle_up_to_date; then
    exit 0
fi
oracle_install

mkdir -p "$work/numba"
cat > "$work/numba/__init__.py" <<'PY'
"""Stub of numba for the RoFormer oracle of stemserve's tests (.ci/oracle-roformer.sh).

librosa decorates functions with numba at import time; the mel filterbank, all the oracle
uses of librosa, calls none of them. The decorators return the function unchanged; every
other attribute raises.
"""
__version__ = "0.0.0+stemserve.stub"


def _decorator(*args, **kwargs):
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return lambda function: function


jit = njit = vectorize = guvectorize = stencil = generated_jit = _decorator


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise AttributeError(f"numba.{name}: stemserve's oracle has a numba stub")
PY

PYTHONPATH="$work" PYTHONWARNINGS=ignore::FutureWarning "$PYTHON" - "$work" <<'PY'
import importlib
import importlib.metadata
import sys
import types
from pathlib import Path

assert importlib.metadata.version("audio-separator") == "0.47.1"
folder = Path(sys.argv[1]).resolve()
for name in ("audio_separator", "audio_separator.separator", "audio_separator.separator.uvr_lib_v5"):
    package = types.ModuleType(name)
    package.__path__ = [str(folder.joinpath(*name.split(".")))]
    sys.modules[name] = package
importlib.import_module("audio_separator.separator.uvr_lib_v5.roformer.bs_roformer").BSRoformer
importlib.import_module("audio_separator.separator.uvr_lib_v5.roformer.mel_band_roformer").MelBandRoformer
from librosa import filters
assert filters.mel(sr=44100, n_fft=2048, n_mels=60).shape == (60, 1025)
PY

oracle_finish "audio-separator 0.47.1"
