"""What the serving scenarios share: the model served, the load put on it, and what the
server and the machine did meanwhile (every figure here comes from a shared machine)."""
from __future__ import annotations

import contextlib
import math
import os
import queue
import statistics
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from stemserve.spec import ModelSpec

from ..memory import group_pids
from ..models import exported
from ..scenario import CACHE
from ..timing import percentiles

RATE = 44100
WORK = CACHE / "serving"  # each scenario's folder of server logs (git-ignored)
WAIT_S = 300.0  # seconds a request may wait for its answer before the measurement fails
STAGES = ("queue", "compute_input", "compute_infer", "compute_output")


def export(channels: int, segment_s: float) -> tuple[Path, ModelSpec]:
    """A random-weight Demucs v2 ``channels`` wide for ``segment_s`` segments (cached)."""
    out = exported("v2", f"c{channels}", segment_length=round(segment_s * RATE))
    return out, ModelSpec.load(out / "model.json")


def track(samples: int, seed: int) -> np.ndarray:
    """``[2, samples]`` float32 stereo: a chord and noise, different for every seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / RATE
    tones = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in rng.uniform(80, 900, 3))
    return (0.2 * tones + 0.1 * rng.standard_normal((2, t.size))).astype(np.float32)


def failed(err: BaseException) -> str:
    return f"failed: {type(err).__name__}: {err}"


def latency(samples: Sequence[float]) -> dict:
    """Percentiles, mean and range of latencies, in seconds."""
    return {**percentiles(samples), "mean": statistics.fmean(samples), "min": min(samples),
            "max": max(samples)}


def counters(url: str, model: str) -> dict:
    """Triton's cumulative counts of ``model`` and nanoseconds in each stage."""
    import tritonclient.grpc as grpcclient

    time.sleep(0.1)  # Triton counts a request just after its response
    with contextlib.closing(grpcclient.InferenceServerClient(url)) as client:
        (stats,) = client.get_inference_statistics(model, as_json=True)["model_stats"]
    infer = stats.get("inference_stats", {})
    return {"inferences": int(stats.get("inference_count") or 0),
            "executions": int(stats.get("execution_count") or 0),
            **{f"{key}_{unit}": int(infer.get(key, {}).get(unit) or 0)
               for key in ("success", *STAGES) for unit in ("count", "ns")}}


def server_delta(before: dict, after: dict) -> dict:
    """What the server did between two :func:`counters`: ms per request in each stage (a
    batch's time counts once for each request in it) and the average batch it formed."""
    delta = {key: after[key] - before[key] for key in after}
    return {"requests": delta["success_count"], "inferences": delta["inferences"],
            "executions": delta["executions"],
            "avg_batch": delta["inferences"] / delta["executions"] if delta["executions"] else None,
            **{f"{key}_ms": delta[f"{key}_ns"] / delta[f"{key}_count"] / 1e6
               if delta[f"{key}_count"] else None for key in STAGES}}


def closed_loop(backend, mix: np.ndarray, *, in_flight: int, warmup: int, requests: int | None,
                budget_s: float, server: tuple[str, str] | None = None) -> dict:
    """Keeps ``in_flight`` requests outstanding through ``backend.submit``, as the pipeline does:
    ``warmup`` untimed answers, the window drained, then ``requests`` timed ones (fewer once
    ``budget_s`` is spent), with Triton's statistics over them given ``server`` (url, model)."""
    done: queue.Queue = queue.Queue()

    def send() -> None:
        start = time.perf_counter()
        backend.submit(mix).add_done_callback(
            lambda future: done.put((future, time.perf_counter() - start)))

    def phase(count: float, budget: float) -> list[float]:
        began, sent, latencies = time.perf_counter(), int(min(in_flight, count)), []
        for _ in range(sent):
            send()
        while len(latencies) < sent:
            future, seconds = done.get(timeout=WAIT_S)
            future.result()  # a failed request fails the measurement
            latencies.append(seconds)
            if sent < count and time.perf_counter() - began < budget:
                send()
                sent += 1
        return latencies

    phase(warmup, math.inf)
    before = counters(*server) if server else None
    cpu, began = time.process_time(), time.perf_counter()
    latencies = phase(math.inf if requests is None else requests, budget_s)
    elapsed = time.perf_counter() - began
    got = {"requests": len(latencies), "elapsed_s": elapsed,
           "requests_per_s": len(latencies) / elapsed, "latency_s": latency(latencies),
           "client_cpu_s_per_request": (time.process_time() - cpu) / len(latencies)}
    if server:
        got["server"] = server_delta(before, counters(*server))
        got["avg_batch"] = got["server"]["avg_batch"]
    return got


def _ticks(servers: Sequence) -> tuple[int, int, float]:
    """CPU ticks so far: the machine's busy and total, and this benchmark's (this process,
    the children it reaped, and the process groups of its running ``servers``)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    own = sum(os.times()[:4]) * os.sysconf("SC_CLK_TCK")
    for pid in [pid for server in servers for pid in group_pids(server.pid)]:
        with contextlib.suppress(OSError):  # gone meanwhile
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            own += int(stat[11]) + int(stat[12])  # utime, stime
    return sum(fields) - fields[3] - fields[4], sum(fields), own


@contextlib.contextmanager
def cpu_share(servers: Sequence) -> Iterator[dict]:
    """Fills the yielded dict with the block's CPU use as a share of all cores: the machine's
    (``cpu_busy``) and that of processes outside this benchmark and ``servers`` (``cpu_others``)."""
    share: dict = {}
    start = _ticks(servers)
    yield share
    busy, total, own = (after - before for after, before in zip(_ticks(servers), start))
    share.update(cpu_busy=busy / max(total, 1), cpu_others=max(0, busy - own) / max(total, 1))
