#!/usr/bin/env bash
# Installs the official demucs 4.0.1 into .oracle/demucs4: the reference oracle of the
# v3/v4 model tests (tests/oracle_v4.py) only; stemserve never imports it.
#
# demucs 2.0.3 (the v2 oracle, installed in .venv) and 4.0.1 are both the package `demucs`,
# so 4.0.1 lives in its own folder that the tests put first on PYTHONPATH of a subprocess.
# --no-deps: only what demucs 4.0.1's model, apply and pretrained modules import, pinned;
# torch, julius, numpy and pyyaml come from .venv.
#
# torchaudio: openunmix and demucs.audio import it at import time (for audio I/O only), and
# no torchaudio wheel matches .venv's torch. The oracle gets a stub package `torchaudio`
# (in this folder only) whose every attribute raises: the tests do no audio I/O with it.
#
# Idempotent: does nothing when the folder holds this exact list. Usage: .ci/oracle-v4.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=.ci/oracle-lib.sh
source .ci/oracle-lib.sh

NAME=oracle-v4

PYTHON=${PYTHON:-.venv/bin/python}
TARGET=.oracle/demucs4
REQUIREMENTS=(
    demucs==4.0.1
    openunmix==1.2.1            # hdemucs/htdemucs: openunmix.filtering.wiener
    einops==0.8.1               # htdemucs, transformer
    dora-search==0.1.12         # states: dora.log
    treetable==0.2.5            # dora
    submitit==1.5.2             # dora
    cloudpickle==3.1.1          # submitit
    retrying==1.4.2             # dora (1.4 needs no six)
    omegaconf==2.3.0            # states, dora
    antlr4-python3-runtime==4.9.3  # omegaconf
    lameenc==1.9.0              # demucs.audio (MP3 encoding, imported at import time)
)
STUB_VERSION=1
WANT="${REQUIREMENTS[*]} torchaudio-stub-$STUB_VERSION"

if oracle_up_to_date; then
    exit 0
fi
oracle_install

mkdir -p "$work/torchaudio"
cat > "$work/torchaudio/__init__.py" <<'PY'
"""Stub of torchaudio for the demucs 4.0.1 oracle of stemserve's tests (.ci/oracle-v4.sh).

openunmix and demucs.audio import torchaudio at import time for audio I/O only, and no
torchaudio wheel matches the tests' torch. Every attribute access raises.
"""
__version__ = "0.0.0+stemserve.stub"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise AttributeError(f"torchaudio.{name}: stemserve's oracle has a torchaudio stub "
                         "without audio I/O")
PY

PYTHONPATH="$work" "$PYTHON" - <<'PY'
import demucs
import demucs.apply, demucs.audio, demucs.demucs, demucs.hdemucs, demucs.htdemucs, demucs.pretrained  # noqa
assert demucs.__version__ == "4.0.1", demucs.__version__
PY

oracle_finish "demucs 4.0.1"
