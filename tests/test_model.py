"""The model is weight-compatible with demucs 2.0.3 and computes the same function."""
from __future__ import annotations

import inspect

import pytest
import torch

from stemserve.model import SOURCES, Demucs
from oracle_v2 import demucs2

pytestmark = pytest.mark.oracle
demucs_model = demucs2("demucs.model", module_level=True)

CONFIGS = {
    "default": {},
    "small": dict(channels=4),
    "hq": dict(channels=48, lstm_layers=1, depth=5),
    "no-glu-no-resample": dict(channels=8, glu=False, resample=False, rewrite=True, context=1),
    "normalize": dict(channels=4, normalize=True),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    torch.manual_seed(0)
    reference = demucs_model.Demucs(sources=list(SOURCES), **CONFIGS[request.param]).eval()
    ours = Demucs(SOURCES, **CONFIGS[request.param]).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def test_constructor_matches_official_signature():
    official = inspect.signature(demucs_model.Demucs.__init__).parameters
    ours = inspect.signature(Demucs.__init__).parameters
    assert list(ours) == list(official)
    for name, parameter in official.items():
        assert ours[name].default == parameter.default, name


def test_state_dict_keys_and_shapes_are_official(pair):
    reference, ours = pair
    theirs = {key: value.shape for key, value in reference.state_dict().items()}
    assert {key: value.shape for key, value in ours.state_dict().items()} == theirs


@pytest.mark.parametrize("length", [44100, 30011])
def test_forward_matches_official(pair, length):
    reference, ours = pair
    assert ours.valid_length(length) == reference.valid_length(length)
    for padded in (length, reference.valid_length(length)):
        mix = torch.randn(2, 2, padded, generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            expected = reference(mix)
            got = ours(mix)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() < 1e-5


def test_valid_length_agrees_over_many_lengths():
    reference = demucs_model.Demucs(sources=list(SOURCES), channels=4)
    ours = Demucs(SOURCES, channels=4)
    for length in range(1, 200_000, 997):
        assert ours.valid_length(length) == reference.valid_length(length)


def test_sources_in_official_order():
    assert SOURCES == ("drums", "bass", "other", "vocals")
