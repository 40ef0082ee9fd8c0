"""Exports keyed by content: two files of one name, a changed file, a release name beside a
local file of that name, and what the keys are made of. Real checkpoints, real exports, real
ONNX Runtime; nothing is downloaded (a mirror where nothing listens proves a download was
tried)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from stemserve.cli import main
from stemserve.client.models import (SOURCE_FILE, ModelSource, export_dir_for, keyed_exports,
                                     local_export, model_source)
from stemserve.errors import ModelError
from stemserve.releases import release_files

RATE = 44100
SOURCES = ["drums", "bass", "other", "vocals"]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """This test's own stemserve cache: the export root starts empty."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("STEMSERVE_CACHE", str(folder))
    return folder


def save_v2(path: Path, seed: int) -> Path:
    """A random-weight Demucs v2 state dict of demucs_unittest's configuration."""
    import torch

    from stemserve.model import Demucs

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(Demucs(SOURCES, channels=4).state_dict(), path)
    return path


def write_song(path: Path) -> Path:
    rng = np.random.default_rng(5)
    t = np.arange(int(1.7 * RATE)) / RATE
    mix = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * rng.standard_normal((2, t.size))
    sf.write(str(path), mix.T.astype(np.float32), RATE, subtype="FLOAT")
    return path


def separate(track: Path, model: Path | str, out: Path, *extra: str) -> dict[str, np.ndarray]:
    """Run the CLI in-process; the stems it wrote, by name."""
    code = main(["separate", str(track), "-n", str(model), "--config", "demucs_unittest",
                 "--backend", "onnx", "-o", str(out), "--float32", "-q", *extra])
    assert code == 0
    (folder,) = (path for path in out.glob("*/*") if path.is_dir())
    return {path.stem: sf.read(str(path), dtype="float32")[0] for path in folder.iterdir()}


@pytest.mark.slow
def test_two_checkpoints_of_one_name_each_get_their_own_stems(tmp_path, cache):
    """a/model.th and b/model.th: two exports, each file's own stems, whichever ran first
    and whatever their times say."""
    first, second = save_v2(tmp_path / "a" / "model.th", 1), save_v2(tmp_path / "b" / "model.th", 2)
    track = write_song(tmp_path / "song.wav")
    stems_a = separate(track, first, tmp_path / "out-a")
    stems_b = separate(track, second, tmp_path / "out-b")
    assert not np.allclose(stems_a["vocals"], stems_b["vocals"])
    folders = sorted(folder.name for folder, _ in keyed_exports())
    assert len(folders) == 2 and all(name.startswith("model-") for name in folders)

    # The PyTorch network of each file gives the same stems: they are that file's own.
    reference = separate(track, first, tmp_path / "torch-a", "--backend", "torch")
    for name, stem in stems_a.items():
        assert np.abs(stem - reference[name]).max() < 1e-4

    os.utime(second)  # newer than every export: time is not what tells them apart
    assert all(np.array_equal(stems_a[name], stem)
               for name, stem in separate(track, first, tmp_path / "out-a2").items())
    assert all(np.array_equal(stems_b[name], stem)
               for name, stem in separate(track, second, tmp_path / "out-b2").items())
    assert sorted(folder.name for folder, _ in keyed_exports()) == folders


def test_a_changed_file_gets_a_new_export_and_the_old_one_stays_its_own(tmp_path, cache):
    path = save_v2(tmp_path / "model.th", 1)
    before = export_dir_for(path, "demucs_unittest")
    stamp = os.stat(path)
    save_v2(path, 2)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # same time, new content
    after = export_dir_for(path, "demucs_unittest")
    assert after != before and (before / "model.json").is_file()
    spec = json.loads((after / "model.json").read_text())
    assert spec["checkpoint_sha256"] == model_source(path, "demucs_unittest").files[0][1]


def test_the_configuration_is_part_of_the_key(tmp_path, cache):
    path = save_v2(tmp_path / "model.th", 1)
    unittest = model_source(path, "demucs_unittest")
    assert model_source(path, "demucs").key != unittest.key
    assert model_source(path, "demucs_unittest", segment=10).key != unittest.key
    export_dir_for(path, "demucs_unittest")
    assert local_export(path, "demucs_unittest") is not None
    assert local_export(path, "demucs") is None  # never the other configuration's export


def test_a_release_name_never_means_a_local_file(tmp_path, cache, monkeypatch, capsys):
    """A local demucs_unittest.th exported earlier: ``-n demucs_unittest`` still asks for the
    release (here from a mirror where nothing listens, so it fails saying so)."""
    local = save_v2(tmp_path / "demucs_unittest.th", 1)
    export_dir_for(local, "demucs_unittest")
    monkeypatch.setenv("STEMSERVE_CHECKPOINT_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert local_export("demucs_unittest") is None
    track = write_song(tmp_path / "song.wav")
    code = main(["separate", str(track), "-n", "demucs_unittest", "--backend", "onnx",
                 "-o", str(tmp_path / "out"), "-q"])
    assert code == 1
    error = capsys.readouterr().err
    assert "could not download http://127.0.0.1:9/demucs_unittest-09ebc15f.th" in error
    assert not (tmp_path / "out").exists()
    (source,) = [source for _, source in keyed_exports()]
    assert (source.kind, source.path) == ("file", str(local.resolve()))
    assert source.describe() == (f"local file {local.resolve()}, sha256 "
                                 f"{source.files[0][1][:8]}, --config demucs_unittest")


def test_a_release_key_is_its_name_and_its_files_checksums():
    source = model_source("htdemucs_ft")
    assert source.kind == "release" and source.describe() == "release htdemucs_ft"
    assert source.files == tuple((file.name, file.checksum) for file in release_files(
        "htdemucs_ft"))
    assert source.folder.name == f"htdemucs_ft-{source.key[:12]}"
    with pytest.raises(ModelError, match="--config demucs applies to local files only"):
        model_source("htdemucs", "demucs")


def test_unkeyed_and_tampered_exports_are_never_used(tmp_path, cache, small_export, caplog):
    """An export folder of an earlier stemserve (named by the model alone), and a keyed
    folder whose source.json describes another model, are skipped; a note names them."""
    import shutil

    path = save_v2(tmp_path / "model.th", 1)
    shutil.copytree(small_export, cache / "export" / "model")  # the old layout
    folder = export_dir_for(path, "demucs_unittest")
    source = ModelSource.read(folder)
    record = json.loads((folder / SOURCE_FILE).read_text())
    record["files"][0][1] = "0" * 64  # claims another file, its key no longer matches
    (folder / SOURCE_FILE).write_text(json.dumps(record))
    with caplog.at_level("INFO", logger="stemserve"):
        assert keyed_exports() == []
    assert "not keyed by content" in caplog.text and "model" in caplog.text
    assert local_export(path, "demucs_unittest") is None
    assert source is not None and ModelSource.read(folder) is None


def test_exports_are_put_in_place_whole(tmp_path, cache):
    """No temporary folder is left, and the folder holds the sidecar and source.json."""
    path = save_v2(tmp_path / "model.th", 1)
    folder = export_dir_for(path, "demucs_unittest")
    assert sorted(item.name for item in folder.iterdir()) == \
        ["model.json", "model.onnx", SOURCE_FILE]
    assert [item.name for item in (cache / "export").iterdir()] == [folder.name]


def test_the_web_catalog_says_what_each_export_is(tmp_path, cache, small_export, monkeypatch):
    """A local file named like a release is listed by its folder, never as the release; each
    entry says whether it is a release or a local file, its family and sha256."""
    from stemserve.web.catalog import ModelCatalog

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached release
    export_dir_for(save_v2(tmp_path / "htdemucs.th", 1), "demucs_unittest")
    mine = save_v2(tmp_path / "mine.th", 2)
    export_dir_for(mine, "demucs_unittest")
    catalog = ModelCatalog(model=str(small_export))
    catalog.open()
    try:
        models = catalog.models()
        assert list(models)[0] == "small" and "htdemucs" not in models
        (local_ht,) = [name for name in models if name.startswith("htdemucs-")]
        assert catalog.describe(local_ht).startswith(
            f"local file {(tmp_path / 'htdemucs.th').resolve()}, sha256 ")
        assert "Demucs v2, sha256 " in catalog.describe(local_ht)
        assert catalog.describe("mine").startswith(f"local file {mine.resolve()}, sha256 ")
        assert catalog.describe("small").startswith("Demucs v2, sha256 ")
        assert catalog.sources("mine") == tuple(SOURCES)
    finally:
        catalog.close()


def test_separate_without_a_model_asks_for_htdemucs(tmp_path, cache, monkeypatch, capsys):
    """demucs 4's default: with nothing cached and a mirror where nothing listens, the
    error names htdemucs' file; demucs_quantized still works by name."""
    monkeypatch.setenv("STEMSERVE_CHECKPOINT_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    track = write_song(tmp_path / "song.wav")
    assert main(["separate", str(track), "--backend", "onnx", "-o", str(tmp_path / "out")]) == 1
    assert "could not download http://127.0.0.1:9/955717e8-8726e21a.th" in \
        capsys.readouterr().err
    assert main(["separate", str(track), "-n", "demucs_quantized", "--backend", "onnx",
                 "-o", str(tmp_path / "out")]) == 1
    assert "could not download http://127.0.0.1:9/demucs_quantized-07afea75.th" in \
        capsys.readouterr().err


def test_a_damaged_export_is_not_offered_by_the_web_catalog(tmp_path, cache, small_export,
                                                            monkeypatch, caplog):
    from stemserve.web.catalog import ModelCatalog

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    mine = export_dir_for(save_v2(tmp_path / "mine.th", 2), "demucs_unittest")
    (mine / "model.json").write_text("{not json")
    catalog = ModelCatalog(model=str(small_export))
    catalog.open()
    try:
        with caplog.at_level("WARNING", logger="stemserve"):
            assert list(catalog.models()) == ["small"]
            assert list(catalog.models()) == ["small"]
        assert caplog.text.count(f"not offering {mine}") == 1
    finally:
        catalog.close()
