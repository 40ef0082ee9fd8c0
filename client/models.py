"""Which model a name means: an export folder, a cached export, a release, a checkpoint file.

The one module of the client that may reach PyTorch, and only lazily: a name that resolves
to an export needs none; a release or a checkpoint without an export is loaded (and
exported once, into the cache) with the ``export`` extra.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stemserve.defaults import export_root
from stemserve.errors import CheckpointError, ModelError
from stemserve.files import file_sha256
from stemserve.spec import load_export_spec

if TYPE_CHECKING:
    from stemserve.checkpoints import CheckpointInfo

logger = logging.getLogger(__name__)


def export_dir_for(model: str | Path, config: str | None = None) -> Path:
    """An ONNX export of ``model``: the folder itself, ``<export root>/<name>``, or a new one.

    Exporting needs PyTorch and happens once; later runs, from any working directory, reuse
    the folder under :func:`~stemserve.defaults.export_root` (a checkpoint file changed
    since its export is exported again). ``config`` is the release whose configuration a
    plain state-dict file has.
    """
    local = local_export(model)
    if local is not None:
        return local
    torch_model, info = load_checkpoint(model, config)
    from stemserve.export.to_onnx import export_onnx  # torch is there: the load needed it

    out = export_root() / info.name
    logger.info("no ONNX export of %s yet: exporting it to %s (once; about a minute for the "
                "full-size model)", model, out)
    start = time.perf_counter()
    export_onnx(torch_model, info, out)
    logger.info("exported %s in %.1f s", model, time.perf_counter() - start)
    return out


def local_export(model: str | Path | None) -> Path | None:
    """The up-to-date export folder ``model`` names: itself, or ``<export root>/<name>``."""
    if model is None:
        return None
    path = Path(model)
    if (path / "model.json").is_file():
        return path
    folder = export_root() / path.stem
    sidecar = folder / "model.json"
    if not sidecar.is_file():
        return None
    if path.is_file() and path.stat().st_mtime > sidecar.stat().st_mtime \
            and load_export_spec(folder).checkpoint_sha256 != file_sha256(path):
        logger.info("%s changed since it was exported to %s: exporting it again", path, folder)
        return None
    return folder


def load_checkpoint(model: str | Path, config: str | None = None) -> tuple[Any, CheckpointInfo]:
    """(network, CheckpointInfo) for a release name or checkpoint file, with clear errors."""
    try:
        from stemserve.checkpoints import load_model
    except ImportError as err:
        raise ModelError(f"loading a checkpoint needs PyTorch ({err}); install "
                         "'stemserve[export]' or use --backend triton", where=str(model)) \
            from None
    try:
        return load_model(str(model), config=config)
    except CheckpointError as err:
        raise err.about(f"model {model}") from None
