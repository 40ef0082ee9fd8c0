"""Model families are registrations (stemserve.models.registry): the built-in ones agree
with their torch-free length rules, nothing else tests a family by name, and a family of
one's own (tests/tiny_family.py) loads from its own checkpoint format, exports, separates
in-process and serves through a real tritonserver with no edit outside its module.
"""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from stemserve import spec
from stemserve.models import registry
from test_layers import modules
from tolerance import assert_matches

BUILT_IN = {"demucs", "demucs_v3", "hdemucs", "htdemucs", "bs_roformer", "mel_band_roformer"}


def test_every_registration_has_its_length_rule_and_no_more():
    assert {family.name for family in registry.registrations()} == set(spec.FAMILIES) \
        == BUILT_IN
    for family in registry.registrations():
        assert registry.by_name(family.name) is family
        if family.rules is not None:  # a rule for every constructor argument
            arguments = set(inspect.signature(family.model_class).parameters) - {"sources"}
            assert arguments <= set(family.rules), (family.name, arguments - set(family.rules))


REGISTERING = {"stemserve.model", "stemserve.models.demucs_v3", "stemserve.models.hdemucs",
               "stemserve.models.htdemucs", "stemserve.spec"}
"""The modules that may name a family in a comparison: the four registrations and the
length rules."""


def _compared_family_names(path: Path) -> list[str]:
    """``line: text`` of every comparison in ``path`` with a built-in family's name as a
    literal (``==``, ``!=``, ``in`` a literal tuple or set)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        for operand in (node.left, *node.comparators):
            values = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) \
                else [operand]
            if any(isinstance(value, ast.Constant) and value.value in BUILT_IN
                   for value in values):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_family_name_is_tested_outside_the_registrations():
    """A family is asked, never tested by name: ``family == "htdemucs"`` anywhere but in its
    registration would be a place a new family has to be added by hand."""
    offenders = {name: found for name, path in sorted(modules().items())
                 if name not in REGISTERING and (found := _compared_family_names(path))}
    assert not offenders, offenders


def test_the_name_check_sees_a_comparison(tmp_path):
    """The check above can fail."""
    path = tmp_path / "x.py"
    path.write_text('if family == "htdemucs" or info.family in ("demucs", "x"):\n    pass\n')
    assert len(_compared_family_names(path)) == 2


# --------------------------------------------------------------------------- a family of one's own

@pytest.fixture
def tiny_family(monkeypatch):
    """tests/tiny_family.py registered, and found by child processes (a Triton server's
    python model) through $STEMSERVE_FAMILY_MODULES (its path: the server's python has a
    sys.path of its own); removed after the test."""
    import tiny_family

    monkeypatch.setenv("STEMSERVE_FAMILY_MODULES", tiny_family.__file__)

    tiny_family.register_all()
    yield tiny_family
    registry.unregister(tiny_family.NAME)
    spec.FAMILIES.pop(tiny_family.NAME)


@pytest.mark.server
@pytest.mark.slow
def test_a_family_of_ones_own_exports_serves_and_separates(tiny_family, tmp_path):
    from stemserve.checkpoints import load_model
    from stemserve.client import open_backend, separate_array
    from stemserve.client.models import export_model
    from stemserve.model_repository.local import local_server
    from stemserve.spec import load_export_spec

    torch.manual_seed(0)
    net = tiny_family.TinyNet(["low", "high", "rest"], samplerate=8000)
    checkpoint = tmp_path / "tiny.th"
    tiny_family.save(net, checkpoint)

    model, info = load_model(checkpoint)
    assert isinstance(model, tiny_family.TinyNet) and info.family == "tinynet"
    out, _ = export_model(checkpoint, out=tmp_path / "export")
    sidecar = load_export_spec(out)
    assert (sidecar.family, sidecar.sources, sidecar.segment_length) == (
        "tinynet", ("low", "high", "rest"), 16000)

    rng = np.random.default_rng(1)
    mix = (0.3 * rng.standard_normal((2, 8000 * 5 + 123))).astype(np.float32)
    options = dict(overlap=0.25, shifts=1, seed=3)
    with open_backend("torch", model=checkpoint) as backend:
        expected = separate_array(mix, 8000, backend=backend, **options)
    assert sorted(expected) == ["high", "low", "rest"]
    assert all(np.abs(stem).max() > 1e-3 for stem in expected.values())

    def stacked(stems: dict) -> np.ndarray:
        return np.stack([stems[name] for name in sorted(stems)])

    with open_backend("onnx", model=out) as backend:
        assert_matches(stacked(separate_array(mix, 8000, backend=backend, **options)),
                       stacked(expected), 64, "tinynet onnx")
    with local_server(out, root=tmp_path, logs=tmp_path) as server, \
            open_backend("triton", connection=server.grpc_url) as backend:
        assert backend.spec.family == "tinynet"
        assert_matches(stacked(separate_array(mix, 8000, backend=backend, **options)),
                       stacked(expected), 64, "tinynet triton")
