"""What machine a result came from: CPU, cores, memory, GPU, load and package versions.

The description is recorded in every result section, and :func:`machine_name` derives the
results file's name from it (``amd-epyc-2c``; ``...-nvidia-h100-80gb-hbm3`` with a GPU), so
results from different machines never overwrite each other.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from stemserve.cpu import cpu_info

from .timing import loadavg

#: Distributions whose versions every result records (absent ones are recorded as None).
PACKAGES = ("stemserve", "torch", "onnxruntime", "onnxruntime-gpu", "openvino", "onnx", "numpy",
            "julius", "onnxslim", "matplotlib", "tritonclient")

#: CPU flags that decide which kernels (and which precisions) can run fast.
INTERESTING_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw",
                     "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16",
                     "amx_tile", "amx_fp16")


def _memory_bytes(path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        match = re.search(r"MemTotal:\s*(\d+)\s*kB", path.read_text())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gpus() -> list[dict]:
    """GPUs that ``nvidia-smi`` reports (name, memory, driver); empty without one."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
             "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.strip().splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 3:
            found.append({"name": parts[0], "memory_mib": int(float(parts[1])),
                          "driver": parts[2]})
    return found


def versions() -> dict[str, str | None]:
    """Python and the installed versions of :data:`PACKAGES`, plus ONNX Runtime's providers."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    try:
        import onnxruntime

        found["onnxruntime_providers"] = ",".join(onnxruntime.get_available_providers())
    except ImportError:
        pass
    return found


def describe() -> dict:
    """Everything about this machine that a reader needs to judge a number measured on it."""
    info = cpu_info()
    flags = set(info.get("flags", "").split())
    memory = _memory_bytes()
    return {
        "hostname": platform.node(),
        "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_vendor": info.get("vendor_id"),
        "cpu_family_model": (f"{info.get('cpu family')}/{info.get('model')}"
                             if "cpu family" in info else None),
        "cpu_flags": sorted(flags.intersection(INTERESTING_FLAGS)),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "memory_gib": round(memory / 2**30, 1) if memory else None,
        "gpus": gpus(),
        "os": platform.platform(),
        "loadavg": loadavg(),
        "versions": versions(),
    }


def slug(text: str) -> str:
    """Lower-case ASCII words joined by dashes: ``"AMD EPYC 7B13"`` -> ``"amd-epyc-7b13"``."""
    text = re.sub(r"\((r|tm)\)|cpu @.*|\d+-core processor", " ", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def machine_name(description: dict | None = None) -> str:
    """Default results name: the CPU model's slug, the core count, and the first GPU if any."""
    description = description or describe()
    name = f"{slug(description['cpu_model'])}-{description['usable_cpus']}c"
    if description["gpus"]:
        name += "-" + slug(description["gpus"][0]["name"])
    return name


def command_line() -> str:
    """The command that produced a result, as one would type it again."""
    argv = list(sys.argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        argv = ["python", "-m", spec.name.removesuffix(".__main__")] + argv[1:]
    else:
        argv = ["python"] + argv
    return shlex.join(argv)


def now() -> str:
    """The current time, ISO 8601 in UTC to the second."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
