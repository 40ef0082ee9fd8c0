"""Triton's own load generator, perf_analyzer, against a fresh batching-on tritonserver: an
independent C++ client checking :mod:`.sweep`'s closed loop at the same levels and model.

Its wheel's binary is ``manylinux_2_38``; where it does not run as it is (Debian 12's glibc
2.36), :func:`provision` adds Debian trixie's libc6, libstdc++6 and libgcc-s1 (``apt-get
download`` in a private APT root) and runs it through trixie's loader.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from ..scenario import CACHE, Column, Scenario, option, tritonservers
from . import served

VERSION, PROVISIONED = "2.60.0", CACHE / "perf_analyzer"
BINARY, MANIFEST = "perf_analyzer/bin/perf_analyzer", "manifest.json"
LIBS = ("debian/usr/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu")


class Unavailable(RuntimeError):
    """perf_analyzer cannot run on this machine; the message says why."""


def _check(command: list, what: str, **kwargs) -> str:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode:
        tail = " / ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise Unavailable(f"{what} failed (exit {done.returncode}): {tail}")
    return (done.stdout + done.stderr).strip()


def _argv(root: Path) -> list[str]:
    libs = [str(root / folder) for folder in LIBS]  # trixie's, then the host's (libz, libssl)
    loader = [f"{libs[0]}/ld-linux-x86-64.so.2", "--library-path", ":".join(libs)]
    return [*(loader if Path(loader[0]).is_file() else []), str(root / BINARY)]


def _debian_libraries(apt: Path, root: Path) -> None:
    """Unpack trixie's C and C++ runtimes under ``root``, fetched through the APT root ``apt``."""
    for folder in ("etc/apt/preferences.d", "var/lib/apt/lists/partial", "debs"):
        (apt / folder).mkdir(parents=True)
    (apt / "etc/apt/sources.list").write_text(
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://deb.debian.org/debian trixie main\n")
    apt_get = ["apt-get", f"-oDir={apt}", "-oAcquire::http::Timeout=20",
               "-oAPT::Sandbox::User=root"]  # not _apt, who may not write the private root
    _check([*apt_get, "update"], "apt-get update (Debian trixie, for glibc 2.38)")
    _check([*apt_get, "download", "libc6", "libstdc++6", "libgcc-s1"], "download", cwd=apt / "debs")
    for deb in (apt / "debs").glob("*.deb"):
        _check(["dpkg-deb", "-x", deb, root / "debian"], f"dpkg-deb -x {deb.name}")


def provision(cache: Path = PROVISIONED, *, download: bool = True) -> list[str]:
    """The argv that runs perf_analyzer, provisioned once into ``cache/<version>`` (staged
    under a temporary name and renamed: a half-made cache is never reused)."""
    root = cache / VERSION
    if not (root / MANIFEST).is_file():
        if not download:
            raise Unavailable(f"{VERSION} is not provisioned in {root} and downloads are off")
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{VERSION}-", dir=cache) as tmp:
            _check([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--retries=1",
                    "--timeout=20", "--only-binary=:all:", "--platform=manylinux_2_38_x86_64",
                    f"--target={tmp}/root", f"perf-analyzer=={VERSION}"], "pip install")
            staged = Path(tmp) / "root"
            if subprocess.run([staged / BINARY, "--version"], capture_output=True).returncode:
                _debian_libraries(Path(tmp) / "apt", staged)
            reported = _check([*_argv(staged), "--version"], "perf_analyzer --version")
            (staged / MANIFEST).write_text(json.dumps({"ready": True, "version": reported}))
            staged.rename(root)  # OSError if a concurrent provisioning got there first
    return _argv(root)


def parse_csv(text: str) -> list[dict]:
    """Rows of an ``-f`` report (times in microseconds): latency in seconds, Triton's stage
    times in ms per request."""
    return [{"concurrency": int(row["Concurrency"]),
             "requests_per_s": float(row["Inferences/Second"]),
             "latency_s": {key: float(row[f"{key} latency"]) / 1e6
                           for key in ("p50", "p90", "p95", "p99")},
             "server": {f"{key}_ms": float(row[f"Server {key.replace('_', ' ').title()}"]) / 1e3
                        for key in served.STAGES}}
            for row in csv.DictReader(text.strip().splitlines())]


@dataclasses.dataclass(frozen=True)
class Config:
    channels: int = option(16, "width of the random-weight Demucs v2 (as serving.sweep)", quick=4)
    segment_s: float = option(2.0, "segment seconds", quick=1.0)
    concurrency: tuple[int, ...] = option((1, 2, 4, 8, 16), "requests in flight", quick=(1, 2))
    duration_s: float = option(10.0, "timed seconds per level, as three windows", quick=2.0)
    warmup: int = option(2, "untimed requests per client", quick=1)
    download: bool = option(True, "provision perf_analyzer when not cached (pip, apt-get)")


def _level(argv: list[str], url: str, spec, work: Path, clients: int, config: Config) -> dict:
    (report := work / f"c{clients}.csv").unlink(missing_ok=True)
    done = subprocess.run([
        *argv, "-m", spec.model_name, "-u", url, "-i", "grpc", "--input-data", str(work / "data"),
        "--shape", f"{spec.input_name}:2,{spec.padded_length}", "--concurrency-range",
        f"{clients}:{clients}:1", "--warmup-request-count", str(config.warmup * clients),
        "--measurement-mode", "time_windows", "--measurement-interval",  # 3 windows of 1.2x it
        str(max(1, round(config.duration_s * 1000 / 3.6))), "--max-trials", "3",
        "--stability-percentage", "1000", "-f", str(report)],
        capture_output=True, text=True, timeout=10 * config.duration_s + 120)
    if done.returncode or not (rows := parse_csv(report.read_text()) if report.is_file() else []):
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
        return {"status": f"failed: perf_analyzer exit {done.returncode}: " + " / ".join(tail)}
    return {**rows[0], "audio_s_per_s": rows[0]["requests_per_s"] * spec.segment_seconds,
            "status": "ok"}


def run(config: Config) -> list[dict]:
    rows = [{"series": "perf_analyzer", "concurrency": level} for level in config.concurrency]
    try:
        argv = provision(PROVISIONED, download=config.download)
    except (Unavailable, OSError) as err:  # OSError: apt-get missing, not an x86-64 binary
        return [{**row, "status": f"skipped: perf_analyzer unavailable: {err}"} for row in rows]
    folder, spec = served.export(config.channels, config.segment_s)
    work = served.WORK / "perf_analyzer"  # the server's log, the input and the reports
    try:
        with tritonservers(folder, work, dynamic_batching=True) as (triton,):
            (work / "data").mkdir(exist_ok=True)
            served.track(spec.padded_length, 0).tofile(work / "data" / spec.input_name)
            for row in rows:
                row.update(_level(argv, triton.grpc_url, spec, work, row["concurrency"], config))
    except Exception as err:  # noqa: BLE001 - a server that would not start, a level timed out
        for row in rows:
            row.setdefault("status", served.failed(err))
    return rows


SCENARIO = Scenario(
    name="serving.perf_analyzer", config=Config, run=run, plots=("concurrency",),
    title=f"Served model measured by Triton's perf_analyzer {VERSION} (batching on)",
    columns=tuple(Column(*column) for column in (
        ("concurrency", "clients"), ("requests_per_s", "req/s", ".2f"), ("audio_s_per_s",
        "audio s/s", ".2f"), ("latency_s.p50", "p50 s", ".3f"), ("latency_s.p95", "p95 s", ".3f"),
        ("latency_s.p99", "p99 s", ".3f"), ("server.queue_ms", "queue ms/req", ".1f"),
        ("server.compute_infer_ms", "compute ms/req", ".1f"), ("status", "status"))),
    notes=(f"perf_analyzer {VERSION} (sync gRPC, a thread per request in flight), a process per "
           "level on a fresh server with dynamic batching: warm-up, then 3 time windows adding up "
           "to duration_s, its stability rule relaxed to 1000 % (one fixed-length measurement). "
           "Client and server share the CPUs; queue and compute ms/req are Triton's.",))
