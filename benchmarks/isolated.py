"""One measurement in a fresh Python process: its memory, thread pools and crashes its own.

    run_isolated("benchmarks.forward.backends:measure", {"batch": 2, ...}, timeout=600)

The child imports the named function, calls it with the job (a JSON object), and prints its
result (a JSON object) as the last ``RESULT`` line of stdout, with the child's CPU seconds and
peak resident memory added. ``pythonpath`` puts a folder first on the child's import path:
how a scenario runs a reference implementation installed apart (demucs 2.0.3 beside 4.0.1).
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .memory import peak_rss_mib

ROOT = Path(__file__).resolve().parents[1]


class IsolatedFailed(RuntimeError):
    """The child ended without a result: timed out, crashed, or raised (its last stderr line)."""


def run_isolated(function: str, job: dict, *, timeout: float,
                 pythonpath: Path | None = None) -> dict:
    """``function(job)`` (``"module:name"``) run in a child process; its result dict."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(pythonpath)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks.isolated", function,
                               json.dumps(job)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise IsolatedFailed(f"{function} timed out after {timeout:g} s") from None
    if done.stderr.strip():
        sys.stderr.write(done.stderr)
        sys.stderr.flush()
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not results:
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()]
        reason = tail[-1][:300] if tail else "no output"
        if done.returncode == -9:
            reason += " (killed: out of memory?)"
        raise IsolatedFailed(f"{function} exited {done.returncode}: {reason}")
    return json.loads(results[-1][len("RESULT "):])


def _child(function: str, job: str) -> None:
    module, name = function.split(":")
    target = getattr(importlib.import_module(module), name)
    cpu = time.process_time()
    result = target(json.loads(job))
    result.setdefault("cpu_s", time.process_time() - cpu)
    result.setdefault("peak_rss_mib", peak_rss_mib())
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    _child(*sys.argv[1:3])
