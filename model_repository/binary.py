"""The local ``tritonserver`` binary: the one in the ``nvidia-pytriton`` wheel, made runnable.

The wheel (version 2.51, the NGC 24.10 release) carries the python backend but no
onnxruntime backend; the CPU model repository therefore runs ONNX Runtime inside a
python-backend model. Its server folder cannot be used in place: the python backend looks
for its stub next to ``libtriton_python.so``, so :func:`prepare_server_dir` makes a writable
copy, in stemserve's cache, with the stub that matches this interpreter.
"""
from __future__ import annotations

import errno
import importlib.metadata
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from stemserve.defaults import cache_root
from stemserve.errors import ServerError

logger = logging.getLogger(__name__)

PYTRITON_DIST = "nvidia-pytriton"


def pytriton_paths() -> tuple[str, Path, Path]:
    """Version, server folder and vendored-library folder of the installed nvidia-pytriton."""
    try:
        dist = importlib.metadata.distribution(PYTRITON_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ServerError(
            f"no local tritonserver: the {PYTRITON_DIST} wheel is not installed; "
            "install it with `pip install stemserve[server]`") from None
    server = Path(dist.locate_file("pytriton/tritonserver"))
    libs = Path(dist.locate_file("nvidia_pytriton.libs"))
    if not (server / "bin" / "tritonserver").is_file():
        raise ServerError(f"{server / 'bin' / 'tritonserver'} is missing: "
                             f"reinstall {PYTRITON_DIST}")
    return dist.version, server, libs


def prepare_server_dir() -> Path:
    """A writable copy of the wheel's server folder with this interpreter's python stub.

    Built once per wheel version and Python version under :func:`cache_root`, in a temporary
    folder renamed into place, so concurrent callers never see a half-copied server.
    """
    version, source, _ = pytriton_paths()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    target = cache_root() / f"tritonserver-{version}-py{python}"
    stub = source / "python_backend_stubs" / python / "triton_python_backend_stub"
    if (target / ".complete").exists():
        return target
    if not stub.is_file():
        raise ServerError(f"{PYTRITON_DIST} {version} has no python backend stub for "
                             f"Python {python} ({stub} is missing)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=target.parent))
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
        shutil.copy2(stub, staging / "backends" / "python" / stub.name)
        (staging / ".complete").touch()
        try:
            staging.rename(target)
        except OSError as err:  # another process finished first: use its copy
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("prepared tritonserver %s for Python %s in %s", version, python, target)
    return target


