"""ONNX export: a checked graph, a truthful sidecar, and ONNX Runtime equal to PyTorch."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from stemserve.export.tensorrt import trtexec_command
from stemserve.export.to_onnx import onnx_parity
from stemserve.spec import ModelSpec


@pytest.fixture(scope="module")
def spec(small_export) -> ModelSpec:
    return ModelSpec.load(small_export / "model.json")


def test_graph_passes_checker_and_names_tensors(small_export, spec):
    graph = onnx.load(str(small_export / "model.onnx"))
    onnx.checker.check_model(graph)
    (mix,), (stems,) = graph.graph.input, graph.graph.output
    assert (mix.name, stems.name) == ("mix", "stems")
    mix_dims = [d.dim_param or d.dim_value for d in mix.type.tensor_type.shape.dim]
    stems_dims = [d.dim_param or d.dim_value for d in stems.type.tensor_type.shape.dim]
    assert mix_dims == ["batch", 2, "time"]
    assert stems_dims == ["batch", 4, 2, "out_time"]


def test_sidecar_describes_the_model(small_model, spec):
    model, info = small_model
    assert spec.sources == ("drums", "bass", "other", "vocals")
    assert spec.sample_rate == 44100 and spec.audio_channels == 2
    assert spec.segment_length == model.segment_length == 44100
    assert spec.padded_length == model.valid_length(spec.segment_length)
    assert spec.checkpoint == info.name and spec.checkpoint_sha256 == info.sha256
    with torch.no_grad():
        out = model(torch.zeros(1, 2, spec.padded_length))
    assert out.shape[-1] == spec.output_length
    for length in (1, 1000, 12345, 44100, 100_000):
        assert spec.valid_length(length) == model.valid_length(length)


def test_parity_with_pytorch_at_batch_1_and_3(small_model, small_export, spec):
    model, _ = small_model
    errors = onnx_parity(model, small_export / "model.onnx", spec, batch_sizes=(1, 3))
    assert set(errors) == {1, 3}
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.parametrize("length", [1000, 23456])
def test_parity_for_a_shorter_last_segment(small_model, small_export, length):
    """The time axis stays dynamic, so a track's last segment runs at its own valid length."""
    model, _ = small_model
    mix = torch.randn(2, 2, model.valid_length(length), generator=torch.Generator().manual_seed(3))
    session = ort.InferenceSession(str(small_export / "model.onnx"))
    got = session.run(["stems"], {"mix": mix.numpy()})[0]
    with torch.no_grad():
        expected = model(mix).numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-4


def test_fp16_variant(small_model, tmp_path):
    from stemserve.export.to_onnx import export_onnx

    model, info = small_model
    export_onnx(model, info, tmp_path, fp16=True)
    half = ModelSpec.load(tmp_path / "model.fp16.json")
    assert half.precision == "fp16" and half.onnx_file == "model.fp16.onnx"
    graph = onnx.load(str(tmp_path / "model.fp16.onnx"))
    initializers = {init.data_type for init in graph.graph.initializer
                    if len(init.dims) > 1}
    assert initializers == {onnx.TensorProto.FLOAT16}
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    mix = np.random.default_rng(0).standard_normal((1, 2, half.padded_length)).astype(np.float32)
    full = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"mix": mix})[0]
    reduced = ort.InferenceSession(str(tmp_path / "model.fp16.onnx")).run(None, {"mix": mix})[0]
    assert reduced.dtype == np.float32
    assert np.abs(full - reduced).max() < 1e-2 * max(1.0, np.abs(full).max())
    assert not list(tmp_path.glob("*.tmp"))


def test_tensorrt_command_uses_sidecar_shapes(small_export, spec, tmp_path):
    command = trtexec_command(small_export, tmp_path / "model.plan", max_batch=8, opt_batch=4)
    assert f"--onnx={small_export / 'model.onnx'}" in command
    assert f"--maxShapes=mix:8x2x{spec.max_request_length}" in command
    assert f"--optShapes=mix:4x2x{spec.padded_length}" in command
    assert f"--minShapes=mix:1x2x{spec.valid_length(1)}" in command  # a 1-sample tail
    assert "--fp16" in command


def _stemserve(*args: str, cwd=None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "stemserve", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_export_command_from_a_checkpoint_file(small_model, tmp_path):
    model, _ = small_model
    checkpoint = tmp_path / "mine.th"
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / "out"
    done = _stemserve("export", "--model", str(checkpoint), "--config", "demucs_unittest",
                      "--segment", "1", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "max abs error" in done.stdout
    spec = ModelSpec.load(out / "model.json")
    assert spec.segment_length == 44100 and spec.checkpoint == "mine"
    assert len(spec.checkpoint_sha256) == 64
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.onnx", "source.json"]


@pytest.mark.slow
def test_export_command_errors_are_clear(tmp_path):
    done = _stemserve("export", "--model", "no_such_model", "-o", str(tmp_path / "x"))
    assert done.returncode == 1
    assert "no_such_model" in done.stderr and "demucs_quantized" in done.stderr
    assert "Traceback" not in done.stderr
    bogus = tmp_path / "bogus.th"
    bogus.write_text("not a checkpoint")
    done = _stemserve("export", "--model", str(bogus), "-o", str(tmp_path / "y"))
    assert done.returncode == 1 and str(bogus) in done.stderr
    assert not (tmp_path / "y").exists()
