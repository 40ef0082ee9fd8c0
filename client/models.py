"""Which model a name means: an export folder, a cached export, a release, a checkpoint file.

The one module of the client that may reach PyTorch, and only lazily: a name that resolves
to an export needs none; a release or a checkpoint without an export is loaded (and
exported once, into the cache) with the ``export`` extra.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from stemserve.defaults import export_root
from stemserve.errors import CheckpointError, ModelError
from stemserve.files import file_sha256
from stemserve.spec import SIDECAR_FILE, has_precision, is_export, load_export

if TYPE_CHECKING:
    from stemserve.checkpoints import Bag

logger = logging.getLogger(__name__)


def export_dir_for(model: str | Path, config: str | None = None,
                   precision: str = "fp32") -> Path:
    """An ONNX export of ``model``: the folder itself, ``<export root>/<name>``, or a new one.

    Exporting needs PyTorch and happens once; later runs, from any working directory, reuse
    the folder under :func:`~stemserve.defaults.export_root` (a checkpoint file changed
    since its export is exported again). ``config`` is the release whose configuration a
    plain state-dict file has. A bag of models exports every member. ``precision``
    ``int8`` also quantizes the export once (ONNX Runtime only, no PyTorch); ``bf16`` adds
    its sidecar (the fp32 graph, run by OpenVINO).
    """
    local = local_export(model)
    if local is None:
        local = _export(model, config)
    if precision == "int8" and not has_precision(local, "int8"):
        from stemserve.export.quantize import quantize_export

        logger.info("quantizing %s to int8 (once)", local)
        quantize_export(local)
    if precision == "bf16" and not has_precision(local, "bf16"):
        from stemserve.export.bf16 import bf16_export

        bf16_export(local)
    return local


def _export(model: str | Path, config: str | None) -> Path:
    bag = load_models(model, config)
    from stemserve.export.to_onnx import export_bag  # torch is there: the load needed it

    out = export_root() / bag.name
    logger.info("no ONNX export of %s yet: exporting %s to %s (once; about a minute per "
                "full-size model)", model,
                "it" if len(bag.models) == 1 else f"its {len(bag.models)} models", out)
    start = time.perf_counter()
    export_bag(bag, out)
    logger.info("exported %s in %.1f s", model, time.perf_counter() - start)
    return out


def local_export(model: str | Path | None) -> Path | None:
    """The up-to-date export folder ``model`` names: itself, or ``<export root>/<name>``."""
    if model is None:
        return None
    path = Path(model)
    if is_export(path):
        return path
    folder = export_root() / path.stem
    if not is_export(folder):
        return None
    layout = load_export(folder)
    if path.is_file() and len(layout.members) == 1:  # one checkpoint file, one sidecar
        sidecar = layout.members[0][0] / SIDECAR_FILE
        if path.stat().st_mtime > sidecar.stat().st_mtime \
                and layout.spec.checkpoint_sha256 != file_sha256(path):
            logger.info("%s changed since it was exported to %s: exporting it again", path,
                        folder)
            return None
    return folder


def load_models(model: str | Path, config: str | None = None) -> Bag:
    """The :class:`~stemserve.checkpoints.Bag` (of one, for a single model) of a release
    name, bag YAML or checkpoint file, with clear errors."""
    try:
        from stemserve.checkpoints import load_bag
    except ImportError as err:
        raise ModelError(f"loading a checkpoint needs PyTorch ({err}); install "
                         "'stemserve[export]' or use --backend triton", where=str(model)) \
            from None
    try:
        return load_bag(str(model), config=config)
    except CheckpointError as err:
        raise err.about(f"model {model}") from None
