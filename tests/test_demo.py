"""`stemserve demo`: a random-weight model of every family, loaded like any checkpoint, to try
export, serving and separation with no download."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from stemserve.checkpoints import load_model
from stemserve.cli import main
from stemserve.cli.demo import DEMO_MODELS
from stemserve.models.demo import CONFIGS


def test_the_cli_lists_every_demo_model():
    assert DEMO_MODELS == tuple(CONFIGS)


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_a_demo_model_of_every_family_loads_as_a_checkpoint(name, tmp_path, capsys):
    path = tmp_path / f"{name}.th"
    assert main(["demo", name, "--small", "-o", str(path)]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    model, info = load_model(path)
    family, _, config, _ = CONFIGS[name]
    assert info.family == family and list(model.sources) == list(config["sources"])


@pytest.mark.slow
def test_a_demo_model_separates_with_no_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STEMSERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("STEMSERVE_CHECKPOINT_URL", "http://127.0.0.1:9/")  # nothing there
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--small"]) == 0
    t = np.arange(3 * 44100) / 44100
    sf.write("song.wav", np.stack([0.3 * np.sin(2 * np.pi * 440 * t)] * 2).T, 44100)
    assert main(["separate", "-n", "demo-htdemucs.th", "song.wav", "--backend", "onnx"]) == 0
    assert "separating with demo-htdemucs (HT Demucs, sha256 " in capsys.readouterr().err
    stems = sorted(path.name for path in (tmp_path / "separated" / "demo-htdemucs" / "song")
                   .iterdir())
    assert stems == ["bass.wav", "drums.wav", "other.wav", "vocals.wav"]
