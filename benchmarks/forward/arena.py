"""ONNX Runtime's CPU memory arena over the batch shapes of one track: each strategy runs them
in a fresh process (stemserve's CPU session otherwise): peak memory and each call's time."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ..isolated import IsolatedFailed, run_isolated
from ..machine import usable_cpus
from ..scenario import Column, Scenario, option
from .. import models
from .backends import describe

ARENAS = {"power_of_two": "ONNX Runtime's default, growing by powers of two",
          "same_as_requested": "growing by what is requested", "none": "no arena",
          "no_pattern": "the default arena without memory patterns (stemserve's)"}
STEPS = (("full_2", 2, 1.0), ("full_1", 1, 1.0), ("tail_1", 1, 0.75), ("warm_full_2", 2, 1.0))
"""(name, batch, share of a segment) of each call: 0.75, a two-segment track's tail."""


@dataclasses.dataclass(frozen=True)
class Config:
    families: tuple[str, ...] = option(("v2",), f"from {', '.join(models.FAMILIES)}")
    size: str = option("default", "the networks' size: default, small; v2 also medium, "
                       "RoFormers wide1", quick="small")
    segment: float = option(8.0, "seconds of audio per segment (the server sends 40)",
                            quick=1.0)
    arenas: tuple[str, ...] = option(tuple(ARENAS), f"from {', '.join(ARENAS)}")
    threads: int = option(usable_cpus(), "ONNX Runtime intra-op threads")
    timeout: float = option(1800.0, "seconds one arena's process may take")


def measure_arena(job: dict) -> dict:
    """The track's sequence of calls on a session with ``job["arena"]`` (run isolated)."""
    import numpy as np
    import onnxruntime as ort

    from stemserve.runtime.ort_session import cpu_session_options
    from stemserve.spec import load_export_spec

    spec = load_export_spec(Path(job["export"]))
    options = cpu_session_options(job["threads"])
    options.enable_mem_pattern = job["arena"] != "no_pattern"  # the others: ORT's default
    if job["arena"] == "none":
        options.enable_cpu_mem_arena = False
    elif job["arena"] == "same_as_requested":  # a process-wide arena (kSameAsRequested)
        memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                   ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(memory, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
        options.add_session_config_entry("session.use_env_allocators", "1")
    session = ort.InferenceSession(str(Path(job["export"]) / spec.onnx_file), options,
                                   providers=["CPUExecutionProvider"])
    rng, steps = np.random.default_rng(models.SEED), {}
    for name, batch, share in STEPS:
        shape = (batch, spec.audio_channels, spec.valid_length(int(share * spec.segment_length)))
        mix = rng.standard_normal(shape, dtype=np.float32)
        start = time.perf_counter()
        session.run(None, {spec.input_name: mix})
        steps[name] = time.perf_counter() - start
    return {"step_s": steps}


def run(config: Config) -> list[dict]:
    if unknown := sorted(set(config.arenas) - set(ARENAS)):
        raise SystemExit(f"unknown arenas {unknown}; choose from {', '.join(ARENAS)}")
    rows = []
    for family, arena in ((family, arena) for family in config.families
                          for arena in config.arenas):
        network = describe(family, config.size, config.segment)
        export = models.exported(family, config.size, segment_length=network["segment_length"],
                                 timeout=config.timeout)
        job = {"export": str(export), "threads": config.threads}
        row = {"family": family, "arena": arena, "what": ARENAS[arena],
               "segment_s": network["segment_s"]}
        try:
            row.update(run_isolated("benchmarks.forward.arena:measure_arena",
                                    dict(job, arena=arena), timeout=config.timeout), status="ok")
        except IsolatedFailed as err:
            row["status"] = f"failed: {err}"
        rows.append(row)
    return rows


SCENARIO = Scenario(
    name="forward.arena", title="ONNX Runtime's memory arena over a track's batch shapes",
    config=Config, run=run,
    columns=(Column("family", "family"), Column("arena", "arena"), Column("what", "what"),
             Column("status", "status"),
             *(Column(f"step_s.{name}", f"{name} s", ".2f") for name, _, _ in STEPS),
             Column("peak_rss_mib", "peak RSS MiB", ".0f")),
    notes=("Calls in order: batches of 2 full segments, 1 full segment, 1 tail of 0.75 segment "
           "(its valid length), 2 full segments again; one call each, seeded noise and weights. "
           "Peak RSS: its process's VmHWM, weights included; one process per arena, in turn.",),
)
