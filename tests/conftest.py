"""Shared fixtures: a small random-weight Demucs and its ONNX export, built once per session."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

SMALL_CONFIG = dict(channels=4, segment_length=44100)
BENCH_MACHINE = "test-box"
"""The machine name of the benchmark quick runs' results files."""
SERVER_FIXTURES = {"triton_server"}


def _cpu_has_bf16() -> bool:
    from stemserve.client.backends.openvino_session import cpu_has_bf16

    return cpu_has_bf16()


needs_bf16 = pytest.mark.skipif(
    not _cpu_has_bf16(), reason="this CPU has no bf16 arithmetic (AMX or AVX512_BF16): "
    "test_bf16.py::test_a_cpu_without_bf16_is_refused covers what stemserve does on it")
"""For tests that run OpenVINO in bf16 (the ``--bf16`` fast path)."""
ORACLE_FIXTURES = {"oracle", "oracle_model", "demucs_oracle"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tiers by what a test needs: a test on the session's tritonserver is a ``server``
    test, one on the official demucs an ``oracle`` test (modules mark the rest)."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & SERVER_FIXTURES:
            item.add_marker(pytest.mark.server)
        if names & ORACLE_FIXTURES:
            item.add_marker(pytest.mark.oracle)


@pytest.fixture(scope="session", autouse=True)
def stemserve_cache(tmp_path_factory) -> Path:
    """A cache folder of this session's own ($STEMSERVE_CACHE) for every test and every
    command they run: exports, repositories and jobs never land in the user's cache."""
    folder = tmp_path_factory.mktemp("cache")
    before = os.environ.get("STEMSERVE_CACHE")
    os.environ["STEMSERVE_CACHE"] = str(folder)
    yield folder
    if before is None:
        del os.environ["STEMSERVE_CACHE"]
    else:
        os.environ["STEMSERVE_CACHE"] = before


@pytest.fixture(scope="session")
def bench_quick_run(tmp_path_factory) -> Path:
    """``python -m benchmarks.run_all --quick`` once for every test of a benchmark script:
    the results folder it wrote (a temporary one, never benchmarks/results), with the
    ``BENCH_MACHINE`` files of every script's section."""
    out = tmp_path_factory.mktemp("bench-results")
    done = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--quick", "--machine",
                           BENCH_MACHINE, "--results-dir", str(out)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def small_model():
    """A random-weight Demucs v2 (4 channels, 1 s segments) and its CheckpointInfo."""
    import torch

    from stemserve.checkpoints import CheckpointInfo
    from stemserve.model import SOURCES, Demucs

    torch.manual_seed(1234)
    model = Demucs(SOURCES, **SMALL_CONFIG).eval()
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    digest = hashlib.sha256(repr(sorted((k, v.sum().item()) for k, v in state.items()))
                            .encode()).hexdigest()
    info = CheckpointInfo(name="small", path=Path("small.th"), sha256=digest,
                          config=dict(SMALL_CONFIG))
    return model, info


@pytest.fixture(scope="session")
def small_export(small_model, tmp_path_factory) -> Path:
    """Folder with ``model.onnx`` and ``model.json`` for :func:`small_model`."""
    from stemserve.export.to_onnx import export_onnx

    model, info = small_model
    out = tmp_path_factory.mktemp("export")
    export_onnx(model, info, out)
    return out


@pytest.fixture(scope="session")
def free_ports():
    """Returns free TCP ports on request, so parallel runs never fight over 8000-8002."""
    from stemserve.model_repository.ports import free_ports as ports

    return ports


@pytest.fixture(scope="session")
def triton_server(small_export, tmp_path_factory):
    """A real tritonserver serving :func:`small_export` on the CPU, started once per session
    by the same context manager as `stemserve separate --serve`.

    Its log goes to ``server-0.log`` in the fixture's folder; a failed start shows its tail.
    """
    from stemserve.model_repository.local import local_server

    root = tmp_path_factory.mktemp("triton")
    with local_server(small_export, root=root, logs=root) as server:
        yield server
