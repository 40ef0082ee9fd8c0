"""An MSST checkpoint as people keep it, loaded: a BS-RoFormer or Mel-Band RoFormer weights
file (``.ckpt``, ``.pth``, ``.safetensors``) and the training ``config.yaml`` it goes with.

The config is found beside the weights as audio-separator keeps them (``<name>.ckpt`` and
``<name>.yaml``), or named (``--config other.yaml``). It is read and bounded first
(:mod:`.msst_config`), the weights read without running anything (:mod:`.msst_state`); then
the network the config describes is laid out on torch's ``meta`` device and its tensor names
and shapes compared with the file's, so that a config of another model (other bands, another
``dim``) is refused in words before a single weight is allocated. Only a state that fits is
materialised: the network is built for real and the state loaded with ``strict=True``.

A config names its own network, so nothing here goes through the demucs family registry;
the checks of the state's tensors and the messages are :mod:`.build`'s and :mod:`.messages`'.
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from stemserve.checkpoints.bags import CheckpointInfo
from stemserve.checkpoints.bounds import _parameter_count
from stemserve.checkpoints.build import _state_dict
from stemserve.checkpoints.fetch import _check_zip_crcs, _sha256
from stemserve.checkpoints.messages import _first_lines
from stemserve.checkpoints.msst_config import (BS_ROFORMER, MAX_PARAMETERS, MEL_BAND_ROFORMER,
                                               MsstConfig, read_msst_config)
from stemserve.checkpoints.msst_state import read_state_dict
from stemserve.errors import CheckpointError
from stemserve.models.roformer import BSRoformer, MelBandRoformer
from stemserve.releases import MSST_CONFIG_SUFFIXES as CONFIG_SUFFIXES
from stemserve.untrusted import brief

_CLASSES: dict[str, type[nn.Module]] = {BS_ROFORMER: BSRoformer,
                                        MEL_BAND_ROFORMER: MelBandRoformer}
_NAMED = 3  # tensors named in a refusal, of each kind
_LISTED_YAMLS = 3  # other YAML files of the folder a missing config's error mentions


def config_beside(checkpoint: Path) -> Path:
    """The config that goes with ``checkpoint``: ``<stem>.yaml`` or ``<stem>.yml`` in its
    folder, the way audio-separator stores each RoFormer's weights and config side by side.

    A folder's lone ``config.yaml`` is not taken for it: MSST's downloads hold several
    models' configs, and a wrong one would build another network.
    """
    checkpoint = Path(checkpoint)
    for suffix in CONFIG_SUFFIXES:
        candidate = checkpoint.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    expected = checkpoint.with_suffix(CONFIG_SUFFIXES[0])
    raise CheckpointError(f"{checkpoint} needs its model configuration (the training "
                          f"config.yaml) beside it, as {expected} (or "
                          f"{checkpoint.with_suffix(CONFIG_SUFFIXES[1]).name}); there is none"
                          f"{_other_yamls(checkpoint)}. --config other.yaml names another one")


def _other_yamls(checkpoint: Path) -> str:
    """The YAML files of the checkpoint's folder, a few, for the user to pick from."""
    try:
        found = sorted(itertools.islice(
            (path.name for path in checkpoint.parent.iterdir()
             if path.suffix.lower() in CONFIG_SUFFIXES), _LISTED_YAMLS + 1))
    except OSError:
        return ""
    if not found:
        return ""
    names = ", ".join(map(brief, found[:_LISTED_YAMLS]))
    return f" (the folder holds {names}{' ...' if len(found) > _LISTED_YAMLS else ''})"


def load_msst(checkpoint: Path, config: Path | None = None, *,
              family: str | None = None) -> tuple[nn.Module, CheckpointInfo, MsstConfig]:
    """The network of an MSST checkpoint in eval mode, where its weights came from, and its
    checked configuration. The network carries what serving it needs from the config
    (:data:`~stemserve.models.roformer.SERVED_ATTRIBUTES`, and ``residual`` for a
    single-target model, whose second stem is the mix minus the first).

    ``config`` is the training YAML (default: :func:`config_beside`); ``family`` MSST's
    ``--model_type``, for a config whose fields do not say. The config is checked before the
    weights are read, and the weights against the network's layout before it is allocated.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"no checkpoint file at {checkpoint}")
    config_path = config_beside(checkpoint) if config is None else Path(config)
    settings = read_msst_config(config_path, family)
    what = str(checkpoint)
    sha256 = _sha256(checkpoint)
    if checkpoint.suffix.lower() != ".safetensors":
        _check_zip_crcs(checkpoint)
    state = read_state_dict(checkpoint)
    _check_fits(_skeleton(settings), state, settings, what)
    model = _materialise(settings, _state_dict(state, what), what)
    model.samplerate, model.sources = settings.sample_rate, list(settings.stems)
    model.chunk_size, model.num_overlap = settings.chunk_size, settings.num_overlap
    model.normalize = settings.normalize
    model.residual = len(settings.stems) > len(settings.targets)
    info = CheckpointInfo(name=checkpoint.stem, path=checkpoint, sha256=sha256,
                          config=settings.kwargs(), family=settings.family)
    return model, info, settings


def _label(settings: MsstConfig) -> str:
    return _CLASSES[settings.family].__name__


def _skeleton(settings: MsstConfig) -> nn.Module:
    """The network on the meta device: its exact layout and size, nothing allocated. The
    class's own checks of its arguments against each other run too."""
    try:
        with torch.device("meta"):
            skeleton = _CLASSES[settings.family](**settings.kwargs())
    except (AssertionError, ArithmeticError, IndexError, KeyError, RuntimeError, TypeError,
            ValueError) as exc:
        raise CheckpointError(f"{settings.path}: its model cannot be built as a "
                              f"{_label(settings)} ({type(exc).__name__}: "
                              f"{_first_lines(exc)})") from exc
    count = _parameter_count(skeleton)
    if count > MAX_PARAMETERS:
        raise CheckpointError(f"{settings.path}: its {_label(settings)} has {count / 1e6:.0f} M "
                              f"parameters; stemserve loads at most {MAX_PARAMETERS / 1e6:.0f} M")
    return skeleton


# Parts of the network counted by the indices of their keys, in the config's words.
_COUNTED = (
    ("band", re.compile(r"band_split\.to_features\.(\d+)\.")),
    ("stem", re.compile(r"mask_estimators\.(\d+)\.")),
    ("layer", re.compile(r"layers\.(\d+)\.")),
)
_FIRST_BAND = "band_split.to_features.0.1.weight"  # [dim, band inputs]


def _check_fits(skeleton: nn.Module, state: Mapping[str, torch.Tensor], settings: MsstConfig,
                what: str) -> None:
    """Refuse a state whose tensor names or shapes differ from the network's, saying first
    what differs in the config's terms (bands, stems, depth, dim), then which tensors."""
    expected = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    found = {name: tuple(tensor.shape) for name, tensor in state.items()}
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    reshaped = [name for name in expected if name in found and found[name] != expected[name]]
    if not (missing or unexpected or reshaped):
        return
    differences = _structure(expected, found, settings) or [
        f"the {_label(settings)} its config describes has other tensors"]
    details = []
    if missing:
        details.append(f"{len(missing)} tensor(s) of the network are not in the weights "
                       f"({_names(missing)})")
    if unexpected:
        details.append(f"{len(unexpected)} tensor(s) of the weights are not in the network "
                       f"({_names(unexpected)})")
    if reshaped:
        shown = "; ".join(f"{brief(name)} is {_shape(found[name])} in the weights, "
                          f"{_shape(expected[name])} in the network"
                          for name in reshaped[:_NAMED])
        details.append(f"{len(reshaped)} tensor(s) have another shape ({shown}"
                       f"{'; ...' if len(reshaped) > _NAMED else ''})")
    raise CheckpointError(f"{what} does not fit its config {settings.path}: "
                          f"{'; '.join(differences)}: is it the config of another model?\n"
                          + "\n".join(details))


def _structure(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
               settings: MsstConfig) -> list[str]:
    """What differs between the config's network and the weights, as the config says it."""
    arguments = settings.arguments()
    fields = {"band": ("model.freqs_per_bands" if settings.family == BS_ROFORMER
                       else "model.num_bands"),
              "stem": "model.num_stems", "layer": "model.depth"}
    differences = []
    for part, pattern in _COUNTED:
        mine, theirs = _count(expected, pattern), _count(found, pattern)
        if mine != theirs:
            differences.append(f"the config has {mine} {part}{'s' * (mine != 1)} "
                               f"({fields[part]}), the weights {theirs}")
        elif part == "band":
            differences += _band_widths(expected, found, settings)
    if _FIRST_BAND in expected and _FIRST_BAND in found:
        mine, theirs = expected[_FIRST_BAND], found[_FIRST_BAND]
        if len(theirs) == 2 and mine[0] != theirs[0]:
            differences.append(f"the config has dim {arguments['dim']}, the weights "
                               f"{theirs[0]}")
    return differences


def _band_widths(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                 settings: MsstConfig) -> list[str]:
    """As many bands on both sides, but of other widths: other ``freqs_per_bands`` (or mel
    bands of another STFT or sample rate), or another channel count."""
    widths = []
    index = 0
    while (key := f"band_split.to_features.{index}.1.weight") in expected:
        if key not in found or len(found[key]) != 2:
            return []
        widths.append((expected[key][1], found[key][1]))
        index += 1
    differ = [(band, mine, theirs) for band, (mine, theirs) in enumerate(widths)
              if mine != theirs]
    if not differ:
        return []
    channels = settings.audio_channels
    if all(theirs * channels == mine * (3 - channels) for _, mine, theirs in differ) and \
            len(differ) == len(widths):
        return [f"the config separates {channels} channel(s) (model.stereo="
                f"{channels == 2}), the weights {3 - channels}"]
    field = ("model.freqs_per_bands" if settings.family == BS_ROFORMER else
             "model.num_bands, model.sample_rate or model.stft_n_fft")
    shown = ", ".join(f"band {band} has {mine // (2 * channels)} frequencies in the config, "
                      f"{theirs / (2 * channels):g} in the weights"
                      for band, mine, theirs in differ[:_NAMED])
    return [f"the bands cover other frequencies ({field}): {shown}"
            f"{', ...' if len(differ) > _NAMED else ''}"]


def _count(shapes: Mapping[str, tuple[int, ...]], pattern: re.Pattern[str]) -> int:
    return len({match.group(1) for name in shapes if (match := pattern.match(name))})


def _names(names: list[str]) -> str:
    shown = ", ".join(map(brief, names[:_NAMED]))
    return shown + (", ..." if len(names) > _NAMED else "")


def _shape(shape: tuple[int, ...]) -> str:
    return f"[{', '.join(map(str, shape))}]"


def _materialise(settings: MsstConfig, state: Mapping[str, torch.Tensor],
                 what: str) -> nn.Module:
    """The network built on the CPU holding ``state`` (copied in as float32), in eval mode.

    Built for real rather than assigned to the skeleton: the Mel-Band RoFormer's band indices
    are buffers the file does not hold. The random initialisation this runs draws from a
    forked generator, so loading leaves the caller's random stream as it was.
    """
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        model = _CLASSES[settings.family](**settings.kwargs())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{what} does not load into its {_label(settings)}: "
                              f"{_first_lines(exc)}") from exc
    return model.eval()
