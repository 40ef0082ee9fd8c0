"""The networks every scenario runs: a family at a size with seeded random weights, and its
ONNX export with the precision variants a run needs, made once and cached.

Timing does not depend on the weights, and pretrained ones cannot be downloaded everywhere,
so each process rebuilds the same network from the seed. An export is reused until its
family, size, segment, seed, torch and onnx versions or the export code change (its stamp);
``weights=True`` also keeps the state dict, for a reference implementation to load.
"""
from __future__ import annotations

import hashlib
import json
from fractions import Fraction
from importlib.metadata import version
from pathlib import Path

from .isolated import ROOT, run_isolated
from .scenario import CACHE

SEED = 0
FAMILIES = {"v2": "demucs", "htdemucs": "htdemucs", "bs_roformer": "bs_roformer",
            "mel_band_roformer": "mel_band_roformer"}
"""Family names here -> stemserve's registry names (v2 is demucs_quantized's network; the
RoFormers are viperx's BS-RoFormer 1297 and Kim's Mel-Band RoFormer)."""
_ONE_LAYER, _SMALL_ROFORMER = dict(depth=1), dict(dim=32, depth=1, dim_head=16, heads=2)
SIZES = {"v2": {"small": dict(channels=4), "medium": dict(channels=16), "default": {}},
         "htdemucs": {"small": dict(channels=8, bottom_channels=32, segment=Fraction(1)),
                      "default": {}},
         **{family: {"small": dict(_SMALL_ROFORMER, chunk_size=44100), "wide1": _ONE_LAYER,
                     "default": {}} for family in ("bs_roformer", "mel_band_roformer")}}
"""Constructor arguments per size name (over the release's; a RoFormer's ``chunk_size`` is
its split's). ``wide1``: a RoFormer release's widths, bands and STFT, one layer deep. A size
may also be given as ``c<N>``: a v2 ``N`` channels wide."""
EXPORT_SOURCES = ("benchmarks/models.py", "export/*.py", "stemserve/model.py",
                  "stemserve/models/*.py", "stemserve/spec.py")
"""Files whose change makes a cached export stale."""


def arguments(family: str, size: str) -> dict:
    """The constructor arguments of ``family`` at ``size``; a clear error for an unknown one."""
    if family == "v2" and size.startswith("c") and size[1:].isdigit():
        return {"channels": int(size[1:])}
    if size not in SIZES.get(family, {}):
        raise SystemExit(f"no {family} of size {size!r}: "
                         f"{ {name: list(sizes) for name, sizes in SIZES.items()} } or v2 c<N>")
    return SIZES[family][size]


def constructor(family: str, size: str) -> dict:
    """The keyword arguments the network is built with (a v2 takes its sources apart), as the
    checkpoint's ``config`` records them for a reference implementation to rebuild it."""
    if family == "v2":
        return dict(arguments(family, size))
    from stemserve.models import configs

    release = {"htdemucs": configs.HTDEMUCS, "bs_roformer": configs.BS_ROFORMER_1297,
               "mel_band_roformer": configs.MEL_BAND_ROFORMER_KIM}[family]
    return {key: value for key, value in dict(release, **arguments(family, size)).items()
            if key != "chunk_size"}


def build(family: str, size: str):
    """The seeded network in eval mode (under ``torch.device("meta")``: its shapes only)."""
    import torch

    config = constructor(family, size)
    torch.manual_seed(SEED)
    if family == "v2":
        from stemserve.defaults import SOURCES
        from stemserve.model import Demucs

        return Demucs(SOURCES, **config).eval()
    from stemserve.models import HTDemucs, roformer
    from stemserve.models.configs import ROFORMER_SPLIT

    if family == "htdemucs":
        return HTDemucs(**config).eval()
    model = getattr(roformer, {"bs_roformer": "BSRoformer"}.get(family, "MelBandRoformer"))
    model = model(**config).eval()  # with what load_msst sets from a release's config
    model.samplerate, model.sources, model.residual = 44100, ["vocals", "instrumental"], True
    for key in ROFORMER_SPLIT:
        setattr(model, key, arguments(family, size).get(key, ROFORMER_SPLIT[key]))
    return model


def checkpoint_info(family: str, size: str):
    """The :class:`~stemserve.checkpoints.CheckpointInfo` an export of the network records."""
    from stemserve.checkpoints import CheckpointInfo

    name = f"random-{family}-{size}-seed{SEED}"
    return CheckpointInfo(name=name, path=Path(f"{name}.th"),
                          sha256=hashlib.sha256(name.encode()).hexdigest(),
                          config=constructor(family, size), family=FAMILIES[family])


def _current(job: dict, precisions: set[str]) -> bool:
    """Whether the folder holds an export of this stamp with every one of ``precisions``."""
    from stemserve.spec import has_precision

    folder = Path(job["folder"])
    stamp = folder / "benchmark-stamp.json"
    return (stamp.is_file() and json.loads(stamp.read_text()) == job["stamp"]
            and all(has_precision(folder, name) for name in precisions)
            and (not job["weights"] or (folder / "weights.th").is_file()))


def export(job: dict) -> dict:
    """Export the network into ``job["folder"]`` unless it holds this stamp's export (with
    fp16 and weights if wanted), then add the other precisions (run isolated: it holds the
    model)."""
    import torch

    from stemserve.client.models import add_variant
    from stemserve.export.to_onnx import export_onnx

    folder, wanted = Path(job["folder"]), set(job["precisions"])
    if not _current(job, (wanted & {"fp16"}) | {"fp32"}):
        (folder / "benchmark-stamp.json").unlink(missing_ok=True)
        model = build(job["family"], job["size"])
        info = checkpoint_info(job["family"], job["size"])
        export_onnx(model, info, folder, segment_length=job["segment_length"],
                    fp16="fp16" in wanted)
        if job["weights"]:
            torch.save({"config": info.config, "state": model.state_dict()},
                       folder / "weights.th")
        (folder / "benchmark-stamp.json").write_text(json.dumps(job["stamp"]))
    for precision in sorted(wanted - {"fp32", "fp16"}):
        add_variant(folder, precision)
    return {}


def exported(family: str, size: str, *, segment_length: int | None = None,
             precisions: set[str] | frozenset[str] = frozenset(), weights: bool = False,
             timeout: float = 3600.0) -> Path:
    """The folder of the cached export (``segment_length`` samples per segment, None: the
    network's own) with ``precisions``, made in a process of its own where missing or stale."""
    sources = hashlib.sha256()
    for path in sorted(path for pattern in EXPORT_SOURCES for path in ROOT.glob(pattern)):
        sources.update(path.read_bytes())
    folder = CACHE / "models" / f"{family}-{size}-{segment_length or 'own'}"
    job = {"family": family, "size": size, "folder": str(folder), "weights": weights,
           "segment_length": segment_length, "precisions": sorted(precisions),
           "stamp": {"family": family, "size": size, "seed": SEED,
                     "segment_length": segment_length, "torch": version("torch"),
                     "onnx": version("onnx"), "sources_sha256": sources.hexdigest()}}
    if not _current(job, set(precisions) | {"fp32"}):
        run_isolated("benchmarks.models:export", job, timeout=timeout)
    return folder
