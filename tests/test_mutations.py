"""The suite can still fail: pipeline bugs planted in a copy of the package fail the tests
that should catch them.

Each mutation copies the package's source as pyproject.toml's package-dir maps it
(``stemserve/``, ``client/`` as ``stemserve/client``, ``export/`` as ``stemserve/export``,
``model_repository/`` as ``stemserve/model_repository``) into a temporary folder, replaces
one exact text (which must be there once: a refactor that moves it fails here loudly rather
than letting the check pass without a bug planted), and runs the tests meant to catch it in
a child pytest with the copy first on ``PYTHONPATH``. The child must fail: each of those
tests must, and every test that fails must fail with an ``AssertionError`` during its call
(no import, collection or setup errors). A plugin of the child records which file every
imported ``stemserve`` module came from: the copy, never the editable install. A control
run of the unmutated copy passes the fast lane's fixture tests.

The tests run per mutation are the fast lane's fixture tests (``test_pipeline_fixture.py``)
and one or two targeted oracle tests, on the torch backend where a backend is run (the
oracle's own network: the tightest bound). Which other oracle tests catch each mutation is
in ``MUTATIONS``' comments, measured with ``STEMSERVE_ERRORS_LOG`` (``tests/tolerance.py``)
over test_pipeline_oracle.py's torch and ONNX tests and test_pipeline_v4.py's torch tests.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from oracle_v2 import demucs2
from oracle_v4 import require_oracle
from tolerance import LOG_ENV

pytestmark = [pytest.mark.slow, pytest.mark.oracle]

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"stemserve": "stemserve", "client": "stemserve/client",
                "export": "stemserve/export", "model_repository": "stemserve/model_repository"}
"""Source folder in the repository -> its place in the copy (pyproject's package-dir)."""

FIXTURE_V2 = "tests/test_pipeline_fixture.py::test_pipeline_matches_the_official_demucs[v2]"
FIXTURE_V4 = "tests/test_pipeline_fixture.py::test_pipeline_matches_the_official_demucs[v4]"
V2_ORACLE = "tests/test_pipeline_oracle.py::test_matches_demucs_reference[torch-stereo-{}]"
V2_SHIFTS0 = V2_ORACLE.format("overlap0.25-shifts0")
V2_SHIFTS2 = V2_ORACLE.format("overlap0.25-shifts2")
V2_TRIM = "tests/test_pipeline_oracle.py::test_window_and_trim_are_demucs"
V4_ORACLE = "tests/test_pipeline_v4.py::test_matches_demucs_4[{}]"


@dataclasses.dataclass(frozen=True)
class Mutation:
    """A bug: ``old`` replaced by ``new`` in ``path`` (a path in the copy). ``catch``: the
    tests that must fail with it; the child runs them and both fixture tests (the one a
    mutation cannot reach passes)."""

    path: str
    old: str
    new: str
    catch: tuple[str, ...]


# The figures are the errors each bug gives, in float32 epsilons of the stems' peak (the
# bounds: fixture 16, v2 torch 4 and ONNX/Triton 12, v4 torch 6 and ONNX/Triton 200);
# "all" is every configuration of test_pipeline_oracle.py's torch and ONNX tests, and
# test_pipeline_v4.py's torch tests of htdemucs, hdemucs_mmi and mdx.
MUTATIONS = {
    # (a) The biased standard deviation (n instead of n - 1) in the normalisation.
    # Fixture v2 233, v4 161; v2 oracle all 16.7 to 21.0; v4 oracle only 2.4 to 5.7 (its
    # networks normalise their own input), under the bound.
    "biased-std": Mutation(
        "stemserve/pipeline.py",
        "    std = (m2 / (count - ddof)) ** 0.5\n",
        "    std = (m2 / count) ** 0.5\n",
        (FIXTURE_V2, FIXTURE_V4, V2_SHIFTS0)),
    # (b) A flat overlap-add window. Fixture v2 5.3e3, v4 2e6; v2 oracle all 1.5e5; v4
    # oracle all 3e6; test_window_and_trim_are_demucs.
    "flat-window": Mutation(
        "stemserve/pipeline.py",
        "    return (weight / weight.max()) ** np.float32(transition_power)\n",
        "    return np.ones_like(weight)\n",
        (FIXTURE_V2, FIXTURE_V4, V2_SHIFTS0, V2_TRIM)),
    # (c) One sample off: a segment read one sample late where demucs 4 and unshifted
    # demucs 2 cut the track (fixture v4 5e5; v2 oracle shifts 0 2.7e5; v4 oracle all
    # 8e5) ...
    "segment-offset": Mutation(
        "stemserve/pipeline.py",
        "            start = offset - (size - length) // 2 - segment.pass_.shift\n",
        "            start = offset - (size - length) // 2 - segment.pass_.shift + 1\n",
        (FIXTURE_V4, V2_SHIFTS0)),
    # ... where demucs 2 shifts inside each segment (fixture v2 2e5; v2 oracle shifts 2
    # 2.6e5) ...
    "shifted-offset": Mutation(
        "stemserve/pipeline.py",
        "            start = offset - self.max_shift + shift - (size - shifted) // 2\n",
        "            start = offset - self.max_shift + shift - (size - shifted) // 2 + 1\n",
        (FIXTURE_V2, V2_SHIFTS2)),
    # ... and an odd surplus trimmed on the left instead of the right (fixture v2 1.4e5,
    # v4 6e6; v2 oracle shifts 2 1.9e5; v4 oracle htdemucs and mdx 6.5e5;
    # test_window_and_trim_are_demucs).
    "trim": Mutation(
        "stemserve/pipeline.py",
        "    return array[..., delta // 2:delta // 2 + length]\n",
        "    return array[..., (delta + 1) // 2:(delta + 1) // 2 + length]\n",
        (FIXTURE_V2, FIXTURE_V4, V2_SHIFTS2, V2_TRIM)),
    # (d) Stems returned and written under each other's names. Everything, 6e6 to 1e7.
    "rotated-stems": Mutation(
        "stemserve/client/stems.py",
        "for index, name in enumerate(self.names)})",
        "for index, name in enumerate(self.names[1:] + self.names[:1])})",
        (FIXTURE_V2, FIXTURE_V4, V2_SHIFTS0)),
    # (e) The random shift applied in the other direction: demucs 2's, inside segments
    # (fixture v2 3.8e4; v2 oracle shifts 2 2.5e5) ...
    "mirrored-shift-v2": Mutation(
        "stemserve/pipeline.py",
        "            shift = self.rng.randint(0, self.max_shift)\n",
        "            shift = self.max_shift - self.rng.randint(0, self.max_shift)\n",
        (FIXTURE_V2, V2_SHIFTS2)),
    # ... and demucs 4's, around the split (fixture v4 4.6e6; v4 oracle all 4.5e6).
    "mirrored-shift-v4": Mutation(
        "stemserve/pipeline.py",
        "                    shift = self.max_shift - self.rng.randint(0, self.max_shift)\n",
        "                    shift = self.rng.randint(0, self.max_shift)\n",
        (FIXTURE_V4, V4_ORACLE.format("hdemucs_mmi"))),
    # (f) One entry of the bag's weight matrix changed: the first model's first source,
    # +0.5 (fixture v4 4.2e5; v4 oracle mdx 6e5). htdemucs_ft cannot show it: only its
    # first model is weighted for that source, and a single model's weight cancels out.
    "bag-weight": Mutation(
        "stemserve/pipeline.py",
        "    return members, [list(map(float, row)) for row in weights]\n",
        "    return members, [[float(value) + 0.5 * (i == j == 0) for j, value in "
        "enumerate(row)]\n                     for i, row in enumerate(weights)]\n",
        (FIXTURE_V4, V4_ORACLE.format("mdx"))),
}

_PROBE = '''
"""Records, for the parent test, every exception a test raised and where stemserve's
modules were imported from."""
import json
import os
import sys

_LOG = os.environ["STEMSERVE_MUTATION_LOG"]


def _write(entry):
    with open(_LOG, "a") as file:
        file.write(json.dumps(entry) + "\\n")


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None:
        _write(dict(kind="exception", test=item.nodeid, when=call.when,
                    type=call.excinfo.typename, message=str(call.excinfo.value)[:500]))
    elif call.when == "call":
        _write(dict(kind="passed", test=item.nodeid))


def pytest_collectreport(report):
    if report.failed:
        _write(dict(kind="collect-error", test=report.nodeid,
                    message=str(report.longrepr)[-2000:]))


def pytest_sessionfinish(session):
    _write(dict(kind="modules", files={
        name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())
        if name == "stemserve" or name.startswith("stemserve.")}))
'''


def make_copy(root: Path) -> Path:
    """The package's source as installed, under ``root``; returns ``root``."""
    for source, target in PACKAGE_DIRS.items():
        shutil.copytree(REPO / source, root / target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


def plant(root: Path, mutation: Mutation) -> None:
    path = root / mutation.path
    text = path.read_text()
    found = text.count(mutation.old)
    assert found == 1, (f"{mutation.path}: the text to mutate is there {found} times, not once "
                        f"(moved by a refactor? update MUTATIONS):\n{mutation.old}")
    path.write_text(text.replace(mutation.old, mutation.new))


def run_tests(root: Path, tests: tuple[str, ...], timeout: float = 900,
              errors_log: str | None = None) -> tuple[int, list, str]:
    """pytest on ``tests`` with the copy at ``root`` first on the path: (exit code, the
    probe's records, the output's tail). ``errors_log``: the child's
    ``STEMSERVE_ERRORS_LOG`` (``tests/tolerance.py``; none by default)."""
    (root / "stemserve_mutation_probe.py").write_text(_PROBE)
    log = root / "probe.jsonl"
    log.unlink(missing_ok=True)
    env = {key: value for key, value in os.environ.items() if key != LOG_ENV}
    if errors_log:
        env[LOG_ENV] = errors_log
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]]
                                                       if env.get("PYTHONPATH") else []))
    env["STEMSERVE_MUTATION_LOG"] = str(log)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    # The child runs in the copy's folder (so the repository's own stemserve/ is never
    # the current directory's), with the repository's configuration and tests.
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-p", "stemserve_mutation_probe", f"--rootdir={REPO}",
         "-c", str(REPO / "pyproject.toml"), "-o", "addopts=--strict-markers",
         *(str(REPO / test) for test in tests)],
        cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    records = [json.loads(line) for line in log.read_text().splitlines()] \
        if log.is_file() else []
    return done.returncode, records, (done.stdout + done.stderr)[-6000:]


def check_imported_from(root: Path, records: list, output: str) -> None:
    modules = [record["files"] for record in records if record["kind"] == "modules"]
    assert modules and modules[0].get("stemserve.pipeline"), \
        f"the child imported no stemserve.pipeline:\n{output}"
    inside = root.resolve()
    elsewhere = {name: file for name, file in modules[0].items()
                 if file is None or not Path(file).resolve().is_relative_to(inside)}
    assert not elsewhere, f"modules imported from outside the copy {root}: {elsewhere}"


@pytest.fixture(scope="module")
def control(tmp_path_factory) -> Path:
    """The unmutated copy passes the fast lane's fixture test: the copy works."""
    root = make_copy(tmp_path_factory.mktemp("control"))
    code, records, output = run_tests(root, (FIXTURE_V2, FIXTURE_V4))
    check_imported_from(root, records, output)
    assert code == 0, output
    return root


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_mutation_fails_the_tests_meant_to_catch_it(name, control, tmp_path):
    mutation = MUTATIONS[name]
    # The oracles, as the child's tests need them (missing: skipped here, failed under CI,
    # rather than the child's skips read as a mutation's failures).
    demucs2("demucs.utils")
    if any(test.startswith("tests/test_pipeline_v4.py") for test in mutation.catch):
        require_oracle()
    root = make_copy(tmp_path / "src")
    plant(root, mutation)
    started = time.monotonic()
    code, records, output = run_tests(root, tuple(dict.fromkeys(
        (FIXTURE_V2, FIXTURE_V4) + mutation.catch)))
    print(f"{name}: the child ran for {time.monotonic() - started:.1f} s")
    check_imported_from(root, records, output)
    assert code == 1, f"pytest exited {code} (1: tests failed), not a failure of its tests:\n" \
        f"{output}"
    problems = [record for record in records if record["kind"] == "collect-error"
                or (record["kind"] == "exception" and (record["when"] != "call"
                                                       or record["type"] != "AssertionError"))]
    assert not problems, f"{name}: errors that are not the tests' assertions: {problems}"
    failed = {record["test"] for record in records if record["kind"] == "exception"}
    missed = [test for test in mutation.catch if test not in failed]
    assert not missed, f"{name}: these tests passed with the bug planted: {missed}\n{output}"
    print(textwrap.indent("\n".join(
        f"{record['test']}: {record['message'].splitlines()[0]}" for record in records
        if record["kind"] == "exception"), "  "))
