"""The matrix-product STFT and the exportable HTDemucs wrappers compute what the model
computes, and export to ONNX (opset 17, TorchScript exporter, dynamic batch)."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from stemserve.models import HTDemucs
from stemserve.models.configs import HTDEMUCS
from stemserve.export.exportable import (HybridGraphSTFT, HTDemucsCore, htdemucs_from_core,
                                         htdemucs_spec)
from stemserve.models.stft import DftISTFT, DftSTFT, hybrid_ispec, hybrid_spec, ispectro, spectro

TINY = dict(HTDEMUCS, channels=8, bottom_channels=32, segment=Fraction(1, 2), t_layers=2)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return HTDemucs(**TINY).eval()


@pytest.mark.parametrize("n_fft,hop,n_bins", [(4096, 1024, None), (4096, 1024, 2048),
                                               (512, 128, None), (300, 100, 150)])
def test_dft_stft_is_spectro(n_fft, hop, n_bins):
    """Powers of two as the models use them, and sizes whose factors are not (300 = 10 x 30,
    a hop of 3 frames per window)."""
    x = torch.randn(3, 20_011, generator=torch.Generator().manual_seed(0))
    spectrum = spectro(x, n_fft, hop)
    z = torch.view_as_real(spectrum).permute(0, 3, 1, 2)[:, :, :n_bins]
    got = DftSTFT(n_fft, hop, n_bins=n_bins)(x)
    assert got.shape == z.shape
    assert (got - z).abs().max() < 1e-5 * z.abs().max()
    # and back, from the bins kept (the others taken as zero)
    kept = torch.zeros_like(spectrum)
    kept[:, :z.shape[-2]] = spectrum[:, :z.shape[-2]]
    wave = ispectro(kept, hop, length=x.shape[-1])
    assert (DftISTFT(n_fft, hop, n_bins=n_bins)(z, x.shape[-1]) - wave).abs().max() < 1e-5


def test_hybrid_spec_round_trip():
    x = torch.randn(2, 2, 30_011, generator=torch.Generator().manual_seed(1))
    z = hybrid_spec(x, 4096)
    assert z.shape == (2, 2, 2048, 30)
    # The Nyquist bin is dropped: the round trip is close, not exact.
    assert (hybrid_ispec(z, x.shape[-1], 1024) - x).abs().mean() < 0.05
    # The MDX models' padding bug misaligns the round trip; only the shapes hold.
    z = hybrid_spec(x, 4096, hybrid_old=True)
    assert z.shape == (2, 2, 2048, 30)
    assert hybrid_ispec(z, x.shape[-1], 1024, hybrid_old=True).shape == x.shape


def test_wrappers_compute_the_model(tiny):
    mix = torch.randn(2, 2, 21_011, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = tiny(mix)
        assert (HybridGraphSTFT(tiny)(mix) - expected).abs().max() < 1e-5
        padded = torch.nn.functional.pad(mix, (0, tiny.training_length - mix.shape[-1]))
        freq, time = HTDemucsCore(tiny)(padded, htdemucs_spec(tiny, padded))
        got = htdemucs_from_core(tiny, freq, time)[..., :mix.shape[-1]]
    assert torch.equal(got, expected)
    # The STFT kernels are not state: the wrapper's state is the model's.
    assert list(HybridGraphSTFT(tiny).state_dict()) == [
        "model." + key for key in tiny.state_dict()]


@pytest.mark.parametrize("way", ["graph-stft", "core"])
@pytest.mark.slow
def test_onnx_export_matches_torch(tiny, way, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    length = tiny.training_length
    mix = torch.randn(2, 2, length, generator=torch.Generator().manual_seed(3))
    if way == "graph-stft":
        module, inputs = HybridGraphSTFT(tiny).eval(), (mix[:1],)
        names, outputs = ["mix"], ["stems"]
    else:
        module, inputs = HTDemucsCore(tiny).eval(), (mix[:1], htdemucs_spec(tiny, mix[:1]))
        names, outputs = ["mix", "spec"], ["freq", "time"]
    path = tmp_path / "model.onnx"
    torch.onnx.export(module, inputs, str(path), opset_version=17, dynamo=False,
                      input_names=names, output_names=outputs,
                      dynamic_axes={name: {0: "batch"} for name in names + outputs})
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {"mix": mix.numpy()}  # batch 2: the batch axis is dynamic
    if way == "core":
        feeds["spec"] = htdemucs_spec(tiny, mix).numpy()
    got = [torch.from_numpy(out) for out in session.run(None, feeds)]
    if way == "core":
        got = htdemucs_from_core(tiny, *got)
    else:
        got = got[0]
    with torch.no_grad():
        expected = tiny(mix)
    assert (got - expected).abs().max() < 1e-4
