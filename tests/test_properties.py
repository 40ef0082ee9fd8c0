"""Property-based tests of what stemserve reads from others: sidecars, bag YAMLs, package
configurations and file name templates. Whatever hypothesis makes, the reader either
accepts it (and then every name it hands on is one plain path component, every path stays
inside its folder) or refuses it with a :class:`StemserveError`; never another exception,
never unbounded work. ``STEMSERVE_PROPERTY_EXAMPLES`` sets the examples per test (300; a
run of 3000 each passed too)."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stemserve.errors import StemserveError
from stemserve.untrusted import is_safe_name

pytestmark = pytest.mark.slow

EXAMPLES = settings(max_examples=int(os.environ.get("STEMSERVE_PROPERTY_EXAMPLES", 300)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])

# Names as an attacker writes them: plain ones, path tricks, and anything at all.
NAMES = st.one_of(st.sampled_from(["drums", "bass", "demucs", "model.onnx", "../x", "..", ".",
                                   "/etc/passwd", "a/b", "a\\b", ".hidden", "", "x" * 300]),
                  st.text(max_size=40))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), NAMES)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=20)


def _small_sidecar() -> dict:
    return {"model_name": "demucs", "checkpoint": "small", "checkpoint_sha256": "ab" * 32,
            "sample_rate": 44100, "audio_channels": 2,
            "sources": ["drums", "bass", "other", "vocals"], "segment_length": 44100,
            "padded_length": 44100, "output_length": 44100, "valid_length_params": None,
            "precision": "fp32", "onnx_file": "model.onnx", "input_name": "mix",
            "output_name": "stems", "spec_version": 1, "family": "hdemucs",
            "forward_randrange": 0}


@EXAMPLES
@given(changes=st.dictionaries(st.sampled_from(sorted(_small_sidecar())),
                               st.one_of(JSON, st.lists(NAMES, max_size=10)), max_size=4))
def test_a_sidecar_is_read_whole_and_plain_or_refused(changes):
    from stemserve.spec import ModelSpec

    text = json.dumps({**_small_sidecar(), **changes})
    try:
        spec = ModelSpec.from_json(text)
    except StemserveError:
        return
    for name in (spec.model_name, spec.checkpoint, spec.onnx_file, *spec.sources):
        assert is_safe_name(name)
    assert spec.max_request_length <= 3 * 120 * spec.sample_rate


@EXAMPLES
@given(data=JSON)
def test_a_bag_sidecar_is_plain_or_refused(data):
    from stemserve.spec import BagSpec

    try:
        bag = BagSpec.from_json(json.dumps(data))
    except StemserveError:
        return
    assert all(is_safe_name(name) for name in (bag.name, *bag.members))


@EXAMPLES
@given(spec=st.one_of(
    JSON,
    st.fixed_dictionaries({"models": st.one_of(st.lists(NAMES, max_size=20), JSON)},
                          optional={"weights": JSON, "segment": SCALARS, "extra": JSON})))
def test_a_bag_yaml_is_read_or_refused(spec, tmp_path_factory):
    import yaml

    from stemserve.releases import read_bag_yaml

    path = tmp_path_factory.mktemp("bag") / "bag.yaml"
    try:
        path.write_text(yaml.safe_dump(spec))
    except (yaml.YAMLError, ValueError, UnicodeEncodeError):
        return  # not YAML text hypothesis can make; the aliases bombs have their own tests
    try:
        bag = read_bag_yaml(path)
    except StemserveError:
        return
    assert 1 <= len(bag.models) <= 16 and all(is_safe_name(name) for name in bag.models)
    assert bag.segment is None or 1 <= bag.segment <= 120


KWARGS = st.dictionaries(
    st.sampled_from(["channels", "depth", "nfft", "segment", "sources", "t_layers", "t_heads",
                     "bottom_channels", "t_mask_type", "samplerate", "growth", "unknown",
                     "t_cape_glob_loc_scale", "multi_freqs", "norm_groups"]),
    JSON, max_size=6)


@EXAMPLES
@given(kwargs=KWARGS, family=st.sampled_from(["htdemucs", "hdemucs", "demucs_v3"]))
def test_a_package_configuration_is_bounded_or_refused(kwargs, family):
    from stemserve.checkpoints import bounds

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "dropping unknown parameter" is the expected note
        try:
            used = bounds._configuration_v4(
                family, (), {"sources": ["drums", "bass", "other", "vocals"], **kwargs},
                "hypothesis")
        except StemserveError:
            return
    assert all(is_safe_name(source) for source in used["sources"])
    assert 1 <= used["segment"] <= 120


TEMPLATE_PARTS = st.sampled_from(["{track}", "{stem}", "{ext}", "{parent}", "{trackext}", "/",
                                  "..", ".", "{", "}", "{stem:>99}", "{track.x}", "{0}", "{!r}",
                                  "{stem!s}", "x", "-", "\\", "~", "$HOME"])


@EXAMPLES
@given(template=st.one_of(st.lists(TEMPLATE_PARTS, max_size=8).map("".join),
                          st.text(max_size=30)),
       track=st.sampled_from(["song.wav", "...wav", "a b.flac", ".hidden.wav", "x"]))
def test_a_file_name_template_lands_inside_out_or_is_refused(template, track, tmp_path_factory):
    from stemserve.client.stems import stem_paths

    out = tmp_path_factory.mktemp("out")
    try:
        targets = stem_paths(out / "in" / track, out / "stems", ["drums", "no_drums"], "wav",
                             template)
    except StemserveError:
        return
    for target in targets.values():
        inside = os.path.normpath(out / "stems")
        assert os.path.commonpath([inside, os.path.normpath(target)]) == inside
        assert Path(target) != out / "stems"
