"""The command a user types for the new releases, end to end.

``stemserve separate -n htdemucs --serve song.mp3`` with the release's file in torch hub's
cache (a package the official demucs 4.0.1 wrote, random weights, under the release's
signature: the table's checksum prefix is patched to the file's) resolves the name, loads
the file, exports it, fills a repository, starts a real tritonserver, separates and writes
stems equal to demucs 4.0.1's ``apply_model`` on the same decoded audio, as its
``separate.py`` normalises it. ``-n htdemucs_ft`` does the same for a bag of four.
The CLI runs in this process (the table patch must reach it); tritonserver is a real one.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from oracle_v4 import run_oracle
from stemserve import checkpoints
from stemserve.checkpoints import BAGS, DEMUCS4_FILES
from stemserve.cli import main
from stemserve.defaults import export_root
from test_models_v4 import SMALL_HT
from tolerance import assert_matches

pytestmark = [pytest.mark.oracle, pytest.mark.server, pytest.mark.slow]

ULPS = 200
"""Bound in float32 epsilons of the stems' peak (~0.2), ``tests/tolerance.py``: measured
79.8 (htdemucs) and 68.1 (htdemucs_ft) on a 2-core Xeon, the ONNX graphs on a real
tritonserver as in ``test_pipeline_v4.py`` (float32 WAV stems, written exactly)."""
RATE = 44100

_MAKE = '''
import os
from omegaconf import OmegaConf
from demucs.apply import BagOfModels, apply_model
from demucs.htdemucs import HTDemucs
from demucs.states import load_model, save_with_checksum, serialize_model

os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
folder = _HERE / "files"
folder.mkdir()
outputs["files"] = {}
models = []
for index, signature in enumerate(inputs["signatures"]):
    torch.manual_seed(index)
    model = HTDemucs(["drums", "bass", "other", "vocals"], **inputs["kwargs"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.5 * p.std() if p.numel() > 1 else 0.05))
    save_with_checksum(serialize_model(model, OmegaConf.create({"quant": {}})),
                       folder / f"{signature}.th")
    (path,) = folder.glob(f"{signature}-*.th")
    outputs["files"][signature] = path.name
    models.append(load_model(path).eval())
bag = BagOfModels(models, inputs["weights"])
# demucs/separate.py on the decoded track, shifts 0, overlap 0.25
wav = inputs["mix"]
ref = wav.mean(0)
wav = (wav - ref.mean()) / ref.std()
with torch.no_grad():
    sources = apply_model(bag, wav[None], shifts=0, split=True, overlap=0.25)[0]
outputs["stems"] = sources * ref.std() + ref.mean()
'''


@pytest.fixture
def song_mp3(tmp_path) -> tuple[Path, np.ndarray]:
    """An MP3 (3.3 s: several segments and a short last one) and what libsndfile decodes."""
    rng = np.random.default_rng(5)
    t = np.arange(int(3.3 * RATE) + 11) / RATE
    mix = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * rng.standard_normal((2, t.size))
    path = tmp_path / "song.mp3"
    sf.write(str(path), mix.T.astype(np.float32), RATE, format="MP3")
    decoded, rate = sf.read(str(path), dtype="float32", always_2d=True)
    assert rate == RATE
    return path, decoded.T.copy()


@pytest.mark.parametrize("name", ["htdemucs", "htdemucs_ft"])
def test_separate_release_with_serve_equals_demucs_4(name, song_mp3, tmp_path, monkeypatch):
    path, decoded = song_mp3
    release = BAGS[name]
    weights = [[1.] * 4] * len(release.models) if release.weights is None else release.weights
    official = run_oracle(_MAKE, tmp_path / "oracle", dict(
        signatures=list(release.models), kwargs=SMALL_HT, weights=weights,
        mix=torch.from_numpy(decoded)), timeout=900)

    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(checkpoints.URL_ENV, "http://127.0.0.1:9/")  # nothing is downloaded
    for signature, file_name in official["files"].items():
        shutil.copy(tmp_path / "oracle" / "files" / file_name, cache / file_name)
        checksum = file_name[:-3].split("-")[1]
        monkeypatch.setitem(DEMUCS4_FILES, signature, (DEMUCS4_FILES[signature][0], checksum))
    export = export_root() / name
    try:
        code = main(["separate", "-n", name, "--serve", str(path), "-o", str(tmp_path / "out"),
                     "--float32", "--clip-mode", "none", "-q"])
        assert code == 0
        stems = sorted((tmp_path / "out" / name / "song").iterdir())
        assert [stem.name for stem in stems] == \
            sorted(f"{source}.wav" for source in ("drums", "bass", "other", "vocals"))
        expected = official["stems"].numpy()
        got = []
        for index, source in enumerate(("drums", "bass", "other", "vocals")):
            stem, rate = sf.read(str(tmp_path / "out" / name / "song" / f"{source}.wav"),
                                 dtype="float32", always_2d=True)
            assert rate == RATE and stem.shape == expected[index].T.shape
            got.append(stem.T)
        assert_matches(np.stack(got), expected, ULPS, name)
    finally:
        shutil.rmtree(export, ignore_errors=True)
