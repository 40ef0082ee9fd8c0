"""The pipeline against the official demucs on small real networks, in the fast lane.

``tests/fixtures/pipeline_v2.pt`` and ``pipeline_v4.pt`` hold tiny random-weight models,
a 1 s mix at 8 kHz, the options, and the stems the official demucs 2.0.3 and 4.0.1 computed
from them (``tests/make_pipeline_fixtures.py`` wrote them; its docstring says how to
regenerate them). Here stemserve's own networks carry the same weights (``TorchBackend``,
and a ``BagBackend`` of two for demucs 4: bag weights, a segment override and demucs 4's
shifts) and its one pipeline separates the mix through ``separate_array``: the stems must
match by name at a few float32 epsilons of their peak. No demucs is imported: unlike the
identity network of ``test_pipeline_core.py``, a real network makes a flat window, a sample
off, a biased standard deviation, mirrored shifts, rotated stem names or a wrong bag weight
fail here, in the developer's loop (``tests/test_mutations.py`` checks that they do).
"""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from stemserve.checkpoints import CheckpointInfo
from stemserve.models.registry import by_name
from stemserve.client import separate_array
from stemserve.client.backends.bag import BagBackend
from stemserve.client.backends.pytorch import TorchBackend
from tolerance import assert_differs, assert_matches

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REGENERATE = ".venv/bin/python tests/make_pipeline_fixtures.py"
ULPS = 16
"""Bound in float32 epsilons of the stems' peak (0.09 and 0.14), ``tests/tolerance.py``.
Measured 1.71 (v2) and 1.76 (v4) on a 2-core Xeon. Loose against that, because the stems
were computed once, on one machine, and other CPUs may round the networks differently;
tight against the bugs it must show, whose smallest is the normalisation's biased std:
233 (v2) and 161 (v4), the others 5e3 to 8e6 (``tests/test_mutations.py``)."""


def load_fixture(name: str) -> dict:
    path = FIXTURES / f"pipeline_{name}.pt"
    if not path.is_file():
        pytest.fail(f"the pipeline fixture {path} is missing: regenerate it with the official "
                    f"demucs code, {REGENERATE} (its docstring says what it needs)",
                    pytrace=False)
    return torch.load(path, weights_only=True)


def build(entry: dict, index: int, segment: Fraction | None) -> TorchBackend:
    """stemserve's network of ``entry`` (family, kwargs, packed state) as a backend."""
    kwargs = json.loads(entry["kwargs"])
    if entry["family"] != "demucs":
        kwargs["segment"] = Fraction(kwargs["segment"])
    model = by_name(entry["family"]).model_class(**kwargs)
    state, values, at = {}, entry["state"]["values"].float(), 0
    for key, shape in zip(entry["state"]["keys"], entry["state"]["shapes"]):
        size = int(np.prod(shape, dtype=np.int64))
        state[key] = values[at:at + size].reshape(shape)
        at += size
    assert at == values.numel()
    model.load_state_dict(state, strict=True)
    info = CheckpointInfo(f"fixture-{index}", None, f"{index:064x}", kwargs, entry["family"])
    return TorchBackend(model.eval(), info, segment=segment)


def backend_of(fixture: dict):
    segment = None if fixture["segment"] is None else Fraction(fixture["segment"])
    members = [build(entry, index, segment) for index, entry in enumerate(fixture["models"])]
    if fixture["weights"] is None:
        assert len(members) == 1
        return members[0]
    return BagBackend(members, fixture["weights"], "fixture-bag")


def separate(fixture: dict, **changes) -> np.ndarray:
    """The fixture's mix through stemserve, its stems stacked in the fixture's order."""
    backend = backend_of(fixture)
    try:
        assert list(backend.spec.sources) == fixture["sources"]
        stems = separate_array(fixture["mix"].float().numpy(), fixture["rate"], backend=backend,
                               **dict(fixture["options"], **changes))
    finally:
        backend.close()
    assert sorted(stems) == sorted(fixture["sources"])
    return np.stack([stems[source] for source in fixture["sources"]])


@pytest.mark.parametrize("name", ["v2", "v4"])
def test_pipeline_matches_the_official_demucs(name):
    """v2: demucs 2.0.3's apply_model(split=True), shifts 2, overlap 0.5; v4: demucs 4.0.1's
    apply_model on a bag of an HT Demucs and a v3 Demucs, shifts 2, overlap 0.25,
    transition power 2."""
    fixture = load_fixture(name)
    got = separate(fixture)
    expected = fixture["expected"].numpy()
    assert got.shape == expected.shape
    assert_matches(got, expected, ULPS, f"fixture {name} ({fixture['oracle']})")


def test_the_comparison_can_fail():
    """Another seed draws other shifts: far outside the bound."""
    fixture = load_fixture("v4")
    got = separate(fixture, seed=fixture["options"]["seed"] + 1)
    assert_differs(got, fixture["expected"].numpy(), 1000 * ULPS)
