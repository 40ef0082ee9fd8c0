"""The bf16 fast path: the export's bf16 sidecar, OpenVINO through every backend, refusals.

How much bf16 changes separation quality is the quality meter's job (benchmarks/quality.py)
and its speed the releases benchmark's; here every family's graph must run on OpenVINO in
bf16 (really in bf16: the stems move), stay close to the fp32 stems of the same
random-weight model, and be what a server started with ``--bf16`` answers with.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stemserve.errors import ModelError, RepositoryError, SpecError
from stemserve.spec import PRECISION_SIDECARS, has_precision, load_export, load_export_spec
from test_int8 import _mix, _relative_error

BF16_CLOSE = 0.05
"""Largest stem difference from fp32, relative to the stems' peak: bf16 keeps 8 bits of
mantissa (random weights amplify rounding more than trained ones do)."""
BF16_MOVES = 1e-5
"""Smallest: below this OpenVINO would have run fp32, and the label would lie."""


@pytest.fixture(scope="module")
def bf16_export(small_export, tmp_path_factory) -> Path:
    """A copy of the session's small Demucs v2 export with its bf16 sidecar."""
    from stemserve.export.bf16 import bf16_export as write_bf16

    folder = tmp_path_factory.mktemp("bf16") / "export"
    shutil.copytree(small_export, folder)
    write_bf16(folder)
    return folder


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
    assert json.loads((bf16_export / PRECISION_SIDECARS["bf16"]).read_text())["precision"] \
        == "bf16"
    assert has_precision(bf16_export, "bf16") and not has_precision(small_export, "bf16")
    assert sorted(path.name for path in bf16_export.glob("*.onnx")) == ["model.onnx"]


def test_bf16_stems_stay_close_to_fp32(bf16_export):
    error = _bf16_vs_fp32(bf16_export, _mix(load_export_spec(bf16_export)))
    assert BF16_MOVES < error < BF16_CLOSE, error


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


def test_open_backend_adds_the_bf16_sidecar_once(small_model, stemserve_cache):
    """`separate --bf16 --backend onnx` on a checkpoint: exported once, no second graph."""
    from stemserve.client.backends import open_backend
    from stemserve.client.models import export_dir_for

    model, info = small_model
    checkpoint = stemserve_cache / "bf16-once" / "tiny.th"
    checkpoint.parent.mkdir()
    torch.save(dict(config=dict(info.config), state=model.state_dict()), checkpoint)
    with open_backend("onnx", model=checkpoint, precision="bf16") as backend:
        assert backend.spec.precision == "bf16"
    folder = export_dir_for(checkpoint)
    stamp = (folder / PRECISION_SIDECARS["bf16"]).stat().st_mtime_ns
    with open_backend("onnx", model=checkpoint, precision="bf16") as backend:
        assert backend.spec.precision == "bf16"
    assert (folder / PRECISION_SIDECARS["bf16"]).stat().st_mtime_ns == stamp


def test_refusals_name_the_way_out(small_export, bf16_export, tmp_path, capsys, monkeypatch):
    from stemserve.client.backends.onnx import OnnxBackend
    from stemserve.client.cli import main
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
    assert "--bf16 runs the graph on OpenVINO: it takes --backend onnx or triton" \
        in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "openvino", None)  # not installed
    with pytest.raises(ModelError, match=r"pip install 'stemserve\[openvino\]'"):
        OnnxBackend(bf16_export, precision="bf16")


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
        with open_backend("triton", url=server.grpc_url, precision="bf16") as served:
            assert served.spec.precision == "bf16"
            got = separate_array(mix, spec.sample_rate, backend=served)
        with pytest.raises(ModelError, match="serves the bf16 graph.*stemserve serve`"):
            open_backend("triton", url=server.grpc_url, precision="fp32")
    log = "".join(path.read_text() for path in tmp_path.glob("**/*.log"))
    assert "on OpenVINO" in log and "(bf16)" in log
    assert max(np.abs(got[name] - expected[name]).max() for name in got) < 1e-6
