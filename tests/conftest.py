"""Shared fixtures: a small random-weight Demucs and its ONNX export, built once per session."""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

SMALL_CONFIG = dict(channels=4, segment_length=44100)
BENCH_MACHINE = "test-box"
"""The machine name of the benchmark quick runs' results files."""
SERVER_FIXTURES = {"triton_server"}


def _cpu_has_bf16() -> bool:
    from stemserve.runtime.openvino_session import cpu_has_bf16

    return cpu_has_bf16()


NO_BF16 = ("this CPU has no bf16 arithmetic (AMX or AVX512_BF16): "
           "test_bf16.py::test_a_cpu_without_bf16_is_refused covers what stemserve does on it")
needs_bf16 = pytest.mark.skipif(not _cpu_has_bf16(), reason=NO_BF16)
"""For tests that run OpenVINO in bf16 (the ``--bf16`` fast path)."""
ORACLE_FIXTURES = {"oracle", "oracle_model", "demucs_oracle"}

ALLOWED_SKIPS = {
    NO_BF16: "hardware: OpenVINO's bf16 needs AMX or AVX512_BF16, which no package can add; "
             "CI's machine kind may lack them, and the refusal is tested on any CPU",
}
"""The only skips CI accepts: a skip reason (its start) -> why it may skip there. With
``CI`` set, any other skip (a missing tool, oracle or package, an unset variable) fails the
run: .ci/run installs everything the tests need, so a skip there hides a test that did not
run. Every skip is listed at the end of the run, allowed or not."""


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: ...")
        reason = str(longrepr[2])
    else:
        reason = str(getattr(longrepr, "reprcrash", None) and longrepr.reprcrash.message
                     or longrepr)
    return reason.removeprefix("Skipped: ")


def skip_allowed(reason: str) -> str | None:
    """Why the skip of ``reason`` is on :data:`ALLOWED_SKIPS`, or None when it is not."""
    return next((why for allowed, why in ALLOWED_SKIPS.items() if reason.startswith(allowed)),
                None)


_skips: list[tuple[str, str]] = []
"""(test or collected file, reason) of every skip of this run."""


def _record_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):  # an xfail is not a skip
        _skips.append((report.nodeid, _skip_reason(report)))


def pytest_sessionstart(session: pytest.Session) -> None:
    _skips.clear()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _record_skip(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """Module-level skips (``importorskip`` at the top of a file) skip a whole file."""
    _record_skip(report)


def _refused_skips() -> list[tuple[str, str]]:
    return [(nodeid, reason) for nodeid, reason in _skips if skip_allowed(reason) is None]


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Every skip, with its reason and whether CI accepts it (:data:`ALLOWED_SKIPS`); a run
    without any says so, so that CI's output always answers what did not run."""
    if not _skips:
        terminalreporter.write_line("skipped: none")
        return
    write = terminalreporter.write_line
    terminalreporter.section(f"skipped: {len(_skips)}", sep="=")
    for nodeid, reason in _skips:
        why = skip_allowed(reason)
        write(f"{'allowed' if why else 'NOT ALLOWED'}  {nodeid}: {reason}")
        if why:
            write(f"    allowed because {why}")
    refused = _refused_skips()
    if refused:
        write(f"{len(refused)} skip(s) not on ALLOWED_SKIPS (tests/conftest.py): "
              + ("CI fails the run" if os.environ.get("CI") else "CI would fail this run"),
              red=True, bold=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With ``CI`` set, a skip not on :data:`ALLOWED_SKIPS` fails a run that passed."""
    if os.environ.get("CI") and _refused_skips() and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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


BENCH_RUN_ON_THEIR_OWN = {"serving.transport", "serving.perf_analyzer"}
"""Benchmark scenarios whose test runs ``--quick`` itself (test_bench_transport.py,
test_bench_perf_analyzer.py): the quick run leaves them out rather than run them twice."""


@pytest.fixture(scope="session")
def bench_quick_run(tmp_path_factory) -> Path:
    """``python -m benchmarks.run_all --quick`` once for every test of a benchmark scenario:
    the results folder it wrote (a temporary one, never benchmarks/results), with the
    ``BENCH_MACHINE`` files of every scenario's section but :data:`BENCH_RUN_ON_THEIR_OWN`."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:  # benchmarks/ is a folder of scripts, not an installed package
        sys.path.insert(0, root)
    from benchmarks.run_all import scenario_names

    names = [name for name in scenario_names() if name not in BENCH_RUN_ON_THEIR_OWN]
    out = tmp_path_factory.mktemp("bench-results")
    done = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--quick", "--machine",
                           BENCH_MACHINE, "--results-dir", str(out), "--only", ",".join(names)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def small_model():
    """A random-weight Demucs v2 (4 channels, 1 s segments) and its CheckpointInfo."""
    import torch

    from stemserve.checkpoints import CheckpointInfo
    from stemserve.defaults import SOURCES
    from stemserve.model import Demucs

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
    """Returns free TCP ports on request, so parallel runs never fight over 8000-8002.

    Only for servers that cannot be handed a bound socket or port 0 (tritonserver): start
    them through ``ports.start_on_free_ports`` (as ``local_servers`` does), which starts
    again on fresh ports when one was taken before the server bound it. ``stemserve web``
    takes ``--port 0`` (test_web.web_process); a port where nothing may answer is
    :func:`dead_port`.
    """
    from stemserve.model_repository.ports import free_ports as ports

    return ports


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port where nothing answers (a connection is refused) for the whole test:
    bound, never listening, so no other process can take it meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture(scope="session")
def triton_server(small_export, tmp_path_factory):
    """A real tritonserver serving :func:`small_export` on the CPU, started once per session
    by the same context manager as `stemserve separate --serve` (again on fresh ports if
    one was taken before the server bound it).

    Its log goes to ``server-0.log`` in the fixture's folder; a failed start shows its tail.
    """
    from stemserve.model_repository.local import local_server

    root = tmp_path_factory.mktemp("triton")
    with local_server(small_export, root=root, logs=root) as server:
        yield server
