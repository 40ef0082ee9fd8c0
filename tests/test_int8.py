"""The int8 fast path: quantization of an export, its variant through every backend, refusals
(and what int8 and bf16 share: a variant made once).

How much int8 changes separation quality is the quality meter's job (benchmarks/quality/);
here the graph must really be quantized, run through ONNX Runtime and Triton, and stay close
to the fp32 stems of the same random-weight model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import needs_bf16
from stemserve.errors import ModelError, RepositoryError, SpecError
from stemserve.spec import has_precision, load_export, load_export_spec, sidecar_name


def export_with_variant(small_export: Path, tmp_path_factory, precision: str) -> Path:
    """A copy of the session's small export with its ``precision`` variant made, as
    ``separate --int8`` or ``--bf16`` makes it."""
    from stemserve.client.models import export_dir_for

    folder = tmp_path_factory.mktemp(precision) / "export"
    shutil.copytree(small_export, folder)
    return export_dir_for(folder, precision=precision)


@pytest.fixture(scope="module")
def int8_export(small_export, tmp_path_factory) -> Path:
    return export_with_variant(small_export, tmp_path_factory, "int8")


def _ops(path: Path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node]


def _relative_error(got: dict, expected: dict) -> float:
    return max(float(np.abs(got[name] - expected[name]).max() / np.abs(expected[name]).max())
               for name in expected)


def _mix(spec, seconds: float = 2.5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.3 * rng.standard_normal((2, int(seconds * spec.sample_rate)))).astype(np.float32)


def test_every_lstm_and_matrix_product_is_quantized(small_export, int8_export):
    fp32_ops, int8_ops = _ops(small_export / "model.onnx"), _ops(int8_export / "model.int8.onnx")
    assert fp32_ops.count("LSTM") >= 1
    assert int8_ops.count("DynamicQuantizeLSTM") == fp32_ops.count("LSTM")
    assert "LSTM" not in int8_ops
    # The linear after the LSTM too; the convolutions stay fp32 (ConvInteger is slow).
    assert int8_ops.count("MatMulInteger") >= 1
    assert int8_ops.count("Conv") == fp32_ops.count("Conv")
    spec = load_export_spec(int8_export, "int8")
    assert (spec.precision, spec.onnx_file) == ("int8", "model.int8.onnx")
    assert has_precision(int8_export, "int8") and not has_precision(small_export, "int8")
    # The LSTM holds most of the weights (half of them at full size, 1013 -> 509 MB).
    assert (int8_export / "model.int8.onnx").stat().st_size \
        < 0.6 * (small_export / "model.onnx").stat().st_size


def test_an_lstm_whose_weights_are_computed_is_refused(small_export, tmp_path):
    """quantize_dynamic leaves such an LSTM in fp32 without a word: the export must fail."""
    from stemserve.export.quantize import quantize_int8

    folder = tmp_path / "export"
    shutil.copytree(small_export, folder)
    model = onnx.load(str(folder / "model.onnx"))
    lstm = next(node for node in model.graph.node if node.op_type == "LSTM")
    weights = lstm.input[1]
    lstm.input[1] = weights + "_computed"
    model.graph.node.insert(0, onnx.helper.make_node("Identity", [weights],
                                                     [weights + "_computed"]))
    onnx.save(model, str(folder / "model.onnx"))
    with pytest.raises(ModelError, match="LSTM layers were quantized") as caught:
        quantize_int8(folder)
    assert str(folder / "model.onnx") in str(caught.value)
    assert not (folder / "model.int8.onnx").exists()
    assert not (folder / sidecar_name("int8")).exists()


def test_int8_stems_stay_close_to_fp32(small_export, int8_export):
    from stemserve.client import separate_array
    from stemserve.client.backends.onnx import OnnxBackend

    spec = load_export_spec(small_export)
    mix = _mix(spec)
    with OnnxBackend(small_export) as fp32, OnnxBackend(int8_export, precision="int8") as int8:
        expected = separate_array(mix, spec.sample_rate, backend=fp32)
        got = separate_array(mix, spec.sample_rate, backend=int8)
    error = _relative_error(got, expected)
    assert 0 < error < 0.05, error


@pytest.mark.parametrize("precision,made", [
    ("int8", "model.int8.onnx"),
    pytest.param("bf16", sidecar_name("bf16"), marks=needs_bf16),
])
def test_open_backend_makes_a_fast_path_variant_once(small_model, stemserve_cache, precision,
                                                     made):
    """`separate --int8` (or `--bf16`) `--backend onnx` on a checkpoint: exported, then
    quantized (or given its bf16 sidecar), once."""
    import torch

    from stemserve.client.backends import open_backend
    from stemserve.client.models import export_dir_for

    model, info = small_model
    checkpoint = stemserve_cache / f"{precision}-once" / "tiny.th"
    checkpoint.parent.mkdir()
    torch.save(dict(config=dict(info.config), state=model.state_dict()), checkpoint)
    with open_backend("onnx", model=checkpoint, precision=precision) as backend:
        assert backend.spec.precision == precision
    folder = export_dir_for(checkpoint)
    stamp = (folder / made).stat().st_mtime_ns
    with open_backend("onnx", model=checkpoint, precision=precision) as backend:
        assert backend.spec.precision == precision
    assert (folder / made).stat().st_mtime_ns == stamp


def test_refusals_name_the_way_out(small_export, tmp_path, capsys):
    from stemserve.client.backends import open_backend
    from stemserve.cli import main
    from stemserve.model_repository.writer import fill_repository

    with pytest.raises(SpecError, match="stemserve export --int8") as caught:
        load_export(small_export, "int8")
    assert str(small_export) in str(caught.value)
    with pytest.raises(SpecError, match="precision must be one of"):
        load_export(small_export, "int4")
    with pytest.raises(RepositoryError, match="cpu variant"):
        fill_repository(small_export, tmp_path / "repo", "gpu", precision="int8")
    with pytest.raises(RepositoryError, match="leave precision out"):
        fill_repository(small_export, tmp_path / "repo", "gpu-trt", precision="fp16")
    assert not (tmp_path / "repo").exists()
    assert main(["serve", "--int8", "--gpu", "-n", str(small_export)]) != 0
    assert "--int8 is a CPU fast path: drop --gpu" in capsys.readouterr().err
    with pytest.raises(ModelError, match="--int8 takes --backend onnx, triton or triton-stream"):
        open_backend("torch", model=small_export, precision="int8")


@pytest.mark.server
@pytest.mark.slow
def test_a_served_int8_repository_answers_with_its_precision(small_export, int8_export,
                                                            tmp_path, capsys):
    """`serve --int8`'s repository: the config carries the int8 sidecar, the stems are the
    in-process int8 ones, a client asking for another precision is told so, and one asking
    for none is told which it gets, its stems in a folder of their own."""
    import soundfile as sf

    from stemserve.cli import main
    from stemserve.client import separate_array
    from stemserve.client.backends import open_backend
    from stemserve.client.backends.onnx import OnnxBackend
    from stemserve.model_repository.local import local_server

    spec = load_export_spec(small_export)
    mix = _mix(spec, seconds=2.0, seed=1)
    with OnnxBackend(int8_export, precision="int8") as local:
        expected = separate_array(mix, spec.sample_rate, backend=local)
    with local_server(int8_export, precision="int8", root=tmp_path, logs=tmp_path) as server:
        record = json.loads((tmp_path.glob("serve-*/repository/demucs/1/fill.json")
                             .__next__()).read_text())
        assert record["model_file"] == "model.int8.onnx"
        with open_backend("triton", connection=server.grpc_url, precision="int8") as served:
            assert served.spec.precision == "int8"
            got = separate_array(mix, spec.sample_rate, backend=served)
        with pytest.raises(ModelError, match="serves the int8 graph"):
            open_backend("triton", connection=server.grpc_url, precision="fp32")
        sf.write(str(tmp_path / "song.wav"), mix.T, spec.sample_rate)
        capsys.readouterr()
        assert main(["separate", str(tmp_path / "song.wav"), "--url", server.grpc_url,
                     "-o", str(tmp_path / "out")]) == 0
    told = capsys.readouterr().err
    assert (f"Triton at {server.grpc_url} serves the int8 graph of 'small', not the exact "
            "fp32 one") in told
    assert f"separating with small (Demucs v2, sha256 {spec.checkpoint_sha256[:8]}, int8) on " \
        f"Triton at {server.grpc_url}" in told
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["small-int8"]
    assert max(np.abs(got[name] - expected[name]).max() for name in got) < 1e-5


def test_exporting_again_drops_the_earlier_int8_graph(small_model, int8_export, tmp_path):
    """A re-export in place (a changed checkpoint) must not leave the old int8 graph to be
    served as the new model's."""
    from stemserve.export.to_onnx import export_onnx

    model, info = small_model
    folder = tmp_path / "export"
    shutil.copytree(int8_export, folder)
    assert has_precision(folder, "int8")
    export_onnx(model, info, folder)
    assert not has_precision(folder, "int8")
    assert not (folder / "model.int8.onnx").exists()
