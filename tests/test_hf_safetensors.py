"""demucs 4.1.0's Hugging Face releases: ``<signature>.safetensors`` files whose metadata
carries the class and constructor arguments (``demucs/hf.py``'s ``load_safetensors_model``),
beside the bag's ``<name>.yaml``; loaded as the ``.th`` releases are, bounded the same way.
"""
from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch

from stemserve.checkpoints import CheckpointError, load_bag
from stemserve.models import HTDemucs
from stemserve.models.configs import HTDEMUCS
from stemserve.releases import is_demucs_safetensors, msst_config_of
from test_models_v4 import SMALL_HT
from test_msst_checkpoints import write_safetensors

SIGNATURE = "955717e8"


def encoded(value):
    """demucs' JSON of constructor arguments: fractions as ``{"_type": "fraction", ...}``."""
    if isinstance(value, Fraction):
        return {"_type": "fraction", "numerator": value.numerator,
                "denominator": value.denominator}
    if isinstance(value, (list, tuple)):
        return [encoded(item) for item in value]
    return value


def release(folder, half: bool = True, changes: dict | None = None,
            **metadata) -> tuple[HTDemucs, dict]:
    """A small HT Demucs saved as demucs 4.1.0's export does (half-precision weights, as its
    .th packages), with the bag's YAML beside it."""
    torch.manual_seed(0)
    kwargs = dict(HTDEMUCS, **SMALL_HT)
    model = HTDemucs(**kwargs).eval()
    state = {key: value.half() if half and value.is_floating_point() else value
             for key, value in model.state_dict().items()}
    meta = {"klass": "demucs.htdemucs.HTDemucs", "args": "[]",
            "kwargs": json.dumps({key: encoded(value)
                                  for key, value in dict(kwargs, **(changes or {})).items()}),
            **metadata}
    write_safetensors(folder / f"{SIGNATURE}.safetensors", state, meta)
    (folder / "htdemucs.yaml").write_text(f"models: ['{SIGNATURE}']\n")
    model.load_state_dict({key: value.float() for key, value in state.items()})
    return model, kwargs


def test_a_bag_yaml_of_safetensors_members_loads_as_its_release(tmp_path):
    model, kwargs = release(tmp_path)
    bag = load_bag(tmp_path / "htdemucs.yaml")
    (loaded,) = bag.models
    assert type(loaded) is HTDemucs and bag.infos[0].family == "htdemucs"
    assert bag.infos[0].config["segment"] == Fraction(1)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    mix = torch.randn(1, 2, 44100)
    with torch.no_grad():
        assert torch.equal(loaded(mix), model(mix))


def test_a_safetensors_model_file_loads_without_a_config(tmp_path):
    release(tmp_path)
    path = tmp_path / f"{SIGNATURE}.safetensors"
    assert is_demucs_safetensors(path) and msst_config_of(path, None) is None
    (loaded,) = load_bag(path).models
    assert type(loaded) is HTDemucs


@pytest.mark.parametrize("metadata, words", [
    (dict(structure="{}"), "diffq-packed"),
    (dict(klass="os.system"), "no family stemserve serves"),
    (dict(kwargs="{not json"), "not demucs' JSON"),
    (dict(changes={"channels": 10 ** 9}), "channels"),
])
def test_a_hostile_file_is_refused_naming_it(tmp_path, metadata, words):
    release(tmp_path, **metadata)
    path = tmp_path / f"{SIGNATURE}.safetensors"
    with pytest.raises(CheckpointError, match=words) as caught:
        load_bag(path)
    assert str(path) in str(caught.value)


def test_a_safetensors_file_without_demucs_metadata_is_a_roformer_s(tmp_path):
    """No ``klass`` in its metadata: an MSST file, which needs its config.yaml beside it."""
    path = write_safetensors(tmp_path / "model.safetensors", {"w": torch.zeros(2)},
                             {"format": "pt"})
    assert not is_demucs_safetensors(path)
    assert msst_config_of(path, None) == tmp_path / "model.yaml"
