"""Resident memory of benchmark processes: a process's own peak, and a server's over time.

Linux only (``/proc``). Not ``getrusage``: Linux carries ``ru_maxrss`` across exec, so a
spawned child would report at least its parent's size, and it cannot see a process group.
"""
from __future__ import annotations

import threading
from pathlib import Path


def _status_mib(pid: int | str, field: str) -> float | None:
    """``VmHWM`` (peak) or ``VmRSS`` (now) of ``pid``, in MiB; None once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def pss_mib(pid: int | str) -> float | None:
    """The proportional set size of ``pid`` in MiB (each shared page divided among the
    processes mapping it), or None once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib(pid: int | str = "self") -> float | None:
    """The peak resident memory (VmHWM) of ``pid`` (this process by default), in MiB."""
    return _status_mib(pid, "VmHWM")


def group_pids(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` (a server and the backend stubs it starts)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ...
            pids.append(int(stat.parent.name))
    return pids


class GroupMemory:
    """Samples the summed RSS of a process group until stopped: its peak footprint.

    The sum of each process's own peak (VmHWM) over-counts when the peaks came at different
    times; sampling the sum gives the footprint the machine actually had to hold, to within
    the sampling interval. Both are reported. The summed RSS still counts shared memory
    once per process that maps it (Triton's python backend exchanges tensors through a
    region mapped by the server and its stub, and the server maps the client's regions
    too): the peak of the summed PSS (``peak_pss_mib``), which divides each shared page
    among its mappers, is the de-duplicated figure.
    """

    def __init__(self, pgid: int, interval: float = 0.2):
        self.pgid = pgid
        self.interval = interval
        self.peak_mib = 0.0
        self.peak_pss_mib = 0.0
        self._hwm: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="group-memory", daemon=True)

    def _sample(self) -> None:
        total = proportional = 0.0
        for pid in group_pids(self.pgid):
            total += _status_mib(pid, "VmRSS") or 0.0
            proportional += pss_mib(pid) or 0.0
            hwm = peak_rss_mib(pid)
            if hwm is not None:
                self._hwm[pid] = max(hwm, self._hwm.get(pid, 0.0))
        self.peak_mib = max(self.peak_mib, total)
        self.peak_pss_mib = max(self.peak_pss_mib, proportional)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "GroupMemory":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def sum_of_peaks_mib(self) -> float:
        """Each process's own peak, summed: an upper bound of the group's footprint."""
        return sum(self._hwm.values())
