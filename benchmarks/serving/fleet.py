"""One client over several tritonservers: a batch of tracks separated the CLI's way (two in
flight per server) as servers are added, with ONNX Runtime on every core each, then cores split.
Servers sharing cores gain only by filling the gaps one leaves idle (gRPC, batching waits)."""
from __future__ import annotations

import dataclasses
import statistics
import time

import soundfile as sf
from stemserve.client import Separator
from stemserve.client.backends.fleet import FleetBackend
from stemserve.client.backends.triton import TritonBackend

from ..machine import usable_cpus
from ..scenario import Column, Scenario, option, tritonservers
from . import served

WORK = served.WORK / "fleet"


@dataclasses.dataclass(frozen=True)
class Config:
    channels: tuple[int, ...] = option((4, 32), "random-weight Demucs v2 widths", quick=(4,))
    segments_s: tuple[float, ...] = option((1.0, 2.0), "each model's segment seconds", quick=(1.0,))
    tracks: tuple[int, ...] = option((8, 4), "tracks of each model's batch", quick=(2,))
    track_s: tuple[float, ...] = option((20.0, 15.0), "each model's track seconds", quick=(3.0,))
    servers: tuple[int, ...] = option((1, 2, 3), "server counts", quick=(1, 2))
    repeats: int = option(3, "timed batches per configuration (the median is reported)", quick=1)


def _batch(client: str, servers: list, paths: list, repeats: int) -> dict:
    """The whole batch ``repeats`` times after one warm-up track; the median batch."""
    urls, walls, shares = [server.grpc_url for server in servers], [], []
    with (TritonBackend(urls[0]) if client == "triton" else FleetBackend(urls)) as backend:
        separator = Separator(backend)
        for batch in [paths[:1]] + [paths] * repeats:
            start = time.perf_counter()
            with served.cpu_share(servers) as share:
                for result in separator.separate_files(batch, WORK / "out", jobs=2 * len(urls)):
                    if result.error is not None:
                        raise result.error
            walls.append(time.perf_counter() - start)
            shares.append(share)
    audio = sum(sf.info(str(path)).duration for path in paths)
    wall = statistics.median(walls[1:])
    return {"status": "ok", "jobs": 2 * len(urls), "tracks": len(paths), "audio_s": audio,
            "wall_s": wall, "walls_s": walls[1:], "audio_s_per_s": audio / wall,
            "cpu_busy": statistics.median(share["cpu_busy"] for share in shares[1:]),
            "cpu_others": max(share["cpu_others"] for share in shares[1:])}


def _model(channels: int, segment_s: float, tracks: int, track_s: float,
           config: Config) -> list[dict]:
    folder, _ = served.export(channels, segment_s)
    WORK.mkdir(parents=True, exist_ok=True)
    paths = [WORK / f"track-{index}.wav" for index in range(tracks)]
    for index, path in enumerate(paths):
        sf.write(path, served.track(round(track_s * served.RATE), index).T, served.RATE, "FLOAT")
    rows = []
    for count in config.servers:
        for threads in [0] if count == 1 else [0, max(1, usable_cpus() // count)]:
            base = {"channels": channels, "segment_s": segment_s, "servers": count,
                    "threads": threads or usable_cpus()}
            clients = ["triton", "fleet"] if count == 1 else ["fleet"]
            try:
                with tritonservers(folder, WORK, count, intra_op_threads=threads) as servers:
                    rows += [{**base, "client": client,
                              **_batch(client, servers, paths, config.repeats)}
                             for client in clients]
            except Exception as err:  # noqa: BLE001 - the row says so, the others run
                rows += [{**base, "client": client, "status": served.failed(err)}
                         for client in clients]
    baseline = {row["client"]: row.get("audio_s_per_s") for row in rows}.get("triton")
    for row in rows:
        if baseline and row["status"] == "ok":
            row["speedup"] = row["audio_s_per_s"] / baseline
    return rows


def run(config: Config) -> list[dict]:
    return [row for model in zip(config.channels, config.segments_s, config.tracks,
                                 config.track_s, strict=True) for row in _model(*model, config)]


SCENARIO = Scenario(
    name="serving.fleet",
    title="One client over several tritonservers: throughput as servers are added",
    config=Config, run=run,
    columns=(Column("channels", "channels"), Column("client", "client"),
             Column("servers", "servers"), Column("threads", "threads / server"),
             Column("tracks", "tracks"), Column("audio_s", "audio s", ".0f"),
             Column("wall_s", "wall s", ".1f"), Column("audio_s_per_s", "audio s/s", ".1f"),
             Column("speedup", "speedup", ".2f"), Column("cpu_busy", "CPU busy", ".2f"),
             Column("cpu_others", "CPU others", ".2f"), Column("status", "status")),
    notes=(
        "Speedup: against the single-server client (`triton`) of the same model; wall: the "
        "median of the timed batches, after a warm-up track; threads: ONNX Runtime's, per "
        "server. CPU busy: the machine's use during a batch, as a share of all cores; CPU "
        "others: the largest share processes outside this benchmark and its servers took.",
    ))
