"""demucs 4.0.1 releases and packages: the release table against demucs' own, packages made
by the official code loaded without demucs (forwards equal), bags over a loopback server, a
folder mirror and a local YAML, the cache shared with demucs, and what is refused.

The official packages come from ``demucs.states.serialize_model`` run in the oracle of
``.ci/oracle-v4.sh`` (``tests/oracle_v4.py``), for small configurations (8 channels) of each
class, saved with ``save_with_checksum`` exactly as the releases are named; the oracle loads
them back with ``demucs.states.load_model`` and runs them. Release tests serve those files
under release signatures, with the table's sha256 prefixes patched to match.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import io
import json
import os
import shutil
import subprocess
import sys
import types
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from oracle_v4 import require_oracle, run_oracle
from stemserve import checkpoints, releases
from stemserve.checkpoints import build, unpickle
from stemserve.checkpoints import (BAGS, DEMUCS4_FILES, DEMUCS4_ROOT_URL, KNOWN_MODELS,
                                   Bag, CheckpointError, checkpoint_files,
                                   checkpoint_url, download_checkpoint, load_bag, load_model)
from stemserve.models.arguments import DEMUCS4_RULES
from stemserve.models.registry import by_name, registrations
from stemserve.models import DemucsV3, HDemucs, HTDemucs
from test_checkpoints import _LIMITED, LoopbackServer, _dead_url

SOURCES = ["drums", "bass", "other", "vocals"]
SIX = SOURCES + ["guitar", "piano"]
SMALL_HT = dict(channels=8, bottom_channels=32, segment=Fraction(6, 5))
# A demucs 4 training configuration (conf/config.yaml's shape), 0.01 MB min_size so that
# the small models have tensors to quantize.
TRAINING = {"model": "hdemucs", "seed": 42, "epochs": 360, "dset": {"sources": SOURCES,
            "segment": 11, "musdb": "/data/musdb"},
            "quant": {"diffq": None, "qat": None, "min_size": 0.01, "group_size": 8},
            "optim": {"lr": 3e-4, "betas": [0.9, 0.999]}, "interpolated": "${seed}"}

# name: (official class, kwargs, quantizer ('diffq', 'qat' or None), signature).
# Release signatures are those of the bags they stand in for.
PACKAGES = {
    "htdemucs": ("HTDemucs", SMALL_HT, None, "955717e8"),
    "ft_drums": ("HTDemucs", SMALL_HT, None, "f7e0c4bc"),
    "ft_bass": ("HTDemucs", SMALL_HT, None, "d12395a8"),
    "ft_other": ("HTDemucs", SMALL_HT, None, "92cfc3b6"),
    "ft_vocals": ("HTDemucs", SMALL_HT, None, "04573f0d"),
    "htdemucs_6s": ("HTDemucs", dict(SMALL_HT, sources=SIX), None, "5c90dfd2"),
    "q_time_a": ("Demucs", dict(channels=8, normalize=False, segment=44), "diffq", "6b9c2ca1"),
    "q_time_b": ("Demucs", dict(channels=8, normalize=False, segment=44), "diffq", "b72baf4e"),
    "q_hybrid_a": ("HDemucs", dict(channels=8), "diffq", "42e558d4"),
    "q_hybrid_b": ("HDemucs", dict(channels=8, cac=False, hybrid_old=True), "diffq", "305bc58f"),
    "time": ("Demucs", dict(channels=8), None, "timeonly"),
    "hybrid": ("HDemucs", dict(channels=8, multi_freqs=[0.25, 0.5]), None, "hybrid"),
    "ht_qat": ("HTDemucs", dict(SMALL_HT, t_emb="cape", t_cross_first=True), "qat", "htqat"),
    "omegaconf": ("HDemucs", dict(channels=8, multi_freqs=[0.25, 0.5]), None, "omega"),
}
# A local bag, in demucs 4's YAML format, next to the files.
LOCAL_BAG = ("models: ['timeonly', 'hybrid', 'timeonly']\n"
             "weights: [[1., 0., 1., 0.5], [0., 1., 1., 0.5], [1., 1., 0., 0.]]\n"
             "segment: 11\n")

_MAKE = '''
import os
import numpy as np
from omegaconf import OmegaConf
from demucs.demucs import Demucs
from demucs.hdemucs import HDemucs
from demucs.htdemucs import HTDemucs
from demucs.pretrained import get_model
from demucs.states import get_quantizer, load_model, save_with_checksum, serialize_model

# demucs 4.0.1 reads its own files with torch.load's old default (no weights_only).
os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
CLASSES = {"HTDemucs": HTDemucs, "HDemucs": HDemucs, "Demucs": Demucs}
folder = _HERE / "files"
folder.mkdir()
outputs["files"], outputs["stems"], outputs["sources"], outputs["quantized"] = {}, {}, {}, {}
for index, (name, (klass, kwargs, quant, signature)) in enumerate(inputs["packages"].items()):
    torch.manual_seed(index)
    kwargs = dict(kwargs)
    model = CLASSES[klass](kwargs.pop("sources", inputs["sources"]), **kwargs)
    with torch.no_grad():  # every parameter perturbed, so that norms and layer scales count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.5 * p.std() if p.numel() > 1 else 0.05))
    training = OmegaConf.create(inputs["training"])
    if quant:
        training.quant[quant] = 1e-4 if quant == "diffq" else 8
    quantizer = get_quantizer(model, training.quant)
    outputs["quantized"][name] = len(quantizer._qparams) if quantizer else 0
    package = serialize_model(model, training, quantizer)
    # tools/export.py adds the metrics: validation losses and numpy test scores.
    package["metrics"] = ({"loss": 0.125, "reco": 0.25},
                          {"sdr": np.float64(7.25), "nsdr": np.mean([1.0, 2.5])})
    if name == "omegaconf":  # the DictConfig itself, and a ListConfig argument
        package["training_args"] = training
        package["kwargs"]["multi_freqs"] = OmegaConf.create([0.25, 0.5])
        outputs["training"] = OmegaConf.to_container(training)
    save_with_checksum(package, folder / f"{signature}.th")
    (path,) = folder.glob(f"{signature}-*.th")
    outputs["files"][name] = path.name
    official = load_model(path).eval()  # torch.load and set_state, as demucs does
    outputs["sources"][name] = list(official.sources)
    with torch.no_grad():
        outputs["stems"][name] = official(inputs["mix"])

(folder / "mybag.yaml").write_text(inputs["bag"])
bag = get_model("mybag", repo=folder)  # LocalRepo and BagOnlyRepo
# BagOfModels keeps no segment of its own: it sets its models'.
outputs["bag"] = {"weights": bag.weights, "segments": [m.segment for m in bag.models]}
'''


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> dict:
    """The official packages (``files``: name -> file name in ``folder``), their forwards on
    ``mix`` (``stems``) and demucs' reading of the local bag YAML (``bag``)."""
    require_oracle()
    workdir = tmp_path_factory.mktemp("official")
    mix = torch.randn(1, 2, 30_011, generator=torch.Generator().manual_seed(7))
    result = run_oracle(_MAKE, workdir, dict(packages=PACKAGES, sources=SOURCES, mix=mix,
                                             training=TRAINING, bag=LOCAL_BAG))
    assert all(result["quantized"][name] > 0 for name, spec in PACKAGES.items() if spec[2])
    return dict(result, folder=workdir / "files", mix=mix)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A private torch home, so nothing reads or writes the real cache; no URL override."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(checkpoints.URL_ENV, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def server():
    srv = LoopbackServer()
    yield srv
    srv.stop()


def _forward(model: torch.nn.Module, mix: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(mix)


def _max_err(model: torch.nn.Module, official: dict, name: str) -> float:
    return (_forward(model, official["mix"]) - official["stems"][name]).abs().max().item()


def _publish(official: dict, monkeypatch, names: list[str], server: LoopbackServer | None = None,
             folder: Path | None = None) -> list[str]:
    """Serve (or copy into ``folder``) the files of ``names`` under their signatures, with
    the table's sha256 prefixes patched to theirs; their file names."""
    published = []
    for name in names:
        file_name = official["files"][name]
        signature, checksum = file_name[:-3].split("-")
        folder_of = DEMUCS4_FILES[signature][0]
        monkeypatch.setitem(DEMUCS4_FILES, signature, (folder_of, checksum))
        payload = (official["folder"] / file_name).read_bytes()
        if server is not None:
            server.files[file_name] = payload
        if folder is not None:
            (folder / file_name).write_bytes(payload)
        published.append(file_name)
    return published


# --------------------------------------------------------------------------- the table


_TABLE = '''
import yaml
from demucs import pretrained
outputs["root"] = pretrained.ROOT_URL
outputs["files"] = pretrained._parse_remote_files(pretrained.REMOTE_ROOT / "files.txt")
outputs["bags"] = {path.stem: yaml.safe_load(path.read_text())
                   for path in pretrained.REMOTE_ROOT.glob("*.yaml")}
'''


@pytest.mark.oracle
def test_release_table_matches_demucs_4_0_1(tmp_path):
    """Every file of remote/files.txt at the URL demucs computes, every remote/*.yaml bag."""
    theirs = run_oracle(_TABLE, tmp_path)
    assert DEMUCS4_ROOT_URL == theirs["root"]
    # demucs' parser reads the file's last, empty line as a signature '' of no file.
    assert theirs["files"].pop("") == DEMUCS4_ROOT_URL + "hybrid_transformer/"
    assert {signature: checkpoints.v4_file(signature).url for signature in DEMUCS4_FILES} \
        == theirs["files"]
    assert set(BAGS) == set(theirs["bags"])
    for name, bag in theirs["bags"].items():
        ours = BAGS[name]
        assert list(ours.models) == bag["models"], name
        assert (None if ours.weights is None else [list(row) for row in ours.weights]) \
            == bag.get("weights"), name
        assert ours.segment == bag.get("segment"), name
    assert set(KNOWN_MODELS) == (set(checkpoints.RELEASES) | set(theirs["bags"])
                                 | set(checkpoints.ROFORMER_RELEASES))


def test_release_files_and_urls():
    assert checkpoint_url("htdemucs") == \
        "https://dl.fbaipublicfiles.com/demucs/hybrid_transformer/955717e8-8726e21a.th"
    assert checkpoint_url("hdemucs_mmi", base_url="http://mirror/x/") == \
        "http://mirror/x/75fc33f5-1941ce65.th"  # a mirror is flat
    assert checkpoint_files("htdemucs_ft") == ("f7e0c4bc-ba3fe64a.th", "d12395a8-e57c48e6.th",
                                               "92cfc3b6-ef3bcb9c.th", "04573f0d-f3cf25b2.th")
    assert checkpoint_files("repro_mdx_a_hybrid_only") == ("fa0cb7f9-100d8bf4.th",
                                                           "902315c2-b39ce9c9.th")
    assert checkpoint_files("demucs") == ("demucs-e07c671f.th",)
    for call in (lambda: checkpoint_url("mdx_q"), lambda: download_checkpoint("mdx_q")):
        with pytest.raises(CheckpointError, match=r"'mdx_q' is a bag of 4 models in 4 files "
                                                  r"\(6b9c2ca1-3fd82607.th, .*load_bag"):
            call()
    with pytest.raises(CheckpointError, match="'htdemucs_ft' is a bag of 4 models; load it "
                                              "with load_bag"):
        load_model("htdemucs_ft", base_url=_dead_url())


def test_every_argument_of_the_demucs_4_classes_has_a_bound():
    names = set()
    for klass in (HTDemucs, HDemucs, DemucsV3):
        names |= set(inspect.signature(klass).parameters) - {"sources"}
    assert names == set(DEMUCS4_RULES)
    assert {family.name for family in registrations()} == {
        "demucs", "demucs_v3", "hdemucs", "htdemucs", "bs_roformer", "mel_band_roformer"}


# --------------------------------------------------------------------------- official packages


@pytest.mark.oracle
@pytest.mark.slow
@pytest.mark.parametrize("name", PACKAGES)
def test_official_package_loads_and_runs_the_same(official, name):
    klass, kwargs, _, signature = PACKAGES[name]
    path = official["folder"] / official["files"][name]
    model, info = load_model(path)
    family = {"HTDemucs": "htdemucs", "HDemucs": "hdemucs", "Demucs": "demucs_v3"}[klass]
    assert (info.family, info.name, info.path) == (family, path.stem, path)
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert isinstance(model, by_name(family).model_class) and not model.training
    assert info.config["sources"] == official["sources"][name]
    for key, value in kwargs.items():
        if key != "sources":
            assert info.config[key] == value, key
    err = _max_err(model, official, name)
    print(f"{name}: max abs error {err:.2e}")
    assert err < 1e-5
    assert all(p.dtype == torch.float32 and not p.is_meta for p in model.parameters())
    assert "demucs.htdemucs" not in sys.modules and "demucs.hdemucs" not in sys.modules


@pytest.mark.oracle
@pytest.mark.slow
def test_omegaconf_training_args_read_back(official):
    """A package that pickled the DictConfig itself (and a ListConfig argument): its
    placeholders hold exactly what OmegaConf.to_container gives, quant included."""
    path = official["folder"] / official["files"]["omegaconf"]
    loaded = unpickle._torch_load(path, str(path))
    assert type(loaded["training_args"]).__name__ == "_OmegaConfDict"
    training = unpickle._plain(loaded["training_args"], str(path))
    assert training == official["training"]
    assert training["quant"] == {"diffq": None, "qat": None, "min_size": 0.01, "group_size": 8}
    assert training["interpolated"] == "${seed}"  # kept, not resolved
    assert loaded["metrics"] == ({"loss": 0.125, "reco": 0.25}, {"sdr": 7.25, "nsdr": 1.75})
    model, info = load_model(path)
    assert info.config["multi_freqs"] == [0.25, 0.5]


# --------------------------------------------------------------------------- releases


@pytest.mark.oracle
@pytest.mark.slow
def test_single_model_release_over_http(official, server, cache, monkeypatch):
    (file_name,) = _publish(official, monkeypatch, ["htdemucs"], server)
    assert checkpoint_url("htdemucs") == f"{DEMUCS4_ROOT_URL}hybrid_transformer/{file_name}"
    model, info = load_model("htdemucs", base_url=server.url, progress=False)
    assert (info.name, info.family, info.path) == ("htdemucs", "htdemucs", cache / file_name)
    assert server.requests == [f"/{file_name}"] and os.listdir(cache) == [file_name]
    assert _max_err(model, official, "htdemucs") < 1e-5

    bag = load_bag("htdemucs", progress=False, base_url=_dead_url())  # from the cache
    assert (bag.name, bag.weights, bag.segment, bag.sources) == ("htdemucs", [[1.] * 4], None,
                                                                 SOURCES)
    assert bag.infos[0] == info and len(server.requests) == 1


@pytest.mark.oracle
@pytest.mark.slow
def test_bag_over_http_every_member_verified_then_offline(official, server, cache, monkeypatch):
    members = ["ft_drums", "ft_bass", "ft_other", "ft_vocals"]
    files = _publish(official, monkeypatch, members, server)
    bag = load_bag("htdemucs_ft", base_url=server.url, progress=False)
    assert isinstance(bag, Bag) and bag.name == "htdemucs_ft"
    assert sorted(server.requests) == sorted(f"/{name}" for name in files)
    assert sorted(os.listdir(cache)) == sorted(files)
    for info, name in zip(bag.infos, files):
        assert info.path == cache / name and info.name == name.split("-")[0]
        assert info.sha256.startswith(name[9:17])
    assert bag.weights == [[1., 0., 0., 0.], [0., 1., 0., 0.], [0., 0., 1., 0.], [0., 0., 0., 1.]]
    assert bag.segment is None and all(m.segment == Fraction(6, 5) for m in bag.models)
    for model, name in zip(bag.models, members):
        assert _max_err(model, official, name) < 1e-5

    server.stop()
    monkeypatch.setenv(checkpoints.URL_ENV, server.url)
    again = load_bag("htdemucs_ft", progress=False)
    assert [info.path for info in again.infos] == [info.path for info in bag.infos]
    assert len(server.requests) == 4


@pytest.mark.oracle
@pytest.mark.slow
def test_quantized_bag_of_mixed_models_over_http(official, server, cache, monkeypatch):
    """mdx_q (mdx_final/): two time-domain and two hybrid models, diffq-quantized, a weight
    matrix and a 44 s segment that replaces theirs."""
    members = ["q_time_a", "q_time_b", "q_hybrid_a", "q_hybrid_b"]
    _publish(official, monkeypatch, members, server)
    bag = load_bag("mdx_q", base_url=server.url, progress=False)
    assert [info.family for info in bag.infos] == ["demucs_v3", "demucs_v3", "hdemucs",
                                                   "hdemucs"]
    assert bag.weights == [list(row) for row in releases._MDX_WEIGHTS]
    assert bag.segment == 44 and all(model.segment == 44 for model in bag.models)
    assert [info.config["segment"] for info in bag.infos] == [44, 44, 40, 40]  # as stored
    assert len(server.requests) == 4
    for model, name in zip(bag.models, members):
        assert _max_err(model, official, name) < 1e-5


@pytest.mark.oracle
@pytest.mark.slow
def test_segment_override_of_a_single_model_from_a_folder_mirror(official, tmp_path, cache,
                                                                 monkeypatch):
    """hdemucs_mmi from a flat folder mirror: load_model applies its bag's segment too."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    payload = (official["folder"] / official["files"]["hybrid"]).read_bytes()
    checksum = hashlib.sha256(payload).hexdigest()[:8]
    monkeypatch.setitem(DEMUCS4_FILES, "75fc33f5", ("hybrid_transformer", checksum))
    (mirror / f"75fc33f5-{checksum}.th").write_bytes(payload)
    monkeypatch.setenv(checkpoints.URL_ENV, str(mirror))
    model, info = load_model("hdemucs_mmi", progress=False)
    assert info.name == "hdemucs_mmi" and info.path == cache / f"75fc33f5-{checksum}.th"
    assert model.segment == 44 and info.config["segment"] == 40
    assert _max_err(model, official, "hybrid") < 1e-5


@pytest.mark.oracle
@pytest.mark.slow
def test_corrupt_member_is_refused_and_the_others_kept(official, server, cache, monkeypatch):
    files = _publish(official, monkeypatch, ["ft_drums", "ft_bass", "ft_other", "ft_vocals"],
                     server)
    server.files[files[2]] = server.files[files[1]]  # other bytes under the third name
    with pytest.raises(CheckpointError, match="checksum mismatch") as error:
        load_bag("htdemucs_ft", base_url=server.url, progress=False)
    assert server.url + files[2] in str(error.value)
    assert sorted(os.listdir(cache)) == sorted(files[:2])


_DEMUCS_READS_OUR_CACHE = '''
import os
os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
from demucs import pretrained
# files.txt with the test files' checksums, at a URL where nothing answers: only the cache
# can provide them.
pretrained._parse_remote_files = lambda _: {
    name.split("-")[0]: inputs["dead_url"] + name for name in inputs["files"]}
bag = pretrained.get_model("htdemucs_ft")
outputs["weights"] = bag.weights
with torch.no_grad():
    outputs["stems"] = [model(inputs["mix"]) for model in bag.models]
'''


@pytest.mark.oracle
@pytest.mark.slow
def test_demucs_reuses_the_cache_stemserve_filled(official, server, cache, monkeypatch,
                                                  tmp_path):
    files = _publish(official, monkeypatch, ["ft_drums", "ft_bass", "ft_other", "ft_vocals"],
                     server)
    bag = load_bag("htdemucs_ft", base_url=server.url, progress=False)
    theirs = run_oracle(_DEMUCS_READS_OUR_CACHE, tmp_path / "oracle",
                        dict(files=files, dead_url=_dead_url(), mix=official["mix"]))
    assert theirs["weights"] == bag.weights
    for model, stems in zip(bag.models, theirs["stems"]):
        assert torch.equal(_forward(model, official["mix"]), stems)
    assert len(server.requests) == 4


# --------------------------------------------------------------------------- local bags


@pytest.mark.oracle
@pytest.mark.slow
def test_local_bag_yaml_reads_as_demucs_reads_it(official):
    """Signatures resolved next to the YAML as <sig>-<sha256 prefix>.th, checked; a model
    listed twice loaded once; weights and segment as demucs' BagOnlyRepo gives them."""
    bag = load_bag(official["folder"] / "mybag.yaml")
    assert bag.name == "mybag" and [info.name for info in bag.infos] == ["timeonly", "hybrid",
                                                                        "timeonly"]
    assert bag.models[0] is bag.models[2]
    assert bag.weights == official["bag"]["weights"]
    assert bag.segment == 11
    assert [model.segment for model in bag.models] == official["bag"]["segments"] == [11] * 3
    assert _max_err(bag.models[0], official, "time") < 1e-5
    assert _max_err(bag.models[1], official, "hybrid") < 1e-5
    with pytest.raises(CheckpointError, match="is a bag of models; load it with load_bag"):
        load_model(official["folder"] / "mybag.yaml")


def _local(official: dict, tmp_path: Path, names: list[str], yaml: str,
           renames: dict[str, str] | None = None) -> Path:
    """A folder with the files of ``names`` (renamed by ``renames``) and ``bag.yaml``."""
    folder = tmp_path / "local"
    folder.mkdir(exist_ok=True)
    for name in names:
        file_name = official["files"][name]
        shutil.copy(official["folder"] / file_name, folder / (renames or {}).get(name, file_name))
    (folder / "bag.yaml").write_text(yaml)
    return folder / "bag.yaml"


@pytest.mark.oracle
@pytest.mark.slow
def test_local_bag_refusals(official, tmp_path):
    bag = _local(official, tmp_path, ["htdemucs", "htdemucs_6s"],
                 "models: ['955717e8', 'nowhere']\n")
    with pytest.raises(CheckpointError) as error:
        load_bag(bag)
    assert str(error.value).startswith(f"{bag}: model 'nowhere' has no file next to it")

    bag.write_text("models: ['955717e8', '5c90dfd2']\n")
    with pytest.raises(CheckpointError, match="its models disagree on sources: 955717e8 has "
                                              r"\['drums', 'bass', 'other', 'vocals'\], "
                                              "5c90dfd2 has"):
        load_bag(bag)

    bag.write_text("models: ['955717e8']\nweights: [[1, 1, 1]]\n")
    with pytest.raises(CheckpointError, match="a row of 3, but its models separate 4 sources"):
        load_bag(bag)
    bag.write_text("models: ['955717e8']\nweights: [[1, 1, 0, 1]]\n")
    with pytest.raises(CheckpointError, match="its weights give other no model"):
        load_bag(bag)
    with pytest.raises(CheckpointError, match="applies to a single local file"):
        load_bag(bag, config="htdemucs")

    wrong = "955717e8-deadbeef.th"
    _local(official, tmp_path, ["htdemucs"], "models: ['955717e8']\n", {"htdemucs": wrong})
    with pytest.raises(CheckpointError, match="has 2 files in"):  # beside the right one
        load_bag(bag)
    os.remove(bag.parent / official["files"]["htdemucs"])
    with pytest.raises(CheckpointError, match=f"{wrong} does not match the sha256 in its "
                                              f"name: .* the name says deadbeef"):
        load_bag(bag)


BAD_YAML = {
    "not-a-bag": ("- a\n- b\n", "is not a bag of models"),
    "unknown-key": ("models: ['a']\nsegement: 44\n", "unknown key 'segement'"),
    "models-str": ("models: 'a'\n", "models='a' is not a list of 1 to 16 signatures"),
    "models-path": ("models: ['../a']\n", "is not a list of 1 to 16 signatures"),
    "models-many": ("models: [" + ", ".join(["a"] * 17) + "]\n", "not a list of 1 to 16"),
    "weights-rows": ("models: ['a', 'b']\nweights: [[1, 1]]\n",
                     "is not one row of per-source weights (numbers >= 0) for each of its 2"),
    "weights-negative": ("models: ['a']\nweights: [[1, -1]]\n", "is not one row"),
    "segment-hour": ("models: ['a']\nsegment: 3600\n", "segment=3600 is out of bounds"),
    "segment-zero": ("models: ['a']\nsegment: 0\n", "segment=0 is out of bounds"),
    "yaml": ("models: [a\n", "is not valid YAML"),
}


@pytest.mark.parametrize("case", BAD_YAML)
def test_bad_bag_yaml_is_refused_before_loading(tmp_path, case):
    text, expected = BAD_YAML[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    with pytest.raises(CheckpointError) as error:
        load_bag(path)
    assert str(error.value).startswith(str(path)) and expected in str(error.value)


# --------------------------------------------------------------------------- refusals


def _fake_class(monkeypatch, module: str, name: str) -> type:
    """A class that pickles as ``module.name``, without that module being installed."""
    for parent in [module.rsplit(".", 1)[0]] if "." in module else []:
        if parent not in sys.modules:
            monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    fake = types.ModuleType(module)
    setattr(fake, name, type(name, (), {"__module__": module}))
    monkeypatch.setitem(sys.modules, module, fake)
    return getattr(fake, name)


@pytest.fixture
def v4_classes(monkeypatch) -> dict[str, type]:
    """Classes that pickle as demucs 4's model classes (and one it does not release), so that
    these tests need no demucs."""
    monkeypatch.setitem(sys.modules, "demucs", types.ModuleType("demucs"))
    return {name: _fake_class(monkeypatch, module, name)
            for module, name in (("demucs.htdemucs", "HTDemucs"), ("demucs.hdemucs", "HDemucs"),
                                 ("demucs.demucs", "Demucs"), ("demucs.wdemucs", "WDemucs"))}


def _small_ht_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.half() for k, v in HTDemucs(SOURCES, **SMALL_HT).state_dict().items()}


def _v4_package(klass, **fields) -> dict:
    return {"klass": klass, "args": (SOURCES,), "kwargs": dict(SMALL_HT),
            "state": _small_ht_state(), "training_args": {"quant": {"diffq": None}}, **fields}


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_fake_package_loads(tmp_path, v4_classes):
    """The stand-in classes make real packages: the refusals below differ in one field."""
    path = tmp_path / "ok.th"
    path.write_bytes(_saved(_v4_package(v4_classes["HTDemucs"])))
    model, info = load_model(path)
    assert info.family == "htdemucs" and info.config["segment"] == Fraction(6, 5)
    expected = HTDemucs(SOURCES, **SMALL_HT)
    expected.load_state_dict(_small_ht_state())
    mix = torch.randn(1, 2, 20_000)
    assert torch.equal(_forward(model, mix), _forward(expected.eval(), mix))


class _Call:
    """Pickles as ``function(*args)``."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


OUT_OF_BOUNDS = {
    "channels": ({"channels": 4096}, "channels=4096 is out of bounds: stemserve loads integers "
                                     "from 1 to 128 (the releases use 48"),
    "nfft": ({"nfft": 1000}, "nfft=1000 is out of bounds: stemserve loads powers of two"),
    "t_heads": ({"t_heads": 0}, "t_heads=0 is out of bounds"),
    "t_emb": ({"t_emb": "evil"}, "t_emb='evil' is out of bounds: stemserve loads one of sin"),
    "segment": ({"segment": Fraction(10**6)}, "segment=Fraction(1000000, 1) is out of bounds"),
    "segment-str": ({"segment": "7.8"}, "segment='7.8' is out of bounds"),
    "multi_freqs": ({"multi_freqs": [2.0]}, "multi_freqs=[2.0] is out of bounds"),
    "bottom": ({"bottom_channels": 10**6}, "bottom_channels=1000000 is out of bounds"),
    "flag": ({"cac": "yes"}, "cac='yes' is out of bounds: stemserve loads True or False"),
    "not-buildable": ({"t_heads": 7}, "cannot be built (AssertionError"),
    "too-big": ({"channels": 128, "growth": 4, "depth": 5},
                "parameters; stemserve loads at most 700 M"),
    "sources": ({"sources": ["a/b"]}, "sources=['a/b'] is not a list of 1 to 8 distinct"),
}


@pytest.mark.parametrize("case", OUT_OF_BOUNDS)
def test_out_of_bounds_arguments_are_refused(tmp_path, v4_classes, case):
    changes, expected = OUT_OF_BOUNDS[case]
    path = tmp_path / f"{case}.th"
    args = () if "sources" in changes else (SOURCES,)
    path.write_bytes(_saved(_v4_package(v4_classes["HTDemucs"], args=args,
                                        kwargs=dict(SMALL_HT, **changes))))
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert str(error.value).startswith(str(path)) and expected in str(error.value)


def test_unknown_argument_is_dropped_with_a_warning(tmp_path, v4_classes):
    path = tmp_path / "old.th"
    path.write_bytes(_saved(_v4_package(v4_classes["HTDemucs"],
                                        kwargs=dict(SMALL_HT, t_ancient=3))))
    with pytest.warns(UserWarning, match="dropping unknown HTDemucs parameter 't_ancient'"):
        _, info = load_model(path)
    assert "t_ancient" not in info.config


def test_other_globals_are_refused_by_name_without_running(tmp_path, v4_classes,
                                                          monkeypatch):
    marker = tmp_path / "executed"
    string_node = _fake_class(monkeypatch, "omegaconf.nodes", "StringNode")
    cases = {
        "demucs.wdemucs.WDemucs": _v4_package(v4_classes["WDemucs"]),
        f"{os.system.__module__}.system": _v4_package(
            v4_classes["HTDemucs"], metrics=_Call(os.system, f"touch {marker}")),
        "omegaconf.nodes.StringNode": _v4_package(
            v4_classes["HTDemucs"], training_args={"name": string_node()}),
        "numpy.core.multiarray._reconstruct": _v4_package(
            v4_classes["HTDemucs"], metrics=np.zeros(3)),
    }
    for global_name, package in cases.items():
        path = tmp_path / "package.th"
        path.write_bytes(_saved(package))
        with pytest.raises(CheckpointError) as error:
            load_model(path)
        assert f"{path} refers to " in str(error.value) and global_name in str(error.value)
        assert "refused without running it" in str(error.value)
    assert not marker.exists()


def test_calling_a_model_class_while_unpickling_is_refused(tmp_path, v4_classes):
    path = tmp_path / "calls.th"
    path.write_bytes(_saved(_v4_package(v4_classes["HTDemucs"],
                                        training_args=_Call(v4_classes["HDemucs"], SOURCES))))
    with pytest.raises(CheckpointError, match="calls the HDemucs class while unpickling"):
        load_model(path)


@pytest.mark.parametrize("value, expected", [
    ("1e999999999", "holds a fraction of '1e999999999'"),
    (10**40, "not a ratio of two small integers"),
])
def test_fraction_bomb_is_refused(tmp_path, v4_classes, value, expected):
    path = tmp_path / "fraction.th"
    path.write_bytes(_saved(_v4_package(v4_classes["HTDemucs"], kwargs=dict(
        SMALL_HT, segment=_Call(Fraction, value)))))
    with pytest.raises(CheckpointError, match=expected):
        load_model(path)


def test_fractions_of_older_pythons_load(tmp_path, v4_classes):
    """Python < 3.11 pickled Fraction(39, 5) as Fraction('39/5')."""
    path = tmp_path / "py39.th"
    path.write_bytes(_saved(_v4_package(v4_classes["HTDemucs"], kwargs=dict(
        SMALL_HT, segment=_Call(Fraction, "6/5")))))
    assert load_model(path)[1].config["segment"] == Fraction(6, 5)


def test_numpy_scalars_other_than_numbers_are_refused(tmp_path, v4_classes):
    path = tmp_path / "text.th"
    path.write_bytes(_saved(_v4_package(v4_classes["HTDemucs"], metrics=np.str_("x"))))
    with pytest.raises(CheckpointError, match="holds a numpy scalar of type 'U1'"):
        load_model(path)
    path.write_bytes(_saved(_v4_package(v4_classes["HTDemucs"], metrics=[
        np.float32(0.5), np.int64(-3), np.bool_(True), np.float16(2.0)])))
    assert unpickle._torch_load(path, "x")["metrics"] == [0.5, -3, True, 2.0]


def _quantized_package(model_class: type, meta: dict, kwargs: dict | None = None,
                       **parts) -> dict:
    """A package of ``model_class`` (HTDemucs arguments unless ``kwargs``) whose state is
    quantized: its ``meta`` (the quantizer) and ``parts`` (its tensors) given."""
    state = {"quantized": [], "float16": [], "others": [], "__quantized": True,
             "meta": {"init_kwargs": {"min_size": 0.2, "group_size": 8}, "packed": True,
                      "torch_pack": False, **meta}, **parts}
    return _v4_package(model_class, state=state, kwargs=kwargs or dict(SMALL_HT))


_FILLER = {"others": [torch.zeros(1 << 18)]}  # 1 MiB: enough bytes for the small model

QUANTIZER_CASES = {
    "group_size": ({"init_kwargs": {"group_size": -8}}, _FILLER,
                   "quantizer group_size=-8 is out of bounds: stemserve loads integers from 0 "
                   "to 1024 (demucs uses 8)"),
    "min_bits": ({"init_kwargs": {"min_bits": 100}}, _FILLER,
                 "quantizer min_bits=100 is out of bounds"),
    "suffix": ({"init_kwargs": {"suffix": "a.b"}}, _FILLER,
               "quantizer suffix='a.b' is out of bounds"),
    "unknown": ({"init_kwargs": {"evil": 1}}, _FILLER,
                "its quantizer diffq.diffq.DiffQuantizer has no argument 'evil'"),
    "kwargs-list": ({"init_kwargs": ["min_size"]}, _FILLER,
                    "its quantizer arguments are a list, not a dict"),
    "klass": ({"klass": "diffq.lsq.LSQ"}, _FILLER,
              "names no diffq quantizer (meta.klass is 'diffq.lsq.LSQ'"),
    "diffq-refuses": ({"init_kwargs": {"min_bits": 9}}, _FILLER,  # min_bits < init_bits (8)
                      "its quantizer settings do not fit its own configuration"),
    "empty": ({}, {}, "its quantized state holds 0 bytes of tensors, less than a bit for each "
                      "of the 0.4 M weights of HTDemucs("),
    "counts": ({}, _FILLER, "1 others tensors where the model has"),  # diffq would zip
}


@pytest.mark.parametrize("case", QUANTIZER_CASES)
def test_quantizer_settings_out_of_bounds_are_refused(tmp_path, v4_classes, case):
    diffq = pytest.importorskip("diffq")
    meta, parts, expected = QUANTIZER_CASES[case]
    path = tmp_path / "quantized.th"
    path.write_bytes(_saved(_quantized_package(v4_classes["HTDemucs"],
                                               {"klass": diffq.DiffQuantizer, **meta}, **parts)))
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert str(path) in str(error.value) and expected in str(error.value), str(error.value)


def test_plain_state_dict_with_a_demucs_4_release_configuration(tmp_path, monkeypatch):
    """--config htdemucs builds the htdemucs arguments (shrunk here, so that the test does
    not build a 42 M-parameter model); a bag of several is no configuration."""
    monkeypatch.setitem(build._STATE_CONFIGS, "htdemucs",
                        ("htdemucs", dict(SMALL_HT, sources=SOURCES)))
    path = tmp_path / "weights.th"
    torch.save(_small_ht_state(3), path)
    model, info = load_model(path, config="htdemucs")
    assert info.family == "htdemucs" and info.config["channels"] == 8
    for key, value in _small_ht_state(3).items():
        assert torch.equal(model.state_dict()[key], value.float()), key
    with pytest.raises(CheckpointError, match="'mdx' is a bag of models, not one configuration; "
                                              "a plain state dict is built with the "
                                              "configuration of one of demucs, .*, htdemucs, "
                                              r"htdemucs_6s, hdemucs_mmi \(--config\)"):
        load_model(path, config="mdx")
    with pytest.raises(CheckpointError, match="'htdemucs_7s' is no release; a plain state"):
        load_model(path, config="htdemucs_7s")
    with pytest.raises(CheckpointError, match="does not fit the 'demucs' configuration"):
        load_model(path)


def test_no_demucs_4_module_is_importable_here():
    """What makes every load in this module a load without demucs: this environment's demucs
    (if any) is 2.0.3, which has none of demucs 4's model modules."""
    if importlib.util.find_spec("demucs") is None:
        return
    for module in ("demucs.htdemucs", "demucs.hdemucs", "demucs.demucs"):
        assert importlib.util.find_spec(module) is None, module


# HDemucs of 128 channels: 594 M parameters (2.4 GB of float32), within the parameter bound.
_BIG_HDEMUCS = {"channels": 128}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
@pytest.mark.slow
@pytest.mark.parametrize("bomb", ["quantized", "plain"])
def test_small_file_asking_for_a_big_model_allocates_nothing(tmp_path, v4_classes, bomb):
    """A few hundred bytes naming a 594 M-parameter HDemucs, loaded in a child whose address
    space is capped at 1 GiB over its start: refused, its memory all but unchanged."""
    if bomb == "quantized":
        diffq = pytest.importorskip("diffq")
        package = _quantized_package(v4_classes["HDemucs"], {"klass": diffq.DiffQuantizer},
                                     _BIG_HDEMUCS)
        expected = "less than a bit for each of the 593.9 M weights"
    else:
        package = _v4_package(v4_classes["HDemucs"], kwargs=_BIG_HDEMUCS,
                              state={"encoder.0.conv.weight": torch.zeros(1)})
        expected = "does not fit its own configuration, HDemucs(channels=128)"
    path = tmp_path / f"{bomb}.th"
    path.write_bytes(_saved(package))
    run = subprocess.run([sys.executable, "-c", _LIMITED, str(path), ""],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    assert outcome["error"] == "CheckpointError", outcome
    assert outcome["message"].startswith(str(path)) and expected in outcome["message"], outcome
    assert outcome["grown_mb"] < 200, outcome
