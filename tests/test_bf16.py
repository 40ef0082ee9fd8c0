"""The bf16 fast path: the export's bf16 sidecar, OpenVINO through every backend, refusals.

How much bf16 changes separation quality is the quality meter's job (benchmarks/quality/)
and its speed the releases benchmark's; here every family's graph must run on OpenVINO in
bf16 (really in bf16: the stems move), stay close to the fp32 stems of the same
random-weight model, and be what a server started with ``--bf16`` answers with.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import needs_bf16
from stemserve.errors import ModelError, RepositoryError, SpecError
from stemserve.spec import has_precision, load_export, load_export_spec, sidecar_name
from test_int8 import _mix, _relative_error, export_with_variant

BF16_CLOSE = 0.05
"""Largest stem difference from fp32, relative to the stems' peak: bf16 keeps 8 bits of
mantissa (random weights amplify rounding more than trained ones do)."""
BF16_MOVES = 1e-5
"""Smallest: below this OpenVINO would have run fp32, and the label would lie."""


@pytest.fixture(scope="module")
def bf16_export(small_export, tmp_path_factory) -> Path:
    return export_with_variant(small_export, tmp_path_factory, "bf16")


def _conv_graph(path: Path, seed: int = 0) -> Path:
    """A graph of one convolution (12 to 32 channels, kernel 8, stride 4), weights drawn from
    ``seed``, written to ``path``."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    weights = onnx.numpy_helper.from_array(
        rng.standard_normal((32, 12, 8), dtype=np.float32), "weights")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["mix", "weights"], ["stems"], strides=[4])], "conv",
        [helper.make_tensor_value_info("mix", TensorProto.FLOAT, ["batch", 12, "time"])],
        [helper.make_tensor_value_info("stems", TensorProto.FLOAT, ["batch", 32, "out"])],
        [weights])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def bf16_log(caplog, monkeypatch):
    """The bf16 session's log records, DEBUG and up (a CLI test before this one stops them at
    the "stemserve" logger)."""
    from stemserve.runtime import openvino_session

    monkeypatch.setattr(logging.getLogger("stemserve"), "propagate", True)
    caplog.set_level(logging.DEBUG, logger=openvino_session.__name__)
    return caplog


@pytest.fixture
def checks_run(tmp_path, monkeypatch) -> list:
    """An empty stemserve cache, and the input shape of every self-check run from now on."""
    from stemserve.runtime.openvino_session import Bf16Session

    monkeypatch.setenv("STEMSERVE_CACHE", str(tmp_path / "cache"))
    runs = []
    check = Bf16Session._self_check

    def counted(self, shape, bf16):
        runs.append(shape)
        return check(self, shape, bf16)

    monkeypatch.setattr(Bf16Session, "_self_check", counted)
    return runs


def _messages(caplog, level: int) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == level]


def _bf16_vs_fp32(export_dir: Path, mix: np.ndarray) -> float:
    from stemserve.client import separate_array
    from stemserve.client.backends import open_backend

    spec = load_export(export_dir).spec
    with open_backend("onnx", model=export_dir) as fp32, \
            open_backend("onnx", model=export_dir, precision="bf16") as bf16:
        assert bf16.spec.precision == "bf16"
        expected = separate_array(mix, spec.sample_rate, backend=fp32)
        got = separate_array(mix, spec.sample_rate, backend=bf16)
    return _relative_error(got, expected)


def test_the_bf16_variant_is_a_sidecar_naming_the_fp32_graph(small_export, bf16_export):
    spec = load_export_spec(bf16_export, "bf16")
    fp32 = load_export_spec(small_export)
    assert (spec.precision, spec.onnx_file) == ("bf16", fp32.onnx_file)
    assert json.loads((bf16_export / sidecar_name("bf16")).read_text())["precision"] \
        == "bf16"
    assert has_precision(bf16_export, "bf16") and not has_precision(small_export, "bf16")
    assert sorted(path.name for path in bf16_export.glob("*.onnx")) == ["model.onnx"]


@needs_bf16
def test_bf16_stems_stay_close_to_fp32(bf16_export):
    error = _bf16_vs_fp32(bf16_export, _mix(load_export_spec(bf16_export)))
    assert BF16_MOVES < error < BF16_CLOSE, error


@needs_bf16
def test_each_input_length_gets_its_own_compiled_model(small_export):
    """OpenVINO 2026.4's bf16 transposed convolutions on a dynamic time axis returned 2,048
    samples too few (and failed on short inputs): every length the session meets is
    compiled on its own, and every length gives ONNX Runtime's output shape."""
    from stemserve.runtime.openvino_session import SHAPES_KEPT, Bf16Session
    from stemserve.runtime.ort_session import cpu_session

    spec = load_export_spec(small_export)
    graph = small_export / spec.onnx_file
    bf16, fp32 = Bf16Session(graph), cpu_session(graph)
    rng = np.random.default_rng(3)
    lengths = (spec.padded_length, spec.min_request_length, spec.max_request_length,
               spec.padded_length)
    for batch, length in zip((1, 2, 1, 2), lengths):
        mix = rng.standard_normal((batch, spec.audio_channels, length), dtype=np.float32)
        (got,) = bf16.run([spec.output_name], {spec.input_name: mix})
        (expected,) = fp32.run([spec.output_name], {spec.input_name: mix})
        assert got.shape == expected.shape
        assert BF16_MOVES < np.abs(got - expected).max() / np.abs(expected).max() < BF16_CLOSE
    assert len(bf16._requests) == SHAPES_KEPT
    assert list(bf16._requests)[-1] == (spec.audio_channels, spec.padded_length)


@needs_bf16
@pytest.mark.slow
@pytest.mark.parametrize("family", ["htdemucs", "hdemucs", "demucs_v3"])
def test_every_v4_family_runs_in_bf16(family, tmp_path):
    """HT Demucs (transformer, in-graph STFT), Hybrid Demucs and the v3 time model (DConv
    with LSTM and local attention): OpenVINO reads each graph and runs it in bf16."""
    from fractions import Fraction

    from stemserve.checkpoints import Bag, CheckpointInfo
    from stemserve.export.bf16 import bf16_export as write_bf16
    from stemserve.export.to_onnx import export_bag
    from stemserve.models import DemucsV3, HDemucs, HTDemucs
    from stemserve.models.configs import DEMUCS_MDX, HDEMUCS_MMI, HTDEMUCS
    from test_models_v4 import SMALL_HT, random_state

    klass, kwargs = {
        "htdemucs": (HTDemucs, dict(HTDEMUCS, **SMALL_HT)),
        "hdemucs": (HDemucs, dict(HDEMUCS_MMI, channels=8, segment=Fraction(3, 2))),
        "demucs_v3": (DemucsV3, dict(DEMUCS_MDX, channels=8, segment=Fraction(3, 2))),
    }[family]
    torch.manual_seed(0)
    model = klass(**kwargs)
    model.load_state_dict(random_state(model, seed=1))
    info = CheckpointInfo(name=f"small-{family}", path=Path(f"{family}.th"), sha256="0" * 64,
                          config=kwargs)
    folder = tmp_path / "export"
    export_bag(Bag(f"small-{family}", [model.eval()], [info], [[1.] * 4], None), folder)
    write_bf16(folder)
    mix = _mix(load_export_spec(folder), seconds=3.3, seed=2)
    error = _bf16_vs_fp32(folder, mix)
    assert BF16_MOVES < error < BF16_CLOSE, error


def test_a_cpu_without_bf16_is_refused(bf16_export, monkeypatch):
    """OpenVINO would quietly run fp32 there, under a bf16 label: refused, with the way out."""
    from stemserve.runtime import openvino_session
    from stemserve.client.backends.onnx import OnnxBackend

    monkeypatch.setattr(openvino_session, "cpu_has_bf16", lambda: False)
    with pytest.raises(ModelError, match="no bf16 arithmetic.*use the fp32 or int8 graph") \
            as caught:
        OnnxBackend(bf16_export, precision="bf16")
    assert str(bf16_export / "model.onnx") in str(caught.value)


@needs_bf16
def test_a_graph_bf16_gets_wrong_is_refused_at_load(tmp_path, monkeypatch):
    """The self-check: bf16 against OpenVINO's own fp32 on seeded noise, before the first
    segment. Within tolerance it passes and says how far off it was; beyond it the graph is
    refused, naming the file and the way out (the tolerance is part of the cached result's
    key: a stricter one checks again)."""
    from stemserve.runtime import openvino_session
    from stemserve.runtime.openvino_session import BF16_TOLERANCE, Bf16Session

    path = _conv_graph(tmp_path / "conv.onnx")
    session = Bf16Session(path, check_shape=(12, 4000))
    assert 1e-4 < session.checked_error < BF16_TOLERANCE
    monkeypatch.setattr(openvino_session, "BF16_TOLERANCE", session.checked_error / 2)
    with pytest.raises(ModelError, match="off its fp32 result.*use the fp32 or int8") \
            as caught:
        Bf16Session(path, check_shape=(12, 4000))
    assert str(path) in str(caught.value)


@needs_bf16
def test_the_check_runs_once_per_graph_cpu_and_openvino(tmp_path, checks_run, bf16_log,
                                                        monkeypatch):
    """Issue "Nothing silent": the check (43 to 93 s for a full v2 on 2 cores) ran at every
    load. Its result is kept by the graph's content, the CPU, OpenVINO's version and the
    check's input, and announced before it runs; the compiles are announced too."""
    import openvino

    from stemserve.runtime import openvino_session
    from stemserve.runtime.openvino_session import CHECKS_FOLDER, Bf16Session

    graph = _conv_graph(tmp_path / "conv.onnx")
    first = Bf16Session(graph, check_shape=(12, 4000))
    assert checks_run == [(12, 4000)]
    reading, compiling, checking = _messages(bf16_log, logging.INFO)
    assert reading == f"reading {graph} into OpenVINO"
    assert compiling == f"compiling {graph} for bf16 at input length 4000"
    assert re.fullmatch(rf"checking the bf16 graph of {re.escape(str(graph))} against fp32 "
                        r"\(once per graph and CPU; about \d+ s\)", checking)
    (record,) = (tmp_path / "cache" / CHECKS_FOLDER).glob("*.json")
    assert json.loads(record.read_text())["error"] == first.checked_error

    bf16_log.clear()
    second = Bf16Session(graph, check_shape=(12, 4000))
    assert checks_run == [(12, 4000)] and second.checked_error == first.checked_error
    assert _messages(bf16_log, logging.INFO) == [reading, compiling]
    assert any(message.startswith(f"bf16 check of {graph} taken from {record}")
               for message in _messages(bf16_log, logging.DEBUG))
    bf16_log.clear()
    second.run(None, {"mix": np.zeros((1, 12, 5000), np.float32)})  # a last segment's length
    assert _messages(bf16_log, logging.INFO) == [
        f"compiling {graph} for bf16 at input length 5000"]
    assert checks_run == [(12, 4000)]

    copy = tmp_path / "elsewhere" / "conv.onnx"  # the same bytes: the same result
    copy.parent.mkdir()
    shutil.copy(graph, copy)
    assert Bf16Session(copy, check_shape=(12, 4000)).checked_error == first.checked_error
    assert len(checks_run) == 1
    _conv_graph(graph, seed=1)  # other bytes, same size, same path
    assert Bf16Session(graph, check_shape=(12, 4000)).checked_error != first.checked_error
    assert len(checks_run) == 2
    Bf16Session(graph, check_shape=(12, 8000))  # another input length
    assert len(checks_run) == 3
    monkeypatch.setattr(openvino, "get_version", lambda: "2026.4.2-0-test")
    Bf16Session(graph, check_shape=(12, 4000))
    assert len(checks_run) == 4
    monkeypatch.setattr(openvino_session, "cpu_model", lambda: "Another CPU")
    Bf16Session(graph, check_shape=(12, 4000))
    assert len(checks_run) == 5
    Bf16Session(graph, check_shape=(12, 4000))
    assert len(checks_run) == 5


@needs_bf16
def test_a_refused_graph_is_refused_again_at_once(tmp_path, checks_run, monkeypatch):
    """A refusal is kept too: the next session refuses with the same message, without
    compiling anything."""
    from stemserve.runtime import openvino_session
    from stemserve.runtime.openvino_session import Bf16Session

    graph = _conv_graph(tmp_path / "conv.onnx")
    monkeypatch.setattr(openvino_session, "BF16_TOLERANCE", 1e-9)
    with pytest.raises(ModelError, match="off its fp32 result") as first:
        Bf16Session(graph, check_shape=(12, 4000))
    compiles = []
    monkeypatch.setattr(Bf16Session, "_compile", lambda *args: compiles.append(args))
    with pytest.raises(ModelError) as again:
        Bf16Session(graph, check_shape=(12, 4000))
    assert str(again.value) == str(first.value) and str(graph) in str(again.value)
    assert len(checks_run) == 1 and compiles == []


@needs_bf16
def test_a_corrupt_or_foreign_check_file_is_no_result(tmp_path, checks_run, bf16_log,
                                                      monkeypatch):
    """A damaged or planted result file means "not checked": the check runs again and the
    file is rewritten; never a crash, a hang (a FIFO), or a pass it does not describe. A
    file that cannot be written only costs the next session the check."""
    from stemserve.runtime import openvino_session
    from stemserve.runtime.openvino_session import CHECKS_FOLDER, Bf16Session

    graph = _conv_graph(tmp_path / "conv.onnx")
    error = Bf16Session(graph, check_shape=(12, 4000)).checked_error
    (path,) = (tmp_path / "cache" / CHECKS_FOLDER).glob("*.json")
    good = json.loads(path.read_text())
    key = good["key"]
    bad = [b"", b"{not json", b"\xff\xfe\x00", b"[" * 4000, b"[" * 100_000,
           json.dumps({"key": key, "error": "0.0"}).encode(),
           json.dumps({"key": key, "error": -1.0}).encode(),
           json.dumps({"key": key, "error": True}).encode(),
           json.dumps([good]).encode(),
           json.dumps({"key": dict(key, openvino="another"), "error": error}).encode(),
           json.dumps(dict(good, padding="x" * 5000)).encode()]
    for content in bad:
        path.write_bytes(content)
        assert Bf16Session(graph, check_shape=(12, 4000)).checked_error == error
        assert json.loads(path.read_text()) == good
    assert len(checks_run) == 1 + len(bad)

    path.unlink()
    os.mkfifo(path)
    assert Bf16Session(graph, check_shape=(12, 4000)).checked_error == error
    assert path.is_file() and len(checks_run) == 2 + len(bad)

    # A record of another graph where this one's refusal would be: still refused.
    monkeypatch.setattr(openvino_session, "BF16_TOLERANCE", 1e-9)
    strict = dict(key, tolerance=1e-9)
    openvino_session._check_file(strict).write_text(
        json.dumps({"key": dict(strict, graph_sha256="0" * 64), "error": 0.0}))
    with pytest.raises(ModelError, match="off its fp32 result"):
        Bf16Session(graph, check_shape=(12, 4000))
    assert len(checks_run) == 3 + len(bad)

    monkeypatch.setattr(openvino_session, "BF16_TOLERANCE", key["tolerance"])
    path.unlink()
    path.mkdir()  # cannot be replaced
    bf16_log.clear()
    assert Bf16Session(graph, check_shape=(12, 4000)).checked_error == error
    assert any("cannot keep the bf16 check's result" in message
               for message in _messages(bf16_log, logging.WARNING))
    assert len(checks_run) == 4 + len(bad)


def test_bf16_measured_slower_on_this_kind_of_cpu_says_so(bf16_export, tmp_path, bf16_log,
                                                          monkeypatch):
    """Where --bf16 was measured slower than fp32 for the graph's family on this kind of CPU
    (Demucs v2 without AMX), a session says so once per process, by the family of the
    sidecar beside the graph (an export's, or a repository version folder's model.json);
    where it was measured faster, or the family is unknown, it says nothing."""
    from stemserve.runtime import openvino_session
    from stemserve.runtime.openvino_session import Bf16Session

    monkeypatch.setattr(openvino_session, "cpu_has_bf16", lambda: True)  # only reads it
    monkeypatch.setattr(openvino_session, "_warned", set())
    monkeypatch.setattr(openvino_session, "bf16_kind", lambda: "avx512_bf16")
    graph = bf16_export / "model.onnx"
    Bf16Session(graph)
    Bf16Session(graph)
    assert _messages(bf16_log, logging.WARNING) == [
        "--bf16 was measured slower than fp32 for Demucs v2 on CPUs without AMX (13.0 s "
        "against 6.7 s for 20 s of audio on a 2-core AMD EPYC): drop --bf16, or use --int8"]

    monkeypatch.setattr(openvino_session, "_warned", set())
    bf16_log.clear()
    monkeypatch.setattr(openvino_session, "bf16_kind", lambda: "amx")
    Bf16Session(graph)
    monkeypatch.setattr(openvino_session, "bf16_kind", lambda: None)
    Bf16Session(graph)
    monkeypatch.setattr(openvino_session, "bf16_kind", lambda: "avx512_bf16")
    Bf16Session(_conv_graph(tmp_path / "conv.onnx"))  # no sidecar: family unknown
    spec = load_export_spec(bf16_export, "bf16")
    version = tmp_path / "repository" / "demucs" / "1"
    version.mkdir(parents=True)
    shutil.copy(graph, version / spec.onnx_file)
    dataclasses.replace(spec, family="htdemucs", valid_length_params=None).save(
        version / "model.json")
    Bf16Session(version / spec.onnx_file)  # HT Demucs: measured faster
    assert _messages(bf16_log, logging.WARNING) == []

    spec.save(version / "model.json")
    Bf16Session(version / spec.onnx_file)
    assert len(_messages(bf16_log, logging.WARNING)) == 1


def test_refusals_name_the_way_out(small_export, bf16_export, tmp_path, capsys, monkeypatch):
    from stemserve.client.backends.onnx import OnnxBackend
    from stemserve.cli import main
    from stemserve.model_repository.writer import fill_repository

    with pytest.raises(SpecError, match="stemserve export --bf16") as caught:
        load_export(small_export, "bf16")
    assert str(small_export) in str(caught.value)
    with pytest.raises(RepositoryError, match="OpenVINO's CPU kernels: fill the cpu variant"):
        fill_repository(bf16_export, tmp_path / "repo", "gpu", precision="bf16")
    assert not (tmp_path / "repo").exists()
    assert main(["serve", "--bf16", "--gpu", "-n", str(bf16_export)]) != 0
    assert "--bf16 is a CPU fast path: drop --gpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["separate", "--bf16", "--int8", "x.wav"])
    assert "not allowed with argument" in capsys.readouterr().err
    track = tmp_path / "song.wav"
    assert main(["separate", "--bf16", "--backend", "torch", str(track)]) == 1
    assert "the bf16 graph runs on OpenVINO: --bf16 takes --backend onnx, triton or triton-stream, not " \
           "torch" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "openvino", None)  # not installed
    with pytest.raises(ModelError, match=r"pip install 'stemserve\[openvino\]'"):
        OnnxBackend(bf16_export, precision="bf16")


@needs_bf16
@pytest.mark.server
@pytest.mark.slow
def test_a_served_bf16_repository_answers_with_its_precision(bf16_export, tmp_path):
    """`serve --bf16`'s repository: the fp32 graph with the bf16 sidecar, run by OpenVINO
    in the python backend; the stems are the in-process bf16 ones, and a client asking for
    another precision is told so."""
    from stemserve.client import separate_array
    from stemserve.client.backends import open_backend
    from stemserve.client.backends.onnx import OnnxBackend
    from stemserve.model_repository.local import local_server

    spec = load_export_spec(bf16_export)
    mix = _mix(spec, seconds=2.0, seed=1)
    with OnnxBackend(bf16_export, precision="bf16", max_batch=1) as local:
        expected = separate_array(mix, spec.sample_rate, backend=local)
    with local_server(bf16_export, precision="bf16", root=tmp_path, logs=tmp_path,
                      max_batch_size=1) as server:
        folder = next(tmp_path.glob("serve-*/repository/demucs/1"))
        assert json.loads((folder / "fill.json").read_text())["model_file"] == "model.onnx"
        assert json.loads((folder / "model.json").read_text())["precision"] == "bf16"
        with open_backend("triton", connection=server.grpc_url, precision="bf16") as served:
            assert served.spec.precision == "bf16"
            got = separate_array(mix, spec.sample_rate, backend=served)
        with pytest.raises(ModelError, match="serves the bf16 graph.*stemserve serve`"):
            open_backend("triton", connection=server.grpc_url, precision="fp32")
    log = "".join(path.read_text() for path in tmp_path.glob("**/*.log"))
    assert "on OpenVINO" in log and "(bf16)" in log
    assert max(np.abs(got[name] - expected[name]).max() for name in got) < 1e-6
