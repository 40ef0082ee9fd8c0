"""stemserve.models.roformer: BSRoformer and MelBandRoformer with the reference's module
trees, state dict keys and constructor arguments, computing what it computes.

The reference is audio-separator 0.47.1's copy of MSST's RoFormers
(``audio_separator/separator/uvr_lib_v5/roformer/``), installed by ``.ci/oracle-roformer.sh``
in ``.oracle/roformer`` and run in a child Python whose ``PYTHONPATH`` starts there (never
on this process's path, so it cannot shadow stemserve). Its files are imported by path as
a package of their own: audio-separator's ``separator`` package imports onnxruntime and
the rest of its separators, which the oracle does not install. A missing oracle fails the
``oracle`` tests under ``CI`` and skips them otherwise.

The tests above the oracle's need no oracle: the mel filterbank against a hand-computed
case, shapes, state dict keys and the refusals.
"""
from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
import torch

from stemserve.models.roformer import (DEFAULT_FREQS_PER_BANDS, BSRoformer, MelBandRoformer,
                                       mel_bands, mel_filterbank)
import oracle_roformer
from oracle_roformer import run_oracle
from tolerance import assert_matches

# Small configurations: n_fft 256 (129 frequencies), two heads of 16.
SMALL_STFT = dict(stft_n_fft=256, stft_hop_length=64, stft_win_length=256)
SMALL_BANDS = (4,) * 16 + (65,)
SMALL = dict(dim=32, depth=1, dim_head=16, heads=2, time_transformer_depth=1,
             freq_transformer_depth=1, **SMALL_STFT)


# --------------------------------------------------------------------------- no oracle

def test_the_mel_filterbank_of_a_hand_computed_case():
    """Below 1 kHz Slaney's mel scale is linear (3 mels per 200 Hz): at 2 kHz with n_fft 8
    the 5 mel points are the 5 FFT bins 0, 250 ... 1000 Hz, so each of the 3 filters is one
    at its centre bin and 0 elsewhere before the area normalisation 2 / 500 Hz."""
    expected = np.zeros((3, 5), np.float32)
    expected[[0, 1, 2], [1, 2, 3]] = 2.0 / 500
    weights = mel_filterbank(2000, 8, 3)
    assert weights.dtype == np.float32
    np.testing.assert_allclose(weights, expected, rtol=1e-6, atol=0)


def test_the_mel_scale_is_slaney_s():
    """Slaney: 15 mels at 1 kHz, then 27 mels per factor 6.4; triangles of area-normalised
    height 2 / (upper - lower edge) peaking at their centres."""
    from stemserve.models.roformer import _hz_to_mel, _mel_to_hz

    np.testing.assert_allclose(_hz_to_mel(np.array([0.0, 500.0, 1000.0, 6400.0])),
                               [0.0, 7.5, 15.0, 42.0], rtol=1e-12)
    hz = np.array([10.0, 999.0, 1000.0, 4321.0, 22050.0])
    np.testing.assert_allclose(_mel_to_hz(_hz_to_mel(hz)), hz, rtol=1e-12)
    weights = mel_filterbank(44100, 2048, 60)
    assert weights.shape == (60, 1025)
    edges = _mel_to_hz(np.linspace(0, _hz_to_mel(np.array(22050.0)), 62))
    heights = 2 / (edges[2:] - edges[:-2])
    assert np.all(weights.max(axis=1) <= heights * (1 + 1e-6))


def test_mel_bands_cover_every_frequency_and_overlap():
    bands = mel_bands(44100, 2048, 60)
    assert bands.shape == (60, 1025) and bands.dtype == torch.bool
    assert bands.any(dim=0).all()
    assert bands[0, 0] and bands[-1, -1]  # the reference's fix-ups
    assert (bands.sum(dim=0) >= 2).any()  # neighbours overlap


@pytest.mark.parametrize("stereo,num_stems", [(False, 1), (True, 2)])
def test_bs_roformer_shapes(stereo, num_stems):
    torch.manual_seed(0)
    model = BSRoformer(**SMALL, freqs_per_bands=SMALL_BANDS, stereo=stereo,
                       num_stems=num_stems).eval()
    channels = 2 if stereo else 1
    mix = torch.randn(3, channels, 1000)  # not a multiple of the hop
    with torch.no_grad():
        stems = model(mix)
        assert stems.shape == (3, num_stems, channels, 1000)
        spec = model.spectrogram(mix)
        assert spec.shape == (3, 129 * channels, 1000 // 64 + 1, 2)
        assert model.masks(spec).shape == (3, num_stems, 129 * channels, 1000 // 64 + 1, 2)
        if not stereo:  # a mono mix may drop its channel axis
            torch.testing.assert_close(model(mix[:, 0]), stems, rtol=0, atol=0)


@pytest.mark.parametrize("match", [False, True])
def test_mel_band_roformer_shapes(match):
    torch.manual_seed(0)
    model = MelBandRoformer(**SMALL, num_bands=8, stereo=True, num_stems=2,
                            match_input_audio_length=match).eval()
    with torch.no_grad():
        stems = model(torch.randn(2, 2, 1000))
    # The reference trims to the input's length only when asked.
    assert stems.shape == (2, 2, 2, 1000 if match else (1000 // 64) * 64)


def test_options_run():
    """The newer checkpoints' options build and run: linear attention, skip connections,
    deeper mask estimators, another MLP expansion."""
    torch.manual_seed(0)
    options = dict(linear_transformer_depth=1, skip_connection=True, mask_estimator_depth=3,
                   mlp_expansion_factor=2, depth=2, zero_dc=False, sage_attention=True,
                   flash_attn=False, use_torch_checkpoint=True)
    for model in (BSRoformer(**dict(SMALL, **options), freqs_per_bands=SMALL_BANDS),
                  MelBandRoformer(**dict(SMALL, **options), num_bands=6)):
        with torch.no_grad():
            assert torch.isfinite(model.eval()(torch.randn(1, 1, 640))).all()


def test_zero_dc_drops_the_dc_bin_of_the_masked_spectrogram():
    """MSST's ``zero_dc`` (the default): the stems lose exactly the iSTFT of their masked
    spectrogram's DC bin."""
    torch.manual_seed(0)
    model = BSRoformer(**SMALL, freqs_per_bands=SMALL_BANDS).eval()
    mix = torch.randn(1, 1, 64 * 40) + 3.0  # a large DC offset
    with torch.no_grad():
        with_dc_zeroed = model(mix)
        model.zero_dc = False
        kept = model(mix)
        spec = model.spectrogram(mix)
        masked = torch.view_as_complex(spec)[:, None] * torch.view_as_complex(model.masks(spec))
        dc_only = torch.zeros_like(masked)
        dc_only[:, :, 0] = masked[:, :, 0]
        dc = torch.istft(dc_only[0], 256, 64, 256, window=torch.hann_window(256),
                         length=mix.shape[-1])
    assert dc.abs().max() > 0.1
    torch.testing.assert_close(kept - with_dc_zeroed, dc[None, :, None], rtol=0, atol=1e-5)


def test_skip_connections_change_nothing_in_one_layer_and_something_in_two():
    """MSST's ``skip_connection``: each layer's input plus the outputs of all the layers
    before it (none before the first)."""
    mix = torch.randn(1, 1, 64 * 20)
    for depth, same in ((1, True), (2, False)):
        torch.manual_seed(0)
        model = BSRoformer(**dict(SMALL, depth=depth), freqs_per_bands=SMALL_BANDS).eval()
        with torch.no_grad():
            plain = model(mix)
            model.skip_connection = True
            skipped = model(mix)
        assert torch.equal(plain, skipped) == same


def test_state_dict_keys():
    """Names of the reference's tree (audio-separator 0.47.1 / MSST); the oracle tests
    compare whole key sets."""
    bs = BSRoformer(**dict(SMALL, depth=2), freqs_per_bands=SMALL_BANDS,
                    linear_transformer_depth=1).state_dict()
    for key in ["layers.0.0.layers.0.0.temperature", "layers.0.0.layers.0.0.to_qkv.0.weight",
                "layers.0.0.layers.0.0.to_out.1.weight",
                "layers.1.1.layers.0.0.rotary_embed.freqs", "layers.1.1.layers.0.0.to_qkv.weight",
                "layers.1.2.layers.0.0.to_gates.bias", "layers.1.2.layers.0.1.net.0.gamma",
                "layers.1.2.layers.0.1.net.4.weight", "final_norm.gamma",
                "band_split.to_features.16.0.gamma", "band_split.to_features.16.1.weight",
                "mask_estimators.0.to_freqs.16.0.2.weight"]:
        assert key in bs, key
    # BS-RoFormer's transformers end without a norm of their own (one final_norm instead).
    assert not any(re.fullmatch(r"layers\.\d+\.\d+\.norm\.gamma", key) for key in bs)
    mel = MelBandRoformer(**SMALL, num_bands=8).state_dict()
    assert "layers.0.0.norm.gamma" in mel and "final_norm.gamma" not in mel
    # Mel-Band RoFormer's mask MLPs have one more Linear than mask_estimator_depth (1).
    assert "mask_estimators.0.to_freqs.7.0.2.weight" in mel
    assert "mask_estimators.0.to_freqs.7.0.4.weight" not in mel
    assert "mask_estimators.0.to_freqs.16.0.2.weight" in bs  # BS: mask_estimator_depth (2)
    assert "mask_estimators.0.to_freqs.16.0.4.weight" not in bs
    assert not any("freq_indices" in key or "num_bands_per_freq" in key for key in mel)


def test_an_unknown_argument_is_refused_with_its_name():
    for klass, extra in ((BSRoformer, dict(freqs_per_bands=SMALL_BANDS)),
                         (MelBandRoformer, dict(num_bands=8))):
        with pytest.raises(TypeError, match="use_shared_bias_typo"):
            klass(**SMALL, **extra, use_shared_bias_typo=True)


def test_refusals():
    with pytest.raises(ValueError, match="adds up to 128"):
        BSRoformer(**SMALL, freqs_per_bands=(4,) * 32)
    with pytest.raises(NotImplementedError, match="use_pope"):
        BSRoformer(**SMALL, freqs_per_bands=SMALL_BANDS, use_pope=True)
    model = BSRoformer(**SMALL, freqs_per_bands=SMALL_BANDS, stereo=True)
    with pytest.raises(ValueError, match="stereo=True"):
        model(torch.randn(1, 1, 640))


def test_default_bands_are_the_paper_s():
    assert len(DEFAULT_FREQS_PER_BANDS) == 62 and sum(DEFAULT_FREQS_PER_BANDS) == 1025


# --------------------------------------------------------------------------- the oracle

CLASSES = {"BSRoformer": (BSRoformer, "bs_roformer"),
           "MelBandRoformer": (MelBandRoformer, "mel_band_roformer")}

# name: (class, kwargs, mix shape). Seeded: the oracle builds each with its own classes.
# zero_dc=False everywhere: audio-separator 0.47.1 accepts zero_dc and skip_connection but
# ignores them (MSST, which stemserve follows, zeroes the DC bin by default and adds the
# skip connections), and its MelBandRoformer ignores mlp_expansion_factor and has no
# linear_transformer_depth: those are left at the values where both agree.
CASES = {
    "bs-mono": ("BSRoformer", dict(SMALL, freqs_per_bands=SMALL_BANDS, zero_dc=False),
                (2, 1, 64 * 50)),
    "bs-stereo-2-stems": ("BSRoformer", dict(
        SMALL, depth=2, freqs_per_bands=SMALL_BANDS, stereo=True, num_stems=2,
        mask_estimator_depth=3, time_transformer_depth=2, zero_dc=False), (2, 2, 64 * 37 + 11)),
    "bs-linear-attention": ("BSRoformer", dict(
        SMALL, depth=2, freqs_per_bands=(2,) * 40 + (49,), stereo=True,
        linear_transformer_depth=1, mlp_expansion_factor=2, num_stems=3, zero_dc=False),
        (1, 2, 64 * 33)),
    "mel-mono": ("MelBandRoformer", dict(SMALL, num_bands=8, zero_dc=False), (2, 1, 64 * 50)),
    "mel-stereo-2-stems": ("MelBandRoformer", dict(
        SMALL, depth=2, num_bands=12, stereo=True, num_stems=2, mask_estimator_depth=2,
        sample_rate=22050, zero_dc=False), (2, 2, 64 * 41 + 7)),
    "mel-match-length": ("MelBandRoformer", dict(
        SMALL, depth=3, num_bands=10, stereo=True, match_input_audio_length=True,
        freq_transformer_depth=2, zero_dc=False), (1, 2, 64 * 29 + 5)),
    # Released configurations at depth 1 (viperx's BS-RoFormer 1297 / ep_317, Kim's
    # Mel-Band RoFormer): full widths, bands and STFT.
    "viperx-bs-1297-depth-1": ("BSRoformer", dict(
        dim=512, depth=1, stereo=True, num_stems=1, time_transformer_depth=1,
        freq_transformer_depth=1, linear_transformer_depth=0,
        freqs_per_bands=DEFAULT_FREQS_PER_BANDS, dim_head=64, heads=8, attn_dropout=0.1,
        ff_dropout=0.1, flash_attn=True, dim_freqs_in=1025, stft_n_fft=2048,
        stft_hop_length=441, stft_win_length=2048, stft_normalized=False,
        mask_estimator_depth=2, zero_dc=False), (1, 2, 441 * 40)),
    "kim-mel-depth-1": ("MelBandRoformer", dict(
        dim=384, depth=1, stereo=True, num_stems=1, time_transformer_depth=1,
        freq_transformer_depth=1, num_bands=60, dim_head=64, heads=8, attn_dropout=0,
        ff_dropout=0, flash_attn=True, dim_freqs_in=1025, sample_rate=44100,
        stft_n_fft=2048, stft_hop_length=441, stft_win_length=2048, stft_normalized=False,
        mask_estimator_depth=2, zero_dc=False), (1, 2, 441 * 40)),
}

_FORWARD = '''
for name, case in inputs["cases"].items():
    module = bs_roformer if case["klass"] == "BSRoformer" else mel_band_roformer
    torch.manual_seed(case["seed"])
    model = getattr(module, case["klass"])(**case["kwargs"])
    generator = torch.Generator().manual_seed(case["seed"] + 1)
    with torch.no_grad():  # every parameter off its init, so that norms and gates matter
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    model.eval()
    with torch.no_grad():
        stems = model(case["mix"])
    outputs[name] = dict(state=model.state_dict(), stems=stems)
'''


@pytest.fixture(scope="module")
def oracle_results(tmp_path_factory) -> dict:
    """Every case built, perturbed and run by the reference in one oracle process."""
    cases = {}
    for index, (name, (klass, kwargs, shape)) in enumerate(CASES.items()):
        mix = torch.randn(*shape, generator=torch.Generator().manual_seed(100 + index))
        cases[name] = dict(klass=klass, kwargs=kwargs, seed=index, mix=mix)
    results = run_oracle(_FORWARD, tmp_path_factory.mktemp("oracle-roformer"),
                         dict(cases=cases))
    for name, case in cases.items():
        results[name]["mix"] = case["mix"]
    return results


@pytest.mark.oracle
@pytest.mark.parametrize("name", list(CASES))
def test_same_state_and_output_as_the_reference(oracle_results, name):
    klass, kwargs, _ = CASES[name]
    result = oracle_results[name]
    model = CLASSES[klass][0](**kwargs)
    assert set(model.state_dict()) == set(result["state"])
    model.load_state_dict(result["state"], strict=True)
    model.eval()
    with torch.no_grad():
        stems = model(result["mix"])
    expected = result["stems"]
    if expected.ndim == 3:  # the reference drops the stem axis of one-stem models
        expected = expected[:, None]
    length = result["mix"].shape[-1]
    if klass == "BSRoformer":
        # audio-separator's BSRoformer ends at the last whole hop (its iSTFT has no length);
        # MSST's, which stemserve follows, returns the input's length.
        hop = kwargs["stft_hop_length"]
        assert expected.shape[-1] == length // hop * hop and stems.shape[-1] == length
        stems = stems[..., :expected.shape[-1]]
    assert stems.shape == expected.shape
    assert (stems - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max()))
    # Measured: at most 2 epsilons of the peak (float32 rounding of reordered sums).
    assert_matches(stems.numpy(), expected.numpy(), ulps=16, what=name)


_SIGNATURES = '''
import inspect
outputs["signatures"] = {}
for name, module in (("BSRoformer", bs_roformer), ("MelBandRoformer", mel_band_roformer)):
    outputs["signatures"][name] = [
        (p.name, p.kind.name, p.default if not callable(p.default) else repr(p.default))
        for p in inspect.signature(getattr(module, name)).parameters.values()]
'''


@pytest.mark.oracle
def test_every_reference_argument_is_accepted_with_its_default(tmp_path):
    signatures = run_oracle(_SIGNATURES, tmp_path)["signatures"]
    for name, parameters in signatures.items():
        ours = inspect.signature(CLASSES[name][0]).parameters
        for argument, kind, default in parameters:
            assert argument in ours, f"{name}: {argument}"
            assert ours[argument].kind.name == kind, f"{name}: {argument}"
            if not isinstance(default, str) or not default.startswith("<"):
                mine = ours[argument].default
                mine = tuple(mine) if isinstance(mine, (tuple, list)) else mine
                assert mine == default, f"{name}: {argument}: {mine!r} != {default!r}"


_MEL = '''
from librosa import filters
outputs["mel"] = {key: filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels)
                  for key in inputs["cases"] for sr, n_fft, n_mels in [key]}
'''


@pytest.mark.oracle
def test_the_mel_filterbank_is_librosa_s(tmp_path):
    cases = [(44100, 2048, 60), (44100, 2048, 128), (48000, 4096, 60), (22050, 256, 12),
             (44100, 256, 8), (32000, 1024, 40)]
    mel = run_oracle(_MEL, tmp_path, dict(cases=cases))["mel"]
    for key in cases:
        ours = mel_filterbank(*key)
        assert ours.dtype == mel[key].dtype
        np.testing.assert_array_equal(ours, mel[key], err_msg=str(key))


def test_a_missing_oracle_fails_under_ci_and_skips_otherwise(monkeypatch, tmp_path):
    monkeypatch.setattr(oracle_roformer, "ORACLE_DIR", tmp_path / "absent")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="oracle-roformer.sh"):
        oracle_roformer.require_oracle()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="oracle-roformer.sh"):
        oracle_roformer.require_oracle()
