"""Music-Source-Separation-Training (MSST) configurations: the ``config.yaml`` that comes
with a BS-RoFormer or Mel-Band RoFormer checkpoint, read safely and bounded.

MSST reads its configs with PyYAML's ``FullLoader`` and builds the network with
``BSRoformer(**config.model)`` / ``MelBandRoformer(**config.model)``. Here the file is read
with a ``SafeLoader`` that also accepts ``!!python/tuple`` (MSST's configs spell
``freqs_per_bands`` and ``multi_stft_resolutions_window_sizes`` so) and refuses every other
``python/`` tag by name; its size and its items counted as a tree (aliases each time they are
reached) are bounded first, as demucs bag YAMLs are (:func:`stemserve.releases.read_bag_yaml`).

Every ``model:`` field is checked against :data:`ROFORMER_RULES` (the style of
:mod:`stemserve.models.arguments`) and against each other before anything is built: the bands
cover the STFT's ``stft_n_fft // 2 + 1`` frequencies, the window fits the FFT, a chunk is at
most :data:`MAX_FRAMES` frames and :data:`~stemserve.spec.MAX_SEGMENT_SECONDS`, and a lower
bound of the network's size is within the loader's parameter limit. A field that neither MSST's
classes nor stemserve's know is refused with its name; so is one of the other family's.
Instrument names become stem file names: they are :func:`~stemserve.untrusted.is_safe_name`.

The other sections are training settings stemserve does not use; of ``audio``, ``training``
and ``inference`` only the fields the reference inference reads are checked (and returned),
the others are ignored as MSST's inference ignores them.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from stemserve.errors import CheckpointError
from stemserve.models.arguments import Rule, flag, integers, numbers
from stemserve.releases import is_number as _is_number
from stemserve.spec import MAX_SEGMENT_SECONDS, MAX_SOURCES
from stemserve.untrusted import TooLarge, brief, check_size, is_safe_name

BS_ROFORMER = "bs_roformer"
MEL_BAND_ROFORMER = "mel_band_roformer"
FAMILIES = (BS_ROFORMER, MEL_BAND_ROFORMER)
"""The model types, as MSST's ``--model_type`` names them."""
_LABELS = {BS_ROFORMER: "BSRoformer", MEL_BAND_ROFORMER: "MelBandRoformer"}

MAX_CONFIG_BYTES = 256 << 10
"""A config's file size: MSST's are 2 to 5 KB (viperx's spells 62 bands one per line)."""
MAX_CONFIG_ITEMS = 10_000
"""A config's items counted as a tree, YAML aliases each time they are reached: MSST's
hold about 250."""
MAX_FRAMES = 8192
"""STFT frames of one chunk, the time transformer's sequence length: the releases use 258
(131584 samples, hop 512) to 1101 (485100, hop 441)."""
MAX_PARAMETERS = 700_000_000
"""As the demucs loader's limit (``bounds._MAX_PARAMETERS``); the largest RoFormer releases
hold about 270 M (MSST's 4-stem Mel-Band RoFormer)."""

# MSST's models/bs_roformer/bs_roformer.py DEFAULT_FREQS_PER_BANDS: 62 bands, 1025 bins.
DEFAULT_FREQS_PER_BANDS = ((2,) * 24 + (4,) * 12 + (12,) * 8 + (24,) * 8 + (48,) * 8
                           + (128, 129))


def _none_only(releases: str) -> Rule:
    """A callable argument: YAML cannot name a function safely, so only null (the default)."""
    return Rule(lambda v: v is None, "null only (a function cannot be named in a config)",
                releases)


def _int_list(low_count: int, high_count: int, low: int, high: int, releases: str) -> Rule:
    def accepts(value: Any) -> bool:
        return (isinstance(value, (list, tuple)) and low_count <= len(value) <= high_count
                and all(_is_number(v, integer=True) and low <= v <= high for v in value))
    return Rule(accepts, f"lists of {low_count} to {high_count} integers from {low} to {high}",
                releases)


# Bounds on the constructor arguments of MSST's BSRoformer and MelBandRoformer (and
# audio-separator's copies, which add sage_attention), by name. The releases' values are in
# the last column; the bounds leave room for custom trainings, and the parameter and frame
# limits above bound what they allow together. Training-only arguments (dropouts, the
# multi-resolution STFT loss, checkpointing, attention kernels) are bounded as plain values.
ROFORMER_RULES: dict[str, Rule] = {
    "dim": integers(1, 2048, "192, 256, 384, 512"),
    "depth": integers(1, 64, "6, 8, 12"),
    "stereo": flag("True"),
    "num_stems": integers(1, MAX_SOURCES, "1; 4 or 6 (multi-stem models)"),
    "time_transformer_depth": integers(0, 16, "1"),
    "freq_transformer_depth": integers(0, 16, "1"),
    "linear_transformer_depth": integers(0, 16, "0"),
    "freqs_per_bands": _int_list(2, 1024, 1, 8193, "62 bands of 2 to 129 bins"),
    "num_bands": integers(2, 1024, "60"),
    "dim_head": integers(2, 512, "64"),
    "heads": integers(1, 64, "8"),
    "attn_dropout": numbers(0, 1, "0 or 0.1"),
    "ff_dropout": numbers(0, 1, "0 or 0.1"),
    "flash_attn": flag("True"),
    "dim_freqs_in": integers(1, 8193, "1025 (unused)"),
    "sample_rate": integers(8000, 192_000, "44100"),
    "stft_n_fft": integers(16, 16384, "2048"),
    "stft_hop_length": integers(1, 16384, "441 or 512"),
    "stft_win_length": integers(1, 16384, "2048"),
    "stft_normalized": flag("False"),
    "stft_window_fn": _none_only("null"),
    "zero_dc": flag("True"),
    "mask_estimator_depth": integers(1, 8, "2"),
    "multi_stft_resolution_loss_weight": numbers(0, 1e6, "1.0"),
    "multi_stft_resolutions_window_sizes": _int_list(0, 16, 1, 65536,
                                                     "(4096, 2048, 1024, 512, 256)"),
    "multi_stft_hop_size": integers(1, 65536, "147"),
    "multi_stft_normalized": flag("False"),
    "multi_stft_window_fn": _none_only("null"),
    "match_input_audio_length": flag("False"),
    "mlp_expansion_factor": integers(1, 16, "4"),
    "use_torch_checkpoint": flag("False"),
    "skip_connection": flag("False"),
    "use_pope": Rule(lambda v: v is False, "False (no release uses PoPE positions, and "
                                           "stemserve does not implement them)", "False"),
    "sage_attention": flag("False; True in MSST's sage configs"),
}

_COMMON_DEFAULTS: dict[str, Any] = {
    "stereo": False, "num_stems": 1, "time_transformer_depth": 2, "freq_transformer_depth": 2,
    "linear_transformer_depth": 0, "dim_head": 64, "heads": 8, "attn_dropout": 0.0,
    "ff_dropout": 0.0, "flash_attn": True, "dim_freqs_in": 1025, "stft_n_fft": 2048,
    "stft_hop_length": 512, "stft_win_length": 2048, "stft_normalized": False,
    "stft_window_fn": None, "zero_dc": True, "mask_estimator_depth": 2,
    "multi_stft_resolution_loss_weight": 1.0,
    "multi_stft_resolutions_window_sizes": (4096, 2048, 1024, 512, 256),
    "multi_stft_hop_size": 147, "multi_stft_normalized": False, "multi_stft_window_fn": None,
    "mlp_expansion_factor": 4, "use_torch_checkpoint": False, "skip_connection": False,
    "use_pope": False, "sage_attention": False,
}
# Each class's arguments with their defaults (MSST's, at commit ccc011a); dim and depth have
# none. multi_stft_window_fn defaults to torch.hann_window: the training loss's, never read.
DEFAULTS: dict[str, dict[str, Any]] = {
    BS_ROFORMER: {**_COMMON_DEFAULTS, "freqs_per_bands": DEFAULT_FREQS_PER_BANDS},
    MEL_BAND_ROFORMER: {**_COMMON_DEFAULTS, "num_bands": 60, "attn_dropout": 0.1,
                        "ff_dropout": 0.1, "sample_rate": 44100, "mask_estimator_depth": 1,
                        "match_input_audio_length": False},
}
_REQUIRED = ("dim", "depth")
# Arguments of MSST's BS-/Mel-Band Conformer, which stemserve does not load: named in the
# refusal so that the user knows which model the config is for.
_CONFORMER_FIELDS = frozenset({"time_conformer_depth", "freq_conformer_depth", "ff_mult",
                               "conv_kernel_size", "conv_expansion_factor", "conv_dropout"})

# audio / inference fields the reference inference reads: (rule, default or _NEEDED).
_NEEDED = object()
_AUDIO: dict[str, tuple[Rule, Any]] = {
    "chunk_size": (integers(1, MAX_SEGMENT_SECONDS * 192_000, "131584, 352800, 485100"),
                   _NEEDED),
    "sample_rate": (integers(8000, 192_000, "44100"), 44100),
    "num_channels": (integers(1, 2, "2"), None),
    "n_fft": (integers(1, 65536, "2048 (unused by RoFormers)"), None),
    "hop_length": (integers(1, 65536, "441 or 512 (unused by RoFormers)"), None),
    "dim_f": (integers(1, 65536, "1024 (unused by RoFormers)"), None),
    "dim_t": (integers(1, 1_000_000, "256 or 801 (unused by RoFormers)"), None),
    "min_mean_abs": (numbers(0, 1, "0 or 0.001 (training only)"), None),
}
_INFERENCE: dict[str, tuple[Rule, Any]] = {
    "num_overlap": (integers(1, 64, "2 or 4"), _NEEDED),
    "batch_size": (integers(1, 256, "1 or 4"), 1),
    "normalize": (flag("absent (False)"), False),
    "dim_t": (integers(1, 1_000_000, "256 or 801 (unused by RoFormers)"), None),
}
COMPLEMENT = "instrumental"
"""The stem a single-target model adds: the mix minus its target (MSST's
``--extract_instrumental``)."""


@dataclass(frozen=True)
class MsstConfig:
    """A checked MSST configuration.

    ``family`` is :data:`BS_ROFORMER` or :data:`MEL_BAND_ROFORMER`; ``model`` the ``model:``
    fields as the file gives them (the class's constructor arguments: the reference builds
    with exactly these, its defaults filling the rest), read-only; ``targets`` the stems the
    network outputs, one per ``num_stems`` (``training.target_instrument``, or
    ``training.instruments``); ``stems`` the stems a separation writes: the targets, and
    :data:`COMPLEMENT` (the mix minus the target) after a single target. ``chunk_size``,
    ``sample_rate`` and ``audio_channels`` come from ``audio`` (channels from the model's
    ``stereo``), ``num_overlap``, ``batch_size`` and ``normalize`` from ``inference``.
    """

    path: str
    family: str
    model: Mapping[str, Any]
    targets: tuple[str, ...]
    stems: tuple[str, ...]
    sample_rate: int
    audio_channels: int
    chunk_size: int
    num_overlap: int
    batch_size: int
    normalize: bool

    def kwargs(self) -> dict[str, Any]:
        """The constructor arguments, a fresh dict (tuples stay tuples)."""
        return dict(self.model)

    def arguments(self) -> dict[str, Any]:
        """Every constructor argument: the file's, over the reference's defaults."""
        return {**DEFAULTS[self.family], **self.model}


# --- reading the YAML ----------------------------------------------------------------------

class _RefusedTag(Exception):
    def __init__(self, tag: str) -> None:
        super().__init__(tag)
        self.tag = tag


def _loader() -> type:
    import yaml

    class MsstLoader(yaml.SafeLoader):
        """PyYAML's SafeLoader, plus ``!!python/tuple``; any other tag it does not know
        (``!!python/name:``, ``!!python/object/apply:``, ...) is refused by name."""

    def construct_tuple(loader: Any, node: Any) -> tuple:
        if not isinstance(node, yaml.SequenceNode):
            raise yaml.constructor.ConstructorError(
                None, None, f"!!python/tuple needs a sequence, not a {node.id}", node.start_mark)
        return tuple(loader.construct_sequence(node, deep=True))

    def refuse(loader: Any, node: Any) -> Any:
        raise _RefusedTag(str(node.tag))

    MsstLoader.add_constructor("tag:yaml.org,2002:python/tuple", construct_tuple)
    MsstLoader.add_constructor(None, refuse)  # every tag without a constructor of its own
    return MsstLoader


def _short_tag(tag: str) -> str:
    prefix = "tag:yaml.org,2002:"
    return "!!" + tag[len(prefix):] if tag.startswith(prefix) else tag


def read_yaml(path: str | Path) -> Any:
    """The data of an MSST-style YAML file, read safely and bounded (see the module)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{path} is over {MAX_CONFIG_BYTES >> 10} KiB, which no "
                                  f"model configuration needs (MSST's are a few KB)")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read the model configuration {path}: {exc}") from exc
    try:
        import yaml
    except ImportError as exc:
        raise CheckpointError(f"{path} is a model configuration in YAML; reading it needs "
                              f"PyYAML (pip install pyyaml)") from exc
    try:
        data = yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except _RefusedTag as exc:
        raise CheckpointError(f"{path}: the tag {brief(_short_tag(exc.tag))} is refused: a "
                              f"model configuration is plain data, and only !!python/tuple of "
                              f"the python tags is read (nothing it names is run)") from None
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path} is not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise CheckpointError(f"{path} nests deeper than YAML can be read; a model "
                              f"configuration is 3 levels deep") from None
    except ValueError as exc:  # an integer past Python's 4300 digits
        raise CheckpointError(f"{path} holds a value that cannot be read ({exc})") from None
    try:
        check_size(data, MAX_CONFIG_ITEMS)
    except TooLarge:
        raise CheckpointError(f"{path} holds more than {MAX_CONFIG_ITEMS} items (YAML aliases "
                              f"counted each time they are used), which no model "
                              f"configuration needs") from None
    return data


def _yaml_problem(exc: Exception) -> str:
    """What PyYAML found wrong and where, in a bounded number of characters."""
    problem = getattr(exc, "problem", None) or str(exc)
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    text = f"{problem}{where}"
    return text if len(text) <= 300 else text[:297] + "..."


# --- checking it ---------------------------------------------------------------------------

def read_msst_config(path: str | Path, family: str | None = None) -> MsstConfig:
    """The checked configuration of an MSST ``config.yaml``.

    ``family`` is MSST's ``--model_type`` (:data:`FAMILIES`); without it the ``model:``
    fields decide: ``num_bands`` (or ``sample_rate``) for a Mel-Band RoFormer,
    ``freqs_per_bands`` for a BS-RoFormer. Every refusal is a :class:`CheckpointError` that
    names the file and the field.
    """
    what = str(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} is not an MSST configuration: it holds "
                              f"{brief(type(data).__name__)}, not a mapping with 'audio', "
                              f"'model', 'training' and 'inference'")
    sections = {}
    for name in ("audio", "model", "training", "inference"):
        section = data.get(name)
        if not isinstance(section, dict):
            raise CheckpointError(f"{what}: its {name!r} section is "
                                  f"{'missing' if section is None else brief(section)}; an "
                                  f"MSST configuration has 'audio', 'model', 'training' and "
                                  f"'inference' mappings")
        unnamed = [key for key in section if not isinstance(key, str)]
        if unnamed:
            raise CheckpointError(f"{what}: {name}: the key {brief(unnamed[0])} is not a name")
        sections[name] = section
    model = sections["model"]
    family = _family(model, family, what)
    _check_model(model, family, what)
    used = {**DEFAULTS[family], **model}
    audio = _section(sections["audio"], _AUDIO, "audio", what)
    inference = _section(sections["inference"], _INFERENCE, "inference", what)
    channels = 2 if used["stereo"] else 1
    if audio["num_channels"] is not None and audio["num_channels"] != channels:
        raise CheckpointError(f"{what}: audio.num_channels={audio['num_channels']} but "
                              f"model.stereo={used['stereo']} separates {channels} channel(s)")
    if family == MEL_BAND_ROFORMER and used["sample_rate"] != audio["sample_rate"]:
        raise CheckpointError(f"{what}: model.sample_rate={used['sample_rate']} (its mel bands) "
                              f"differs from audio.sample_rate={audio['sample_rate']}")
    _check_chunk(audio, inference, used, what)
    targets, stems = _stems(sections["training"], used["num_stems"], what)
    # Returned as given, so that the network is built with what the reference is built with;
    # a null multi_stft_window_fn (the training loss's) is dropped, as the reference would
    # fail on it only when computing that loss.
    given = {key: value for key, value in model.items()
             if not (key == "multi_stft_window_fn" and value is None)}
    return MsstConfig(path=what, family=family, model=MappingProxyType(given), targets=targets,
                      stems=stems, sample_rate=audio["sample_rate"], audio_channels=channels,
                      chunk_size=audio["chunk_size"], num_overlap=inference["num_overlap"],
                      batch_size=inference["batch_size"], normalize=inference["normalize"])


def _family(model: Mapping[str, Any], family: str | None, what: str) -> str:
    if family is not None:
        if family not in FAMILIES:
            raise CheckpointError(f"{what}: model type {brief(family)} is not one stemserve "
                                  f"reads configurations of; known: {', '.join(FAMILIES)}")
        return family
    mel = "num_bands" in model or "sample_rate" in model
    bands = "freqs_per_bands" in model
    if mel and bands:
        raise CheckpointError(f"{what}: model has both freqs_per_bands (a BS-RoFormer's) and "
                              f"{'num_bands' if 'num_bands' in model else 'sample_rate'} (a "
                              f"Mel-Band RoFormer's); a config is for one of them")
    if mel or bands:
        return MEL_BAND_ROFORMER if mel else BS_ROFORMER
    raise CheckpointError(f"{what}: its model fields do not say whether it is a BS-RoFormer "
                          f"(freqs_per_bands) or a Mel-Band RoFormer (num_bands); name the "
                          f"model type ({' or '.join(FAMILIES)})")


def _check_model(model: Mapping[str, Any], family: str, what: str) -> None:
    """Every field known and within its bounds, then the fields against each other."""
    defaults = DEFAULTS[family]
    for name, value in model.items():
        if name not in defaults and name not in _REQUIRED:
            raise CheckpointError(f"{what}: model.{_unknown(name, family)}")
        rule = ROFORMER_RULES[name]
        if not rule.accepts(value):
            raise CheckpointError(f"{what}: model.{name}={brief(value)} is out of bounds: "
                                  f"stemserve loads {rule.accepted} (the releases use "
                                  f"{rule.releases})")
    missing = [name for name in _REQUIRED if name not in model]
    if missing:
        raise CheckpointError(f"{what}: model.{missing[0]} is missing; {_LABELS[family]} has "
                              f"no default for it")
    used = {**defaults, **model}
    n_fft, win, hop = used["stft_n_fft"], used["stft_win_length"], used["stft_hop_length"]
    if win > n_fft:
        raise CheckpointError(f"{what}: model.stft_win_length={win} is longer than "
                              f"model.stft_n_fft={n_fft}")
    if hop > win:
        raise CheckpointError(f"{what}: model.stft_hop_length={hop} is longer than "
                              f"model.stft_win_length={win}: the STFT could not be inverted")
    freqs = n_fft // 2 + 1
    if family == BS_ROFORMER:
        total = sum(used["freqs_per_bands"])
        if total != freqs:
            raise CheckpointError(f"{what}: model.freqs_per_bands adds up to {total} "
                                  f"frequencies, but model.stft_n_fft={n_fft} gives {freqs} "
                                  f"(n_fft // 2 + 1)")
    elif used["num_bands"] > freqs:
        raise CheckpointError(f"{what}: model.num_bands={used['num_bands']} is more bands than "
                              f"the {freqs} frequencies of model.stft_n_fft={n_fft}")
    count = estimated_parameters(family, used)
    if count > MAX_PARAMETERS:
        raise CheckpointError(f"{what}: its model has at least {count / 1e6:.0f} M parameters "
                              f"(dim {used['dim']}, depth {used['depth']}); stemserve loads at "
                              f"most {MAX_PARAMETERS / 1e6:.0f} M (the largest RoFormer "
                              f"releases hold about 270 M)")


def _field(name: str) -> str:
    """A field's name as a message shows it: plain if it is an identifier, else quoted."""
    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", name) else brief(name)


def _unknown(name: str, family: str) -> str:
    other = MEL_BAND_ROFORMER if family == BS_ROFORMER else BS_ROFORMER
    if name in DEFAULTS[other]:
        return (f"{name} is an argument of {_LABELS[other]}, not of {_LABELS[family]}; "
                f"name the model type {other} if the config is for one")
    if name in _CONFORMER_FIELDS:
        return (f"{name} is an argument of MSST's BS-/Mel-Band Conformer, which "
                f"stemserve does not load")
    return (f"{_field(name)} is not an argument of {_LABELS[family]} in MSST or in stemserve; "
            f"refused rather than ignored (check the config is for this model)")


def estimated_parameters(family: str, used: Mapping[str, Any]) -> int:
    """A lower bound of the network's parameter count (its weight matrices; biases, norms and
    the Mel-Band RoFormer's band overlaps left out), from checked arguments, computed
    without building anything."""
    dim, heads, dim_head = used["dim"], used["heads"], used["dim_head"]
    channels = 2 if used["stereo"] else 1
    freqs = used["stft_n_fft"] // 2 + 1
    if family == BS_ROFORMER:
        bands, widths = len(used["freqs_per_bands"]), sum(used["freqs_per_bands"])
    else:
        bands, widths = used["num_bands"], freqs  # each frequency in at least one band
    inner = heads * dim_head
    layers = used["depth"] * (used["time_transformer_depth"] + used["freq_transformer_depth"]
                              + used["linear_transformer_depth"])
    # attention: qkv, gates, out; feed-forward: dim -> 4 dim -> dim
    transformer = layers * (4 * dim * inner + dim * heads + 8 * dim * dim)
    band_inputs = 2 * channels * widths  # real and imaginary, per channel
    band_split = band_inputs * dim
    hidden, depth = dim * used["mlp_expansion_factor"], used["mask_estimator_depth"]
    if depth == 1:
        mask = 2 * band_inputs * dim  # a GLU's two halves
    else:
        mask = bands * (dim * hidden + (depth - 2) * hidden * hidden) + 2 * band_inputs * hidden
    return transformer + band_split + used["num_stems"] * mask


def _section(section: Mapping[str, Any], fields: Mapping[str, tuple[Rule, Any]], name: str,
             what: str) -> dict[str, Any]:
    found = {}
    for field, (rule, default) in fields.items():
        if field not in section:
            if default is _NEEDED:
                raise CheckpointError(f"{what}: {name}.{field} is missing; the reference "
                                      f"inference needs it")
            found[field] = default
            continue
        value = section[field]
        if not rule.accepts(value):
            raise CheckpointError(f"{what}: {name}.{field}={brief(value)} is out of bounds: "
                                  f"stemserve loads {rule.accepted} (the releases use "
                                  f"{rule.releases})")
        found[field] = value
    return found


def _check_chunk(audio: Mapping[str, Any], inference: Mapping[str, Any],
                 used: Mapping[str, Any], what: str) -> None:
    chunk, rate, hop = audio["chunk_size"], audio["sample_rate"], used["stft_hop_length"]
    if chunk > MAX_SEGMENT_SECONDS * rate:
        raise CheckpointError(f"{what}: audio.chunk_size={chunk} is {chunk / rate:.0f} s at "
                              f"{rate} Hz; stemserve loads chunks of at most "
                              f"{MAX_SEGMENT_SECONDS} s (the releases use 3 to 11 s)")
    if chunk < used["stft_n_fft"]:
        raise CheckpointError(f"{what}: audio.chunk_size={chunk} is shorter than "
                              f"model.stft_n_fft={used['stft_n_fft']}")
    frames = chunk // hop + 1
    if frames > MAX_FRAMES:
        raise CheckpointError(f"{what}: audio.chunk_size={chunk} with model.stft_hop_length="
                              f"{hop} is {frames} frames; stemserve loads at most {MAX_FRAMES} "
                              f"(the releases use 258 to 1101)")
    if inference["num_overlap"] > chunk:
        raise CheckpointError(f"{what}: inference.num_overlap={inference['num_overlap']} is "
                              f"more than audio.chunk_size={chunk} samples")


def _stems(training: Mapping[str, Any], num_stems: int,
           what: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The network's outputs and the stems written, as MSST's ``prefer_target_instrument``
    and ``--extract_instrumental`` name them."""
    instruments, target = training.get("instruments"), training.get("target_instrument")
    if not (isinstance(instruments, (list, tuple)) and 1 <= len(instruments) <= MAX_SOURCES
            and all(is_safe_name(name) for name in instruments)
            and len(set(instruments)) == len(instruments)):
        raise CheckpointError(f"{what}: training.instruments={brief(instruments)} is not a list "
                              f"of 1 to {MAX_SOURCES} distinct names that can name a file "
                              f"(letters, digits and _ . + -, no '..'); the releases use "
                              f"['vocals', 'other']")
    if target is not None and not is_safe_name(target):
        raise CheckpointError(f"{what}: training.target_instrument={brief(target)} is not a name "
                              f"that can name a file (letters, digits and _ . + -, no '..')")
    targets = (target,) if target else tuple(instruments)
    if len(targets) != num_stems:
        source = ("training.target_instrument" if target else
                  f"training.instruments ({len(targets)})")
        raise CheckpointError(f"{what}: model.num_stems={num_stems}, but {source} names "
                              f"{len(targets)} stem(s) for its outputs")
    if len(targets) > 1:
        return targets, targets
    complement = COMPLEMENT
    if targets[0] == COMPLEMENT:  # a model of the instrumental: its complement is listed
        others = [name for name in instruments if name != COMPLEMENT]
        if len(others) != 1:
            raise CheckpointError(f"{what}: its target is {COMPLEMENT!r}; name the other stem "
                                  f"(the mix minus it) in training.instruments, once")
        complement = others[0]
    return targets, (targets[0], complement)
