"""Issues 13 and 14: a quality meter for the fast paths. SDR of fp32, bf16, fp16 and int8
separations.

    python -m benchmarks.quality                       # v2 and HT Demucs, ~4 min training each
    python -m benchmarks.quality --train-minutes 8 --mixes 10
    python -m benchmarks.quality --quick               # tiny models, 3 steps: checks that it runs

Random weights cannot show whether int8 or fp16 hurts separation, and real stems (MUSDB18)
cannot be downloaded everywhere, so this script makes its own music: seeded synthetic stems
for ``drums`` (kicks as decaying low sine sweeps, snares and hats as filtered noise bursts
with exponential decay, on a tempo grid), ``bass`` (low notes with a few harmonics),
``other`` (detuned pad chords with slow attacks) and ``vocals`` (a glottal pulse train with
vibrato through four formant resonators, changing vowels and pitches, phrases with gaps).
Tempo, key, gains and panning are drawn per song. The training songs and the held-out test
mixes come from different seeds.

A small Demucs v2 and a small HT Demucs are trained on random remixes of the training stems
(Adam, L1 loss) for ``--train-minutes`` each, and cached in ``--work-dir`` keyed by their
configuration, the seed, the budget and the code that makes the data and trains them, so a
rerun reuses them. Each is then exported by stemserve's own :func:`export_onnx` (fp32 and
fp16 graphs) and :func:`quantize_int8` (with and without ``reduce_range``), and the held-out
mixes are separated through stemserve's pipeline (:func:`stemserve.client.separate_array`)
with every backend: PyTorch fp32 and bf16 autocast (with its oneDNN kernels and without:
their bf16 convolution is wrong for some shapes on the development VM's CPU), ONNX Runtime
fp32, fp16 and int8, and OpenVINO bf16 (the ``--bf16`` fast path: the fp32 graph with bf16
arithmetic; measured where the CPU has bf16 instructions).

The measure is the BSS Eval SDR (``fast_bss_eval.sdr``, 512-tap distortion filter, float64),
per source and channel over the whole clip, averaged over channels and mixes. Each path's SDR
is compared with ONNX Runtime fp32 (the served graph); the issue's target is int8 within
0.2 dB of it. The mixture itself as the estimate is the baseline that shows what the models
learned.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import json
import time
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import signal

from stemserve.defaults import SOURCES

from .machine import describe, machine_name, now, usable_cpus
from .results import add_output_arguments, new_section, save_section

SCRIPT = "quality"
TITLE = "Separation quality of the fast paths: SDR on synthetic stems (issue 14)"
SAMPLE_RATE = 44100
WORK_DIR = Path(__file__).resolve().parent / ".cache" / "quality"
TARGET_DB = 0.2
"""Issue 14's target: int8 separates within this many dB of SDR of fp32."""
TEST_SEED_OFFSET = 10_000
"""Test songs are drawn from ``seed + TEST_SEED_OFFSET``: never a training song."""
FILTER_LENGTH = 512
"""BSS Eval's distortion filter (taps), as bss_eval and museval use."""

# Scales (semitones above the root) and vowel formants (Hz, bandwidth Hz, gain).
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
VOWELS = {
    "a": ((800, 80, 1.0), (1150, 90, 0.5), (2900, 120, 0.25), (3900, 130, 0.1)),
    "e": ((400, 70, 1.0), (2000, 100, 0.35), (2800, 120, 0.25), (3600, 130, 0.1)),
    "i": ((280, 60, 1.0), (2250, 100, 0.3), (2900, 120, 0.3), (3800, 130, 0.1)),
    "o": ((450, 70, 1.0), (800, 80, 0.6), (2830, 100, 0.1), (3500, 130, 0.05)),
    "u": ((325, 60, 1.0), (700, 70, 0.4), (2530, 100, 0.08), (3500, 130, 0.04)),
}


# ---------------------------------------------------------------------------------------------
# Synthetic stems

def _hz(midi: np.ndarray | float) -> np.ndarray | float:
    return 440.0 * 2.0 ** ((np.asarray(midi) - 69) / 12)


def _pan(mono: np.ndarray, pan: float) -> np.ndarray:
    """Constant-power panning of ``mono`` to stereo; ``pan`` in [-1, 1] (left to right)."""
    angle = (pan + 1) * np.pi / 4
    return np.stack([np.cos(angle) * mono, np.sin(angle) * mono])


def _add(out: np.ndarray, event: np.ndarray, start: int) -> None:
    """Add ``event`` into ``out`` at sample ``start``, cut at the end of ``out``."""
    if start >= out.shape[-1]:
        return
    stop = min(out.shape[-1], start + event.shape[-1])
    out[..., start:stop] += event[..., :stop - start]


def _adsr(n: int, attack_s: float, release_s: float, sustain: float = 1.0,
          decay_s: float = 0.1) -> np.ndarray:
    """Attack, decay to ``sustain``, and a release over the last ``release_s`` of ``n``."""
    t = np.arange(n) / SAMPLE_RATE
    env = np.minimum(1.0, t / max(attack_s, 1e-4))
    env *= sustain + (1 - sustain) * np.exp(-np.maximum(t - attack_s, 0) / decay_s)
    release = min(n, max(1, int(release_s * SAMPLE_RATE)))
    env[n - release:] *= np.linspace(1, 0, release)
    return env


def _harmonics(phase: np.ndarray, amplitudes: np.ndarray, f0_max: float) -> np.ndarray:
    """Sum of ``sin(k phase)`` weighted by ``amplitudes[k-1]``, below Nyquist only."""
    out = np.zeros_like(phase)
    for k, amplitude in enumerate(amplitudes, start=1):
        if k * f0_max >= 0.45 * SAMPLE_RATE:
            break
        out += amplitude * np.sin(k * phase)
    return out


def drums(rng: np.random.Generator, n: int, beat: int) -> np.ndarray:
    """Kicks (sine sweeps down to ~50 Hz), snares (band-passed noise and a tone burst) and
    hats (high-passed noise), each with an exponential decay, on a 16th-note grid."""
    t = np.arange(int(0.4 * SAMPLE_RATE)) / SAMPLE_RATE
    f_start, f_end = rng.uniform(110, 180), rng.uniform(42, 60)
    sweep = f_end + (f_start - f_end) * np.exp(-t / rng.uniform(0.025, 0.06))
    kick = np.sin(2 * np.pi * np.cumsum(sweep) / SAMPLE_RATE) * np.exp(-t / rng.uniform(0.1, 0.2))
    snare_band = signal.butter(2, [rng.uniform(1200, 2000), rng.uniform(5000, 8000)], "bandpass",
                               fs=SAMPLE_RATE, output="sos")
    snare = (signal.sosfilt(snare_band, rng.standard_normal(t.size))
             * np.exp(-t / rng.uniform(0.05, 0.12))
             + 0.5 * np.sin(2 * np.pi * rng.uniform(170, 230) * t) * np.exp(-t / 0.04))
    hat_band = signal.butter(4, rng.uniform(6000, 9000), "highpass", fs=SAMPLE_RATE,
                             output="sos")
    hat_noise = signal.sosfilt(hat_band, rng.standard_normal(t.size))
    hat = hat_noise * np.exp(-t / rng.uniform(0.015, 0.04))
    open_hat = hat_noise * np.exp(-t / rng.uniform(0.1, 0.2))
    parts = {name: _pan(sound / np.abs(sound).max(), pan) for name, sound, pan in (
        ("kick", kick, rng.uniform(-0.1, 0.1)), ("snare", snare, rng.uniform(-0.3, 0.3)),
        ("hat", hat, rng.uniform(-0.6, 0.6)), ("open", open_hat, rng.uniform(-0.6, 0.6)))}
    step, sixteenths = beat // 4, rng.random() < 0.5
    out = np.zeros((2, n))
    for index in range(n // step + 1):
        position, start = index % 16, index * step
        if position in (0, 8) or (position in (6, 10, 14) and rng.random() < 0.3):
            _add(out, rng.uniform(0.8, 1.0) * parts["kick"], start)
        if position in (4, 12) or (position == 15 and rng.random() < 0.15):
            _add(out, rng.uniform(0.6, 0.9) * parts["snare"], start)
        if sixteenths or position % 2 == 0:
            name = "open" if position == 14 and rng.random() < 0.3 else "hat"
            _add(out, rng.uniform(0.15, 0.35) * parts[name], start)
    return out


def _chords(rng: np.random.Generator, root: int, scale: tuple[int, ...], bars: int
            ) -> list[tuple[int, ...]]:
    """One triad of the scale per bar, as MIDI notes of the scale degree (root position)."""
    degrees = rng.choice([0, 3, 4, 5, 1, 2], size=bars, p=[0.3, 0.2, 0.2, 0.2, 0.05, 0.05])
    chords = []
    for degree in degrees:
        notes = [root + 12 * ((degree + k) // 7) + scale[(degree + k) % 7] for k in (0, 2, 4)]
        chords.append(tuple(notes))
    return chords


def bass(rng: np.random.Generator, n: int, beat: int, chords: list[tuple[int, ...]]
         ) -> np.ndarray:
    """The chord's root (now and then its fifth or octave) in the bass register, in eighths
    or quarters, as a few decaying harmonics with a plucked envelope."""
    amplitudes = rng.uniform(0.3, 1.0, 6) / np.arange(1, 7) ** rng.uniform(0.8, 1.6)
    amplitudes[0] = 1.0
    step = beat // 2 if rng.random() < 0.5 else beat
    out = np.zeros(n)
    for index in range(n // step + 1):
        chord = chords[(index * step) // (4 * beat) % len(chords)]
        note = chord[0] - 12 * ((chord[0] - 28) // 12) + rng.choice([0, 0, 0, 7, 12])
        length = int(step * rng.uniform(0.6, 1.0))
        f0 = float(_hz(note))
        phase = 2 * np.pi * f0 * np.arange(length) / SAMPLE_RATE
        env = _adsr(length, 0.004, 0.02, sustain=0.5, decay_s=rng.uniform(0.1, 0.3))
        _add(out, env * _harmonics(phase, amplitudes, f0), index * step)
    return _pan(out, rng.uniform(-0.15, 0.15))


def pads(rng: np.random.Generator, n: int, beat: int, chords: list[tuple[int, ...]]
         ) -> np.ndarray:
    """Each bar's chord in the middle register, three detuned band-limited saws per note
    spread across the stereo field, slow attack, low-passed."""
    bar, out = 4 * beat, np.zeros((2, n))
    attack, release = rng.uniform(0.2, 0.6), 0.25
    saw = 1 / np.arange(1, 13)
    for index, chord in enumerate(chords):
        length = bar + int(release * SAMPLE_RATE)
        env = _adsr(length, attack, release, sustain=0.8, decay_s=0.5)
        for note in chord:
            note = note + 12 * ((60 - note) // 12 + 1) if note < 52 else note
            for detune, pan in ((-1, -0.7), (0, 0.0), (1, 0.7)):
                f0 = float(_hz(note + detune * rng.uniform(0.05, 0.12)))
                phase = rng.uniform(0, 2 * np.pi) + 2 * np.pi * f0 * np.arange(length) / SAMPLE_RATE
                _add(out, _pan(env * _harmonics(phase, saw, f0), pan), index * bar)
    lowpass = signal.butter(2, rng.uniform(1500, 4000), fs=SAMPLE_RATE, output="sos")
    return signal.sosfilt(lowpass, out)


def vocals(rng: np.random.Generator, n: int, beat: int, root: int, scale: tuple[int, ...]
           ) -> np.ndarray:
    """Sung phrases: a glottal pulse train (harmonics falling 12 dB/octave, a little breath
    noise) gliding between notes of the scale with delayed vibrato, each note on its own
    vowel through four formant resonators; gaps of 1 to 3 beats between phrases."""
    register = root + 12 * ((60 - root) // 12) + rng.choice([0, 5, 7])
    pitches = [register + 12 * (k // 7) + scale[k % 7] for k in range(-3, 10)]
    vibrato_hz, vibrato_st = rng.uniform(4.8, 6.5), rng.uniform(0.15, 0.5)
    out, position, previous = np.zeros(n), int(rng.integers(0, 2)) * beat, None
    eighth = beat // 2
    while position < n:
        for _ in range(int(rng.integers(3, 8))):
            length = eighth * int(rng.choice([1, 2, 2, 3, 4]))
            pitch = float(pitches[int(rng.integers(0, len(pitches)))])
            glide_from = pitch if previous is None else previous
            t = np.arange(length) / SAMPLE_RATE
            midi = pitch + (glide_from - pitch) * np.exp(-t / 0.03)
            midi += vibrato_st * np.sin(2 * np.pi * vibrato_hz * t) * np.minimum(1, t / 0.25)
            f0 = _hz(midi)
            phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
            source = _harmonics(phase, 1 / np.arange(1, 41) ** 2, float(f0.max()))
            source += 0.02 * rng.standard_normal(length)
            voice = np.zeros(length)
            for freq, bandwidth, gain in VOWELS[str(rng.choice(list(VOWELS)))]:
                b, a = signal.iirpeak(freq, freq / bandwidth, fs=SAMPLE_RATE)
                voice += gain * signal.lfilter(b, a, source)
            _add(out, _adsr(length, 0.03, 0.05) * voice, position)
            position, previous = position + length, pitch
        position += beat * int(rng.integers(1, 4))
        previous = None
    return _pan(out, rng.uniform(-0.2, 0.2))


def song(seed: int, seconds: float) -> np.ndarray:
    """Stems [4 sources, 2 channels, samples] of one synthetic song (float32).

    Tempo, key, mode, the sounds' parameters, gains (-9 to 0 dB after each stem is brought
    to the same RMS) and panning are all drawn from ``seed``.
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    beat = int(SAMPLE_RATE * 60 / rng.uniform(85, 140))
    root = 36 + int(rng.integers(0, 12))
    scale = SCALES[str(rng.choice(list(SCALES)))]
    chords = _chords(rng, root, scale, n // (4 * beat) + 1)
    stems = np.stack([drums(rng, n, beat), bass(rng, n, beat, chords),
                      pads(rng, n, beat, chords), vocals(rng, n, beat, root, scale)])
    rms = np.sqrt(np.mean(stems ** 2, axis=(1, 2), keepdims=True))
    gains = 10 ** (rng.uniform(-9, 0, (len(SOURCES), 1, 1)) / 20)
    return (0.1 * gains * stems / np.maximum(rms, 1e-8)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Training


def remix(pool: np.ndarray, length: int, batch: int, rng: np.random.Generator
          ) -> tuple[np.ndarray, np.ndarray]:
    """``(mix [B, 2, L], stems [B, 4, 2, L])``: each source cut from a random song of
    ``pool`` [songs, 4, 2, T] at a random offset, with a random gain (-6 to +3 dB) and
    channel swap, summed; the mix and stems are divided by the mix's mono std, as stemserve's
    pipeline normalises a track before the network sees it."""
    songs, sources, _, total = pool.shape
    stems = np.empty((batch, sources, 2, length), np.float32)
    for b in range(batch):
        for s in range(sources):
            start = int(rng.integers(0, total - length + 1))
            cut = pool[int(rng.integers(0, songs)), s, :, start:start + length]
            stems[b, s] = 10 ** (rng.uniform(-6, 3) / 20) * (cut[::-1] if rng.random() < 0.5
                                                             else cut)
    mix = stems.sum(axis=1)
    std = mix.mean(axis=1).std(axis=-1, ddof=1)[:, None, None] + 1e-8
    return mix / std, stems / std[:, None]


def build_model(family: str, config: dict):
    """A freshly initialised Demucs v2 (``demucs``) or HT Demucs (``htdemucs``) of ``config``
    (JSON-able constructor arguments; the HT segment in seconds as a string fraction)."""
    from stemserve.model import Demucs
    from stemserve.models.htdemucs import HTDemucs

    if family == "demucs":
        return Demucs(SOURCES, **config)
    return HTDemucs(list(SOURCES), **dict(config, segment=Fraction(config["segment"])))


def train(family: str, config: dict, pool: np.ndarray, *, seed: int, minutes: float,
          max_steps: int, batch: int, lr: float, log) -> tuple[dict, dict]:
    """Train a model of ``config`` on remixes of ``pool`` with Adam and an L1 loss until
    ``minutes`` are spent or ``max_steps`` (0: no cap) are done.

    Returns the state dict and the training record (steps, seconds, losses).
    """
    import torch

    from stemserve.model import center_trim

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(family, config).train()
    # v2 sees its segment's valid length (its output is center-trimmed to the references);
    # HT Demucs its fixed training segment.
    length = (model.valid_length(config["segment_length"]) if family == "demucs"
              else model.training_length)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses: list[float] = []
    began = time.perf_counter()
    while time.perf_counter() - began < 60 * minutes and (not max_steps or len(losses) < max_steps):
        mix, stems = (torch.from_numpy(array) for array in remix(pool, length, batch, rng))
        estimate = model(mix)
        loss = torch.nn.functional.l1_loss(estimate, center_trim(stems, estimate.shape[-1]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if len(losses) % 50 == 0:
            log(f"  {family} step {len(losses)}: loss {np.mean(losses[-50:]):.4f} "
                f"({time.perf_counter() - began:.0f} s)")
    window = max(1, min(20, len(losses) // 5))
    record = {"steps": len(losses), "train_s": time.perf_counter() - began, "batch": batch,
              "segment_samples": length, "lr": lr,
              "first_loss": float(np.mean(losses[:window])),
              "final_loss": float(np.mean(losses[-window:])), "loss_window": window}
    model.eval()
    return {key: value.detach().clone() for key, value in model.state_dict().items()}, record


def _jsonable(config: dict) -> dict:
    return {key: str(value) if isinstance(value, Fraction) else value
            for key, value in config.items()}


def _code_digest() -> str:
    """Digest of the code that makes the training data and trains: a change retrains (the
    model's construction is in the key as its configuration)."""
    parts = (drums, _chords, bass, pads, vocals, song, remix, train, _hz, _pan, _add, _adsr,
             _harmonics)
    text = "".join(inspect.getsource(part) for part in parts) + repr((SCALES, VOWELS))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_key(family: str, config: dict, training: dict) -> str:
    """The cached checkpoint's name: configuration, seed, budget, pool and training code."""
    stamp = json.dumps({"family": family, "config": config, **training, "code": _code_digest()},
                       sort_keys=True)
    return f"{family}-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}.th"


def trained_checkpoint(family: str, config: dict, training: dict, pool_fn, work_dir: Path,
                       log) -> tuple[Path, dict]:
    """The checkpoint of ``config`` trained as ``training`` says, from ``work_dir`` or
    trained now (``pool_fn()`` makes the training songs). Returns its path and its record.

    v2 checkpoints are ``{"config", "state"}``, which :func:`stemserve.checkpoints.load_model`
    reads; HT Demucs ones ``{"family", "kwargs", "state"}`` (the loader reads HT Demucs only
    as demucs 4 packages, which name demucs' own class).
    """
    import torch

    from stemserve.files import atomic_path

    path = work_dir / cache_key(family, config, training)
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        log(f"{family}: reusing {path.name} ({saved['training']['steps']} steps)")
        return path, dict(saved["training"], reused=True)
    log(f"{family}: training for {training['minutes']:g} min"
        + (f" or {training['max_steps']} steps" if training["max_steps"] else ""))
    state, record = train(family, config, pool_fn(), seed=training["seed"],
                          minutes=training["minutes"], max_steps=training["max_steps"],
                          batch=training["batch"], lr=training["lr"], log=log)
    record["pool"] = training["pool"]
    saved = {"config": config, "state": state} if family == "demucs" else \
        {"family": family, "kwargs": config, "state": state}
    work_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as target:
        torch.save(dict(saved, training=record), target)
    return path, dict(record, reused=False)


def load_trained(family: str, path: Path):
    """``(model, info)`` of a cached checkpoint, in eval mode: v2 through stemserve's own
    loader, HT Demucs rebuilt from its kwargs."""
    import torch

    from stemserve.checkpoints import CheckpointInfo, load_model
    from stemserve.files import file_sha256

    if family == "demucs":
        return load_model(path)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(family, saved["kwargs"])
    model.load_state_dict(saved["state"], strict=True)
    kwargs = dict(saved["kwargs"], segment=Fraction(saved["kwargs"]["segment"]))
    return model.eval(), CheckpointInfo(name=path.stem, path=path, sha256=file_sha256(path),
                                        config=kwargs, family=family)


# ---------------------------------------------------------------------------------------------
# Separation through stemserve and SDR

class Way(NamedTuple):
    """How a path separates: the backend, its precision, the int8 graph's ``reduce_range``,
    and whether PyTorch may use oneDNN (its bf16 convolutions are wrong on some CPUs)."""

    backend: str
    precision: str
    reduce_range: bool | None = None
    onednn: bool = True


PATHS = {
    "torch fp32": Way("torch", "fp32"),
    "torch bf16": Way("torch", "bf16"),
    "torch bf16 no oneDNN": Way("torch", "bf16", onednn=False),
    "onnx fp32": Way("onnx", "fp32"),
    "onnx fp16": Way("onnx", "fp16"),
    "onnx int8": Way("onnx", "int8", reduce_range=False),
    "onnx int8 reduce_range": Way("onnx", "int8", reduce_range=True),
    "openvino bf16": Way("onnx", "bf16"),
}
REFERENCE = "onnx fp32"
MIXTURE, NO_MODEL = "mixture", "(none)"
"""The row of the mix itself as every source's estimate: the baseline a model must beat."""


def sdr_db(references: np.ndarray, estimates: np.ndarray) -> np.ndarray:
    """BSS Eval SDR in dB per source: [sources, channels, time] each -> [sources].

    ``fast_bss_eval.sdr`` on each source and channel alone (one reference, so no
    permutation is searched), 512-tap distortion filter, over the whole clip; the channels'
    SDRs are averaged. In float64: its float32 solve moves an SDR by up to 0.2 dB between
    estimates that differ by 2e-6, more than the differences this script measures.
    """
    import fast_bss_eval

    sources, channels, length = references.shape
    values = fast_bss_eval.sdr(references.reshape(-1, 1, length).astype(np.float64),
                               estimates[..., :length].reshape(-1, 1, length).astype(np.float64),
                               filter_length=FILTER_LENGTH)
    return np.asarray(values).reshape(sources, channels).mean(axis=1)


def open_path(name: str, model, info, export_dir: Path, threads: int):
    """The backend of path ``name``; an int8 path quantizes the export first (its
    ``reduce_range``), overwriting the previous int8 graph; the bf16 path writes its
    sidecar (OnnxBackend then runs the fp32 graph on OpenVINO)."""
    from stemserve.client.backends.onnx import OnnxBackend
    from stemserve.client.backends.pytorch import TorchBackend
    from stemserve.export.bf16 import bf16_export
    from stemserve.export.quantize import quantize_int8

    way = PATHS[name]
    if way.backend == "torch":
        return TorchBackend(model, info,
                            autocast=None if way.precision == "fp32" else way.precision)
    if way.precision == "int8":
        quantize_int8(export_dir, reduce_range=way.reduce_range)
    if way.precision == "bf16":
        bf16_export(export_dir)
    return OnnxBackend(export_dir, precision=way.precision, threads=threads)


def separate_all(backend, mixes: list[np.ndarray], onednn: bool
                 ) -> tuple[list[np.ndarray], float]:
    """Every mix through stemserve's pipeline: stems [4, 2, time] per mix, and seconds.
    ``onednn`` False turns PyTorch's oneDNN kernels off meanwhile (a global switch, so the
    backend's worker thread follows it)."""
    import torch

    from stemserve.client import separate_array

    began, out = time.perf_counter(), []
    with torch.backends.mkldnn.flags(enabled=onednn):
        for mix in mixes:
            stems = separate_array(mix, SAMPLE_RATE, backend=backend)
            out.append(np.stack([stems[name] for name in SOURCES]))
    return out, time.perf_counter() - began


def onednn_bf16_conv_error() -> dict:
    """Relative error against fp32 of one bf16 convolution (16 to 32 channels, kernel 8,
    stride 4) in PyTorch with oneDNN and without, and in OpenVINO (oneDNN inside; None
    without bf16 arithmetic): on this development VM's CPU (AMX, avx512_bf16) oneDNN's result
    is wrong for this shape (error ~1; 16 and 24 input channels, not 2 to 14, 18 to 22, 26
    to 32, 40 to 128), which the measured models' channel counts avoid."""
    import torch

    from stemserve.runtime.openvino_session import cpu_has_bf16

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8000, generator=generator)
    weight = torch.randn(32, 16, 8, generator=generator)
    exact = torch.nn.functional.conv1d(x, weight, stride=4)
    errors = {}
    for enabled in (True, False):
        with torch.backends.mkldnn.flags(enabled=enabled):
            bf16 = torch.nn.functional.conv1d(x.bfloat16(), weight.bfloat16(), stride=4).float()
        errors["onednn" if enabled else "no_onednn"] = float(
            (bf16 - exact).norm() / exact.norm())
    errors["openvino"] = None
    if cpu_has_bf16():
        import openvino as ov

        parameter = ov.opset13.parameter([1, 16, 8000], ov.Type.f32)
        conv = ov.opset13.convolution(parameter, ov.opset13.constant(weight.numpy()), [4],
                                      [0], [0], [1])
        compiled = ov.Core().compile_model(ov.Model([conv], [parameter]), "CPU",
                                           {"INFERENCE_PRECISION_HINT": "bf16"})
        got = torch.from_numpy(compiled(x.numpy())[0])
        errors["openvino"] = float((got - exact).norm() / exact.norm())
    return errors


def layer_scale(model) -> float | None:
    """Mean |scale| of HT Demucs' transformer layer scales (initialised at 1e-4): how much
    of the transformer, the only part int8 quantizes there, reaches the output."""
    transformer = getattr(model, "crosstransformer", None)
    if transformer is None:
        return None
    scales = [p.detach().abs().mean().item() for name, p in transformer.named_parameters()
              if "gamma" in name]
    return float(np.mean(scales)) if scales else None


def score_row(model_name: str, path: str, scores: np.ndarray, **fields) -> dict:
    """A row of per-source and mean SDR from ``scores`` [mixes, sources]."""
    per_source = scores.mean(axis=0)
    return {"model": model_name, "path": path, "status": "ok",
            "sdr_db": dict(zip(SOURCES, per_source.tolist())),
            "sdr_mean_db": float(per_source.mean()),
            "sdr_per_mix_db": scores.tolist(), **fields}


def add_deltas(rows: list[dict]) -> None:
    """Each ok row's SDR minus the same model's ONNX fp32 SDR: mean and per source, and the
    source that moved most."""
    reference = {row["model"]: row for row in rows if row["path"] == REFERENCE
                 and row["status"] == "ok"}
    for row in rows:
        base = reference.get(row["model"])
        if row["status"] != "ok" or base is None or row["path"] == MIXTURE:
            continue
        delta = {name: row["sdr_db"][name] - base["sdr_db"][name] for name in SOURCES}
        worst = max(SOURCES, key=lambda name: abs(delta[name]))
        row.update(delta_db=delta, delta_mean_db=row["sdr_mean_db"] - base["sdr_mean_db"],
                   delta_worst_db=delta[worst], delta_worst_source=worst)


def measure_model(model_name: str, family: str, checkpoint: Path, mixes: list[np.ndarray],
                  references: list[np.ndarray], threads: int, log) -> tuple[list[dict], dict]:
    """Export ``checkpoint`` (fp32, fp16) and separate ``mixes`` through every path.

    Returns one row per path and what the export took.
    """
    import tempfile

    from stemserve.export.to_onnx import export_onnx

    model, info = load_trained(family, checkpoint)
    rows: list[dict] = []
    outputs: dict[str, list[np.ndarray]] = {}
    with tempfile.TemporaryDirectory(prefix="stemserve-quality-") as tmp:
        export_dir = Path(tmp)
        began = time.perf_counter()
        export = {"parameters": sum(p.numel() for p in model.parameters()), "fp16_error": None,
                  "layer_scale": layer_scale(model)}
        try:
            export_onnx(model, info, export_dir, fp16=True)
        except Exception as err:  # noqa: BLE001 - the fp16 trace failed: measure the rest
            export["fp16_error"] = f"{type(err).__name__}: {err}"
            log(f"{model_name}: the fp16 export failed ({export['fp16_error']}); fp32 only")
            export_onnx(model, info, export_dir)
        export["export_s"] = time.perf_counter() - began
        for path in PATHS:
            if path == "onnx fp16" and export["fp16_error"]:
                rows.append({"model": model_name, "path": path,
                             "status": f"failed: export_onnx(fp16=True): {export['fp16_error']}"})
                continue
            way = PATHS[path]
            try:
                backend = open_path(path, model, info, export_dir, threads)
                try:
                    outputs[path], seconds = separate_all(backend, mixes, way.onednn)
                finally:
                    backend.close()
            except Exception as err:  # noqa: BLE001 - one path failing must not hide the rest
                log(f"{model_name} {path}: {type(err).__name__}: {err}")
                rows.append({"model": model_name, "path": path,
                             "status": f"failed: {type(err).__name__}: {err}"})
                continue
            scores = np.stack([sdr_db(ref, est) for ref, est in zip(references, outputs[path])])
            rows.append(score_row(model_name, path, scores, **way._asdict(), separate_s=seconds))
            log(f"{model_name} {path:>22}: mean SDR {rows[-1]['sdr_mean_db']:.3f} dB "
                f"({seconds:.1f} s)")
    for row in rows:
        if row["status"] == "ok" and REFERENCE in outputs:
            row["stems_rel_diff"] = relative_difference(outputs[row["path"]], outputs[REFERENCE])
    return rows, export


def relative_difference(estimates: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """||estimates - reference|| / ||reference|| over all mixes: how much a path changes the
    stems, whether or not the SDR notices."""
    error = sum(float(np.sum((a - b) ** 2)) for a, b in zip(estimates, reference))
    return (error / sum(float(np.sum(b ** 2)) for b in reference)) ** 0.5


# ---------------------------------------------------------------------------------------------
# The section

def model_configs(quick: bool) -> dict[str, tuple[str, dict]]:
    """The measured models: name -> (family, constructor arguments; for HT Demucs the changes
    to the htdemucs release's). Small enough to learn something in minutes on 2 CPU cores;
    the ``quick`` ones only check that everything runs."""
    # Channel counts keep every strided convolution's input off 16 and 24 channels, the
    # shapes oneDNN's bf16 convolution gets wrong on AMX CPUs (onednn_bf16_conv_error):
    # the bf16 rows then measure bf16's rounding, and the released models (48 and 64
    # channels) are not among those shapes either.
    if quick:
        return {"demucs v2": ("demucs", dict(channels=5, depth=4, resample=False,
                                             segment_length=SAMPLE_RATE)),
                "htdemucs": ("htdemucs", dict(channels=10, bottom_channels=16, t_layers=1,
                                              t_heads=4, segment="1"))}
    return {"demucs v2": ("demucs", dict(channels=20, depth=4, resample=False,
                                         segment_length=2 * SAMPLE_RATE)),
            "htdemucs": ("htdemucs", dict(channels=10, bottom_channels=32, t_layers=2,
                                          t_heads=4, segment="1"))}


def full_config(family: str, changes: dict) -> dict:
    """Every constructor argument (JSON-able): v2's as given, HT Demucs' the htdemucs
    release's with ``changes``."""
    if family == "demucs":
        return dict(changes)
    from stemserve.models.configs import HTDEMUCS

    base = {key: value for key, value in HTDEMUCS.items() if key != "sources"}
    return _jsonable(dict(base, **changes))


def segment_seconds(family: str, config: dict) -> float:
    """The training segment, which is also what the pipeline splits tracks by."""
    if family == "demucs":
        return config["segment_length"] / SAMPLE_RATE
    return float(Fraction(config["segment"]))


def target_verdict(rows: list[dict]) -> dict:
    """Per model: each served fast path's (int8, OpenVINO bf16) mean-SDR delta from ONNX
    fp32 and whether it is within :data:`TARGET_DB`."""
    verdict = {}
    for row in rows:
        if row["path"].startswith(("onnx int8", "openvino bf16")) and "delta_mean_db" in row:
            entry = verdict.setdefault(row["model"], {})
            entry[row["path"]] = {"delta_mean_db": row["delta_mean_db"],
                                  "delta_worst_db": row["delta_worst_db"],
                                  "worst_source": row["delta_worst_source"],
                                  "met": abs(row["delta_mean_db"]) <= TARGET_DB}
    return verdict


def notes(rows: list[dict], training: list[dict], verdict: dict, bf16_conv: dict,
          args) -> list[str]:
    """What a reader needs next to the SDR table: data, metric, verdict, sanity checks."""
    from stemserve.cpu import cpu_has_vnni

    by_key = {(row["model"], row["path"]): row for row in rows if row["status"] == "ok"}
    out = [
        "Synthetic music, numpy/scipy only, every song from its own seed: drums (kicks as "
        "decaying sine sweeps to ~50 Hz, snares and hats as band/high-passed noise bursts with "
        "exponential decays, on a 16th grid at 85-140 bpm), bass (chord roots, a few harmonics, "
        "plucked), other (detuned saw pads of each bar's triad, slow attack, low-passed), "
        "vocals (glottal pulse train with glides and vibrato through 4 formant resonators, a "
        "vowel per note, phrases with gaps). Random key, mode, gains (-9 to 0 dB) and panning "
        f"per song. Training: {args.pool_songs} songs of {args.pool_seconds:g} s from seeds "
        f"{args.seed}..; remixed per step (each source from a random song and offset, -6 to "
        f"+3 dB, channel swap). Test: {args.mixes} held-out mixes of {args.mix_seconds:g} s "
        f"from seeds {args.seed + TEST_SEED_OFFSET}.., each song's own stems summed.",
        "SDR: BSS Eval's signal-to-distortion ratio, fast_bss_eval.sdr(reference, estimate, "
        f"filter_length={FILTER_LENGTH}) on each source and channel against its own reference "
        "(no permutation search), over the whole clip (museval instead takes the median over "
        "1 s frames), in float64 (float32 moves an SDR by up to 0.2 dB between estimates "
        "2e-6 apart), averaged over the 2 channels and the mixes. Δ = the path's SDR minus "
        f"ONNX Runtime fp32's for the same model (the graph that is served); 'worst Δ' is the "
        "source whose SDR moved most.",
        "Every path is stemserve's own pipeline: separate_array (25% overlap, no shifts) on "
        "TorchBackend (fp32, bf16 autocast with PyTorch's oneDNN kernels and without) or "
        "OnnxBackend (the fp32 and fp16 graphs of export_onnx(fp16=True); the int8 graph of "
        "quantize_int8 with reduce_range False, then True, on the same export; the fp32 "
        "graph on OpenVINO with bf16 arithmetic, as --bf16 serves it). 'stems rel diff' = "
        "||stems - ONNX fp32 stems|| / ||ONNX fp32 stems|| over all mixes.",
    ]
    for model, entry in verdict.items():
        parts = [f"{path}: Δ {item['delta_mean_db']:+.3f} dB (worst source {item['worst_source']}"
                 f" {item['delta_worst_db']:+.3f} dB), {'met' if item['met'] else 'NOT met'}"
                 for path, item in entry.items()]
        out.append(f"Target (issue 14, int8 within {TARGET_DB} dB of fp32, on the mean SDR; "
                   f"held to the bf16 fast path too), {model}: " + "; ".join(parts) + ".")
    out.append(f"This CPU {'has' if cpu_has_vnni() else 'lacks'} VNNI, so quantize_int8's "
               f"default here is reduce_range={not cpu_has_vnni()}. int8 quantizes activations "
               "per batch (dynamic, one scale per tensor) and OnnxBackend batches whatever "
               "segments are queued (up to 2), so int8 stems depend on which segments shared a "
               "batch and its rows move by a few thousandths of a dB from run to run.")
    for record in training:
        model = record["model"]
        fp32, torch32 = by_key.get((model, REFERENCE)), by_key.get((model, "torch fp32"))
        mixture = by_key.get((NO_MODEL, MIXTURE))
        if fp32 and mixture:
            out.append(f"{model} learned: ONNX fp32 mean SDR {fp32['sdr_mean_db']:.2f} dB "
                       f"against {mixture['sdr_mean_db']:.2f} dB for the mixture itself "
                       f"({record['parameters'] / 1e6:.2f} M parameters, {record['steps']} "
                       f"steps in {record['train_s'] / 60:.1f} min, L1 loss "
                       f"{record['first_loss']:.4f} -> {record['final_loss']:.4f}).")
        if fp32 and torch32:
            out.append(f"{model} sanity check: torch fp32 - ONNX fp32 = "
                       f"{torch32['delta_mean_db']:+.4f} dB (same network, expected ~0).")
        int8 = by_key.get((model, "onnx int8"))
        if int8 and record["layer_scale"] is not None:
            out.append(f"{model}: int8 quantizes only the transformer's matrix products here "
                       "(convolutions stay fp32), and after minutes of training its layer "
                       f"scales average {record['layer_scale']:.3g} (1e-4 at init), so little "
                       f"of it reaches the stems (int8 changes them by "
                       f"{int8['stems_rel_diff']:.1e} relative): weak evidence for the "
                       "released htdemucs, whose transformer trained far longer.")
        if record["fp16_error"]:
            out.append(f"{model}: no fp16 graph, export_onnx(fp16=True) failed "
                       f"({record['fp16_error']}), so its fp16 path is not measured.")
    if bf16_conv["onednn"] > 0.05:
        openvino = ("" if bf16_conv["openvino"] is None
                    else f", {bf16_conv['openvino']:.2f} in OpenVINO")
        out.append("bf16 on this CPU: oneDNN's bf16 convolution is wrong for some shapes "
                   "(Conv1d 16 to 32 channels, kernel 8, stride 4: relative error "
                   f"{bf16_conv['onednn']:.2f} against fp32 in PyTorch{openvino}, "
                   f"{bf16_conv['no_onednn']:.4f} in PyTorch with oneDNN off). The measured "
                   "models' channel counts keep their strided convolutions off those shapes "
                   "(16 and 24 input channels), as the released models' 48 and 64 do, so the "
                   "bf16 rows measure bf16's rounding; stemserve's --bf16 session checks each "
                   "graph against fp32 at load and refuses one that such a layer breaks.")
    out += [
        "fp16 and bf16 on a CPU: ONNX Runtime runs the fp16 graph through its few fp16 CPU "
        "kernels and casts around the rest, and bf16 autocast rounds activations on whatever "
        "kernels this CPU has; the SDR change is the numerics', the time is not a GPU's.",
        "Small models trained for minutes on synthetic stems: the absolute SDRs say nothing "
        "about real music; the deltas between paths of one model are the measurement.",
        f"Training (Adam, lr {args.lr:g}, batch {args.batch}, L1 loss) stops at "
        f"{args.train_minutes:g} min per model"
        + (f" or {args.max_steps} steps" if args.max_steps else "")
        + ", so its step count and weights depend on the "
        "machine's load at the time; the checkpoints are cached ('cached' in the training "
        "table), so a rerun measures the same weights.",
    ]
    if args.quick:
        out.append("--quick: tiny models, a few training steps and one short mix; a check "
                   "that the script runs, not a measurement.")
    return out


COLUMNS = [
    {"key": "model", "title": "model"},
    {"key": "path", "title": "path"},
    *({"key": f"sdr_db.{name}", "title": f"{name} dB", "format": ".2f"} for name in SOURCES),
    {"key": "sdr_mean_db", "title": "mean dB", "format": ".3f"},
    {"key": "delta_mean_db", "title": "Δ mean vs ONNX fp32 dB", "format": "+.3f"},
    {"key": "delta_worst_db", "title": "worst Δ dB", "format": "+.3f"},
    {"key": "delta_worst_source", "title": "worst source"},
    {"key": "stems_rel_diff", "title": "stems rel diff", "format": ".1e"},
    {"key": "separate_s", "title": "separate s", "format": ".1f"},
    {"key": "status", "title": "status"},
]
TRAINING_COLUMNS = [
    {"key": "model", "title": "model"},
    {"key": "parameters", "title": "parameters"},
    {"key": "config_summary", "title": "configuration"},
    {"key": "segment_s", "title": "segment s", "format": ".2f"},
    {"key": "batch", "title": "batch"},
    {"key": "steps", "title": "steps"},
    {"key": "train_s", "title": "train s", "format": ".0f"},
    {"key": "first_loss", "title": "first L1", "format": ".4f"},
    {"key": "final_loss", "title": "final L1", "format": ".4f"},
    {"key": "export_s", "title": "export s", "format": ".1f"},
    {"key": "reused", "title": "cached"},
    {"key": "checkpoint", "title": "checkpoint"},
]

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--train-minutes", type=float, default=4.0,
                        help="training budget per model in minutes (4)")
    parser.add_argument("--max-steps", type=int, default=0,
                        help="stop training after this many steps (0: the budget decides)")
    parser.add_argument("--batch", type=int, default=4, help="training batch (4)")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (2e-3)")
    parser.add_argument("--pool-songs", type=int, default=24,
                        help="training songs that the remixes are cut from (24)")
    parser.add_argument("--pool-seconds", type=float, default=8.0,
                        help="length of each training song (8)")
    parser.add_argument("--mixes", type=int, default=6, help="held-out test mixes (6)")
    parser.add_argument("--mix-seconds", type=float, default=8.0,
                        help="length of each test mix (8)")
    parser.add_argument("--seed", type=int, default=0,
                        help=f"training seed; the test songs use seed + {TEST_SEED_OFFSET} (0)")
    parser.add_argument("--threads", type=int, default=usable_cpus(),
                        help="torch and ONNX Runtime threads (the usable CPUs)")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR,
                        help=f"cache of the trained checkpoints (default: {WORK_DIR})")
    parser.add_argument("--quick", action="store_true",
                        help="tiny models, 3 training steps, one 3 s mix: checks that it runs")
    add_output_arguments(parser)
    return parser


def _require_fast_bss_eval() -> None:
    """Fail before minutes of training, not after them."""
    if importlib.util.find_spec("fast_bss_eval") is None:
        raise SystemExit("benchmarks.quality needs fast_bss_eval for the SDR: pip install "
                         "'fast_bss_eval>=0.1.4,<0.2' (it is in stemserve's dev extra)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _require_fast_bss_eval()
    if args.quick:
        args.max_steps, args.batch, args.pool_songs, args.pool_seconds = 3, 2, 2, 3.0
        args.mixes, args.mix_seconds = 1, 3.0
    import torch

    torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(f"[{SCRIPT}] {message}", flush=True)

    machine = describe()
    configs = model_configs(args.quick)
    training = {"seed": args.seed, "minutes": args.train_minutes, "max_steps": args.max_steps,
                "batch": args.batch, "lr": args.lr,
                "pool": {"songs": args.pool_songs, "seconds": args.pool_seconds}}
    section = new_section(SCRIPT, TITLE, machine=machine, config={
        "models": {name: {"family": family, **changes} for name, (family, changes)
                   in configs.items()},
        **{key: value for key, value in training.items() if key != "pool"},
        "pool_songs": args.pool_songs, "pool_seconds": args.pool_seconds,
        "mixes": args.mixes, "mix_seconds": args.mix_seconds, "sdr": "fast_bss_eval.sdr",
        "filter_length": FILTER_LENGTH, "target_db": TARGET_DB, "threads": args.threads,
        "quick": args.quick})
    began = time.perf_counter()
    pool: list[np.ndarray] = []

    def make_pool() -> np.ndarray:
        if not pool:
            log(f"synthesising {args.pool_songs} training songs of {args.pool_seconds:g} s")
            pool.append(np.stack([song(args.seed + index, args.pool_seconds)
                                  for index in range(args.pool_songs)]))
        return pool[0]

    tests = [song(args.seed + TEST_SEED_OFFSET + index, args.mix_seconds)
             for index in range(args.mixes)]
    mixes = [stems.sum(axis=0) for stems in tests]
    mixture = np.stack([sdr_db(stems, np.broadcast_to(mix, stems.shape))
                        for stems, mix in zip(tests, mixes)])
    rows = [score_row(NO_MODEL, MIXTURE, mixture)]
    records = []
    for name, (family, changes) in configs.items():
        config = full_config(family, changes)
        checkpoint, record = trained_checkpoint(family, config, training, make_pool,
                                                args.work_dir, log)
        got, export = measure_model(name, family, checkpoint, mixes, tests, args.threads, log)
        rows += got
        records.append(dict(record, **export, model=name, family=family,
                            checkpoint=str(checkpoint), segment_s=segment_seconds(family, config),
                            config_summary=", ".join(f"{key}={value}" for key, value in
                                                     changes.items() if "segment" not in key)))
    add_deltas(rows)
    verdict, bf16_conv = target_verdict(rows), onednn_bf16_conv_error()
    section["rows"], section["columns"] = rows, COLUMNS
    section["tables"] = [{"title": "The trained models", "columns": TRAINING_COLUMNS,
                          "rows": records}]
    section["extra"] = {"target": verdict, "training": records, "reference_path": REFERENCE,
                        "bf16_conv_rel_error": bf16_conv}
    section["notes"] = notes(rows, records, verdict, bf16_conv, args)
    section["duration_s"] = time.perf_counter() - began
    section["finished"] = now()
    path = save_section(section, results_dir=args.results_dir,
                        machine=args.machine or machine_name(machine))
    log(f"wrote {path} in {section['duration_s']:.0f} s")
    references_ok = all(any(row["path"] == REFERENCE and row["model"] == name
                            and row["status"] == "ok" for row in rows) for name in configs)
    return 0 if references_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
