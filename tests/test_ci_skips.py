"""conftest.py's skip report: every skip is listed at the end of a run, and with ``CI`` set a
skip not on ``ALLOWED_SKIPS`` fails a run whose tests passed.

Each case is a real pytest run in a child process, on a generated test file and a conftest
that takes the hooks of this suite's conftest.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import NO_BF16

CONFTEST = Path(__file__).resolve().parent / "conftest.py"

HOOKS = f'''
import importlib.util

_spec = importlib.util.spec_from_file_location("suite_conftest", {str(CONFTEST)!r})
_suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_suite)
pytest_sessionstart = _suite.pytest_sessionstart
pytest_runtest_logreport = _suite.pytest_runtest_logreport
pytest_collectreport = _suite.pytest_collectreport
pytest_terminal_summary = _suite.pytest_terminal_summary
pytest_sessionfinish = _suite.pytest_sessionfinish
'''

ALLOWED = f'''
import pytest

@pytest.mark.skipif(True, reason={NO_BF16!r})
def test_bf16_marked():
    pass

def test_bf16_inside():
    pytest.skip({NO_BF16!r})

def test_passes():
    pass

@pytest.mark.xfail(reason="an expected failure is not a skip")
def test_xfails():
    assert False
'''

REFUSED = '''
import pytest

def test_needs_a_tool():
    pytest.skip("kubectl is not installed")
'''

MODULE_SKIP = '''
import pytest

pytest.importorskip("no_such_package_here")

def test_never_collected():
    pass
'''


def _start(folder: Path, files: dict[str, str]) -> subprocess.Popen:
    folder.mkdir()
    (folder / "pytest.ini").write_text("[pytest]\n")
    (folder / "conftest.py").write_text(HOOKS)
    for name, text in files.items():
        (folder / name).write_text(text)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("PYTEST_") and key != "CI"}
    env.update(CI="1", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")  # plugins: seconds of imports
    return subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                             "-c", str(folder / "pytest.ini"), str(folder)], cwd=folder,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_ci_fails_on_a_skip_off_the_allow_list_and_passes_an_allowed_one(tmp_path):
    # Both runs at once: each is mostly interpreter and import time.
    refused = _start(tmp_path / "refused", {"test_allowed.py": ALLOWED,
                                            "test_refused.py": REFUSED,
                                            "test_module_skip.py": MODULE_SKIP})
    allowed = _start(tmp_path / "allowed", {"test_allowed.py": ALLOWED})
    none = _start(tmp_path / "none", {"test_passes.py": "def test_passes():\n    pass\n"})
    out, _ = refused.communicate(timeout=120)
    assert refused.returncode == 1, out
    assert "1 passed, 4 skipped, 1 xfailed" in out  # every test passed: only the skips fail
    summary = out[out.index("= skipped: 4 ="):]
    assert "NOT ALLOWED  test_refused.py::test_needs_a_tool: kubectl is not installed" \
        in summary
    assert "NOT ALLOWED  test_module_skip.py: could not import 'no_such_package_here'" \
        in summary
    assert f"allowed  test_allowed.py::test_bf16_marked: {NO_BF16}" in summary
    assert f"allowed  test_allowed.py::test_bf16_inside: {NO_BF16}" in summary
    assert "test_xfails" not in summary
    assert "2 skip(s) not on ALLOWED_SKIPS (tests/conftest.py): CI fails the run" in summary

    out, _ = allowed.communicate(timeout=120)
    assert allowed.returncode == 0, out
    summary = out[out.index("= skipped: 2 ="):]
    assert "NOT ALLOWED" not in summary and "allowed because hardware:" in summary
    assert "1 passed, 2 skipped, 1 xfailed" in out

    out, _ = none.communicate(timeout=120)
    assert none.returncode == 0, out
    assert "skipped: none" in out  # CI's output says so when nothing skipped
