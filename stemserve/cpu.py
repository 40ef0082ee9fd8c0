"""What this CPU offers the CPU fast paths, from Linux's ``/proc/cpuinfo``. No imports beyond
the standard library.

Which int8 quantization pays (VNNI) and whether bf16 runs on AMX tiles or only on
AVX512_BF16 dot products depend on the CPU's flags; the bf16 self-check's cached result
(:mod:`stemserve.runtime.openvino_session`) is kept per CPU model and flags. Where
there is no ``/proc/cpuinfo`` the CPU has no name and no flags, and each path takes its
cautious choice.
"""
from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_info() -> dict[str, str]:
    """The fields of ``/proc/cpuinfo``'s first processor (the others repeat its model and
    flags); empty where it cannot be read."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    return fields


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) Processor"), "" if unknown."""
    return cpu_info().get("model name", "")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel names them (``avx512_bf16``, ``amx_tile``)."""
    return frozenset(cpu_info().get("flags", "").split())


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has int8 dot-product instructions (VNNI)."""
    return bool({"avx512_vnni", "avx_vnni"} & cpu_flags())


def bf16_flags() -> tuple[str, ...]:
    """The CPU's flags that say how it multiplies bf16 (``avx512_bf16``, ``amx_*``), sorted."""
    return tuple(sorted(flag for flag in cpu_flags()
                        if "bf16" in flag or flag.startswith("amx")))


def bf16_kind() -> str | None:
    """``"amx"`` (bf16 matrix tiles), ``"avx512_bf16"`` (bf16 dot products, no AMX), or None
    (no bf16 arithmetic, or flags unknown): what decides whether bf16 beats fp32."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return None
