"""Six-source models (htdemucs_6s: drums, bass, other, vocals, guitar, piano) through the
command line: every stem written, ``--two-stems`` for the new sources, the filename
template. A small random-weight htdemucs_6s exported to ONNX, run in-process."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from stemserve.checkpoints import CheckpointInfo
from stemserve.cli import main
from stemserve.export.to_onnx import export_onnx
from stemserve.models import HTDemucs
from stemserve.models.configs import HTDEMUCS_6S, SOURCES_6
from test_models_v4 import SMALL_HT

pytestmark = pytest.mark.slow

RATE = 44100


@pytest.fixture(scope="module")
def export_6s(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = HTDemucs(**dict(HTDEMUCS_6S, **SMALL_HT)).eval()
    folder = tmp_path_factory.mktemp("export") / "tiny_6s"
    export_onnx(model, CheckpointInfo("tiny_6s", None, "6" * 64, {}, "htdemucs"), folder)
    return folder


@pytest.fixture
def track(tmp_path) -> Path:
    rng = np.random.default_rng(3)
    mix = 0.2 * rng.standard_normal((int(2.2 * RATE), 2)).astype(np.float32)
    path = tmp_path / "in" / "song.wav"
    path.parent.mkdir()
    sf.write(str(path), mix, RATE, subtype="FLOAT")
    return path


def read(path: Path) -> np.ndarray:
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    assert rate == RATE
    return data


def test_all_six_stems_then_two_stems_of_a_new_source(export_6s, track, tmp_path):
    common = [str(track), "--backend", "onnx", "-n", str(export_6s), "-o", str(tmp_path),
              "-q", "--float32", "--clip-mode", "none"]
    assert main(["separate", *common]) == 0
    folder = tmp_path / "tiny_6s" / "song"
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        f"{source}.wav" for source in SOURCES_6)
    six = {source: read(folder / f"{source}.wav") for source in SOURCES_6}

    assert main(["separate", *common, "--two-stems", "piano",
                 "--filename", "{stem}-of-{track}.{ext}"]) == 0
    piano = read(tmp_path / "tiny_6s" / "piano-of-song.wav")
    rest = read(tmp_path / "tiny_6s" / "no_piano-of-song.wav")
    assert np.abs(piano - six["piano"]).max() < 1e-6
    others = sum(six[source] for source in SOURCES_6 if source != "piano")
    assert np.abs(rest - others).max() < 1e-5


def test_two_stems_names_the_sources_it_knows(export_6s, track, tmp_path, capsys):
    assert main(["separate", str(track), "--backend", "onnx", "-n", str(export_6s),
                 "-o", str(tmp_path), "-q", "--two-stems", "ukulele"]) != 0
    message = capsys.readouterr().err
    assert "ukulele" in message and "guitar" in message and "piano" in message
    assert not (tmp_path / "tiny_6s").exists() or not any((tmp_path / "tiny_6s").rglob("*.wav"))


def test_the_web_catalog_offers_its_stems(export_6s, tmp_path, monkeypatch):
    """The page's model picker: an export under the export root is offered with the stems
    its sidecar names (guitar and piano here), before it is opened and after."""
    import shutil

    from stemserve.defaults import export_root
    from stemserve.web.catalog import ModelCatalog

    monkeypatch.setenv("STEMSERVE_CACHE", str(tmp_path / "cache"))
    shutil.copytree(export_6s, export_root() / "tiny_6s")
    catalog = ModelCatalog(model=str(export_root() / "tiny_6s"))
    try:
        assert "tiny_6s" in catalog.models()
        assert catalog.sources("tiny_6s") == tuple(SOURCES_6)
        catalog.open()
        assert catalog.backend("tiny_6s").spec.sources == tuple(SOURCES_6)
        assert catalog.sources("tiny_6s") == tuple(SOURCES_6)
    finally:
        catalog.close()
