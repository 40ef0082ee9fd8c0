"""Writes the fast lane's pipeline fixtures with the official demucs code.

Regenerate them (from the repository root; the output is deterministic on one machine):

    .venv/bin/python tests/make_pipeline_fixtures.py

It needs demucs 2.0.3 in .venv and demucs 4.0.1 in .oracle/demucs4 (``.ci/oracle-v4.sh``),
the oracles of ``tests/oracle_v2.py`` and ``tests/oracle_v4.py``, and writes:

- ``tests/fixtures/pipeline_v2.pt``: a tiny random-weight Demucs v2 (demucs 2.0.3's class,
  4 sources, 8 kHz, 1 s segments), the mix, the options (overlap 0.5, shifts 2, a seed)
  and demucs 2.0.3's stems: its ``separate.py`` normalisation and
  ``apply_model(split=True)`` after ``random.seed(seed)``, as ``test_pipeline_oracle.py``'s
  ``run_oracle`` does;
- ``tests/fixtures/pipeline_v4.pt``: a demucs-4 bag of two tiny random-weight models (an
  HT Demucs and a v3 waveform Demucs, built by demucs 4.0.1's own classes in its subprocess
  oracle) with a weight matrix of unequal rows and a segment override, the same mix, the
  options (overlap 0.25, shifts 2, transition power 2, a seed) and demucs 4.0.1's stems:
  ``apply_model`` on the ``BagOfModels``, as ``test_pipeline_v4.py`` does.

Each file is a ``torch.save`` dict that ``torch.load(weights_only=True)`` reads: ``models``
(``family``, constructor ``kwargs`` as JSON with a v4 segment as a fraction string, and
``state``: its keys, shapes and values in one vector), ``weights``, ``segment``,
``sources``, ``rate``, ``mix``, ``options`` and ``expected`` [sources, 2, time] float32.
Weights and the mix are stored as float16 holding values that float16 represents exactly
(the models were built with them rounded so), which halves the files; the stems are
float32. The mix is 1 s plus 7 samples at 8 kHz, cut in 1 s segments: v2's start every
4000 samples (the last has 7), a demucs 4 pass (the track and up to 0.5 s of shift) has
two or three starting every 6000. Both files together are ~0.8 MB.

``tests/test_pipeline_fixture.py`` separates the mix with stemserve's own networks
(``TorchBackend``, ``BagBackend``) on these weights and compares. The expected stems come
from demucs alone, so a change of stemserve never calls for new fixtures; a change here
does, and then the figures measured in ``test_pipeline_fixture.py`` (its bound) and
``test_mutations.py`` are measured again (``STEMSERVE_ERRORS_LOG``, ``tests/tolerance.py``).
"""
from __future__ import annotations

import json
import random
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from oracle_v4 import run_oracle  # noqa: E402

OUT = HERE / "fixtures"
RATE = 8000
LENGTH = RATE + 7
SOURCES = ["drums", "bass", "other", "vocals"]
SEED = 20240613

V2_KWARGS = dict(sources=SOURCES, audio_channels=2, channels=4, depth=4, lstm_layers=1,
                 samplerate=RATE, segment_length=RATE)
V2_OPTIONS = dict(overlap=0.5, shifts=2, seed=SEED, transition_power=1.0)

# Small configurations of the released classes' defaults (stemserve.models.configs), at
# 8 kHz with 1 s segments (the v3 model's own 2 s are overridden by the bag's 1 s).
HT_KWARGS = dict(sources=SOURCES, audio_channels=2, samplerate=RATE, segment="1", channels=4,
                 nfft=1024, depth=3, bottom_channels=0, t_layers=1, t_heads=4, dconv_comp=4,
                 dconv_mode=3)
# normalize=False (mdx's waveform members): a network that normalises its own input (the HT
# Demucs does) hides most of a wrong normalisation of the mix.
V3_KWARGS = dict(sources=SOURCES, audio_channels=2, samplerate=RATE, segment="2", channels=4,
                 depth=4, lstm_layers=0, dconv_comp=2, dconv_mode=1, gelu=True, glu=True,
                 norm_starts=4, norm_groups=4, resample=True, normalize=False)
V4_MEMBERS = [("htdemucs", "demucs.htdemucs", "HTDemucs", HT_KWARGS),
              ("demucs_v3", "demucs.demucs", "Demucs", V3_KWARGS)]
V4_WEIGHTS = [[1.0, 0.25, 0.0, 2.0], [0.5, 1.0, 1.0, 1.0]]
V4_SEGMENT = "1"
V4_OPTIONS = dict(overlap=0.25, shifts=2, seed=SEED, transition_power=2.0)


def make_mix() -> np.ndarray:
    """Stereo noise plus tones with a DC offset (mean and std both matter), rounded to
    float16 values."""
    rng = np.random.default_rng(7)
    t = np.arange(LENGTH) / RATE
    tones = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 1500 * t)
    mix = 0.2 * rng.standard_normal((2, LENGTH)) + tones + 0.05
    return mix.astype(np.float16).astype(np.float32)


def half_exact(state: dict) -> dict:
    """The state with float tensors rounded to float16 values (kept as float32)."""
    return {key: value.half().float() if value.is_floating_point() else value
            for key, value in state.items()}


def stored(state: dict) -> dict:
    """The state as one float16 vector with its keys and shapes: a zip entry per tensor
    would add ~0.2 kB each to the file (an HT Demucs has ~300)."""
    assert all(value.is_floating_point() for value in state.values())
    return dict(keys=list(state), shapes=[list(value.shape) for value in state.values()],
                values=torch.cat([value.reshape(-1) for value in state.values()]).half())


def make_v2(mix: np.ndarray) -> dict:
    from demucs import __version__
    from demucs.audio import convert_audio_channels
    from demucs.model import Demucs
    from demucs.utils import apply_model

    assert __version__ == "2.0.3", f"the v2 oracle is demucs {__version__}, not 2.0.3"
    torch.manual_seed(SEED)
    model = Demucs(**V2_KWARGS).eval()
    state = half_exact(model.state_dict())
    model.load_state_dict(state, strict=True)
    # demucs/separate.py, from the channel conversion to the de-normalisation
    wav = convert_audio_channels(torch.from_numpy(mix), model.audio_channels)
    ref = wav.mean(0)
    wav = (wav - ref.mean()) / ref.std()
    random.seed(V2_OPTIONS["seed"])
    with torch.no_grad():
        sources = apply_model(model, wav, shifts=V2_OPTIONS["shifts"], split=True,
                              overlap=V2_OPTIONS["overlap"],
                              transition_power=V2_OPTIONS["transition_power"])
    expected = sources * ref.std() + ref.mean()
    return dict(oracle="demucs 2.0.3", rate=RATE, sources=SOURCES,
                models=[dict(family="demucs", kwargs=json.dumps(V2_KWARGS),
                             state=stored(state))],
                weights=None, segment=None, options=V2_OPTIONS,
                mix=torch.from_numpy(mix).half(), expected=expected.float().contiguous())


_V4 = '''
import importlib
import json
import random
from fractions import Fraction
from demucs.apply import BagOfModels, apply_model
from demucs.audio import convert_audio_channels

models, states = [], []
for index, (module, klass, kwargs) in enumerate(inputs["members"]):
    kwargs = dict(json.loads(kwargs), segment=Fraction(json.loads(kwargs)["segment"]))
    torch.manual_seed(index)
    model = getattr(importlib.import_module(module), klass)(**kwargs)
    # test_models_v4's random_state: every float perturbed by half its std (0.05 for
    # constants), so that LayerScales and norms matter; then rounded to float16 values.
    generator = torch.Generator().manual_seed(100 + index)
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            scale = 0.5 * value.std().item() if value.numel() > 1 else 0.05
            value = value + torch.randn(value.shape, generator=generator) * scale
            value = value.half().float()
        state[key] = value
    model.load_state_dict(state, strict=True)
    models.append(model.eval())
    states.append(state)
bag = BagOfModels(models, inputs["weights"], Fraction(inputs["segment"]))
options = inputs["options"]
# demucs/separate.py, from the channel conversion to the de-normalisation
wav = convert_audio_channels(inputs["mix"], bag.audio_channels)
ref = wav.mean(0)
wav = (wav - ref.mean()) / ref.std()
random.seed(options["seed"])
with torch.no_grad():
    sources = apply_model(bag, wav[None], shifts=options["shifts"], split=True,
                          overlap=options["overlap"],
                          transition_power=options["transition_power"])[0]
outputs["expected"] = sources * ref.std() + ref.mean()
outputs["states"] = states
'''


def make_v4(mix: np.ndarray) -> dict:
    members = [(module, klass, json.dumps(kwargs)) for _, module, klass, kwargs in V4_MEMBERS]
    with tempfile.TemporaryDirectory() as work:
        result = run_oracle(_V4, Path(work), dict(members=members, weights=V4_WEIGHTS,
                                                  segment=V4_SEGMENT, options=V4_OPTIONS,
                                                  mix=torch.from_numpy(mix)))
    models = [dict(family=family, kwargs=json.dumps(kwargs), state=stored(state))
              for (family, _, _, kwargs), state in zip(V4_MEMBERS, result["states"])]
    return dict(oracle="demucs 4.0.1", rate=RATE, sources=SOURCES, models=models,
                weights=V4_WEIGHTS, segment=V4_SEGMENT, options=V4_OPTIONS,
                mix=torch.from_numpy(mix).half(),
                expected=result["expected"].float().contiguous())


def main() -> None:
    OUT.mkdir(exist_ok=True)
    mix = make_mix()
    torch.set_num_threads(2)
    for name, make in (("v2", make_v2), ("v4", make_v4)):
        path = OUT / f"pipeline_{name}.pt"
        fixture = make(mix)
        torch.save(fixture, path)
        peak = fixture["expected"].abs().max().item()
        print(f"{path.relative_to(HERE.parent)}: {path.stat().st_size / 1e3:.0f} kB, "
              f"stems {tuple(fixture['expected'].shape)} peaking at {peak:.3g}")


if __name__ == "__main__":
    main()
