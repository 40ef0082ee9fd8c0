"""The restricted unpickler on its own (``stemserve.checkpoints.unpickle``): the security
boundary of the checkpoint loader, tested on hand-made pickles without building any model.

What a whole package does past the unpickler (its bounds, its network) is in
test_checkpoints*.py and test_hostile_checkpoints.py.
"""
from __future__ import annotations

import io
import os
import sys
import types
from fractions import Fraction
from pathlib import PurePosixPath

import pytest
import torch

from stemserve.checkpoints import unpickle
from stemserve.errors import CheckpointError


@pytest.fixture
def pickled(monkeypatch):
    """``pickled(module, qualname, args=None)``: torch.save bytes of a reference to
    ``module.qualname`` (what a training package holds) or, with ``args``, of a call to it
    (what a hostile file holds). The target is a stand-in in a module registered for this
    test: pickling names it without importing anything real, and it is never called."""

    def make(module: str, qualname: str, args: tuple | None = None) -> bytes:
        def target(*given):
            raise AssertionError(f"{module}.{qualname} was called")

        target.__module__, target.__qualname__, target.__name__ = module, qualname, qualname
        fake = types.ModuleType(module)
        setattr(fake, qualname, target)
        monkeypatch.setitem(sys.modules, module, fake)

        class Call:
            def __reduce__(self):
                return target, args

        return saved(target if args is None else Call())

    return make


def saved(value) -> bytes:
    """``value`` as torch.save writes it (the zip format, data.pkl inside)."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


class _System:
    """Pickles as a call of the real ``os.system``: the classic hostile pickle."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_global_off_the_allowlist_is_refused_by_name_and_never_run(tmp_path):
    """``os.system`` (or anything else not on the list) is named and refused; the command it
    carries never runs."""
    marker = tmp_path / "ran"
    data = saved(_System(f"touch {marker}"))
    # pickle names it by where it lives: posix.system on Linux, nt.system on Windows.
    with pytest.raises(CheckpointError, match=rf"^evil\.th refers to {os.name}\.system, which "
                                              r"a model checkpoint never needs; refused "
                                              r"without running it$"):
        unpickle._torch_load(data, "evil.th")
    assert not marker.exists()


def test_a_pickled_torch_module_is_refused_with_the_way_out():
    data = saved(torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match=r"torch\.nn\.modules\.linear\.Linear.*whole "
                                              r"pickled model.*model\.state_dict\(\)"):
        unpickle._torch_load(data, "model.th")


@pytest.mark.parametrize("name, family", [("demucs.htdemucs.HTDemucs", "htdemucs"),
                                          ("demucs.hdemucs.HDemucs", "hdemucs"),
                                          ("demucs.demucs.Demucs", "demucs_v3"),
                                          ("demucs.model.Demucs", "demucs")])
def test_a_model_class_is_a_marker_that_refuses_to_be_called(pickled, name, family):
    """A training package names its class: it loads as an inert marker of the family. A
    pickle that calls it is refused before anything is built."""
    module, _, qualname = name.rpartition(".")
    loaded = unpickle._torch_load(pickled(module, qualname), "package.th")
    assert issubclass(loaded, unpickle._ClassMarker) and loaded.family == family
    with pytest.raises(CheckpointError, match=r"^package\.th calls the .* class while "
                                              r"unpickling, which no checkpoint does"):
        unpickle._torch_load(pickled(module, qualname, (["drums"],)), "package.th")


def test_data_stand_ins_keep_only_data():
    """A Fraction segment, pure paths and plain containers load as themselves."""
    value = {"segment": Fraction(39, 5), "path": PurePosixPath("/a/b"), "items": [1, 2.5]}
    assert unpickle._torch_load(saved(value), "x.th") == value
