"""Export and int8 quantization of every family, and their refusals: a segment out of
bounds, a full disk (as a clear error that leaves no partial file), and no log noise.

A full disk is a file size limit here (``RLIMIT_FSIZE`` with ``SIGXFSZ`` ignored, in a child
process): a write past it fails with EFBIG, as one on a full disk fails with ENOSPC, and
neither needs root nor fills a disk.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from stemserve.checkpoints import Bag, CheckpointInfo
from stemserve.errors import ModelError
from stemserve.models import DemucsV3, HDemucs, HTDemucs
from stemserve.models.configs import DEMUCS_MDX, HDEMUCS_MMI, HTDEMUCS
from stemserve.spec import load_export_spec

RATE = 44100
SMALL_HT = dict(HTDEMUCS, channels=8, bottom_channels=32, segment=Fraction(6, 5))
FAMILIES = {
    "hdemucs": (HDemucs, dict(HDEMUCS_MMI, channels=8)),
    "demucs_v3": (DemucsV3, dict(DEMUCS_MDX, channels=8)),
    "htdemucs": (HTDemucs, SMALL_HT),
}
"""Small random-weight networks of each demucs 4 family (configs as test_models_v4's)."""


def _info(name: str) -> CheckpointInfo:
    return CheckpointInfo(name, None, "0" * 64, {})


def _network(family: str) -> torch.nn.Module:
    klass, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    return klass(**kwargs).eval()


@pytest.fixture(scope="module")
def family_exports(tmp_path_factory) -> dict[str, Path]:
    """Each family's network exported once (fp32) for the int8 tests, which copy it."""
    from stemserve.export.to_onnx import export_onnx

    root = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        export_onnx(_network(family), _info(family), root / family)
    return {family: root / family for family in FAMILIES}


def _copy(export: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "export"
    shutil.copytree(export, folder)
    return folder


def _nodes(path: Path, op_type: str) -> list[onnx.NodeProto]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return [node for node in graph.node if node.op_type == op_type]


def _run(path: Path, mix: np.ndarray, extra_outputs: list[str]) -> dict[str, np.ndarray]:
    """ONNX Runtime's ``stems`` and ``extra_outputs`` (inner tensors, made graph outputs)."""
    import onnxruntime as ort

    model = onnx.load(str(path))
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name)
                              for name in extra_outputs)
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = ["stems", *extra_outputs]
    return dict(zip(names, session.run(names, {"mix": mix})))


def _relative(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


# -- int8 for every family ------------------------------------------------------------------

@pytest.mark.slow
def test_shared_lstm_weights_are_why_half_the_lstms_were_left(family_exports):
    """The cause: BLSTM(max_steps) traces its whole and its framed run, two LSTM nodes on
    the same weights, and torch's exporter deduplicates them to ``Identity(first's W)``,
    which ``quantize_dynamic`` skips (it quantizes initializers only)."""
    for family in ("hdemucs", "demucs_v3"):
        graph = onnx.load(str(family_exports[family] / "model.onnx")).graph
        initializers = {tensor.name for tensor in graph.initializer}
        producers = {output: node for node in graph.node for output in node.output}
        lstms = [node for node in graph.node if node.op_type == "LSTM"]
        behind_identity = [node for node in lstms if node.input[1] not in initializers]
        assert len(lstms) == 16 and len(behind_identity) == 8, family
        for node in behind_identity:
            for slot in (1, 2):
                identity = producers[node.input[slot]]
                assert identity.op_type == "Identity" and identity.input[0] in initializers
                assert any(other.input[slot] == identity.input[0] for other in lstms)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_lstm_of_every_family_is_quantized(family, family_exports, tmp_path):
    """Every LSTM comes out a DynamicQuantizeLSTM whose output stays within a few percent
    of the fp32 one (the stems hardly show the LSTMs of a random network: a wrongly
    quantized LSTM moves them by 1e-4, so each LSTM is compared), and the stems stay
    close to fp32."""
    from stemserve.export.quantize import INT8_FILE, quantize_int8

    folder = _copy(family_exports[family], tmp_path)
    spec = quantize_int8(folder)
    assert (spec.precision, spec.onnx_file) == ("int8", INT8_FILE)
    lstms = _nodes(folder / "model.onnx", "LSTM")
    quantized = _nodes(folder / INT8_FILE, "DynamicQuantizeLSTM")
    assert len(lstms) == (0 if family == "htdemucs" else 16)
    assert len(quantized) == len(lstms) and not _nodes(folder / INT8_FILE, "LSTM")
    assert _nodes(folder / INT8_FILE, "MatMulInteger")

    fp32 = load_export_spec(folder)
    length = fp32.fixed_length or fp32.valid_length(int(2.5 * fp32.sample_rate))
    mix = (0.3 * np.random.default_rng(0).standard_normal((1, 2, length))).astype(np.float32)
    outputs = [node.output[0] for node in lstms]
    expected = _run(folder / "model.onnx", mix, outputs)
    got = _run(folder / INT8_FILE, mix, outputs)
    for name in outputs:
        assert _relative(got[name], expected[name]) < 0.05, name
    assert 0 < _relative(got["stems"], expected["stems"]) < 0.05


def test_an_lstm_left_in_fp32_is_named_with_its_weights_source(small_export, tmp_path):
    """Weights behind anything but an Identity shared with another LSTM stay a refusal,
    which says which LSTM and where its weights come from."""
    from stemserve.export.quantize import INT8_FILE, quantize_int8

    folder = _copy(small_export, tmp_path)
    model = onnx.load(str(folder / "model.onnx"))
    lstm = next(node for node in model.graph.node if node.op_type == "LSTM")
    recurrent = lstm.input[2]
    lstm.input[2] = recurrent + "_computed"
    model.graph.node.insert(0, onnx.helper.make_node("Neg", [recurrent], [lstm.input[2]],
                                                     name="negate"))
    onnx.save(model, str(folder / "model.onnx"))
    with pytest.raises(ModelError, match="LSTM layers were quantized") as caught:
        quantize_int8(folder)
    assert f"{lstm.name!r} (R from Neg node 'negate')" in str(caught.value)
    assert sorted(path.name for path in folder.iterdir()) == ["model.json", "model.onnx"]
    assert not (folder / INT8_FILE).exists()


# -- log noise --------------------------------------------------------------------------------

def test_onnx_runtime_pre_processing_advice_is_silent_unless_verbose(small_export, tmp_path,
                                                                   caplog):
    from stemserve.export.quantize import PREPROCESS_ADVICE, quantize_int8

    folder = _copy(small_export, tmp_path)
    filters = list(logging.getLogger().filters)
    with caplog.at_level(logging.WARNING):
        quantize_int8(folder)
    assert PREPROCESS_ADVICE not in caplog.text
    with caplog.at_level(logging.DEBUG, logger="stemserve"):
        quantize_int8(folder)  # as with -v: ONNX Runtime's words are kept
    assert "Please consider to run pre-processing before quantization" in caplog.text
    assert logging.getLogger().filters == filters


# -- a full disk --------------------------------------------------------------------------------

CHILD = """
import importlib, resource, signal, sys

module, attribute, limit, *command = sys.argv[1:]
owner = importlib.import_module(module)
*path, name = attribute.split(".")
for part in path:
    owner = getattr(owner, part)
call = getattr(owner, name)

def limited(*args, **kwargs):
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
    return call(*args, **kwargs)

setattr(owner, name, limited)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG, not a kill
if command[0] == "quantize":  # what `export --int8` runs after the export
    from stemserve.errors import StemserveError, print_error
    from stemserve.export.quantize import quantize_export
    try:
        quantize_export(command[1])
    except StemserveError as err:
        print_error(err)
        sys.exit(1)
else:
    from stemserve.cli import main
    sys.exit(main(command))
"""
LIMIT = 4096
"""Bytes a file may grow to once the limit is on: less than any graph, even a small one's
graph without its weights."""


def _limited(hook: str, command: list[str], tmpdir: Path) -> subprocess.CompletedProcess:
    """``command`` (stemserve's CLI, or ``quantize <folder>``) in a child whose files cannot
    grow past :data:`LIMIT` bytes from the first call of ``hook`` (``module:attribute``)
    on, with its temporary files in ``tmpdir``."""
    module, attribute = hook.split(":")
    tmpdir.mkdir()
    return subprocess.run([sys.executable, "-c", CHILD, module, attribute, str(LIMIT),
                           *command], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TMPDIR=str(tmpdir)))


def _assert_clear_error(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "stemserve: error: " in done.stderr
    for word in words:
        assert word in done.stderr, done.stderr[-3000:]


@pytest.mark.slow
def test_a_full_disk_during_export_is_a_clear_error(small_model, tmp_path):
    model, _ = small_model
    checkpoint = tmp_path / "mine.th"
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / "out"
    done = _limited("torch.onnx:export", ["export", "--model", str(checkpoint), "--config",
                                          "demucs_unittest", "--no-check", "-o", str(out)],
                    tmp_path / "tmp")
    _assert_clear_error(done, f"{out}: cannot write model.onnx: file too large")
    assert list(out.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("hook,words", [
    # The first write: the graph's temporary copy (weights in a file of their own).
    ("stemserve.export.quantize:quantize_int8",
     ["cannot write a temporary copy of the graph", "file too large", "TMPDIR"]),
    # ONNX's shape inference writes model-inferred.onnx, in C++, and a failed write there
    # is silent: ONNX Runtime then fails to read it back.
    ("onnx.shape_inference:infer_shapes_path",
     ["could not read back the shape-inferred graph", "TMPDIR"]),
    # The int8 graph itself.
    ("onnxruntime.quantization.onnx_model:ONNXModel.save_model_to_file",
     ["export: cannot write model.int8.onnx: file too large"]),
], ids=["temporary-copy", "shape-inference", "int8-graph"])
def test_a_full_disk_during_quantization_is_a_clear_error(hook, words, small_export, tmp_path):
    """A clear error, and nothing left behind: no half int8 graph, no ``.part`` file, no
    ``model-inferred.onnx``, in the export or in the temporary folder."""
    folder = _copy(small_export, tmp_path)
    done = _limited(hook, ["quantize", str(folder)], tmp_path / "tmp")
    _assert_clear_error(done, *words)
    assert sorted(path.name for path in folder.iterdir()) == ["model.json", "model.onnx"]
    # (ONNX Runtime's import writes its session id, .ses, there.)
    assert [path.name for path in (tmp_path / "tmp").iterdir()] in ([], [".ses"])


# -- segment bounds -------------------------------------------------------------------------------

@pytest.fixture
def traced(monkeypatch) -> list[int]:
    """The segment lengths that got as far as tracing (which is skipped here)."""
    from stemserve.export import to_onnx

    segments: list[int] = []
    monkeypatch.setattr(to_onnx, "_export_graph",
                        lambda module, spec, out_dir, opset: segments.append(spec.segment_length))
    return segments


@pytest.mark.parametrize("seconds,ok", [
    (-1, False), (1 - 1 / RATE, False), (1, True), (1 + 1 / RATE, True),
    (120 - 1 / RATE, True), (120, True), (120 + 1 / RATE, False), (1e6, False),
])
def test_a_segment_is_1_to_120_seconds(seconds, ok, small_model, tmp_path, traced):
    from stemserve.export.to_onnx import export_onnx

    model, info = small_model
    segment = round(seconds * RATE)
    if ok:
        export_onnx(model, info, tmp_path / "out", segment_length=segment)
        assert traced == [segment]
        return
    with pytest.raises(ModelError, match=r"out of range: 44100 to 5292000 samples "
                                         r"\(1 s to 120 s at 44100 Hz\)") as caught:
        export_onnx(model, info, tmp_path / "out", segment_length=segment)
    assert f"a segment of {segment} samples" in str(caught.value)
    assert traced == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("samples,ok", [
    (RATE - 1, False), (RATE, True), (52919, True), (52920, True), (52921, False),
])
def test_an_htdemucs_segment_is_at_most_its_training_segment(samples, ok, tmp_path, traced):
    """demucs 4 refuses a longer segment for HT Demucs (``separate``: ``--segment`` over
    ``float(model.segment)``; ``HTDemucs.valid_length``: more than
    ``int(segment * samplerate)`` samples): 1.2 s here, 52,920 samples."""
    from stemserve.export.to_onnx import export_onnx

    model = _network("htdemucs")
    if ok:
        export_onnx(model, _info("ht"), tmp_path / "out", segment_length=samples)
        assert traced == [samples]
        return
    with pytest.raises(ModelError, match=r"out of range: 44100 to 52920 samples \(1 s to HT "
                                         r"Demucs' training segment, 1.2 s at 44100 Hz\)"):
        export_onnx(model, _info("ht"), tmp_path / "out", segment_length=samples)
    assert traced == []


def test_a_segment_at_the_upper_bound_exports(small_model, tmp_path):
    """Not only the check: a whole export at 120 s, which the sidecar states."""
    from stemserve.export.to_onnx import export_onnx

    model, info = small_model
    spec = export_onnx(model, info, tmp_path / "out", segment_length=120 * RATE)
    assert spec.segment_length == load_export_spec(tmp_path / "out").segment_length == 5292000
    assert spec.padded_length == model.valid_length(120 * RATE)


def test_a_refused_segment_leaves_the_earlier_export(small_model, small_export, tmp_path):
    """export_bag checks every member's segment before it removes the export it replaces."""
    from stemserve.export.to_onnx import export_bag

    model, info = small_model
    folder = _copy(small_export, tmp_path)
    bag = Bag("small", [model], [info], [[1.0] * 4], None)
    with pytest.raises(ModelError, match="out of range"):
        export_bag(bag, folder, segment_length=-RATE)
    assert load_export_spec(folder).segment_length == RATE


@pytest.mark.parametrize("segment", ["0.5", "1e6"])
def test_the_export_command_refuses_a_segment_out_of_range(segment, small_model, tmp_path,
                                                            capsys):
    """`export --segment 1e6` used to export (a graph tritonserver then crashes on); the
    command's own parser refuses -1 and 0 (a number of seconds above 0)."""
    from stemserve.cli import main

    model, _ = small_model
    checkpoint = tmp_path / "mine.th"
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / "out"
    assert main(["export", "--model", str(checkpoint), "--config", "demucs_unittest",
                 "--segment", segment, "--no-check", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "stemserve: error: mine: a segment of" in err
    assert "(1 s to 120 s at 44100 Hz)" in err
    assert not out.exists()
