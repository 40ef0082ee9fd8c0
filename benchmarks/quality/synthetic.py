"""Songs made from seeds, one function per source, and small Demucs models trained on them
(cached under a digest of configuration, training and this file): random weights cannot show
what int8 or fp16 costs, and real stems (MUSDB18) cannot be downloaded everywhere."""
from __future__ import annotations

import hashlib
import json
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from scipy import signal

from stemserve.defaults import SOURCES

SAMPLE_RATE = 44100
TEST_SEED_OFFSET = 10_000  # test songs are seed + TEST_SEED_OFFSET..: never a training song
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
#: Each vowel's formants: (Hz, bandwidth Hz, gain).
VOWELS = {"a": ((800, 80, 1.0), (1150, 90, 0.5), (2900, 120, 0.25), (3900, 130, 0.1)),
          "e": ((400, 70, 1.0), (2000, 100, 0.35), (2800, 120, 0.25), (3600, 130, 0.1)),
          "i": ((280, 60, 1.0), (2250, 100, 0.3), (2900, 120, 0.3), (3800, 130, 0.1)),
          "o": ((450, 70, 1.0), (800, 80, 0.6), (2830, 100, 0.1), (3500, 130, 0.05)),
          "u": ((325, 60, 1.0), (700, 70, 0.4), (2530, 100, 0.08), (3500, 130, 0.04))}


def _hz(midi: np.ndarray | float) -> np.ndarray:
    return 440.0 * 2.0 ** ((np.asarray(midi) - 69) / 12)


def _pan(mono: np.ndarray, pan: float) -> np.ndarray:
    """Constant-power panning to stereo; ``pan`` in [-1, 1] (left to right)."""
    angle = (pan + 1) * np.pi / 4
    return np.stack([np.cos(angle) * mono, np.sin(angle) * mono])


def _add(out: np.ndarray, event: np.ndarray, start: int) -> None:
    """Add ``event`` into ``out`` at sample ``start``, cut at the end of ``out``."""
    stop = min(out.shape[-1], start + event.shape[-1])
    out[..., start:stop] += event[..., :max(stop - start, 0)]


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
    """Sum of ``amplitudes[k-1] * sin(k phase)``, below Nyquist only (no aliasing)."""
    return sum(amplitude * np.sin(k * phase) for k, amplitude in enumerate(amplitudes, start=1)
               if k * f0_max < 0.45 * SAMPLE_RATE)


def drums(rng: np.random.Generator, n: int, beat: int) -> np.ndarray:
    """Kicks (sine sweeps down to ~50 Hz), snares (noise and a tone) and hats (high-passed
    noise), each decaying exponentially, on a 16th-note grid."""
    t = np.arange(int(0.4 * SAMPLE_RATE)) / SAMPLE_RATE
    f_start, f_end = rng.uniform(110, 180), rng.uniform(42, 60)
    sweep = f_end + (f_start - f_end) * np.exp(-t / rng.uniform(0.025, 0.06))
    kick = np.sin(2 * np.pi * np.cumsum(sweep) / SAMPLE_RATE) * np.exp(-t / rng.uniform(0.1, 0.2))
    snare_band = signal.butter(2, [rng.uniform(1200, 2000), rng.uniform(5000, 8000)], "bandpass",
                               fs=SAMPLE_RATE, output="sos")
    snare = (signal.sosfilt(snare_band, rng.standard_normal(t.size))
             * np.exp(-t / rng.uniform(0.05, 0.12))
             + 0.5 * np.sin(2 * np.pi * rng.uniform(170, 230) * t) * np.exp(-t / 0.04))
    hat_band = signal.butter(4, rng.uniform(6000, 9000), "highpass", fs=SAMPLE_RATE, output="sos")
    hat_noise = signal.sosfilt(hat_band, rng.standard_normal(t.size))
    hat = hat_noise * np.exp(-t / rng.uniform(0.015, 0.04))
    open_hat = hat_noise * np.exp(-t / rng.uniform(0.1, 0.2))
    parts = {name: _pan(sound / np.abs(sound).max(), pan) for name, sound, pan in (
        ("kick", kick, rng.uniform(-0.1, 0.1)), ("snare", snare, rng.uniform(-0.3, 0.3)),
        ("hat", hat, rng.uniform(-0.6, 0.6)), ("open", open_hat, rng.uniform(-0.6, 0.6)))}
    step, sixteenths, out = beat // 4, rng.random() < 0.5, np.zeros((2, n))
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


def bass(rng: np.random.Generator, n: int, beat: int, chords: list[tuple[int, ...]]) -> np.ndarray:
    """Each chord's root (or its fifth or octave), plucked, a few harmonics, in 8ths or 4ths."""
    amplitudes = rng.uniform(0.3, 1.0, 6) / np.arange(1, 7) ** rng.uniform(0.8, 1.6)
    amplitudes[0] = 1.0
    step, out = (beat // 2 if rng.random() < 0.5 else beat), np.zeros(n)
    for index in range(n // step + 1):
        chord = chords[(index * step) // (4 * beat) % len(chords)]
        note = chord[0] - 12 * ((chord[0] - 28) // 12) + rng.choice([0, 0, 0, 7, 12])
        length, f0 = int(step * rng.uniform(0.6, 1.0)), float(_hz(note))
        phase = 2 * np.pi * f0 * np.arange(length) / SAMPLE_RATE
        env = _adsr(length, 0.004, 0.02, sustain=0.5, decay_s=rng.uniform(0.1, 0.3))
        _add(out, env * _harmonics(phase, amplitudes, f0), index * step)
    return _pan(out, rng.uniform(-0.15, 0.15))


def pads(rng: np.random.Generator, n: int, beat: int, chords: list[tuple[int, ...]]) -> np.ndarray:
    """Each bar's chord as three detuned saws per note across the stereo field, low-passed."""
    bar, out = 4 * beat, np.zeros((2, n))
    attack, release, saw = rng.uniform(0.2, 0.6), 0.25, 1 / np.arange(1, 13)
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
    """Phrases of a glottal pulse train gliding between notes of the scale with vibrato, each
    note on its own vowel (four formant resonators), 1 to 3 beats apart."""
    register = root + 12 * ((60 - root) // 12) + rng.choice([0, 5, 7])
    pitches = [register + 12 * (k // 7) + scale[k % 7] for k in range(-3, 10)]
    vibrato_hz, vibrato_st = rng.uniform(4.8, 6.5), rng.uniform(0.15, 0.5)
    out, position = np.zeros(n), int(rng.integers(0, 2)) * beat
    while position < n:
        previous = None
        for _ in range(int(rng.integers(3, 8))):
            length = beat // 2 * int(rng.choice([1, 2, 2, 3, 4]))
            pitch = float(pitches[int(rng.integers(0, len(pitches)))])
            t = np.arange(length) / SAMPLE_RATE
            midi = pitch + ((pitch if previous is None else previous) - pitch) * np.exp(-t / 0.03)
            midi += vibrato_st * np.sin(2 * np.pi * vibrato_hz * t) * np.minimum(1, t / 0.25)
            f0 = _hz(midi)
            source = _harmonics(2 * np.pi * np.cumsum(f0) / SAMPLE_RATE,
                                1 / np.arange(1, 41) ** 2, float(f0.max()))
            source += 0.02 * rng.standard_normal(length)
            voice = np.zeros(length)
            for freq, bandwidth, gain in VOWELS[str(rng.choice(list(VOWELS)))]:
                b, a = signal.iirpeak(freq, freq / bandwidth, fs=SAMPLE_RATE)
                voice += gain * signal.lfilter(b, a, source)
            _add(out, _adsr(length, 0.03, 0.05) * voice, position)
            position, previous = position + length, pitch
        position += beat * int(rng.integers(1, 4))
    return _pan(out, rng.uniform(-0.2, 0.2))


def song(seed: int, seconds: float) -> np.ndarray:
    """Stems [4 sources, 2 channels, samples] (float32) of one song whose tempo, key, sounds,
    gains (-9 to 0 dB after each stem is brought to the same RMS) and panning are ``seed``'s."""
    rng, n = np.random.default_rng(seed), int(seconds * SAMPLE_RATE)
    beat = int(SAMPLE_RATE * 60 / rng.uniform(85, 140))
    root = 36 + int(rng.integers(0, 12))
    scale = SCALES[str(rng.choice(list(SCALES)))]
    degrees = rng.choice([0, 3, 4, 5, 1, 2], size=n // (4 * beat) + 1,
                         p=[0.3, 0.2, 0.2, 0.2, 0.05, 0.05])  # one triad of the scale per bar
    chords = [tuple(root + 12 * ((degree + k) // 7) + scale[(degree + k) % 7] for k in (0, 2, 4))
              for degree in degrees]
    stems = np.stack([drums(rng, n, beat), bass(rng, n, beat, chords),
                      pads(rng, n, beat, chords), vocals(rng, n, beat, root, scale)])
    rms = np.sqrt(np.mean(stems ** 2, axis=(1, 2), keepdims=True))
    gains = 10 ** (rng.uniform(-9, 0, (len(SOURCES), 1, 1)) / 20)
    return (0.1 * gains * stems / np.maximum(rms, 1e-8)).astype(np.float32)


def remix(pool: np.ndarray, length: int, batch: int, rng: np.random.Generator
          ) -> tuple[np.ndarray, np.ndarray]:
    """``(mix [B, 2, L], stems [B, 4, 2, L])``: each source cut from a random song at a random
    offset, gain (-6 to +3 dB) and channel order; divided by the mix's mono std, as in stemserve."""
    songs, sources, _, total = pool.shape
    stems = np.empty((batch, sources, 2, length), np.float32)
    for b, s in np.ndindex(batch, sources):
        start = int(rng.integers(0, total - length + 1))
        cut = pool[int(rng.integers(0, songs)), s, :, start:start + length]
        stems[b, s] = 10 ** (rng.uniform(-6, 3) / 20) * (cut[::-1] if rng.random() < 0.5 else cut)
    mix = stems.sum(axis=1)
    std = mix.mean(axis=1).std(axis=-1, ddof=1)[:, None, None] + 1e-8
    return mix / std, stems / std[:, None]


def trained_model(family: str, config: dict, training: dict, cache: Path) -> tuple[Any, Any, dict]:
    """``(model in eval mode, CheckpointInfo, training record)``: a v2 (``demucs``), HT Demucs
    (the htdemucs release's arguments with ``config``'s) or 4-stem BS-RoFormer (``config``:
    its arguments and ``chunk_size``) from ``cache``, else trained (Adam, L1,
    remixes of training songs) for ``train_minutes`` or ``max_steps`` and saved there."""
    import torch

    from stemserve.checkpoints import CheckpointInfo
    from stemserve.files import atomic_path, file_sha256
    from stemserve.model import Demucs, center_trim
    from stemserve.models.configs import HTDEMUCS
    from stemserve.models.htdemucs import HTDemucs

    stamp = json.dumps({"family": family, "config": config, **training,
                        "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()},
                       sort_keys=True)
    path = cache / f"{family}-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}.th"
    torch.manual_seed(training["seed"])
    if family == "bs_roformer":  # 4 stems, served on its chunk as load_msst sets it
        from stemserve.models.roformer import BSRoformer

        model = BSRoformer(**{key: value for key, value in config.items() if key != "chunk_size"})
        model.samplerate, model.sources, model.residual = SAMPLE_RATE, list(SOURCES), False
        model.chunk_size, model.num_overlap, model.normalize = config["chunk_size"], 2, False
    else:
        model = (Demucs(SOURCES, **config) if family == "demucs" else
                 HTDemucs(**{**HTDEMUCS, **config, "segment": Fraction(config["segment"])}))
    if not (reused := path.is_file()):
        rng = np.random.default_rng(training["seed"])
        pool = np.stack([song(training["seed"] + index, training["pool_seconds"])
                         for index in range(training["pool_songs"])])
        length = (model.valid_length(config["segment_length"]) if family == "demucs" else
                  model.training_length if family == "htdemucs" else config["chunk_size"])
        optimizer = torch.optim.Adam(model.train().parameters(), lr=training["lr"])
        losses: list[float] = []
        began, cap = time.perf_counter(), training["max_steps"] or float("inf")
        while time.perf_counter() - began < 60 * training["train_minutes"] and len(losses) < cap:
            mix, stems = map(torch.from_numpy, remix(pool, length, training["batch"], rng))
            estimate = model(mix)
            loss = torch.nn.functional.l1_loss(estimate, center_trim(stems, estimate.shape[-1]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        window = max(1, min(20, len(losses) // 5))
        record = {"steps": len(losses), "train_s": time.perf_counter() - began,
                  "segment_samples": length, "first_loss": float(np.mean(losses[:window])),
                  "final_loss": float(np.mean(losses[-window:]))}
        cache.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as target:
            torch.save({"state": model.state_dict(), "training": record}, target)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(saved["state"])
    info = CheckpointInfo(path.stem, path, file_sha256(path), config, family)
    return model.eval(), info, dict(saved["training"], reused=reused, checkpoint=str(path))
