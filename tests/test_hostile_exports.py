"""Export folders, sidecars, Triton servers and command lines as an attacker writes them.

A sidecar (``model.json``, ``bag.json``, the ``stemserve_spec`` a server sends) names the
stems, the Triton model and the graph's file: each name becomes a path, so each is checked
where the sidecar is read. Nothing may be written outside ``-o`` or the repository, or
deleted, whatever the folder or the server says; the file name template and the export's
segment are bounded too.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from stemserve.cli import main
from stemserve.errors import SpecError
from stemserve.spec import BagSpec, ModelSpec

RATE = 44100


def write_song(path: Path, seconds: float = 1.5) -> Path:
    t = np.arange(int(seconds * RATE)) / RATE
    mix = np.stack([0.3 * np.sin(2 * np.pi * 330 * t)] * 2).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), mix.T, RATE, format="WAV")
    return path


def hostile_export(small_export: Path, folder: Path, **change) -> Path:
    """A copy of the small export whose model.json has ``change`` applied."""
    shutil.copytree(small_export, folder)
    sidecar = json.loads((folder / "model.json").read_text())
    sidecar.update(change)
    (folder / "model.json").write_text(json.dumps(sidecar))
    return folder


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()}


ESCAPES = ["../../../../ESCAPED", "/tmp/ESCAPED", "..", ".hidden", "a/b", "a\\b", "", "x" * 300]


@pytest.mark.parametrize("source", ESCAPES)
def test_a_sidecar_source_that_is_a_path_writes_nothing(small_export, tmp_path, capsys, source):
    export = hostile_export(small_export, tmp_path / "deep" / "er" / "export",
                            sources=[source, "bass", "other", "vocals"])
    track = write_song(tmp_path / "deep" / "er" / "song.wav")
    before = files_under(tmp_path)
    assert main(["separate", str(track), "--backend", "onnx", "-n", str(export),
                 "-o", str(tmp_path / "deep" / "er" / "out" / "x"), "-q"]) == 1
    error = capsys.readouterr().err
    assert "source" in error and "not a plain name" in error and str(export) in error
    assert files_under(tmp_path) == before
    assert not list(Path("/tmp").glob("ESCAPED*"))


@pytest.mark.parametrize("field,value", [("model_name", "../victim"),
                                         ("onnx_file", "../../../../../etc/hostname"),
                                         ("checkpoint", "../../out")])
def test_repository_fill_refuses_a_sidecar_name_that_is_a_path(small_export, tmp_path, capsys,
                                                                field, value):
    """``model_name: ../victim`` made fill delete victim/1/ and write there; ``onnx_file``
    hard-linked /etc/hostname into the repository as the model."""
    export = hostile_export(small_export, tmp_path / "export", **{field: value})
    victim = tmp_path / "victim" / "1"
    victim.mkdir(parents=True)
    (victim / "mine.txt").write_text("keep me")
    repository = tmp_path / "repository"
    assert main(["repository", "fill", str(export), str(repository)]) == 1
    error = capsys.readouterr().err
    assert f"{field} " in error and "not a plain name" in error
    assert (victim / "mine.txt").read_text() == "keep me"
    assert not repository.exists() or not any(repository.rglob("*"))


def test_a_bag_sidecar_member_that_is_a_path_is_refused(small_export, tmp_path, capsys):
    export = tmp_path / "bag"
    export.mkdir()
    shutil.copytree(small_export, export / "demucs_0")
    (export / "bag.json").write_text(json.dumps({
        "name": "bag", "members": ["demucs_0", "../../elsewhere"],
        "weights": [[1, 1, 1, 1], [1, 1, 1, 1]], "spec_version": 1}))
    track = write_song(tmp_path / "song.wav")
    assert main(["separate", str(track), "--backend", "onnx", "-n", str(export),
                 "-o", str(tmp_path / "out"), "-q"]) == 1
    assert "bag member '../../elsewhere' is not a plain name" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sidecar_lengths_and_sizes_are_bounded(small_export):
    spec = json.loads((small_export / "model.json").read_text())
    assert ModelSpec.from_json(json.dumps(spec)).segment_length == spec["segment_length"]
    for change, message in [
            (dict(segment_length=10 ** 12), "segment_length"),
            (dict(padded_length=-1), "padded_length"),
            (dict(sample_rate=True), "sample_rate"),
            (dict(audio_channels=3), "audio_channels"),
            (dict(sources=["a"] * 9), "sources"),
            (dict(sources=["a", "a"]), "sources"),
            (dict(precision="fp64"), "precision"),
            (dict(input_name='mix" } parameters { key: "x'), "input_name"),
            (dict(checkpoint_sha256="../x"), "checkpoint_sha256"),
            (dict(valid_length_params=dict(spec["valid_length_params"], depth=10 ** 6)),
             "valid_length_params")]:
        with pytest.raises(SpecError, match=message):
            ModelSpec.from_json(json.dumps({**spec, **change}))
    with pytest.raises(SpecError, match="over 65536"):
        ModelSpec.from_json(json.dumps({**spec, "pad": "x" * 70000}))
    with pytest.raises(SpecError, match="weights"):
        BagSpec.from_json(json.dumps({"name": "b", "members": ["m"], "weights": [[float("nan")]],
                                      "spec_version": 1}))


@pytest.mark.server
def test_a_hostile_server_never_makes_the_client_write_outside_out(small_export, tmp_path,
                                                                   capsys, free_ports):
    """A real tritonserver whose config sends a ``stemserve_spec`` naming a source
    ``../../../../ESCAPED``: the client refuses it before anything is written."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from stemserve.model_repository.server import TritonServer
    from stemserve.model_repository.writer import fill_repository

    repository = tmp_path / "repository"
    fill_repository(small_export, repository)
    config_path = repository / "demucs" / "config.pbtxt"
    config = text_format.Parse(config_path.read_text(), mc.ModelConfig())
    spec = json.loads(config.parameters["stemserve_spec"].string_value)
    spec["sources"][0] = "../../../../ESCAPED"
    config.parameters["stemserve_spec"].string_value = json.dumps(spec)
    config_path.write_text(text_format.MessageToString(config))
    http_port, grpc_port, metrics_port = free_ports(3)
    track = write_song(tmp_path / "a" / "b" / "c" / "song.wav")
    before = files_under(tmp_path)
    with TritonServer(repository, http_port=http_port, grpc_port=grpc_port,
                      metrics_port=metrics_port, log_file=tmp_path / "server.log") as server:
        code = main(["separate", str(track), "--url", server.grpc_url,
                     "-o", str(tmp_path / "a" / "b" / "c" / "out"), "-q"])
    assert code == 1
    error = capsys.readouterr().err
    assert "source '../../../../ESCAPED' is not a plain name" in error
    assert f"model 'demucs' at {server.grpc_url}" in error
    assert {path for path in files_under(tmp_path) if path.name != "server.log"
            and "__pycache__" not in path.parts} == before


@pytest.mark.parametrize("template,message", [
    ("{stem:>9999999999}.{ext}", "'{stem:>9999999999}' is not a plain field"),
    ("{track.__class__}/{stem}.{ext}", "'{track.__class__}' is not a plain field"),
    ("{stem!r}.{ext}", "'{stem!r}' is not a plain field"),
    ("{0}/{stem}.{ext}", "'{0}' is not a plain field"),
    ("{stem}.{ext", "bad filename template"),
    ("/tmp/{stem}.{ext}", "leaves the output folder"),
    ("../{stem}.{ext}", "leaves the output folder"),
    ("{track}/../../{stem}.{ext}", "leaves the output folder"),
])
def test_the_file_name_template_takes_plain_fields_inside_out(small_export, tmp_path, capsys,
                                                              template, message):
    track = write_song(tmp_path / "song.wav")
    assert main(["separate", str(track), "--backend", "onnx", "-n", str(small_export),
                 "-o", str(tmp_path / "out"), "--filename", template, "-q"]) == 1
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_a_track_whose_name_climbs_out_is_refused(small_export, tmp_path, capsys):
    """A file named ``...wav`` makes ``{track}`` be ``..``."""
    track = write_song(tmp_path / "in" / "...wav")
    assert main(["separate", str(track), "--backend", "onnx", "-n", str(small_export),
                 "-o", str(tmp_path / "in" / "out"), "--filename", "{track}/{stem}.{ext}",
                 "-q"]) == 1
    assert "would be written outside the output folder" in capsys.readouterr().err
    assert files_under(tmp_path) == {track}


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0", "ten"])
def test_export_segment_must_be_seconds_above_zero(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "-n", "demucs_unittest", f"--segment={value}"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert f"argument --segment: '{value}' is not a number of seconds" in error
