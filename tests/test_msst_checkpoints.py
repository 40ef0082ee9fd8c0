"""RoFormer checkpoints as people have them: MSST's ``config.yaml`` read safely and bounded,
and ``.ckpt`` / ``.safetensors`` weights read without running anything.

The real configs are MSST's (ZFTurbo/Music-Source-Separation-Training at ccc011a, copied into
fixtures/msst/); the safetensors fixture was written by the safetensors package 0.8.0, so
that the hand-written reader is checked against the reference writer. Every hostile input is
refused with a :class:`CheckpointError` naming the file and the field; every bound is tried at,
just inside and just past its limit. No oracle, no network, a few seconds.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import time
from pathlib import Path

import pytest
import torch
import yaml

from stemserve.checkpoints import msst_config, msst_state
from stemserve.checkpoints.msst_config import (BS_ROFORMER, MEL_BAND_ROFORMER, ROFORMER_RULES,
                                               estimated_parameters, read_msst_config)
from stemserve.checkpoints.msst_state import (MAX_HEADER_BYTES, read_safetensors,
                                              read_state_dict)
from stemserve.errors import CheckpointError
from stemserve.spec import MAX_SEGMENT_SECONDS, MAX_SOURCES
from stemserve.untrusted import check_size

FIXTURES = Path(__file__).parent / "fixtures" / "msst"
BS_VOCALS = FIXTURES / "config_vocals_bs_roformer.yaml"
MEL_VOCALS = FIXTURES / "config_vocals_mel_band_roformer.yaml"
VIPERX = FIXTURES / "model_bs_roformer_ep_317_sdr_12.9755.yaml"
KJ = FIXTURES / "config_vocals_mel_band_roformer_kj.yaml"
MEL_4STEMS = FIXTURES / "config_musdb18_mel_band_roformer_all_stems.yaml"
BS_SAGE = FIXTURES / "config_musdb18_bs_roformer_384_8_2_485100_sage.yaml"
VIPERX_BANDS = (2,) * 24 + (4,) * 12 + (12,) * 8 + (24,) * 8 + (48,) * 8 + (128, 129)
UP, DOWN = math.inf, -math.inf


def full_load(path: Path) -> dict:
    """What MSST itself reads (``yaml.FullLoader``), to compare with."""
    return yaml.load(path.read_text(), Loader=yaml.FullLoader)  # noqa: S506 - trusted fixture


def write_config(tmp_path: Path, data: dict, name: str = "config.yaml") -> Path:
    """``data`` as YAML (tuples as !!python/tuple, as MSST's configs spell them)."""
    path = tmp_path / name
    path.write_text(yaml.dump(data, sort_keys=False))
    return path


def changed(source: Path, tmp_path: Path, **sections) -> Path:
    """``source``'s config with some fields changed: ``model={'dim': 0}``; a value of
    ``DELETE`` removes the field."""
    data = full_load(source)
    for section, fields in sections.items():
        for key, value in fields.items():
            if value is DELETE:
                data[section].pop(key, None)
            else:
                data[section][key] = value
    return write_config(tmp_path, data)


DELETE = object()


def refusal(read, path: Path, *words: str) -> str:
    """``read()``'s refusal of ``path``: a CheckpointError naming the file and each of
    ``words``."""
    with pytest.raises(CheckpointError) as caught:
        read()
    message = str(caught.value)
    assert str(path) in message, message
    for word in words:
        assert word in message, (word, message)
    return message


def refused(path: Path, *words: str, family: str | None = None) -> str:
    """The config reader's refusal of ``path``."""
    return refusal(lambda: read_msst_config(path, family), path, *words)


# =============================================================================================
# The real configs

@pytest.mark.parametrize("path, family, stems, dim, depth, chunk, overlap, batch", [
    (BS_VOCALS, BS_ROFORMER, ("vocals", "instrumental"), 192, 6, 131584, 4, 1),
    (MEL_VOCALS, MEL_BAND_ROFORMER, ("vocals", "instrumental"), 192, 8, 131584, 4, 1),
    (VIPERX, BS_ROFORMER, ("vocals", "instrumental"), 512, 12, 352800, 2, 4),
    (KJ, MEL_BAND_ROFORMER, ("vocals", "instrumental"), 384, 6, 352800, 2, 4),
    (MEL_4STEMS, MEL_BAND_ROFORMER, ("drums", "bass", "other", "vocals"), 384, 6, 352800, 2, 4),
    (BS_SAGE, BS_ROFORMER, ("drums", "bass", "other", "vocals"), 384, 8, 485100, 2, 2),
])
def test_real_configs(path, family, stems, dim, depth, chunk, overlap, batch):
    config = read_msst_config(path)
    assert config.family == family and config.stems == stems
    assert config.targets == (stems if len(stems) > 2 else stems[:1])
    assert (config.model["dim"], config.model["depth"]) == (dim, depth)
    assert (config.chunk_size, config.num_overlap, config.batch_size) == (chunk, overlap, batch)
    assert config.sample_rate == 44100 and config.audio_channels == 2
    assert config.normalize is False
    # The constructor arguments are exactly what MSST builds its network with.
    assert config.kwargs() == full_load(path)["model"]
    assert config.kwargs() is not config.kwargs()
    with pytest.raises(TypeError):
        config.model["dim"] = 1  # read-only
    with pytest.raises(AttributeError):
        config.family = BS_ROFORMER  # frozen


def test_the_tuples_of_real_configs_are_tuples():
    config = read_msst_config(VIPERX)
    assert config.model["freqs_per_bands"] == VIPERX_BANDS
    assert config.model["multi_stft_resolutions_window_sizes"] == (4096, 2048, 1024, 512, 256)
    assert config.model["stft_hop_length"] == 441
    assert "mlp_expansion_factor" not in config.model  # the reference's default applies
    arguments = config.arguments()
    assert arguments["mlp_expansion_factor"] == 4 and arguments["zero_dc"] is True
    assert read_msst_config(KJ).arguments()["num_bands"] == 60


def test_newer_fields_are_known():
    """The fields that broke older loaders ("unexpected keyword argument
    'mlp_expansion_factor'") are arguments stemserve knows."""
    config = read_msst_config(BS_VOCALS)
    assert config.model["mlp_expansion_factor"] == 4
    assert config.model["skip_connection"] is False
    assert read_msst_config(BS_SAGE).model["sage_attention"] is True


def test_the_estimate_is_a_lower_bound_close_to_the_releases():
    """viperx's BS-RoFormer 1297 holds 159.8 M parameters; the estimate leaves out biases and
    norms only."""
    config = read_msst_config(VIPERX)
    estimate = estimated_parameters(config.family, config.arguments())
    assert 159_000_000 < estimate <= 159_758_092


def test_the_known_fields_are_the_networks_arguments():
    """Every field a config may set is an argument of stemserve's network, with the same
    default (the reference's), and every argument is a field a config may set."""
    roformer = pytest.importorskip("stemserve.models.roformer")
    import inspect

    assert set(ROFORMER_RULES) == set(msst_config.DEFAULTS[BS_ROFORMER]) | set(
        msst_config.DEFAULTS[MEL_BAND_ROFORMER]) | {"dim", "depth"}
    for family, network in ((BS_ROFORMER, roformer.BSRoformer),
                            (MEL_BAND_ROFORMER, roformer.MelBandRoformer)):
        parameters = inspect.signature(network).parameters
        defaults = msst_config.DEFAULTS[family]
        assert set(parameters) == set(defaults) | {"dim", "depth"}, family
        for name, default in defaults.items():
            if name != "multi_stft_window_fn":  # torch.hann_window there, unset here
                assert parameters[name].default == default, (family, name)


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.yaml")), ids=lambda p: p.stem)
def test_real_configs_build_and_the_estimate_is_a_lower_bound(path):
    """Each config's kwargs build stemserve's network (on the meta device, nothing
    allocated), and the estimate that bounds it before building is at most its size."""
    roformer = pytest.importorskip("stemserve.models.roformer")
    config = read_msst_config(path)
    network = {BS_ROFORMER: roformer.BSRoformer,
               MEL_BAND_ROFORMER: roformer.MelBandRoformer}[config.family]
    with torch.device("meta"):
        model = network(**config.kwargs())
    count = sum(parameter.numel() for parameter in model.parameters())
    assert estimated_parameters(config.family, config.arguments()) <= count


# =============================================================================================
# Which family

def test_an_explicit_family_wins_and_the_other_family_s_fields_are_named(tmp_path):
    assert read_msst_config(MEL_VOCALS, MEL_BAND_ROFORMER).family == MEL_BAND_ROFORMER
    refused(MEL_VOCALS, "model.num_bands", "MelBandRoformer", "not of BSRoformer",
            family=BS_ROFORMER)
    refused(BS_VOCALS, "model.freqs_per_bands", "BSRoformer", family=MEL_BAND_ROFORMER)
    refused(BS_VOCALS, "model type 'htdemucs'", family="htdemucs")


def test_a_config_for_both_or_neither_family_is_refused(tmp_path):
    refused(changed(BS_VOCALS, tmp_path, model={"num_bands": 60}), "freqs_per_bands",
            "num_bands", "one of them")
    neither = changed(BS_VOCALS, tmp_path, model={"freqs_per_bands": DELETE})
    refused(neither, "name the model type")
    assert read_msst_config(neither, BS_ROFORMER).arguments()["freqs_per_bands"] == \
        VIPERX_BANDS  # the reference's default bands


# =============================================================================================
# Hostile YAML

def test_an_alias_bomb_is_refused_quickly(tmp_path):
    """Billion laughs: nine levels of ten aliases, 10**9 items as a tree, in 800 bytes."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    lines += ["audio: {chunk_size: 131584}", "model: {dim: 8, depth: 1, bomb: *a8}"]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines))
    start = time.perf_counter()
    refused(path, "more than 10000 items", "aliases")
    assert time.perf_counter() - start < 5


def test_a_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("model: &m {dim: 8, depth: 1, again: *m}\naudio: &a [*a]\n")
    refused(path, "more than 10000 items")


@pytest.mark.parametrize("tag", [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/new:os.system ['touch {marker}']",
    "!!python/object:os.system {{}}",
    "!!python/name:os.system ''",
    "!!python/module:os ''",
    "!!python/str 'x'",
    "!<tag:yaml.org,2002:python/object/apply:os.system> ['touch {marker}']",
    "!custom 1",
])
def test_python_tags_other_than_tuples_are_refused_by_name(tmp_path, tag):
    marker = tmp_path / "ran"
    text = BS_VOCALS.read_text().replace("  dim: 192", f"  dim: {tag.format(marker=marker)}")
    path = tmp_path / "tagged.yaml"
    path.write_text(text)
    message = refused(path, "tag", "is refused", "!!python/tuple")
    shown = re.search(r"the tag '([^']*)'", message).group(1)
    assert "os" in shown or "python/str" in shown or "custom" in shown, message
    assert not marker.exists()


def test_a_python_tuple_must_be_a_sequence(tmp_path):
    path = tmp_path / "tuple.yaml"
    path.write_text(BS_VOCALS.read_text().replace(
        "multi_stft_hop_size: 147", "multi_stft_hop_size: !!python/tuple {a: 1}"))
    refused(path, "not valid YAML", "needs a sequence")


@pytest.mark.parametrize("text, words", [
    ("a: [1, 2", "not valid YAML"),
    ("[" * 5000 + "]" * 5000, "nests deeper"),
    ("- 1\n- 2\n", "not an MSST configuration"),
    ("audio: {chunk_size: 1}\n", "'model' section is missing"),
    (f"x: {'9' * 5000}\n", "cannot be read"),
])
def test_yaml_that_is_not_a_config(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    refused(path, words)


@pytest.mark.parametrize("padding, accepted", [(0, True), (1, False)])
def test_config_file_size(tmp_path, padding, accepted):
    text = BS_VOCALS.read_text() + "\n#"
    path = tmp_path / "config.yaml"
    path.write_text(text + "x" * (msst_config.MAX_CONFIG_BYTES - len(text) - 1 + padding) + "\n")
    assert path.stat().st_size == msst_config.MAX_CONFIG_BYTES + padding
    if accepted:
        read_msst_config(path)
    else:
        refused(path, "over 256 KiB")


@pytest.mark.parametrize("extra, accepted", [(0, True), (1, False)])
def test_config_item_count(tmp_path, extra, accepted):
    """Items counted as a tree: a list in an ignored section brings a config to the limit."""
    data = full_load(BS_VOCALS)
    data["padding"] = []  # one key and one list: 2 items
    base = check_size(data, 10**9)
    data["padding"] = [0] * (msst_config.MAX_CONFIG_ITEMS - base + extra)
    assert check_size(data, 10**9) == msst_config.MAX_CONFIG_ITEMS + extra
    path = write_config(tmp_path, data)
    if accepted:
        read_msst_config(path)
    else:
        refused(path, "more than 10000 items")


# =============================================================================================
# Model fields

@pytest.mark.parametrize("field, words", [
    ("mlp_expansion_factorr", "not an argument of BSRoformer in MSST or in stemserve"),
    ("time_conformer_depth", "Conformer"),
    ("sample_rate", "argument of MelBandRoformer"),
])
def test_an_unknown_model_field_is_refused_by_name(tmp_path, field, words):
    path = changed(BS_VOCALS, tmp_path, model={field: 1})
    refused(path, f"model.{field} ", words, family=BS_ROFORMER)


def test_a_missing_dim_is_refused(tmp_path):
    refused(changed(BS_VOCALS, tmp_path, model={"dim": DELETE}), "model.dim is missing")


# name: (low, high, integer) of every ranged rule
RANGES = {
    "dim": (1, 2048, True), "depth": (1, 64, True), "num_stems": (1, MAX_SOURCES, True),
    "time_transformer_depth": (0, 16, True), "freq_transformer_depth": (0, 16, True),
    "linear_transformer_depth": (0, 16, True), "num_bands": (2, 1024, True),
    "dim_head": (2, 512, True), "heads": (1, 64, True), "attn_dropout": (0, 1, False),
    "ff_dropout": (0, 1, False), "dim_freqs_in": (1, 8193, True),
    "sample_rate": (8000, 192_000, True), "stft_n_fft": (16, 16384, True),
    "stft_hop_length": (1, 16384, True), "stft_win_length": (1, 16384, True),
    "mask_estimator_depth": (1, 8, True), "multi_stft_resolution_loss_weight": (0, 1e6, False),
    "multi_stft_hop_size": (1, 65536, True), "mlp_expansion_factor": (1, 16, True),
}
LISTS = {  # name: (shortest, longest, low, high)
    "freqs_per_bands": (2, 1024, 1, 8193),
    "multi_stft_resolutions_window_sizes": (0, 16, 1, 65536),
}


def edges(low, high, integer):
    """``(value, accepted)`` just past, at and just inside each end of [low, high]."""
    if integer:
        return [(low - 1, False), (low, True), (low + 1, True), (high - 1, True), (high, True),
                (high + 1, False)]
    return [(math.nextafter(low, DOWN), False), (low, True), (math.nextafter(low, UP), True),
            (math.nextafter(high, DOWN), True), (high, True), (math.nextafter(high, UP), False)]


def test_every_ranged_rule_is_tested():
    ranged = {name for name, rule in ROFORMER_RULES.items() if " from " in rule.accepted}
    assert ranged == set(RANGES) | set(LISTS)
    sections = {name for fields in (msst_config._AUDIO, msst_config._INFERENCE)
                for name, (rule, _) in fields.items() if " from " in rule.accepted}
    assert {f"audio.{n}" for n in msst_config._AUDIO} | {
        f"inference.{n}" for n in msst_config._INFERENCE if n != "normalize"} == \
        set(SECTION_RANGES)
    assert sections == {name.split(".")[1] for name in SECTION_RANGES}


@pytest.mark.parametrize("name", sorted(RANGES))
def test_model_field_bounds(name):
    """Each ranged field at, inside and past both ends, and its words say the same."""
    rule = ROFORMER_RULES[name]
    low, high, integer = RANGES[name]
    for value, accepted in edges(low, high, integer):
        assert rule.accepts(value) is accepted, (value, accepted)
    words = (f"integers from {low} to {high}" if integer
             else f"numbers from {low:g} to {high:g}")
    assert words in rule.accepted
    assert not rule.accepts(True) and not rule.accepts("8") and not rule.accepts(None)
    if integer:
        assert not rule.accepts(float(low))


@pytest.mark.parametrize("name", sorted(LISTS))
def test_model_list_bounds(name):
    shortest, longest, low, high = LISTS[name]
    accepts = ROFORMER_RULES[name].accepts
    assert accepts((low,) * longest) and accepts([high] * max(shortest, 1))
    assert not accepts((low,) * (longest + 1))
    if shortest:
        assert accepts((low,) * shortest) and not accepts((low,) * (shortest - 1))
    assert not accepts((low - 1,) * max(shortest, 1))
    assert not accepts((high + 1,) * max(shortest, 1))
    assert not accepts((1.5,) * max(shortest, 1)) and not accepts("12")


@pytest.mark.parametrize("field, value, words", [
    ("dim", 0, "model.dim=0 is out of bounds"),
    ("dim", 2049, "model.dim=2049 is out of bounds: stemserve loads integers from 1 to 2048"),
    ("depth", 65, "model.depth=65 is out of bounds"),
    ("heads", 0, "model.heads=0"),
    ("time_transformer_depth", 17, "model.time_transformer_depth=17"),
    ("dim", "192", "model.dim='192'"),
    ("stereo", "yes", "model.stereo='yes' is out of bounds: stemserve loads True or False"),
    ("use_pope", True, "model.use_pope=True", ),
    ("stft_window_fn", "hann", "model.stft_window_fn='hann'"),
    ("freqs_per_bands", (1025,), "model.freqs_per_bands=(1025,)"),
])
def test_out_of_bound_model_fields_are_refused_by_name(tmp_path, field, value, words):
    refused(changed(BS_VOCALS, tmp_path, model={field: value}), words)


def test_bands_must_cover_the_spectrum(tmp_path):
    refused(changed(BS_VOCALS, tmp_path, model={"freqs_per_bands": VIPERX_BANDS[:-1] + (128,)}),
            "model.freqs_per_bands adds up to 1024", "stft_n_fft=2048 gives 1025")
    refused(changed(BS_VOCALS, tmp_path, model={"stft_n_fft": 4096}),
            "adds up to 1025", "gives 2049")
    read_msst_config(changed(BS_VOCALS, tmp_path, model={
        "stft_n_fft": 512, "stft_win_length": 512, "freqs_per_bands": (128, 129)}))
    refused(changed(MEL_VOCALS, tmp_path, model={"num_bands": 34, "stft_n_fft": 64,
                                                 "stft_win_length": 64, "stft_hop_length": 16}),
            "model.num_bands=34 is more bands than the 33 frequencies")


@pytest.mark.parametrize("model, words", [
    ({"stft_win_length": 4096}, "model.stft_win_length=4096 is longer than model.stft_n_fft"),
    ({"stft_hop_length": 1025, "stft_win_length": 1024},
     "model.stft_hop_length=1025 is longer than model.stft_win_length=1024"),
])
def test_stft_settings_are_checked_against_each_other(tmp_path, model, words):
    refused(changed(BS_VOCALS, tmp_path, model=model), words)


@pytest.mark.parametrize("excess, accepted", [(0, True), (1, False)])
def test_parameter_limit(tmp_path, monkeypatch, excess, accepted):
    config = read_msst_config(VIPERX)
    monkeypatch.setattr(msst_config, "MAX_PARAMETERS",
                        estimated_parameters(BS_ROFORMER, config.arguments()) - excess)
    if accepted:
        read_msst_config(VIPERX)
    else:
        refused(VIPERX, "parameters", "dim 512, depth 12")


def test_a_large_network_is_refused_before_anything_is_built(tmp_path):
    path = changed(VIPERX, tmp_path, model={"dim": 2048, "depth": 64, "heads": 64,
                                            "dim_head": 512})
    refused(path, "M parameters", "at most 700 M")


# =============================================================================================
# audio, inference and training

SECTION_RANGES = {  # section.field: (low, high)
    "audio.chunk_size": (1, MAX_SEGMENT_SECONDS * 192_000),
    "audio.sample_rate": (8000, 192_000), "audio.num_channels": (1, 2),
    "audio.n_fft": (1, 65536), "audio.hop_length": (1, 65536), "audio.dim_f": (1, 65536),
    "audio.dim_t": (1, 1_000_000), "audio.min_mean_abs": (0, 1),
    "inference.num_overlap": (1, 64), "inference.batch_size": (1, 256),
    "inference.dim_t": (1, 1_000_000),
}


@pytest.mark.parametrize("name", sorted(SECTION_RANGES))
def test_section_field_bounds(name):
    section, field = name.split(".")
    rule = {"audio": msst_config._AUDIO, "inference": msst_config._INFERENCE}[section][field][0]
    low, high = SECTION_RANGES[name]
    integer = name != "audio.min_mean_abs"
    for value, accepted in edges(low, high, integer):
        assert rule.accepts(value) is accepted, (name, value, accepted)


def test_section_fields_are_refused_by_name(tmp_path):
    refused(changed(BS_VOCALS, tmp_path, inference={"num_overlap": 0}),
            "inference.num_overlap=0 is out of bounds")
    refused(changed(BS_VOCALS, tmp_path, inference={"normalize": "yes"}),
            "inference.normalize='yes'")
    refused(changed(BS_VOCALS, tmp_path, audio={"chunk_size": DELETE}),
            "audio.chunk_size is missing")
    refused(changed(BS_VOCALS, tmp_path, audio={"num_channels": 1}),
            "audio.num_channels=1 but model.stereo=True")
    refused(changed(MEL_VOCALS, tmp_path, audio={"sample_rate": 48000}),
            "model.sample_rate=44100", "audio.sample_rate=48000")
    config = read_msst_config(changed(BS_VOCALS, tmp_path, inference={"normalize": True,
                                                                      "batch_size": DELETE}))
    assert config.normalize is True and config.batch_size == 1


@pytest.mark.parametrize("extra, accepted", [(0, True), (1, False)])
def test_chunk_is_at_most_the_longest_segment(tmp_path, monkeypatch, extra, accepted):
    monkeypatch.setattr(msst_config, "MAX_FRAMES", 10**9)  # the frame bound on its own below
    chunk = MAX_SEGMENT_SECONDS * 44100 + extra
    path = changed(VIPERX, tmp_path, audio={"chunk_size": chunk})
    if accepted:
        assert read_msst_config(path).chunk_size == chunk
    else:
        refused(path, f"audio.chunk_size={chunk}", f"at most {MAX_SEGMENT_SECONDS} s")


@pytest.mark.parametrize("extra, accepted", [(0, True), (1, False)])
def test_chunk_frames(tmp_path, extra, accepted):
    """(chunk // hop + 1) frames: 8192 at most."""
    chunk = (msst_config.MAX_FRAMES - 1) * 441 + (441 if extra else 440)
    path = changed(VIPERX, tmp_path, audio={"chunk_size": chunk})
    if accepted:
        read_msst_config(path)
    else:
        refused(path, "8193 frames", "at most 8192")


@pytest.mark.parametrize("chunk, accepted", [(2048, True), (2047, False)])
def test_chunk_holds_one_fft(tmp_path, chunk, accepted):
    path = changed(BS_VOCALS, tmp_path, audio={"chunk_size": chunk})
    if accepted:
        read_msst_config(path)
    else:
        refused(path, "audio.chunk_size=2047 is shorter than model.stft_n_fft=2048")


@pytest.mark.parametrize("instruments", [
    ["../vocals", "other"], ["vocals", "a/b"], [".hidden", "other"], ["vocals", "vocals"],
    [], "vocals", [f"s{i}" for i in range(MAX_SOURCES + 1)], ["x" * 129], [3, "other"],
])
def test_instrument_names_become_file_names(tmp_path, instruments):
    path = changed(MEL_4STEMS, tmp_path, training={"instruments": instruments})
    refused(path, "training.instruments=", "can name a file")


def test_instrument_count_up_to_the_limit(tmp_path):
    names = [f"s{i}" for i in range(MAX_SOURCES)]
    config = read_msst_config(changed(MEL_4STEMS, tmp_path, training={"instruments": names},
                                      model={"num_stems": MAX_SOURCES}))
    assert config.stems == tuple(names)


def test_a_target_must_name_a_file(tmp_path):
    refused(changed(BS_VOCALS, tmp_path, training={"target_instrument": "../../etc/x"}),
            "training.target_instrument='../../etc/x'")


def test_outputs_must_match_the_stems(tmp_path):
    refused(changed(MEL_4STEMS, tmp_path, model={"num_stems": 3}),
            "model.num_stems=3", "training.instruments (4) names 4")
    refused(changed(BS_VOCALS, tmp_path, model={"num_stems": 2}),
            "model.num_stems=2", "training.target_instrument names 1")


def test_single_target_stems(tmp_path):
    one = changed(BS_VOCALS, tmp_path, training={"target_instrument": DELETE,
                                                 "instruments": ["vocals"]})
    assert read_msst_config(one).stems == ("vocals", "instrumental")
    instrumental = changed(BS_VOCALS, tmp_path, training={
        "target_instrument": "instrumental", "instruments": ["vocals", "instrumental"]})
    assert read_msst_config(instrumental).stems == ("instrumental", "vocals")
    alone = changed(BS_VOCALS, tmp_path, training={"target_instrument": "instrumental",
                                                   "instruments": ["instrumental"]})
    refused(alone, "name the other stem")


# =============================================================================================
# .ckpt / .pth state dicts

def small_state() -> dict[str, torch.Tensor]:
    return {"band_split.to_features.0.0.weight": torch.randn(4, 3),
            "layers.0.0.layers.0.0.to_qkv.weight": torch.randn(6, 4),
            "mask_estimators.0.to_freqs.0.0.0.bias": torch.zeros(5, dtype=torch.float16)}


@pytest.mark.parametrize("suffix", [".ckpt", ".pth"])
@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model_state_dict", "state",
                                  "lightning", "module"])
def test_state_dicts_as_people_save_them(tmp_path, suffix, wrap):
    state = small_state()
    saved = {
        "bare": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model_state_dict": {"model_state_dict": state, "optimizer": {"lr": 1e-5}},
        "state": {"state": state},
        "lightning": {"state_dict": {f"model.{k}": v for k, v in state.items()},
                      "global_step": 100},
        "module": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    path = tmp_path / f"model{suffix}"
    torch.save(saved, path)
    loaded = read_state_dict(path)
    assert type(loaded) is dict and list(loaded) == list(state)
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor) and loaded[key].dtype == tensor.dtype


def test_a_prefix_only_some_keys_have_stays(tmp_path):
    state = {"model.a": torch.zeros(1), "b": torch.zeros(1)}
    torch.save(state, tmp_path / "m.ckpt")
    assert list(read_state_dict(tmp_path / "m.ckpt")) == ["model.a", "b"]


class _System:
    """Pickles as a call of the real ``os.system``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_ckpt_with_pickled_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": _System(f"touch {marker}")}, path)
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path)
    assert str(path) in str(caught.value) and "system" in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("saved, words", [
    ({"w": torch.zeros(1), "epoch": 3}, "'epoch' is an int, not a tensor"),
    ({}, "empty"),
    ([torch.zeros(1)], "holds a list, not a state dict"),
    ({"w": torch.zeros(2).to_sparse()}, "'w' is a torch.float32 torch.sparse_coo tensor"),
    ({"": torch.zeros(1)}, "the key ''"),
])
def test_what_is_not_a_state_dict_is_refused(tmp_path, saved, words):
    path = tmp_path / "odd.ckpt"
    torch.save(saved, path)
    with pytest.raises(CheckpointError, match=re.escape(words)):
        read_state_dict(path)


@pytest.mark.parametrize("extra, accepted", [(0, True), (1, False)])
def test_state_dict_tensor_count(extra, accepted):
    shared = torch.zeros(1)
    state = {f"t{i}": shared for i in range(msst_state.MAX_TENSORS + extra)}
    if accepted:
        assert len(msst_state._state_dict(state, "x")) == msst_state.MAX_TENSORS
    else:
        with pytest.raises(CheckpointError, match="at most 65536 tensors"):
            msst_state._state_dict(state, "x")


def test_a_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        read_state_dict(tmp_path / "absent.ckpt")


# =============================================================================================
# safetensors

def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None = None, *,
                      edit=None, padding: int = 0) -> bytes:
    """A safetensors file: tensors in order, back to back; ``edit(header)`` may change the
    header before it is written; ``padding`` spaces after the JSON (the format allows them)."""
    header, chunks, position = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, tensor in tensors.items():
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        code = next(c for c, d in msst_state.SAFETENSORS_DTYPES.items() if d == tensor.dtype)
        header[name] = {"dtype": code, "shape": list(tensor.shape),
                        "data_offsets": [position, position + len(data)]}
        chunks.append(data)
        position += len(data)
    if edit is not None:
        edit(header)
    raw = json.dumps(header).encode() + b" " * padding
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks)


def write_safetensors(path: Path, tensors, metadata=None, **changes) -> Path:
    path.write_bytes(safetensors_bytes(tensors, metadata, **changes))
    return path


ALL_DTYPES = {
    "f64": torch.randn(2, 3, dtype=torch.float64), "f32": torch.randn(4),
    "f16": torch.randn(2, 2).half(), "bf16": torch.randn(3, 1, 2).bfloat16(),
    "i64": torch.arange(-3, 3), "i32": torch.arange(4, dtype=torch.int32),
    "i16": torch.arange(4, dtype=torch.int16), "i8": torch.arange(-2, 2, dtype=torch.int8),
    "u8": torch.arange(250, 256, dtype=torch.uint8), "bool": torch.tensor([True, False]),
    "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 7),
}


def test_safetensors_round_trip(tmp_path):
    path = write_safetensors(tmp_path / "m.safetensors", ALL_DTYPES, {"format": "pt"},
                             padding=5)
    tensors, metadata = read_safetensors(path)
    assert metadata == {"format": "pt"} and list(tensors) == list(ALL_DTYPES)
    for name, tensor in ALL_DTYPES.items():
        assert tensors[name].dtype == tensor.dtype and tensors[name].shape == tensor.shape
        assert torch.equal(tensors[name], tensor), name


def test_safetensors_written_by_the_reference_package():
    """A file of safetensors 0.8.0's save_file (its own layout, keys with a model. prefix)."""
    tensors, metadata = read_safetensors(FIXTURES / "written_by_safetensors_0.8.0.safetensors")
    assert metadata == {"format": "pt"}
    assert torch.equal(tensors["model.band_split.weight"],
                       torch.arange(12, dtype=torch.float32).reshape(3, 4) / 8)
    assert torch.equal(tensors["model.counts"], torch.arange(5))
    assert torch.equal(tensors["model.half"],
                       torch.tensor([[1.5, -2.0], [0.25, 3.0]]).bfloat16())
    assert torch.equal(tensors["model.mask"], torch.tensor([True, False, True]))
    state = read_state_dict(FIXTURES / "written_by_safetensors_0.8.0.safetensors")
    assert sorted(state) == ["band_split.weight", "counts", "half", "mask"]


def test_a_state_dict_reads_alike_from_ckpt_and_safetensors(tmp_path):
    state = small_state()
    torch.save({"state_dict": state}, tmp_path / "m.ckpt")
    write_safetensors(tmp_path / "m.safetensors", state)
    from_ckpt, from_safetensors = (read_state_dict(tmp_path / "m.ckpt"),
                                   read_state_dict(tmp_path / "m.safetensors"))
    assert list(from_ckpt) == list(from_safetensors)
    assert all(torch.equal(from_ckpt[k], from_safetensors[k]) for k in state)


def _set(name, field, value):
    def edit(header):
        header[name][field] = value
    return edit


TWO = {"a": torch.zeros(4), "b": torch.ones(2)}  # a: bytes 0-16, b: 16-24


@pytest.mark.parametrize("edit, words", [
    (_set("b", "data_offsets", [8, 16]), "overlap"),
    (_set("b", "data_offsets", [12, 20]), "overlap"),
    (_set("b", "data_offsets", [16, 20]), "span 4"),
    (_set("a", "data_offsets", [0, 8]), "span"),
    (_set("b", "data_offsets", [16, 32]), "not a range inside the 24 bytes"),
    (_set("b", "data_offsets", [-8, 0]), "not a range inside"),
    (_set("b", "data_offsets", [16]), "not a range inside"),
    (_set("b", "data_offsets", [20, 16]), "not a range inside"),
    (_set("b", "dtype", "F8_E4M3"), "dtype 'F8_E4M3'"),
    (_set("b", "dtype", "object"), "dtype 'object'"),
    (_set("b", "shape", [1] * 9 + [2]), "not a list of at most 8 sizes"),
    (_set("b", "shape", [-2]), "not a list of at most 8 sizes"),
    (_set("b", "shape", [True, 2]), "not a list of at most 8 sizes"),
    (_set("b", "extra", 1), "not dtype, shape and data_offsets"),
    (lambda header: header.update({"__metadata__": {"a": 1}}), "__metadata__"),
    (lambda header: header.update(c=header.pop("b")) or header["c"].update(
        data_offsets=[20, 28]), "not a range inside"),
])
def test_hostile_safetensors_headers(tmp_path, edit, words):
    path = write_safetensors(tmp_path / "bad.safetensors", TWO, edit=edit)
    with pytest.raises(CheckpointError) as caught:
        read_safetensors(path)
    assert str(path) in str(caught.value) and words in str(caught.value), str(caught.value)


def test_safetensors_tensors_must_tile_the_buffer(tmp_path):
    """A gap, and bytes left after the last tensor, are refused as the reference refuses
    them."""
    gap = safetensors_bytes(TWO, edit=_set("b", "data_offsets", [20, 28]))
    path = tmp_path / "gap.safetensors"
    path.write_bytes(gap + b"\0" * 4)
    with pytest.raises(CheckpointError, match="a gap"):
        read_safetensors(path)
    path.write_bytes(safetensors_bytes(TWO) + b"\0")
    with pytest.raises(CheckpointError, match="cover 24 of the 25 bytes"):
        read_safetensors(path)


@pytest.mark.parametrize("data, words", [
    (b"", "too short"),
    (b"\x01" * 7, "too short"),
    (struct.pack("<Q", 100) + b"{}", "runs past the end of the file"),
    (struct.pack("<Q", 2**63) + b"{}", "at most 16 MiB"),
    (struct.pack("<Q", 4) + b"[1] ", "not a JSON object"),
    (struct.pack("<Q", 3) + b"\xff\xfe{", "not JSON"),
    (struct.pack("<Q", 2) + b"{]", "not JSON"),
    (struct.pack("<Q", 24) + b'{"a": 1, "a": 2}        ', "names 'a' twice"),
])
def test_hostile_safetensors_files(tmp_path, data, words):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=re.escape(words)):
        read_safetensors(path)


def test_a_bool_tensor_holds_only_0_and_1(tmp_path):
    raw = bytearray(safetensors_bytes({"m": torch.tensor([True, False])}))
    raw[-1] = 2
    path = tmp_path / "bool.safetensors"
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="bytes other than 0 and 1"):
        read_safetensors(path)


def test_a_safetensors_file_without_tensors_is_no_state_dict(tmp_path):
    path = write_safetensors(tmp_path / "empty.safetensors", {}, {"format": "pt"})
    assert read_safetensors(path) == ({}, {"format": "pt"})
    with pytest.raises(CheckpointError, match="holds no tensors"):
        read_state_dict(path)


@pytest.mark.parametrize("extra, accepted", [(0, True), (1, False)])
def test_safetensors_header_size(tmp_path, extra, accepted):
    """A header of exactly 16 MiB (padded with spaces, as the format allows) is read."""
    plain = safetensors_bytes(TWO)
    (length,) = struct.unpack("<Q", plain[:8])
    path = write_safetensors(tmp_path / "big.safetensors", TWO,
                             padding=MAX_HEADER_BYTES - length + extra)
    if accepted:
        assert torch.equal(read_safetensors(path)[0]["b"], torch.ones(2))
    else:
        with pytest.raises(CheckpointError, match="at most 16 MiB"):
            read_safetensors(path)


@pytest.mark.parametrize("extra, accepted", [(0, True), (1, False)])
def test_safetensors_tensor_count(tmp_path, monkeypatch, extra, accepted):
    monkeypatch.setattr(msst_state, "MAX_TENSORS", 3)
    tensors = {f"t{i}": torch.zeros(1) for i in range(3 + extra)}
    path = write_safetensors(tmp_path / "many.safetensors", tensors, {"format": "pt"})
    if accepted:
        assert len(read_safetensors(path)[0]) == 3
    else:
        with pytest.raises(CheckpointError, match="lists 4 tensors; stemserve reads at most 3"):
            read_safetensors(path)
