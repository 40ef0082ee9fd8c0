"""The shape contract between a served model and everything around it: the sidecar.

It is written next to the ONNX file by ``stemserve export``, copied into the Triton model
repository (and carried in its config as the ``stemserve_spec`` parameter), and read by the
client. It says the sample rate, the sources, the segment, and the lengths a server must
accept: the shortest request (the last segment of a track, as short as one sample), the
one every full segment is sent at, and the longest (a full segment with a shift). The
TensorRT profile, the GPU and CPU repository configs, the python model's checks and the
client's shared-memory regions all derive from it, so no length is computed twice.

Every Demucs generation is described by the same fields, its ``family`` saying how lengths
work (:data:`FAMILIES`): Demucs v2 and the v3 waveform model take any "valid length" of
their convolutions (``valid_length_params``), Hybrid Demucs takes any length, HT Demucs one
fixed length (its training segment). The family also says where demucs puts the random
shifts: inside each segment (demucs 2.0.3) or around the whole split (demucs 4). No torch.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from stemserve.defaults import FAMILY_MODULES_ENV, family_modules
from stemserve.errors import SpecError
from stemserve.files import atomic_write
from stemserve.precision import PRECISIONS, Precision, asked_as
from stemserve.untrusted import brief, is_safe_name

SPEC_VERSION = 1
SPEC_PARAMETER = "stemserve_spec"
"""The config.pbtxt parameter whose string value is the sidecar, for clients of a server."""
MAX_SHIFT_SECONDS = 0.5
"""demucs' random shifts move a segment by up to this much: the longest request is a full
segment plus this much context."""
_OPTIONAL = {"precision", "onnx_file", "input_name", "output_name", "family",
             "forward_randrange", "num_overlap", "normalize", "residual"}
_CHUNKED = ("num_overlap", "normalize", "residual")
MAX_OVERLAP = 64
"""The most chunks that may cover one sample (an MSST config's ``inference.num_overlap``;
the releases use 2 to 8)."""
MAX_SOURCES = 8
"""The most stems a sidecar may name (the releases have 4 or 6)."""
MIN_SEGMENT_SECONDS = 1
"""The shortest segment a model, bag or export may have: every request is one segment, so
a tiny one makes a track millions of network calls (and 1e-9 s requests of 0 samples); 1 s
leaves room under the shortest release's 7.8 s (htdemucs)."""
MAX_SEGMENT_SECONDS = 120
"""The longest segment a model, bag, export or sidecar may have: every request and
shared-memory region a client makes is sized from it (the releases use 7.8 to 44 s)."""
_SAMPLE_RATES = (8000, 192000)
_TENSOR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_HEX = re.compile(r"[0-9a-f]{1,64}")
_VALID_LENGTH_KEYS = {"resample": bool, "depth": range(1, 9), "kernel_size": range(1, 17),
                      "stride": range(1, 9), "context": range(0, 10)}
"""The arguments of :func:`valid_length` and their bounds (the checkpoint loader's)."""


@dataclasses.dataclass(frozen=True)
class Family:
    """How a network family takes lengths, and which demucs applies it."""

    title: str
    """The family's name for users (``HT Demucs``)."""
    lengths: str
    """``valid`` (demucs' valid-length formula, with the context term), ``any`` (the input as
    it is) or ``fixed`` (always the training segment)."""
    output_as_input: bool
    """Whether the network returns as many samples as it takes (v2 returns fewer)."""
    shifts_around_split: bool
    """demucs 4's apply_model shifts the whole track, then splits it; 2.0.3 splits, then
    shifts each segment."""
    cpu_batch: int = 2
    """The largest batch the CPU server forms. Batching pays where a BiLSTM reads all its
    recurrent weights at every time step whatever the batch; HT Demucs has none, and a batch
    costs it more per segment and memory besides (docs/decisions/0002-cpu-batch-per-family.md)."""
    split: str = "demucs"
    """How a track is cut and put back: ``demucs`` (``apply_model``: the client's overlap,
    triangular transition windows, random shifts) or ``chunks`` (Music-Source-Separation-
    Training's ``demix``: chunks every ``segment_length // num_overlap`` samples, the track's
    borders reflected, linear fades of a tenth of a chunk, no shifts)."""


FAMILIES = {
    "demucs": Family("Demucs v2", "valid", output_as_input=False, shifts_around_split=False),
    "demucs_v3": Family("Demucs v3", "valid", output_as_input=True, shifts_around_split=True),
    "hdemucs": Family("Hybrid Demucs", "any", output_as_input=True, shifts_around_split=True),
    "htdemucs": Family("HT Demucs", "fixed", output_as_input=True, shifts_around_split=True,
                       cpu_batch=1),
    "bs_roformer": Family("BS-RoFormer", "fixed", output_as_input=True,
                          shifts_around_split=True, cpu_batch=1, split="chunks"),
    "mel_band_roformer": Family("Mel-Band RoFormer", "fixed", output_as_input=True,
                                shifts_around_split=True, cpu_batch=1, split="chunks"),
}
"""Demucs v2 (demucs 2.0.3), demucs 4.0.1's waveform Demucs (v3), Hybrid Demucs (v3) and
Hybrid Transformer Demucs (v4), and the band-split RoFormers of Music-Source-Separation-
Training (on their training chunk, split as its ``demix`` splits). The v3 waveform model's
formula is v2's without the context term (``context=1`` in ``valid_length_params``). A family of one's own adds its row
with :func:`register_length_rule`, from a module named in ``$STEMSERVE_FAMILY_MODULES``
(each family's torch side is its registration, :mod:`stemserve.models.registry`)."""
_imported_family_modules: set[str] = set()


def register_length_rule(name: str, family: Family) -> Family:
    """Add family ``name``'s length rule (a name is registered once: again only with the
    same rule)."""
    if FAMILIES.get(name, family) != family:
        raise SpecError(f"a model family named {name!r} is already registered")
    FAMILIES[name] = family
    return family


def import_family_modules() -> None:
    """Import the modules ``$STEMSERVE_FAMILY_MODULES`` names, once each: they register
    families of their own (this process may serve or read one of their models). An entry
    is a module name, or a ``.py`` file's path (a Triton server's python model runs with a
    ``sys.path`` of its own), imported under its file's name."""
    for module in family_modules():
        if module in _imported_family_modules:
            continue
        _imported_family_modules.add(module)
        if not module.endswith(".py"):
            importlib.import_module(module)
            continue
        name = Path(module).stem
        if name not in sys.modules:
            found = importlib.util.spec_from_file_location(name, module)
            if found is None or found.loader is None:
                raise SpecError(f"{module}: not a Python module to import "
                                f"(${FAMILY_MODULES_ENV})")
            sys.modules[name] = importlib.util.module_from_spec(found)
            found.loader.exec_module(sys.modules[name])


def family_rule(name: str) -> Family:
    """The length rule of family ``name``, stemserve's own or one a family module registers;
    a KeyError for any other."""
    if name not in FAMILIES:
        import_family_modules()
    return FAMILIES[name]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a served model expects and returns.

    The ONNX graph maps ``mix`` [batch, audio_channels, time] to
    ``stems`` [batch, len(sources), audio_channels, time'] for any ``time`` that
    :meth:`valid_length` gives. The batched hot path uses ``time = padded_length``: a
    segment of ``segment_length`` samples with ``(padded_length - segment_length) // 2``
    samples of real context on its left, the rest on its right. The output is center-trimmed
    by the caller to the segment's length, exactly like demucs' ``apply_model``.
    """

    model_name: str
    checkpoint: str
    checkpoint_sha256: str
    sample_rate: int
    audio_channels: int
    sources: tuple[str, ...]
    segment_length: int
    padded_length: int
    output_length: int
    valid_length_params: dict[str, Any] | None
    precision: str = "fp32"
    onnx_file: str = "model.onnx"
    input_name: str = "mix"
    output_name: str = "stems"
    spec_version: int = SPEC_VERSION
    family: str = "demucs"
    """The network's family, a key of :data:`FAMILIES`."""
    forward_randrange: int = 0
    """demucs 4's HT Demucs draws ``random.randrange(n)`` once per call (the shift of its
    sinusoidal embedding, always 0 for the releases), which moves Python's random state
    between two random shifts: the pipeline draws the same to reproduce a seed. 0: no draw."""
    num_overlap: int = 0
    """A chunked family's chunks start every ``segment_length // num_overlap`` samples (its
    config's ``inference.num_overlap``); 0 for demucs' families, whose overlap is the
    client's."""
    normalize: bool = True
    """Whether the mix is normalised by the mean and std of its mono reference (demucs
    always; an MSST config when its ``inference.normalize`` asks)."""
    residual: bool = False
    """Whether the last source is the mix minus the others (a single-target RoFormer's
    ``instrumental``), computed in the graph: it is de-normalised without the mean."""

    def __post_init__(self) -> None:
        """A sidecar comes from a file or a server: every field is checked here, where it
        is read, because names become paths (stems, repository folders, the graph's file)
        and lengths size every buffer a client allocates."""
        if isinstance(self.family, str) and self.family not in FAMILIES:
            import_family_modules()
        if not (isinstance(self.family, str) and self.family in FAMILIES):
            raise SpecError(f"unknown model family {brief(self.family)}; known: "
                            f"{', '.join(FAMILIES)}")
        for field in ("model_name", "checkpoint"):
            _check_name(getattr(self, field), field)
        if not (isinstance(self.sources, tuple) and 1 <= len(self.sources) <= MAX_SOURCES):
            raise SpecError(f"sources {brief(self.sources)} are not 1 to {MAX_SOURCES} names")
        for source in self.sources:
            _check_name(source, "source")
        if len(set(self.sources)) != len(self.sources):
            raise SpecError(f"sources {brief(self.sources)} name a stem twice")
        _check_name(self.onnx_file, "onnx_file")
        if not self.onnx_file.endswith(".onnx"):
            raise SpecError(f"onnx_file {brief(self.onnx_file)} is not an .onnx file name")
        for field in ("input_name", "output_name"):
            if not (isinstance(getattr(self, field), str)
                    and _TENSOR_NAME.fullmatch(getattr(self, field))):
                raise SpecError(f"{field} {brief(getattr(self, field))} is not a tensor name "
                                "(letters, digits and _)")
        if not (isinstance(self.precision, str) and self.precision in PRECISION_NAMES):
            raise SpecError(f"precision {brief(self.precision)} is not one of "
                            f"{', '.join(PRECISION_NAMES)}")
        if not (isinstance(self.checkpoint_sha256, str) and _HEX.fullmatch(self.checkpoint_sha256)):
            raise SpecError(f"checkpoint_sha256 {brief(self.checkpoint_sha256)} is not a "
                            "sha256 in hex")
        _check_integer(self.sample_rate, "sample_rate", *_SAMPLE_RATES)
        _check_integer(self.audio_channels, "audio_channels", 1, 2)
        longest = 2 * MAX_SEGMENT_SECONDS * self.sample_rate
        for field in ("segment_length", "padded_length", "output_length"):
            _check_integer(getattr(self, field), field, 1, longest)
        _check_integer(self.forward_randrange, "forward_randrange", 0, 1 << 16)
        chunked = family_rule(self.family).split == "chunks"
        if chunked:
            _check_integer(self.num_overlap, "num_overlap", 1, MAX_OVERLAP)
        elif self.num_overlap != 0 or self.normalize is not True or self.residual is not False:
            raise SpecError(f"family {self.family!r} splits as demucs does: no num_overlap, "
                            "always normalised, no residual source")
        for field in ("normalize", "residual"):
            if not isinstance(getattr(self, field), bool):
                raise SpecError(f"{field} {brief(getattr(self, field))} is not true or false")
        if self.residual and len(self.sources) < 2:
            raise SpecError("a residual source needs another source to subtract")
        formula = family_rule(self.family).lengths == "valid"
        if formula != (self.valid_length_params is not None):
            raise SpecError(f"family {self.family!r} "
                            f"{'needs' if formula else 'takes no'} valid_length_params")
        if formula:
            params = self.valid_length_params
            if not (isinstance(params, dict) and set(params) == set(_VALID_LENGTH_KEYS)
                    and all(isinstance(params[key], bool) if bounds is bool else
                            _is_integer(params[key]) and params[key] in bounds
                            for key, bounds in _VALID_LENGTH_KEYS.items())):
                raise SpecError(f"valid_length_params {brief(params)} are not "
                                f"{', '.join(_VALID_LENGTH_KEYS)} within Demucs' bounds")
        if self.segment_length > MAX_SEGMENT_SECONDS * self.sample_rate:
            raise SpecError(f"a segment of {self.segment_length} samples is over "
                            f"{MAX_SEGMENT_SECONDS} s at {self.sample_rate} Hz")

    @classmethod
    def for_model(cls, model: Any, *, checkpoint: str, checkpoint_sha256: str,
                  segment_length: int, model_name: str, family: str = "demucs",
                  **fields: Any) -> "ModelSpec":
        """The spec of ``model`` (a network with ``samplerate``, ``audio_channels``,
        ``sources``, ``valid_length_params`` in a family that has them, and ``num_overlap``,
        ``normalize`` and ``residual`` in a chunked one) served with segments of
        ``segment_length`` samples."""
        params = model.valid_length_params if family_rule(family).lengths == "valid" else None
        spec = cls(model_name=model_name, checkpoint=checkpoint,
                   checkpoint_sha256=checkpoint_sha256, sample_rate=int(model.samplerate),
                   audio_channels=int(model.audio_channels), sources=tuple(model.sources),
                   segment_length=int(segment_length), padded_length=int(segment_length),
                   output_length=int(segment_length),  # placeholders, replaced below
                   valid_length_params=params, family=family,
                   **({field: getattr(model, field) for field in _CHUNKED
                       if hasattr(model, field) and field not in fields}
                      if family_rule(family).split == "chunks" else {}), **fields)
        padded = spec.valid_length(spec.segment_length)
        return dataclasses.replace(spec, padded_length=padded,
                                   output_length=spec.request_output_length(padded))

    # -- the shape contract ------------------------------------------------------------------

    @property
    def rules(self) -> Family:
        return family_rule(self.family)

    @property
    def fixed_length(self) -> int | None:
        """The one input length of a fixed-length network; None when it takes many."""
        return self.segment_length if self.rules.lengths == "fixed" else None

    def valid_length(self, length: int) -> int:
        """The input length the network takes for ``length`` samples of audio: demucs'
        formula, the length itself, or the fixed length (which must hold them)."""
        lengths = self.rules.lengths
        if lengths == "fixed":
            if length > self.segment_length:
                raise SpecError(f"{length} samples do not fit the model's fixed input of "
                                f"{self.segment_length}")
            return self.segment_length
        if lengths == "any":
            return length
        return valid_length(length, **self.valid_length_params)

    def request_output_length(self, length: int) -> int:
        """Samples the network returns for an input of ``length`` (a valid length)."""
        if self.rules.output_as_input:
            return length
        return output_length(length, **self.valid_length_params)

    @property
    def max_shift(self) -> int:
        """The largest random shift, in samples."""
        return int(MAX_SHIFT_SECONDS * self.sample_rate)

    @property
    def min_request_length(self) -> int:
        """The shortest request a client sends: a track's last segment of one sample."""
        return self.valid_length(1)

    @property
    def max_request_length(self) -> int:
        """The longest request a client sends: a full segment, with a shift's context where
        demucs shifts inside each segment (v2)."""
        if self.rules.shifts_around_split:
            return self.valid_length(self.segment_length)
        return self.valid_length(self.segment_length + self.max_shift)

    def tensorrt_profile(self, max_batch: int, opt_batch: int | None = None) -> dict[str, str]:
        """TensorRT's min/opt/max shapes of the input (``BxCxT``): the shortest request at
        batch 1, full segments at ``opt_batch`` (default: a full batch), the longest
        request at ``max_batch``. The GPU config and the trtexec script both use it."""
        channels = self.audio_channels
        return {"min": f"1x{channels}x{self.min_request_length}",
                "opt": f"{opt_batch or max_batch}x{channels}x{self.padded_length}",
                "max": f"{max_batch}x{channels}x{self.max_request_length}"}

    @property
    def segment_seconds(self) -> float:
        return self.segment_length / self.sample_rate

    # -- the sidecar file ----------------------------------------------------------------------

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["sources"] = list(self.sources)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save(self, path: Path) -> None:
        with atomic_write(path, "w") as file:
            file.write(self.to_json())

    @classmethod
    def load(cls, path: Path) -> "ModelSpec":
        """Read a sidecar file; a missing field or a wrong version is a clear error."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise SpecError(f"cannot read model sidecar: {err}", where=str(path)) from err
        return cls.from_json(text, where=str(path))

    @classmethod
    def from_json(cls, text: str, where: str = "model sidecar") -> "ModelSpec":
        """Parse a sidecar's text (a file, or the ``stemserve_spec`` parameter of a config)."""
        data = _json_object(text, where)
        if data.get("spec_version") != SPEC_VERSION:
            raise SpecError(f"sidecar version {brief(data.get('spec_version'))}, expected "
                            f"{SPEC_VERSION}", where=where)
        fields = {field.name for field in dataclasses.fields(cls)}
        missing = fields - set(data) - _OPTIONAL
        if missing:
            raise SpecError(f"sidecar lacks {sorted(missing)}", where=where)
        data = {key: value for key, value in data.items() if key in fields}
        if not isinstance(data["sources"], list):
            raise SpecError(f"sources {brief(data['sources'])} is not a list", where=where)
        data["sources"] = tuple(data["sources"])
        try:
            return cls(**data)
        except SpecError as err:
            raise err.about(where) from None


SIDECAR_FILE = PRECISIONS[Precision.FP32].sidecar
"""The fp32 graph's sidecar, ``model.json``: the one every export has (the other
precisions' are in :data:`~stemserve.precision.PRECISIONS`). Every variant has the same
tensors."""
PRECISION_NAMES = tuple(name.value for name in Precision)
MAX_BAG_MEMBERS = 16
"""The most models a bag sidecar may list (the releases list 1 or 4), as bag YAMLs are
bounded."""
MAX_SIDECAR_CHARS = 1 << 16
"""The longest sidecar text read: a real one is under 1 KiB, and a server's answer is
untrusted."""
BAG_FILE = "bag.json"
BAG_PARAMETER = "stemserve_bag"
"""The config.pbtxt parameter of each served member of a bag: the bag's sidecar."""
SPECS_PARAMETER = "stemserve_specs"
"""The streaming model's parameter: the JSON list of its network models' sidecars, in the
bag's order."""


@dataclasses.dataclass(frozen=True)
class BagSpec:
    """A bag of models (demucs 4's ``BagOfModels``) as exported and served: ``members`` are
    the members' folders in the export and their model names on a server (each has its
    own :class:`ModelSpec`), ``weights`` one row of per-source weights per member,
    ``segment`` the bag's segment override in seconds (already in the members' specs).

    A single model is a bag of one, with weights of one and no file of its own.
    """

    name: str
    members: tuple[str, ...]
    weights: tuple[tuple[float, ...], ...]
    segment: float | None = None
    spec_version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        """Checked where read, as :class:`ModelSpec`: the name and members become folder
        and model names."""
        _check_name(self.name, "bag name")
        if not (isinstance(self.members, tuple) and 1 <= len(self.members) <= MAX_BAG_MEMBERS):
            raise SpecError(f"bag {self.name!r}: members {brief(self.members)} are not 1 to "
                            f"{MAX_BAG_MEMBERS} names")
        for member in self.members:
            _check_name(member, "bag member")
        if len(self.weights) != len(self.members):
            raise SpecError(f"bag {self.name!r}: {len(self.members)} members but "
                            f"{len(self.weights)} rows of weights")
        if not all(1 <= len(row) <= MAX_SOURCES
                   and all(math.isfinite(weight) and weight >= 0 for weight in row)
                   for row in self.weights):
            raise SpecError(f"bag {self.name!r}: weights {brief(self.weights)} are not rows "
                            f"of 1 to {MAX_SOURCES} finite numbers >= 0")
        if self.segment is not None and not (
                isinstance(self.segment, (int, float)) and not isinstance(self.segment, bool)
                and 0 < self.segment <= MAX_SEGMENT_SECONDS):
            raise SpecError(f"bag {self.name!r}: segment {brief(self.segment)} is not seconds "
                            f"above 0 up to {MAX_SEGMENT_SECONDS}")

    @classmethod
    def single(cls, spec: ModelSpec) -> "BagSpec":
        return cls(spec.checkpoint, (spec.model_name,), ((1.0,) * len(spec.sources),))

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save(self, path: Path) -> None:
        with atomic_write(path, "w") as file:
            file.write(self.to_json())

    @classmethod
    def from_json(cls, text: str, where: str = "bag sidecar") -> "BagSpec":
        data = _json_object(text, where)
        try:
            if data.get("spec_version") != SPEC_VERSION:
                raise SpecError(f"bag sidecar version {brief(data.get('spec_version'))}, "
                                f"expected {SPEC_VERSION}")
            members, weights = data["members"], data["weights"]
            if not (isinstance(members, list) and isinstance(weights, list)
                    and len(members) <= MAX_BAG_MEMBERS and len(weights) <= MAX_BAG_MEMBERS
                    and all(isinstance(row, list) and len(row) <= MAX_SOURCES
                            for row in weights)):
                raise SpecError(f"members {brief(members)} and weights {brief(weights)} are "
                                f"not lists of up to {MAX_BAG_MEMBERS}")
            return cls(name=data["name"], members=tuple(members),
                       weights=tuple(tuple(float(w) for w in row) for row in weights),
                       segment=data.get("segment"))
        except SpecError as err:
            raise SpecError(f"not a bag sidecar: {err.message}", where=where) from None
        except (ValueError, KeyError, TypeError) as err:
            raise SpecError(f"not a bag sidecar: {brief(err)}", where=where) from None


@dataclasses.dataclass(frozen=True)
class ExportLayout:
    """What an export folder holds: a bag (of one, for a single model) and, per member,
    its folder and sidecar. A single model's files are at the top of the folder; a bag's
    members each have a subfolder named as the member, next to ``bag.json``."""

    bag: BagSpec
    members: tuple[tuple[Path, ModelSpec], ...]

    @property
    def spec(self) -> ModelSpec:
        """The first member's sidecar (sample rate, sources, channels are the bag's)."""
        return self.members[0][1]


def is_export(folder: Path) -> bool:
    """Whether ``folder`` looks like a finished export (the sidecar is written last)."""
    folder = Path(folder)
    return (folder / SIDECAR_FILE).is_file() or (folder / BAG_FILE).is_file()


def sidecar_name(precision: str) -> str:
    """The sidecar file of an export's ``precision`` variant."""
    if precision not in PRECISION_NAMES:
        raise SpecError(f"precision must be one of {', '.join(PRECISION_NAMES)}, "
                        f"not {precision!r}")
    return PRECISIONS[Precision(precision)].sidecar


def has_precision(export_dir: Path, precision: str) -> bool:
    """Whether every model of the export has a graph of ``precision``."""
    layout = load_export(export_dir)
    return all((folder / sidecar_name(precision)).is_file() for folder, _ in layout.members)


def load_export(export_dir: Path, precision: str = "fp32") -> ExportLayout:
    """The layout of an export folder (its ``precision`` variant), with an error that names
    the folder."""
    export_dir = Path(export_dir)
    sidecar = sidecar_name(precision)
    if precision != "fp32" and is_export(export_dir) and not has_precision(export_dir,
                                                                            precision):
        raise SpecError(f"no {precision} graph in this export: `stemserve export "
                        f"{asked_as(precision)}` makes one", where=str(export_dir))
    try:
        if (export_dir / BAG_FILE).is_file():
            bag = BagSpec.from_json((export_dir / BAG_FILE).read_text(),
                                    where=str(export_dir / BAG_FILE))
            members = tuple((export_dir / name, ModelSpec.load(export_dir / name / sidecar))
                            for name in bag.members)
            return ExportLayout(bag, members)
        spec = ModelSpec.load(export_dir / sidecar)
        return ExportLayout(BagSpec.single(spec), ((export_dir, spec),))
    except OSError as err:
        raise SpecError(f"not a stemserve export: {err}", where=str(export_dir)) from None
    except SpecError as err:
        raise SpecError(f"not a stemserve export: {err.message}", where=str(export_dir)) \
            from None


def load_export_spec(export_dir: Path, precision: str = "fp32") -> ModelSpec:
    """The sidecar of a single model's export folder (of its ``precision`` variant), with an
    error that names the folder."""
    try:
        return ModelSpec.load(Path(export_dir) / sidecar_name(precision))
    except SpecError as err:
        raise SpecError(f"not a stemserve export: {err.message}", where=str(export_dir)) \
            from None


def _json_object(text: str, where: str) -> dict:
    """A sidecar's JSON object, its size bounded before parsing."""
    if len(text) > MAX_SIDECAR_CHARS:
        raise SpecError(f"a sidecar of {len(text)} characters, over {MAX_SIDECAR_CHARS}",
                        where=where)
    try:
        data = json.loads(text)
    except ValueError as err:
        raise SpecError(f"not JSON: {err}", where=where) from None
    if not isinstance(data, dict):
        raise SpecError(f"not a JSON object: {brief(data)}", where=where)
    return data


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_integer(value: Any, field: str, low: int, high: int) -> None:
    if not (_is_integer(value) and low <= value <= high):
        raise SpecError(f"{field} {brief(value)} is not an integer from {low} to {high}")


def _check_name(value: Any, field: str) -> None:
    """A name that becomes a path component: one safe component, or refused."""
    if not is_safe_name(value):
        raise SpecError(f"{field} {brief(value)} is not a plain name (letters, digits, "
                        "'_.+-', no path separator, no leading dot, no '..')")


def valid_length(length: int, *, resample: bool, depth: int, kernel_size: int, stride: int,
                 context: int) -> int:
    """Demucs v2's valid length, without torch (the client needs it for the last segment)."""
    if resample:
        length *= 2
    for _ in range(depth):
        length = -(-(length - kernel_size) // stride) + 1
        length = max(1, length)
        length += context - 1
    for _ in range(depth):
        length = (length - 1) * stride + kernel_size
    if resample:
        length = -(-length // 2)
    return int(length)


def output_length(length: int, *, resample: bool, depth: int, kernel_size: int, stride: int,
                  context: int) -> int:
    """Length of Demucs v2's output for an input of ``length`` samples."""
    if resample:
        length *= 2
    for _ in range(depth):
        length = (length - kernel_size) // stride + 1
    for _ in range(depth):
        length = (length - context) * stride + kernel_size
    if resample:
        length //= 2
    return int(length)
