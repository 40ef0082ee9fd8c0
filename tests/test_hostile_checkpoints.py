"""Hostile checkpoints and bag YAMLs: files of a few hundred bytes that unfold to billions of
items, refusals that would quote them, segments and nesting at the edges of their bounds, and
a bag that loads but that no backend serves.

Every one is refused with a :class:`CheckpointError` that names the file. The bombs load in a
child whose address space is capped 1 GiB over its start, so that a regression fails the test
(a MemoryError in the child) instead of taking the machine's memory; they take a second or
two, so they run in the everyday lane, not the slow one.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from stemserve import releases
from stemserve.checkpoints import CheckpointError, load_bag, load_model, unpickle
from stemserve.client.backends.bag import BagBackend
from stemserve.client.backends.pytorch import TorchBackend
from stemserve.errors import StemserveError
from stemserve.model import Demucs
from stemserve.models import HDemucs
from test_checkpoints_v4 import (SMALL_HT, SOURCES, _Call, _fake_class, _quantized_package,
                                 _saved, _small_ht_state, _v4_package)
from test_checkpoints_v4 import v4_classes  # noqa: F401 - a fixture, requested by name

# Each path of argv loaded with load_bag in a child capped 1 GiB over its start: what it
# raised (type and the start of its message), how long it took and how much it grew.
_BOUNDED = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from stemserve.checkpoints import load_bag

with open("/proc/self/status") as status:
    held = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (held + (1 << 30), held + (1 << 30)))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcomes = []
for path in sys.argv[1:]:
    start = time.perf_counter()
    try:
        load_bag(path)
        error, message = None, ""
    except BaseException as exc:
        error, message = type(exc).__name__, str(exc)
    outcomes.append({"error": error, "message": message[:1000], "length": len(message),
                     "seconds": time.perf_counter() - start})
grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"outcomes": outcomes, "grown_mb": grown_mb}))
"""


def _load_bounded(paths: list[Path]) -> tuple[list[dict], float]:
    """What loading each of ``paths`` raised in a capped child, and the MB the child grew."""
    run = subprocess.run([sys.executable, "-c", _BOUNDED, *map(str, paths)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    return result["outcomes"], result["grown_mb"]


def _laughs(levels: int = 28) -> list:
    """``x = [x, x]`` ``levels`` times: each level pickles as one list of two references to
    the one before (a few bytes), and unfolds to 2**levels leaves as a tree."""
    value: list = []
    for _ in range(levels):
        value = [value, value]
    return value


def _omegaconf_laughs(monkeypatch, levels: int = 28) -> object:
    """The same bomb made of omegaconf DictConfig nodes, each holding ``{'a': x, 'b': x}``:
    what :func:`unpickle._plain` unwraps, and :func:`~stemserve.untrusted.check_size`
    alone would not look into."""
    node_class = _fake_class(monkeypatch, "omegaconf.dictconfig", "DictConfig")
    value: object = {}
    for _ in range(levels):
        node = node_class()
        node._content = {"a": value, "b": value}
        value = node
    return value


def _package(klass: type, **fields) -> dict:
    """A demucs 4 training package of the small HTDemucs with an empty state: every bomb
    below is refused before the state is looked at."""
    return {"klass": klass, "args": (SOURCES,), "kwargs": dict(SMALL_HT), "state": {},
            "training_args": {}, **fields}


# --------------------------------------------------------------------------- 1: pickle bombs


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_pickle_billion_laughs_is_refused_in_bounded_time_and_memory(tmp_path, v4_classes,
                                                                     monkeypatch):
    """2**28 leaves in kwargs, in training_args and in omegaconf nodes, each file a few
    hundred bytes (plus torch's zip framing): refused in a second or two, naming the field,
    the child's memory all but unchanged (the unbounded walk took 5 GB)."""
    ht = v4_classes["HTDemucs"]
    packages = {
        "kwargs": _package(ht, kwargs=dict(SMALL_HT, multi_freqs=_laughs())),
        "training_args": _package(ht, training_args={"quant": _laughs()}),
        "omegaconf": _package(ht, training_args=_omegaconf_laughs(monkeypatch)),
    }
    paths = []
    for name, package in packages.items():
        paths.append(tmp_path / f"{name}.th")
        paths[-1].write_bytes(_saved(package))
        assert paths[-1].stat().st_size < 4096
    outcomes, grown_mb = _load_bounded(paths)
    for path, field, outcome in zip(paths, ["kwargs", "training_args", "training_args"],
                                    outcomes):
        assert outcome["error"] == "CheckpointError", (path.name, outcome)
        assert outcome["message"] == (
            f"{path}: its {field!r} holds more than {unpickle._MAX_CONFIG_ITEMS} items "
            f"(shared references counted each time they are reached); demucs stores a few "
            f"hundred"), outcome
        assert outcome["seconds"] < 5, outcome
    assert grown_mb < 200


def test_package_fields_are_bounded_at_exactly_the_item_limit():
    """10 000 items counted as a tree pass, one more is refused: ``{'k': [0] * n}`` counts
    the dict, its key, the list and n zeros. demucs 4's training_args count about 500."""
    assert unpickle._MAX_CONFIG_ITEMS == 10_000
    package = {"training_args": {"k": [0] * 9_997}}
    assert unpickle._package_field(package, "training_args", "x.th") == \
        package["training_args"]
    package["training_args"]["k"].append(0)
    with pytest.raises(CheckpointError, match=r"^x\.th: its 'training_args' holds more than "
                                              r"10000 items"):
        unpickle._package_field(package, "training_args", "x.th")


def test_shared_references_are_converted_once_per_depth():
    """The conversion of omegaconf placeholders shares what the pickle shares: 2**20 leaves
    as a tree take 20 lists (what makes the size check after it cheap)."""
    plain = unpickle._plain({"deep": _laughs(20)}, "x.th")
    value, levels = plain["deep"], 0
    while value:
        assert value[0] is value[1]
        value, levels = value[0], levels + 1
    assert levels == 20


BOMB = "[[[[...], [...]], [[...], [...]]]]"  # brief([_laughs(n)]) for n >= 3


def _quoted_package(case: str, classes: dict[str, type], monkeypatch) -> dict:
    """A package whose refusal quotes a value: 2**20 items as a tree (a quote of it in full
    is megabytes, bearable should a regression make one), or 5000 numbers (a kwargs value
    within the size limit)."""
    bomb = [_laughs(20)]
    if case == "kwargs":
        return _package(classes["HTDemucs"], kwargs=dict(SMALL_HT, segment=[1.5] * 5000))
    if case == "klass":
        return _package(bomb)
    if case == "fraction":
        return _package(classes["HTDemucs"], kwargs=dict(SMALL_HT, segment=_Call(Fraction,
                                                                                 bomb)))
    if case == "quantizer":
        return _quantized_package(classes["HTDemucs"], {"klass": bomb})
    if case == "quantizer-argument":
        return _quantized_package(classes["HTDemucs"], {"klass": "diffq.diffq.DiffQuantizer",
                                                        "init_kwargs": {"exclude": bomb}})
    v2 = _fake_class(monkeypatch, "demucs.model", "Demucs")  # v2's training_args
    return {"klass": v2, "args": (), "kwargs": {"sources": SOURCES, "channels": 4},
            "state": {}, "training_args": argparse.Namespace(diffq=bomb)}


QUOTES = {
    "kwargs": "segment=[1.5, 1.5, 1.5, 1.5, 1.5, 1.5, ...] is out of bounds",
    "klass": f"is a training package of {BOMB}, not of",
    "fraction": f"holds a fraction of {BOMB} and 1, not a ratio",
    "quantizer": f"names no diffq quantizer (meta.klass is {BOMB};",
    "quantizer-argument": f"quantizer exclude={BOMB} is out of bounds",
    "v2-training-args": f"training_args.diffq={BOMB} is not a penalty",
}


@pytest.mark.parametrize("case", QUOTES)
def test_refusals_quote_values_briefly(tmp_path, v4_classes, monkeypatch, case):
    """Each value a refusal of a package quotes, in a few hundred characters at once."""
    path = tmp_path / "quoted.th"
    path.write_bytes(_saved(_quoted_package(case, v4_classes, monkeypatch)))
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert str(error.value).startswith(str(path)) and QUOTES[case] in str(error.value)
    assert len(str(error.value)) < len(str(path)) + 400


# --------------------------------------------------------------------------- 2: YAML bombs


def _alias_bomb(levels: int = 9, width: int = 10) -> str:
    """A bag YAML whose models are lists of aliases of the list before: width**levels
    strings as a tree, in under 500 bytes (PyYAML shares aliases, a repr does not)."""
    lines, previous = ["models:"], None
    for level in range(levels):
        name = "abcdefghijklmnopqrstuvwxyz"[level]
        items = [f"*{previous}" if previous else "lol"] * width
        lines.append(f"  - &{name} [{', '.join(items)}]")
        previous = name
    return "\n".join(lines) + "\n"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_yaml_alias_bomb_is_refused_in_bounded_time_and_memory(tmp_path):
    """10**9 strings of aliases in models (the refusal's repr took 4.4 GB): refused right
    after parsing, by its size."""
    path = tmp_path / "laughs.yaml"
    path.write_text(_alias_bomb())
    assert path.stat().st_size < 500
    (outcome,), grown_mb = _load_bounded([path])
    assert outcome["error"] == "CheckpointError", outcome
    assert outcome["message"] == (
        f"{path} holds more than {releases._MAX_BAG_ITEMS} items (YAML aliases counted "
        f"each time they are used), which no bag of models needs"), outcome
    assert outcome["seconds"] < 5 and grown_mb < 200, (outcome, grown_mb)


def test_bag_yaml_is_bounded_at_exactly_the_item_limit(tmp_path):
    """1000 items pass the size check (and are refused for their count of models, quoted
    briefly), 1001 do not: a mapping, its key, the list and 997 or 998 signatures."""
    assert releases._MAX_BAG_ITEMS == 1000
    path = tmp_path / "many.yaml"
    for count, expected in ((997, "is not a list of 1 to 16 signatures"),
                            (998, "holds more than 1000 items")):
        path.write_text("models: [" + ", ".join(["abc"] * count) + "]\n")
        with pytest.raises(CheckpointError) as error:
            load_bag(path)
        assert str(error.value).startswith(str(path)) and expected in str(error.value)
        assert len(str(error.value)) < len(str(path)) + 400


LONG = "x" * 60_000
QUOTED = {
    "models": (f"models: ['{LONG}']\n", "models=['xxxx"),
    "weights": ("models: ['a']\nweights: [[" + ", ".join(["1.5"] * 900) + "]]\n",
                "weights=[[1.5, 1.5"),
    "segment": (f"models: ['a']\nsegment: '{LONG}'\n", "segment='xxxx"),
    "unknown-key": (f"models: ['a']\n? {LONG}\n: 1\n", "unknown key 'xxxx"),  # explicit: long
}


@pytest.mark.parametrize("case", QUOTED)
def test_bag_yaml_refusals_quote_values_briefly(tmp_path, case):
    """Values of up to 60 kB (within the size limits) quoted in a few hundred characters."""
    text, expected = QUOTED[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    with pytest.raises(CheckpointError) as error:
        load_bag(path)
    assert str(error.value).startswith(str(path)) and expected in str(error.value)
    assert len(str(error.value)) < len(str(path)) + 400


@pytest.mark.parametrize("text, expected", [
    ("models: " + "[" * 20_000 + "]" * 20_000 + "\n", "nests deeper than YAML can be read"),
    ("models: ['a']\nsegment: 1" + "0" * 5000 + "\n", "holds a value that cannot be read"),
])
def test_bag_yaml_that_breaks_the_parser_is_refused(tmp_path, text, expected):
    """Within 64 kB, PyYAML recurses past Python's limit, or reads an int past its 4300
    digits: refused like any other bad YAML, not as a traceback."""
    path = tmp_path / "parser.yaml"
    path.write_text(text)
    with pytest.raises(CheckpointError) as error:
        load_bag(path)
    assert str(error.value).startswith(str(path)) and expected in str(error.value)


# --------------------------------------------------------------------------- 3: segments


@pytest.mark.parametrize("value, accepted", [
    (1, True), (1.0, True), (Fraction(1), True), (1.001, True), (Fraction(39, 5), True),
    (119.999, True), (120, True), (Fraction(120), True),
    (0.999, False), (Fraction(999, 1000), False), (1e-9, False), (0, False), (-1, False),
    (-120, False), (120.001, False), (Fraction(120_001, 1000), False), (121, False),
    (math.nan, False), (math.inf, False), (-math.inf, False), (True, False), (False, False),
    ("7.8", False), (None, False), pytest.param(16 ** 60_000, False, id="huge-int"),
])
def test_segment_bounds(value, accepted):
    """1 s to 120 s, both included; nan, infinities, bools and ints past a float's range
    (which overflowed ``math.isfinite``) refused."""
    assert (releases.MIN_SEGMENT_SECONDS, releases.MAX_SEGMENT_SECONDS) == (1, 120)
    assert releases.is_segment(value) is accepted


@pytest.mark.parametrize("text, segment", [
    ("1", 1), ("1.0", 1.0), ("1.001", 1.001), ("119.999", 119.999), ("120", 120),
    ("0.999", None), ("120.001", None), ("0.000000001", None), ("1.0e-9", None), ("0", None),
    ("-1", None), (".nan", None), (".inf", None), ("-.inf", None), ("true", None),
])
def test_bag_yaml_segment_bounds(tmp_path, text, segment):
    """In a bag YAML: read at the bounds, refused past them with the bounds in words."""
    path = tmp_path / "bag.yaml"
    path.write_text(f"models: ['a']\nsegment: {text}\n")
    if segment is not None:
        assert releases.read_bag_yaml(path).segment == segment
        return
    with pytest.raises(CheckpointError) as error:
        load_bag(path)
    assert str(error.value).startswith(f"{path}: segment=") and \
        "is out of bounds: stemserve loads seconds from 1 to 120" in str(error.value)


@pytest.mark.parametrize("segment, accepted", [
    (Fraction(1), True), (Fraction(999, 1000), False), (math.nan, False), (121, False)])
def test_package_segment_bounds(tmp_path, v4_classes, segment, accepted):
    """In a demucs 4 package's kwargs: 1 s loads, under it or past 120 s is refused."""
    path = tmp_path / "segment.th"
    path.write_bytes(_saved(_v4_package(v4_classes["HTDemucs"],
                                        kwargs=dict(SMALL_HT, segment=segment))))
    if accepted:
        assert load_model(path)[0].segment == segment
        return
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert str(error.value).startswith(f"{path}: segment=") and \
        "is out of bounds: stemserve loads seconds from 1 to 120" in str(error.value)


# --------------------------------------------------------------------------- 4: nesting

NESTING = 32
"""What the nesting tests are built for: :data:`unpickle._MAX_NESTING`."""


def _nested(depth: int) -> dict:
    """A dict whose deepest item is ``depth`` levels below it (lists inside lists)."""
    value: object = "leaf"
    for _ in range(depth - 1):
        value = [value]
    return {"deep": value}


def test_nesting_is_bounded_at_exactly_the_limit(tmp_path, v4_classes):
    """training_args nested to the limit load; one level more is refused, by the unpickled
    package's conversion and by load_model alike."""
    assert unpickle._MAX_NESTING == NESTING
    assert unpickle._plain(_nested(NESTING), "x.th") == _nested(NESTING)
    with pytest.raises(CheckpointError, match=r"^x\.th: its configuration nests deeper than "
                                              r"32 levels$"):
        unpickle._plain(_nested(NESTING + 1), "x.th")
    path = tmp_path / "nested.th"
    path.write_bytes(_saved(_v4_package(v4_classes["HTDemucs"],
                                        training_args=_nested(NESTING))))
    assert load_model(path)[1].family == "htdemucs"
    path.write_bytes(_saved(_v4_package(v4_classes["HTDemucs"],
                                        training_args=_nested(NESTING + 1))))
    with pytest.raises(CheckpointError, match="nests deeper than 32 levels"):
        load_model(path)


# --------------------------------------------------------------------------- 5: mixed bags

SMALL_HD = dict(channels=4, depth=4, nfft=1024)  # 59 k parameters, 40 s segments


def _hdemucs_package(klass: type) -> dict:
    torch.manual_seed(1)
    state = {key: value.half() for key, value in HDemucs(SOURCES, **SMALL_HD).state_dict().items()}
    return {"klass": klass, "args": (SOURCES,), "kwargs": dict(SMALL_HD), "state": state,
            "training_args": {}}


@pytest.fixture
def mixed_folder(tmp_path, v4_classes) -> Path:
    """An HTDemucs (1.2 s segments) and an HDemucs (40 s) next to each other."""
    (tmp_path / "httiny.th").write_bytes(_saved(_v4_package(v4_classes["HTDemucs"])))
    (tmp_path / "hdtiny.th").write_bytes(_saved(_hdemucs_package(v4_classes["HDemucs"])))
    return tmp_path


def test_bag_of_models_with_different_segments_is_refused_at_load(mixed_folder):
    """Without a segment override, no backend serves them as one bag: refused when the bag
    loads, with the fix; with one, they load and a bag backend takes them."""
    bag = mixed_folder / "mixed.yaml"
    bag.write_text("models: [httiny, hdtiny]\n")
    with pytest.raises(CheckpointError) as error:
        load_bag(bag)
    assert str(error.value) == (
        f"{bag}: its models split tracks into segments of different lengths (httiny: 1.2 s, "
        f"hdtiny: 40 s), and a bag's models are served on one; add 'segment: N' to the bag's "
        f"YAML, N seconds from 1 to 1.2, the shortest training segment of its HTDemucs models")

    bag.write_text("models: [httiny, hdtiny]\nsegment: 1\n")
    loaded = load_bag(bag)
    assert loaded.segment == 1 and [model.segment for model in loaded.models] == [1, 1]
    members = [TorchBackend(model, info, segment=loaded.segment)
               for model, info in zip(loaded.models, loaded.infos)]
    assert BagBackend(members, loaded.weights, "mixed").spec.segment_length == 44_100


def test_the_backend_still_refuses_members_of_different_segments(mixed_folder):
    """What protects exports made before the load-time check: the same two models, each
    loaded on its own, are refused as one bag backend."""
    members = [TorchBackend(*load_model(mixed_folder / name)) for name in ("httiny.th",
                                                                            "hdtiny.th")]
    with pytest.raises(StemserveError, match="the bag's models disagree"):
        BagBackend(members, None, "mixed")


def test_bag_mixing_demucs_2_and_4_models_is_refused_at_load(mixed_folder):
    """The other case every backend refuses: models of both generations in one bag."""
    torch.manual_seed(2)
    state = Demucs(SOURCES, channels=4).state_dict()
    torch.save({"config": {"channels": 4}, "state": state}, mixed_folder / "v2tiny.th")
    bag = mixed_folder / "generations.yaml"
    bag.write_text("models: [v2tiny, httiny]\nsegment: 1.2\n")
    with pytest.raises(CheckpointError, match=r"it mixes demucs 2 models \(v2tiny\) with "
                                              r"demucs 3/4 models"):
        load_bag(bag)


def test_a_bag_of_one_family_and_one_segment_still_loads(mixed_folder):
    bag = mixed_folder / "same.yaml"
    bag.write_text("models: [httiny, httiny]\n")
    loaded = load_bag(bag)
    assert loaded.segment is None and loaded.models[0] is loaded.models[1]
    assert loaded.models[0].segment == Fraction(6, 5)
    assert _small_ht_state().keys() == loaded.models[0].state_dict().keys()
