"""A RoFormer checkpoint, as people have it (a ``.ckpt`` and its training ``config.yaml``
beside it), separated by ``stemserve separate`` in-process (ONNX Runtime, PyTorch) and
through Triton, equals the reference inference of the same checkpoint.

The reference: audio-separator 0.47.1's networks (what the public checkpoints load into),
built with random weights from the config by the oracle itself and saved as the ``.ckpt``,
and MSST's ``demix`` at its pinned commit (``tests/msst_demix.py``) with a batch of one,
then ``instrumental = mix - vocals`` as MSST's ``--extract_instrumental``. Tracks are long
enough for the reflected borders and a short, reflected last chunk, and one is shorter than
two borders (no reflection; its last chunks are zero-padded).
"""
from __future__ import annotations


import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from oracle_roformer import run_oracle
from stemserve.checkpoints import ROFORMER_RELEASES, URL_ENV, RoformerRelease
from stemserve.cli import main
from test_checkpoints import LoopbackServer
from test_msst_checkpoints import write_safetensors

RATE = 44100
CHUNK = 44100  # 100 hops of 441: a Mel-Band RoFormer's chunk is a whole number of hops
TOLERANCE = 1e-4
"""The issue's bound on float output: the ONNX graph's convolution STFTs round differently
from torch.stft, and the weights divide after summing where MSST divides once."""
MODELS = {
    # viperx's BS-RoFormer 1297 (model_bs_roformer_ep_317_sdr_12.9755.yaml) and Kim's
    # Mel-Band RoFormer (config_vocals_mel_band_roformer_kj.yaml), narrowed to depth 1.
    # zero_dc false: audio-separator 0.47.1 ignores it (MSST's default zeroes the DC bin).
    "bs_roformer": dict(
        dim=32, depth=1, stereo=True, num_stems=1, time_transformer_depth=1,
        freq_transformer_depth=1, linear_transformer_depth=0,
        freqs_per_bands=(2,) * 24 + (4,) * 12 + (12,) * 8 + (24,) * 8 + (48,) * 8 + (128, 129),
        dim_head=16, heads=2, attn_dropout=0.1, ff_dropout=0.1, flash_attn=True,
        dim_freqs_in=1025, stft_n_fft=2048, stft_hop_length=441, stft_win_length=2048,
        stft_normalized=False, mask_estimator_depth=2, zero_dc=False),
    "mel_band_roformer": dict(
        dim=32, depth=1, stereo=True, num_stems=1, time_transformer_depth=1,
        freq_transformer_depth=1, num_bands=60, dim_head=16, heads=2, attn_dropout=0,
        ff_dropout=0, flash_attn=True, dim_freqs_in=1025, sample_rate=RATE, stft_n_fft=2048,
        stft_hop_length=441, stft_win_length=2048, stft_normalized=False,
        mask_estimator_depth=2, zero_dc=False),
}
TRACKS = {"song": 3 * RATE + 12_345, "short": RATE // 2 + 777}
"""``song``: 4 chunks' borders reflected, a last chunk under a chunk but over half of one;
``short``: under two borders (33,075 samples each), so nothing is reflected."""


def config(family: str) -> dict:
    return {"audio": {"chunk_size": CHUNK, "num_channels": 2, "sample_rate": RATE,
                      "min_mean_abs": 0.0},
            "model": MODELS[family],
            "training": {"instruments": ["vocals", "other"], "target_instrument": "vocals",
                         "batch_size": 2, "use_amp": True},
            "inference": {"batch_size": 1, "dim_t": 101, "num_overlap": 4}}


_REFERENCE = '''
import numpy as np
import yaml
import msst_demix

for family, case in inputs["families"].items():
    module = bs_roformer if family == "bs_roformer" else mel_band_roformer
    klass = module.BSRoformer if family == "bs_roformer" else module.MelBandRoformer
    with open(case["yaml"]) as file:
        config = ConfigDict(yaml.load(file, Loader=yaml.FullLoader))  # as MSST reads it
    torch.manual_seed(case["seed"])
    model = klass(**config.model)
    generator = torch.Generator().manual_seed(case["seed"] + 1)
    with torch.no_grad():  # every parameter off its init, so that norms and gates matter
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    model.eval()
    torch.save(model.state_dict(), case["ckpt"])
    for track, mix in inputs["tracks"].items():
        stems = msst_demix.demix(config, model, mix, torch.device("cpu"), family)
        stems["instrumental"] = mix - stems["vocals"]
        outputs[family, track] = stems
'''


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """Per family: the checkpoint folder, and the reference's stems of every track."""
    folder = tmp_path_factory.mktemp("roformers")
    generator = np.random.default_rng(7)
    tracks = {}
    for track, length in TRACKS.items():
        mix = (0.3 * generator.standard_normal((2, length))).astype(np.float32)
        sf.write(folder / f"{track}.wav", mix.T, RATE, subtype="FLOAT")
        tracks[track] = sf.read(folder / f"{track}.wav", dtype="float32", always_2d=True)[0].T
    families = {}
    for seed, family in enumerate(MODELS):
        (folder / family).mkdir()
        ckpt = folder / family / f"{family}_vocals.ckpt"
        # as MSST writes them: freqs_per_bands a !!python/tuple
        ckpt.with_suffix(".yaml").write_text(yaml.dump(config(family)))
        families[family] = dict(yaml=str(ckpt.with_suffix(".yaml")), ckpt=str(ckpt), seed=seed)
    stems = run_oracle(_REFERENCE, folder / "oracle", dict(families=families, tracks=tracks))
    return dict(folder=folder, families=families, stems=stems)


def separated(reference: dict, family: str, *options: str, model: str | None = None
              ) -> dict[str, dict[str, np.ndarray]]:
    """Every track separated by ``stemserve separate -n <model> ...options`` (default: the
    family's checkpoint)."""
    folder = reference["folder"]
    model = model or reference["families"][family]["ckpt"]
    out = folder / "out" / "-".join([Path(model).name, *options]).replace("--", "")
    tracks = [str(folder / f"{track}.wav") for track in TRACKS]
    assert main(["separate", "-n", model, *options, "-o", str(out), "--float32",
                 "--clip-mode", "none", "-q", *tracks]) == 0
    found = {}
    for track in TRACKS:
        where = out / Path(model).stem / track
        assert sorted(path.name for path in where.iterdir()) == ["instrumental.wav",
                                                                 "vocals.wav"]
        found[track] = {stem: sf.read(where / f"{stem}.wav", dtype="float32")[0].T
                        for stem in ("vocals", "instrumental")}
    return found


def assert_equal_to_reference(reference: dict, family: str, found: dict) -> None:
    for track, length in TRACKS.items():
        for stem in ("vocals", "instrumental"):
            expected = np.asarray(reference["stems"][family, track][stem]).reshape(2, length)
            got = found[track][stem]
            assert got.shape == (2, length), (track, stem, got.shape)
            error = float(np.abs(got - expected).max())
            assert error < TOLERANCE, (family, track, stem, error)
            assert np.abs(expected).max() > 0.01  # not a comparison of silences


@pytest.mark.oracle
@pytest.mark.parametrize("family, backend", [("bs_roformer", "onnx"),
                                             ("mel_band_roformer", "onnx"),
                                             ("bs_roformer", "torch")])
def test_in_process_stems_equal_the_reference(reference, family, backend):
    assert_equal_to_reference(reference, family,
                              separated(reference, family, "--backend", backend))


@pytest.mark.oracle
@pytest.mark.server
def test_served_stems_equal_the_reference(reference):
    """The Mel-Band RoFormer through a tritonserver started for the run (its gathers and
    scatter-add batched by the server); the BS-RoFormer's graph is the same kind."""
    family = "mel_band_roformer"
    assert_equal_to_reference(reference, family, separated(reference, family, "--serve"))


@pytest.mark.oracle
def test_a_release_name_resolves_through_the_mirror(reference, tmp_path, monkeypatch):
    """``-n bs_roformer_1297`` downloads the weights and the config.yaml from a loopback
    mirror, verifies both by sha256 (the table's, patched to the test checkpoint's), and
    separates as the file does."""
    name, family = "bs_roformer_1297", "bs_roformer"
    release, ckpt = ROFORMER_RELEASES[name], Path(reference["families"][family]["ckpt"])
    mirror = LoopbackServer()
    try:
        files = {}
        for remote, path in ((release.checkpoint, ckpt), (release.config,
                                                          ckpt.with_suffix(".yaml"))):
            mirror.files[remote.name] = path.read_bytes()
            files[remote] = remote._replace(checksum=hashlib.sha256(path.read_bytes()).hexdigest())
        monkeypatch.setitem(ROFORMER_RELEASES, name, RoformerRelease(
            release.title, files[release.checkpoint], files[release.config]))
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        monkeypatch.setenv(URL_ENV, mirror.url)
        assert_equal_to_reference(reference, family,
                                  separated(reference, family, "--backend", "onnx", model=name))
        assert sorted(mirror.requests) == sorted(f"/{remote.name}" for remote in files)
        cached = tmp_path / "torch" / "hub" / "checkpoints"
        assert sorted(path.name for path in cached.iterdir()) == sorted(
            remote.name for remote in files)
    finally:
        mirror.stop()


@pytest.mark.oracle
def test_a_safetensors_file_separates_as_its_ckpt(reference, tmp_path):
    family = "mel_band_roformer"
    ckpt = Path(reference["families"][family]["ckpt"])
    state = torch.load(ckpt, weights_only=True)
    model = write_safetensors(tmp_path / "kim.safetensors", state)
    shutil.copy(ckpt.with_suffix(".yaml"), tmp_path / "kim.yaml")
    assert_equal_to_reference(reference, family,
                              separated(reference, family, "--backend", "onnx",
                                        model=str(model)))


@pytest.mark.oracle
def test_the_comparison_can_fail(reference):
    """The reference tells the families apart: the comparison is not of near-silence."""
    bs = reference["stems"]["bs_roformer", "song"]["vocals"]
    mel = reference["stems"]["mel_band_roformer", "song"]["vocals"]
    assert np.abs(np.asarray(bs) - np.asarray(mel)).max() > 100 * TOLERANCE


def test_a_checkpoint_without_its_config_is_refused_with_where_it_belongs(tmp_path, capsys):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not read")
    track = tmp_path / "song.wav"
    sf.write(track, np.zeros((RATE, 2), np.float32), RATE)
    assert main(["separate", "-n", str(ckpt), "--backend", "onnx", "-o",
                 str(tmp_path / "out"), "-q", str(track)]) != 0
    message = capsys.readouterr().err
    assert str(ckpt.with_suffix(".yaml")) in message and "config" in message
    assert not (tmp_path / "out").exists()


def test_shifts_and_overlap_are_refused_for_a_roformer():
    from stemserve.pipeline import SeparationOptions, _ChunkPlanner
    from stemserve.spec import ModelSpec

    spec = ModelSpec(model_name="stems", checkpoint="m", checkpoint_sha256="0" * 64,
                     sample_rate=RATE, audio_channels=2, sources=("vocals", "instrumental"),
                     segment_length=CHUNK, padded_length=CHUNK, output_length=CHUNK,
                     valid_length_params=None, family="bs_roformer", num_overlap=4,
                     normalize=False, residual=True)
    for options, words in ((SeparationOptions(shifts=1), "shifts"),
                           (SeparationOptions(overlap=0.5), "num_overlap says (4)")):
        with pytest.raises(Exception, match=words.replace("(", r"\(").replace(")", r"\)")):
            _ChunkPlanner(spec, 10 * RATE, options)


def test_a_config_with_an_unknown_field_is_refused_naming_the_file_and_field(tmp_path, capsys):
    ckpt = tmp_path / "model.ckpt"
    torch.save({}, ckpt)
    data = config("bs_roformer")
    data["model"] = dict(data["model"], use_hyper_connections=True)
    ckpt.with_suffix(".yaml").write_text(yaml.dump(data))
    track = tmp_path / "song.wav"
    sf.write(track, np.zeros((RATE, 2), np.float32), RATE)
    assert main(["separate", "-n", str(ckpt), "--backend", "onnx", "-o",
                 str(tmp_path / "out"), "-q", str(track)]) != 0
    message = capsys.readouterr().err
    assert "model.yaml" in message and "use_hyper_connections" in message, message
    assert not (tmp_path / "out").exists()
