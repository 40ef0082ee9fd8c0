"""The RoFormers' export and split, without the oracle: the convolution STFTs against
torch's, the exported graph against the network (within 1e-4, batch dynamic, no ``Range``,
``Tile``, ``If`` or ``Loop``), the sidecar a loaded RoFormer exports with, and the chunked
split against MSST's own ``demix`` run here with a stand-in network.
"""
from __future__ import annotations

import importlib
import sys
import types
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from oracle_roformer import ConfigDict
from stemserve.client.backends.local import LocalBackend
from stemserve.errors import ModelError, SpecError
from stemserve.export.attention import FusedAttention, fuse_attention
from stemserve.export.exportable import RoformerGraph
from stemserve.export.tensorrt import onnx_runtime_domains, trtexec_command
from stemserve.export.to_onnx import export_onnx
from stemserve.checkpoints import CheckpointInfo
from stemserve.models.roformer import BSRoformer, MelBandRoformer
from stemserve.models.stft import ConvISTFT, ConvSTFT
from stemserve.pipeline import SeparationOptions, fade_window, stream_stems
from stemserve.spec import ModelSpec

SMALL = dict(dim=32, depth=1, dim_head=16, heads=2, time_transformer_depth=1,
             freq_transformer_depth=1, stft_n_fft=256, stft_hop_length=41,
             stft_win_length=256)
CHUNK = 41 * 200  # over a second at 8 kHz: the shortest segment an export takes
BANDS = (4,) * 16 + (65,)


@pytest.mark.parametrize("n_fft, hop, win, normalized", [(2048, 441, 2048, False),
                                                          (256, 64, 200, True)])
def test_the_convolution_stfts_are_torch_s(n_fft, hop, win, normalized):
    x = torch.randn(3, 44100 // 4, generator=torch.Generator().manual_seed(0))
    window = torch.hann_window(win)
    expected = torch.view_as_real(torch.stft(x, n_fft, hop, win, window=window,
                                             normalized=normalized, return_complex=True))
    got = ConvSTFT(n_fft, hop, win, normalized)(x)
    peak = expected.abs().max()
    assert (got - expected.permute(0, 3, 1, 2)).abs().max() < 1e-5 * peak
    frames = expected.shape[2]
    for length in (None, x.shape[-1]):
        back = torch.istft(torch.view_as_complex(expected.contiguous()), n_fft, hop, win,
                           window=window, normalized=normalized, length=length)
        mine = ConvISTFT(n_fft, hop, frames, win, normalized, length)(expected.permute(0, 3, 1, 2))
        assert mine.shape == back.shape and (mine - back).abs().max() < 1e-5


def loaded(model: torch.nn.Module, sources: list[str], residual: bool) -> torch.nn.Module:
    """``model`` with what load_msst sets from a config."""
    model.samplerate, model.sources, model.chunk_size = 8000, sources, CHUNK
    model.num_overlap, model.normalize, model.residual = 4, False, residual
    return model.eval()


def networks() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "bs-stereo-2-stems": loaded(BSRoformer(**SMALL, stereo=True, num_stems=2,
                                               freqs_per_bands=BANDS), ["vocals", "drums"],
                                    residual=False),
        "mel-mono-residual": loaded(MelBandRoformer(**SMALL, num_bands=8), ["vocals",
                                                                             "instrumental"],
                                    residual=True),
    }


@pytest.mark.parametrize("portable", [False, True], ids=["fused", "portable"])
@pytest.mark.parametrize("name", ["bs-stereo-2-stems", "mel-mono-residual"])
def test_the_exported_graph_is_the_network(name, portable, tmp_path):
    model = networks()[name]
    info = CheckpointInfo(name=name, path=tmp_path / "m.ckpt", sha256="ab" * 32, config={},
                          family="x")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    spec = export_onnx(model, info, tmp_path, portable=portable)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    assert not any(isinstance(module, FusedAttention) for module in model.modules())
    assert spec.family == ("bs_roformer" if name.startswith("bs") else "mel_band_roformer")
    assert (spec.segment_length, spec.padded_length, spec.output_length) == (CHUNK,) * 3
    assert (spec.num_overlap, spec.normalize, spec.residual) == (4, False, model.residual)
    assert list(spec.sources) == model.sources and spec.fixed_length == CHUNK
    graph = onnx.load(str(tmp_path / spec.onnx_file))
    operators = {(node.domain, node.op_type) for node in graph.graph.node}
    assert not {op for _, op in operators} & {"Range", "Tile", "If", "Loop"}
    fused = {("com.microsoft", "MultiHeadAttention"), ("com.microsoft", "RotaryEmbedding")}
    if portable:  # what TensorRT's parser reads
        assert {domain for domain, _ in operators} == {""}
        assert onnx_runtime_domains(tmp_path) == set()
        assert trtexec_command(tmp_path)[1] == f"--onnx={tmp_path / spec.onnx_file}"
    else:  # every attention in the fused operators: no Softmax left
        assert fused <= operators and "Softmax" not in {op for _, op in operators}
        assert onnx_runtime_domains(tmp_path) == {"com.microsoft"}
        with pytest.raises(ModelError, match="TensorRT does not read: export it again "
                                             "with --portable"):
            trtexec_command(tmp_path)
    session = ort.InferenceSession(str(tmp_path / spec.onnx_file),
                                   providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        mix = torch.randn(batch, model.audio_channels, CHUNK)
        with torch.no_grad():
            expected = model(mix).numpy()
        got = session.run(None, {"mix": mix.numpy()})[0]
        assert got.shape == expected.shape == (batch, len(model.sources),
                                               model.audio_channels, CHUNK)
        assert np.abs(got - expected).max() < 1e-4


@pytest.mark.parametrize("length", [CHUNK, CHUNK - 41 * 7], ids=["fixed", "other"])
def test_the_fused_attention_is_the_network_s(length):
    """In PyTorch, on the chunk whose rotary tables the graph fixes and on another length."""
    model = loaded(BSRoformer(**SMALL, freqs_per_bands=BANDS, linear_transformer_depth=1),
                   ["vocals"], residual=False)
    fused = fuse_attention(RoformerGraph(model, CHUNK))
    assert sum(isinstance(module, FusedAttention) for module in fused.modules()) == 2
    assert not any(isinstance(module, FusedAttention) for module in model.modules())
    plain = torch.nn.Linear(1, 1)
    assert fuse_attention(plain) is plain  # nothing to fuse: not copied
    x = torch.randn(3, length // 41 + 1, 32)
    attention = model.layers[0][-2].layers[0][0]
    with torch.no_grad():
        expected = attention(x)
        assert (FusedAttention(attention)(x) - expected).abs().max() < 1e-5
        mix = torch.randn(2, model.audio_channels, CHUNK)
        assert (fused(mix) - model(mix)).abs().max() < 1e-5


def test_the_zeroed_dc_bin_is_the_network_s():
    model = loaded(BSRoformer(**SMALL, freqs_per_bands=BANDS, zero_dc=True), ["vocals"],
                   residual=False)
    mix = torch.randn(2, 1, CHUNK)
    with torch.no_grad():
        assert (RoformerGraph(model, CHUNK)(mix) - model(mix)).abs().max() < 1e-5


def chunk_spec(num_overlap: int, chunk: int = 1000, residual: bool = False,
               normalize: bool = False) -> ModelSpec:
    sources = ("vocals", "instrumental") if residual else ("vocals",)
    return ModelSpec(model_name="stems", checkpoint="m", checkpoint_sha256="0" * 64,
                     sample_rate=8000, audio_channels=2, sources=sources,
                     segment_length=chunk, padded_length=chunk, output_length=chunk,
                     valid_length_params=None, family="bs_roformer",
                     num_overlap=num_overlap, normalize=normalize, residual=residual)


def separate(spec: ModelSpec, mix: np.ndarray, network) -> np.ndarray:
    with LocalBackend(spec, network, max_batch=1, name="test") as backend:
        blocks = list(stream_stems(
            lambda: (mix[:, i:i + 777] for i in range(0, mix.shape[-1], 777)), backend,
            SeparationOptions(in_flight=3)))
    return np.concatenate(blocks, axis=-1)


@pytest.fixture(scope="module")
def msst_demix():
    """MSST's own ``demix`` (tests/msst_demix.py, copied at a pinned commit), importable here:
    it needs torch, numpy and tqdm, and ml_collections only for a type hint."""
    stub = types.ModuleType("ml_collections")
    stub.ConfigDict = ConfigDict
    saved = sys.modules.get("ml_collections")
    sys.modules["ml_collections"] = stub
    try:
        yield importlib.import_module("msst_demix")
    finally:
        sys.modules.pop("msst_demix", None)
        if saved is None:
            sys.modules.pop("ml_collections")
        else:
            sys.modules["ml_collections"] = saved


class Warped(torch.nn.Module):
    """A network whose output depends on where in the chunk a sample is: any misplaced
    chunk, reflection or weight shows."""

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        return torch.tanh(mix * torch.linspace(0.5, 1.5, mix.shape[-1]))[:, None]


@pytest.mark.parametrize("num_overlap", [1, 2, 4])
@pytest.mark.parametrize("length", [300, 999, 1000, 1501, 2600, 7777])
def test_the_split_is_msst_s_demix(msst_demix, num_overlap, length):
    """Reflected borders (or none, under two borders), a last chunk reflected or
    zero-padded, first and last fades, and MSST's zeros where the windows sum to 0 (at
    every chunk boundary with ``num_overlap`` 1): all as MSST's ``demix`` with a batch of
    one."""
    mix = np.random.default_rng(length).standard_normal((2, length)).astype(np.float32)
    config = ConfigDict(dict(audio=dict(chunk_size=1000),
                             inference=dict(num_overlap=num_overlap, batch_size=1),
                             training=dict(target_instrument="vocals", use_amp=False,
                                           instruments=["vocals", "other"])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its torch.cuda.amp.autocast is deprecated
        expected = msst_demix.demix(config, Warped(), mix, torch.device("cpu"),
                                    "bs_roformer")["vocals"]
    got = separate(chunk_spec(num_overlap), mix,
                   lambda batch: Warped()(torch.from_numpy(batch)).numpy())
    assert got.shape == (1, 2, length)
    np.testing.assert_allclose(got[0], expected, rtol=0, atol=1e-6)


def test_a_residual_stem_is_de_normalised_without_the_mean():
    mix = (np.random.default_rng(0).standard_normal((2, 5000)) + 3).astype(np.float32)
    spec = chunk_spec(2, residual=True, normalize=True)

    def network(batch: np.ndarray) -> np.ndarray:  # a "vocals" of half the mix
        return np.stack([batch / 2, batch - batch / 2], axis=1)

    out = separate(spec, mix, network)
    mono = mix.mean(axis=0, dtype=np.float64)
    mean, std = mono.mean(), mono.std()  # MSST's: numpy's population std
    normalised = (mix - mean) / std
    np.testing.assert_allclose(out[0], normalised / 2 * std + mean, atol=1e-4)
    np.testing.assert_allclose(out[0] + out[1], mix, atol=1e-4)  # the stems add up


def test_the_fade_window_is_msst_s():
    fade = torch.linspace(0, 1, 100)
    window = torch.ones(1000)
    window[-100:] = torch.linspace(1, 0, 100)
    window[:100] = fade
    np.testing.assert_array_equal(fade_window(1000), window.numpy())


def test_a_sidecar_checks_its_chunked_fields():
    chunk_spec(4)
    for changes, words in ((dict(num_overlap=0), "num_overlap"),
                           (dict(num_overlap=65), "num_overlap"),
                           (dict(normalize="yes"), "normalize"),
                           (dict(residual=True), "residual")):
        fields = dict(model_name="stems", checkpoint="m", checkpoint_sha256="0" * 64,
                      sample_rate=8000, audio_channels=2, sources=("vocals",),
                      segment_length=1000, padded_length=1000, output_length=1000,
                      valid_length_params=None, family="bs_roformer", num_overlap=4)
        with pytest.raises(SpecError, match=words):
            ModelSpec(**{**fields, **changes})
    with pytest.raises(SpecError, match="no num_overlap"):
        ModelSpec(model_name="stems", checkpoint="m", checkpoint_sha256="0" * 64,
                  sample_rate=8000, audio_channels=2, sources=("vocals",),
                  segment_length=1000, padded_length=1000, output_length=1000,
                  valid_length_params=None, family="htdemucs", num_overlap=4)
    with pytest.raises(SpecError, match="always normalised"):
        ModelSpec(model_name="stems", checkpoint="m", checkpoint_sha256="0" * 64,
                  sample_rate=8000, audio_channels=2, sources=("vocals",),
                  segment_length=1000, padded_length=1000, output_length=1000,
                  valid_length_params=None, family="htdemucs", normalize=False)


def test_two_stems_of_a_single_target_roformer_are_vocals_and_the_rest():
    from stemserve.client.stems import StemSplitter

    spec = chunk_spec(2, residual=True)
    written = []
    splitter = StemSplitter(spec, "vocals", spec.sample_rate, written.append)
    block = np.random.default_rng(0).standard_normal((2, 2, 500)).astype(np.float32)
    splitter(block)
    splitter.flush()
    assert splitter.names == ["vocals", "no_vocals"]
    got = {name: np.concatenate([part[name] for part in written], axis=-1)
           for name in splitter.names}
    np.testing.assert_array_equal(got["vocals"], block[0])
    np.testing.assert_array_equal(got["no_vocals"], block[1])  # the instrumental


@pytest.mark.parametrize("variant, batch", [("cpu", 1), ("gpu", 8)])
def test_the_repositories_serve_a_roformer_on_its_chunk(variant, batch):
    """One input shape (the chunk) so that every request batches; the CPU server batches by
    1 (a batch of 2 costs as much as two of 1 there), a GPU by up to 8, TensorRT's profile
    fixed at the chunk."""
    from stemserve.model_repository.writer import render_config

    spec = chunk_spec(2, chunk=CHUNK, residual=True)
    config = render_config(spec, variant)
    assert config.max_batch_size == batch
    assert list(config.input[0].dims) == [2, CHUNK]
    assert list(config.output[0].dims) == [2, 2, CHUNK]
    if variant == "gpu":
        assert spec.tensorrt_profile(8) == {"min": f"1x2x{CHUNK}", "opt": f"8x2x{CHUNK}",
                                            "max": f"8x2x{CHUNK}"}


@pytest.mark.slow
def test_tensorrt_gets_a_portable_export(tmp_path, capsys):
    """``export --tensorrt`` finds the fused export of the checkpoint, says why it exports it
    again, and builds from standard operators; the next time it takes that export as is."""
    from test_msst_checkpoints import write_config
    from test_msst_load import config_data, network

    from stemserve.cli import main
    from stemserve.client.models import local_export

    config = config_data("bs_roformer")
    config["audio"]["chunk_size"] = 64 * 690  # a second at 44.1 kHz, in hops
    write_config(tmp_path, config, "model.yaml")
    checkpoint = tmp_path / "model.ckpt"
    torch.save(network("bs_roformer").state_dict(), checkpoint)
    assert main(["export", "-n", str(checkpoint), "--no-check"]) == 0
    folder = local_export(str(checkpoint))
    assert onnx_runtime_domains(folder) == {"com.microsoft"}
    capsys.readouterr()
    for again in (True, False):
        assert main(["export", "-n", str(checkpoint), "--tensorrt", "--print", "--no-check"]) == 0
        out, err = capsys.readouterr()
        assert ("has ONNX Runtime's fused attention, which TensorRT does not read: exporting "
                "it again with --portable" in err) is again
        assert local_export(str(checkpoint)) == folder and onnx_runtime_domains(folder) == set()
        assert f"--onnx={folder / 'model.onnx'}" in out
