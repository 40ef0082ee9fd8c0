"""Triton's perf_analyzer as an independent load generator: provision it, run it, parse it.

    python -m benchmarks.perf_analyzer --provision              # download once, print argv
    python -m benchmarks.perf_analyzer --url 127.0.0.1:8001 --shape mix:2,94890 \\
        --concurrency 1,4 --duration 10                         # against a live server

The PyPI wheel ``perf-analyzer`` ships a ``manylinux_2_38`` binary (glibc 2.38, GCC 13's
libstdc++); Debian 12 has glibc 2.36, and pip there silently installs the do-nothing 0.1.0
placeholder. So :func:`provision` downloads the wheel for the 2.38 platform and, where the
binary does not run as it is, Debian trixie's ``libc6``, ``libstdc++6`` and ``libgcc-s1``
(``apt-get download`` with a private APT configuration: no root, nothing installed), unpacks
them next to it and runs the binary through trixie's own loader with ``--library-path``.
The host still provides the rest (libz, libssl, libcrypto), which the loader's ``--list``
checks before the cache is declared ready.

Each concurrency level is one perf_analyzer process measuring exactly three time windows
(its stability window) that add up to the requested duration: one fixed-length measurement
like the sweep's own. Its stability rule (three windows within 10 %) is relaxed to 1000 %:
on a shared 2-core machine it rarely converges, and a level that does not is dropped from
the CSV. The per-window rates are kept so the spread stays visible. ``--request-count`` is
not used: 2.60 divides the count by a window that its 1 s polling rounds up to whole
seconds (the clamp to first request / last response is computed and then discarded), so a
short run's throughput comes out low by up to a second's worth.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

VERSION = "2.60.0"
WHEEL_PLATFORM = "manylinux_2_38_x86_64"
DEBIAN_SUITE = "trixie"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEBIAN_PACKAGES = ("libc6", "libstdc++6", "libgcc-s1")
DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache" / "perf_analyzer"
#: Where the host's own shared libraries live (libz, libssl, libcrypto come from there).
HOST_LIBRARY_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu")
MANIFEST = "manifest.json"
#: perf_analyzer judges stability on its last 3 windows; each lasts 1.2x --measurement-interval.
STABILITY_WINDOWS = 3
WINDOW_STRETCH = 1.2

#: perf_analyzer's CSV columns (times in microseconds) -> (row key, sub-key, divisor).
CSV_FIELDS = {
    "Inferences/Second": ("inferences_per_s", None, 1),
    "p50 latency": ("latency_s", "p50", 1e6),
    "p90 latency": ("latency_s", "p90", 1e6),
    "p95 latency": ("latency_s", "p95", 1e6),
    "p99 latency": ("latency_s", "p99", 1e6),
    "Avg latency": ("latency_s", "mean", 1e6),
    "Client Send": ("client", "send_ms", 1e3),
    "Client Recv": ("client", "recv_ms", 1e3),
    "Network+Server Send/Recv": ("client", "network_ms", 1e3),
    "Server Queue": ("server", "queue_ms", 1e3),
    "Server Compute Input": ("server", "compute_input_ms", 1e3),
    "Server Compute Infer": ("server", "compute_infer_ms", 1e3),
    "Server Compute Output": ("server", "compute_output_ms", 1e3),
}


class PerfAnalyzerUnavailable(RuntimeError):
    """perf_analyzer cannot run on this machine; the message says why."""


def _check(command: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise PerfAnalyzerUnavailable(f"{what} failed (exit {done.returncode}): "
                                      + " / ".join(tail))
    return done


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _argv(root: Path, manifest: dict) -> list[str]:
    binary = str(root / manifest["binary"])
    if not manifest.get("loader"):
        return [binary]
    paths = [str(root / item) for item in manifest["library_path"]] + list(HOST_LIBRARY_DIRS)
    return [str(root / manifest["loader"]), "--library-path", ":".join(paths), binary]


def _download_wheel(version: str, work: Path) -> Path:
    _check([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--retries", "1", "--timeout", "20",  # offline, fail in seconds, not minutes
            "--only-binary=:all:", "--platform", WHEEL_PLATFORM, "--dest", str(work / "wheel"),
            f"perf-analyzer=={version}"], f"pip download perf-analyzer=={version}")
    (wheel,) = (work / "wheel").glob("perf_analyzer-*.whl")
    return wheel


def _debian_libraries(work: Path, root: Path) -> dict[str, str]:
    """Unpack trixie's C and C++ runtimes under ``root``; {package file: sha256}."""
    missing = [tool for tool in ("apt-get", "dpkg-deb") if not shutil.which(tool)]
    if missing:
        raise PerfAnalyzerUnavailable(
            f"the perf_analyzer binary needs glibc 2.38 and this machine's is "
            f"{platform.libc_ver()[1] or 'unknown'}; a newer one would come from Debian "
            f"{DEBIAN_SUITE} but {', '.join(missing)} is not installed")
    apt = work / "apt"
    for folder in ("lists/partial", "cache/archives/partial", "etc/sources.list.d",
                   "etc/preferences.d", "debs"):
        (apt / folder).mkdir(parents=True, exist_ok=True)
    (apt / "status").touch()
    (apt / "etc/sources.list").write_text(
        f"deb [signed-by={DEBIAN_KEYRING}] {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n")
    settings = {"Dir::State": apt, "Dir::State::Lists": apt / "lists",
                "Dir::State::status": apt / "status", "Dir::Cache": apt / "cache",
                "Dir::Etc::SourceList": apt / "etc/sources.list",
                "Dir::Etc::SourceParts": apt / "etc/sources.list.d",
                "Dir::Etc::Preferences": apt / "etc/preferences",
                "Dir::Etc::PreferencesParts": apt / "etc/preferences.d",
                "Debug::NoLocking": "true", "APT::Architecture": "amd64",
                "Acquire::http::Timeout": "20"}
    if os.geteuid() == 0:  # else apt drops to _apt, which may not write this private folder
        settings["APT::Sandbox::User"] = "root"
    (apt / "apt.conf").write_text("".join(f'{key} "{value}";\n' for key, value in settings.items()))
    env = {**os.environ, "APT_CONFIG": str(apt / "apt.conf")}
    _check(["apt-get", "update"], f"apt-get update (Debian {DEBIAN_SUITE})", env=env)
    _check(["apt-get", "download", *DEBIAN_PACKAGES], f"apt-get download {DEBIAN_PACKAGES}",
           env=env, cwd=apt / "debs")
    debs = {}
    for deb in sorted((apt / "debs").glob("*.deb")):
        _check(["dpkg-deb", "-x", str(deb), str(root)], f"dpkg-deb -x {deb.name}")
        debs[deb.name] = _sha256(deb)
    return debs


def provision(cache: Path = DEFAULT_CACHE, *, version: str = VERSION,
              download: bool = True) -> list[str]:
    """The argv prefix that runs perf_analyzer ``version``, provisioning it once into ``cache``.

    A second call finds ``cache/<version>/manifest.json`` and downloads nothing. The folder
    is built under a temporary name and renamed into place, so an interrupted or concurrent
    provisioning never leaves a half-made cache. Raises :class:`PerfAnalyzerUnavailable`
    with the reason when it cannot run here (or is not cached and ``download`` is false).
    """
    root = Path(cache) / version
    if (root / MANIFEST).is_file():
        return _argv(root, json.loads((root / MANIFEST).read_text()))
    if not download:
        raise PerfAnalyzerUnavailable(f"perf_analyzer {version} is not provisioned in {root} "
                                      "and downloading is off")
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise PerfAnalyzerUnavailable(f"the perf-analyzer wheel is for x86_64 Linux only, "
                                      f"not {sys.platform}/{platform.machine()}")
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{version}-", dir=root.parent) as tmp:
        work, staged = Path(tmp) / "work", Path(tmp) / "root"
        wheel = _download_wheel(version, work)
        with zipfile.ZipFile(wheel) as archive:
            archive.extract("perf_analyzer/bin/perf_analyzer", staged)
        binary = "perf_analyzer/bin/perf_analyzer"
        (staged / binary).chmod(0o755)
        manifest: dict = {"version": version, "wheel": wheel.name, "wheel_sha256": _sha256(wheel),
                          "binary": binary, "loader": None, "library_path": [], "debian": {}}
        if subprocess.run([str(staged / binary), "--version"], capture_output=True).returncode:
            manifest["debian"] = _debian_libraries(work, staged / "debian")
            libdir = "debian/usr/lib/x86_64-linux-gnu"
            manifest.update(loader=f"{libdir}/ld-linux-x86-64.so.2", library_path=[libdir])
        argv = _argv(staged, manifest)
        if manifest["loader"]:
            listed = _check([*argv[:3], "--list", argv[3]], "the loader's --list").stdout
            unresolved = [line.split()[0] for line in listed.splitlines() if "not found" in line]
            if unresolved:
                raise PerfAnalyzerUnavailable("perf_analyzer needs shared libraries this "
                                              f"machine lacks: {', '.join(unresolved)}")
        reported = _check([*argv, "--version"], "perf_analyzer --version")
        manifest["version_output"] = (reported.stdout + reported.stderr).strip()
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        try:
            staged.rename(root)
        except OSError:  # a concurrent provisioning got there first: use its copy
            if not (root / MANIFEST).is_file():
                raise
    return _argv(root, json.loads((root / MANIFEST).read_text()))


def parse_csv(text: str) -> list[dict]:
    """Rows of a perf_analyzer ``-f`` report: seconds for latency, ms for the stage times."""
    lines = text.strip().splitlines()
    table = lines[:lines.index("")] if "" in lines else lines  # metrics may follow a blank line
    reader = csv.DictReader(io.StringIO("\n".join(table)))
    if not reader.fieldnames or not {"Concurrency", "Inferences/Second"} <= set(reader.fieldnames):
        raise ValueError(f"not a perf_analyzer concurrency report: {reader.fieldnames}")
    rows = []
    for record in reader:
        row: dict = {"concurrency": int(record["Concurrency"])}
        for column, (key, sub, divisor) in CSV_FIELDS.items():
            if record.get(column) not in (None, ""):
                value = float(record[column]) / divisor
                if sub:
                    row.setdefault(key, {})[sub] = value
                else:
                    row[key] = value
        rows.append(row)
    return rows


def parse_console(output: str) -> dict:
    """What perf_analyzer's verbose console report adds to the CSV.

    The timed request count, each window's rate (``-v``), and Triton's inference and
    execution counts, whose ratio is the average batch the server formed.
    """
    found = {key: int(match.group(1)) for key, label in
             (("requests", "Request count"), ("inferences", "Inference count"),
              ("executions", "Execution count"))
             if (match := re.search(rf"{label}: (\d+)", output))}
    windows = re.findall(r"Pass \[\d+\] throughput: ([0-9.]+) infer/sec", output)
    if windows:
        found["window_infer_per_s"] = [float(value) for value in windows]
    if found.get("executions"):
        found["avg_batch"] = found["inferences"] / found["executions"]
    return found


def run(argv: Sequence[str], url: str, model: str, inputs: Mapping[str, np.ndarray],
        concurrency: Sequence[int], *, duration_s: float,
        warmup: Mapping[int, int] | None = None) -> list[dict]:
    """One perf_analyzer process per concurrency level against the gRPC server at ``url``.

    ``inputs`` are one batch-1 request's tensors (without the batch dimension, already in the
    model's data type): each is sent as it is, so the load is the same data the caller uses.
    Each level is timed for about ``duration_s`` after ``warmup[c]`` untimed requests. A
    level that fails gets a row with ``status`` "failed: ..." and the others still run.
    """
    interval_ms = max(1, round(duration_s * 1000 / (STABILITY_WINDOWS * WINDOW_STRETCH)))
    rows = []
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        shapes = []
        for name, array in inputs.items():
            np.ascontiguousarray(array).tofile(data / name)
            shapes += ["--shape", f"{name}:{','.join(str(dim) for dim in array.shape)}"]
        for clients in concurrency:
            report = Path(tmp) / f"c{clients}.csv"
            command = [*argv, "-m", model, "-u", url, "-i", "grpc", *shapes,
                       "--input-data", str(data), "--concurrency-range", f"{clients}:{clients}:1",
                       "--warmup-request-count", str((warmup or {}).get(clients, 0)),
                       "--measurement-mode", "time_windows",
                       "--measurement-interval", str(interval_ms),
                       "--stability-percentage", "1000",
                       "--max-trials", str(STABILITY_WINDOWS),
                       "-v", "--verbose-csv", "-f", str(report)]  # verbose: windows, mean latency
            row: dict = {"concurrency": clients, "measurement_interval_ms": interval_ms}
            began = time.perf_counter()
            try:
                done = subprocess.run(command, capture_output=True, text=True,
                                      timeout=10 * duration_s + 120)
            except subprocess.TimeoutExpired as err:
                rows.append({**row, "status": f"failed: no result within {err.timeout:g} s"})
                continue
            row["wall_s"] = time.perf_counter() - began
            parsed = parse_csv(report.read_text()) if report.is_file() else []
            if done.returncode or not parsed:
                tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
                rows.append({**row, "status": f"failed (exit {done.returncode}): "
                                              + " / ".join(tail)})
                continue
            rows.append({**row, **parsed[0], **parse_console(done.stdout), "status": "ok"})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf_analyzer",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--provision", action="store_true",
                        help="provision into the cache and print the argv prefix")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--pa-version", default=VERSION,
                        help=f"perf-analyzer release to provision ({VERSION})")
    parser.add_argument("--url", help="gRPC host:port of a live server to measure")
    parser.add_argument("--model", default="demucs")
    parser.add_argument("--shape", default="mix:2,94890",
                        help="input name:dims of one request, filled with random normal data")
    parser.add_argument("--concurrency", default="1", help="comma-separated levels (1)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="timed seconds per level (10)")
    args = parser.parse_args(argv)
    if not (args.provision or args.url):
        parser.error("give --provision, --url or both")
    try:
        prefix = provision(args.cache, version=args.pa_version)
    except PerfAnalyzerUnavailable as err:
        print(f"perf_analyzer unavailable: {err}", file=sys.stderr)
        return 1
    print(" ".join(prefix))
    if args.url:
        name, dims = args.shape.split(":")
        shape = [int(dim) for dim in dims.split(",")]
        data = (0.1 * np.random.default_rng(0).standard_normal(shape)).astype(np.float32)
        levels = [int(item) for item in args.concurrency.split(",") if item]
        rows = run(prefix, args.url, args.model, {name: data}, levels,
                   duration_s=args.duration)
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
