"""Resident memory of benchmark processes: a process's own peak, and a server's over time.

Linux only (``/proc``). Not ``getrusage``: Linux carries ``ru_maxrss`` across exec, so a
spawned child would report at least its parent's size, and it cannot see a process group.
"""
from __future__ import annotations

import threading
import time
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
    among its mappers, is the de-duplicated figure. Reading it costs about 80 ms for a
    server stub holding a 400 MB network (the kernel walks its page tables), so it is
    sampled every ``pss_interval`` seconds only: at the RSS's 0.2 s it took a fifth of a core
    from the measured server.
    """

    def __init__(self, pgid: int, interval: float = 0.2, pss_interval: float = 5.0):
        self.pgid = pgid
        self.interval, self.pss_interval = interval, pss_interval
        self._pss_due = 0.0
        self.peak_mib = 0.0
        self.peak_pss_mib = 0.0
        self._hwm: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="group-memory", daemon=True)

    def _sample(self, pss: bool = False) -> None:
        pss = pss or time.monotonic() >= self._pss_due
        total = proportional = 0.0
        for pid in group_pids(self.pgid):
            total += _status_mib(pid, "VmRSS") or 0.0
            proportional += (pss_mib(pid) or 0.0) if pss else 0.0
            hwm = peak_rss_mib(pid)
            if hwm is not None:
                self._hwm[pid] = max(hwm, self._hwm.get(pid, 0.0))
        self.peak_mib = max(self.peak_mib, total)
        if pss:
            self.peak_pss_mib = max(self.peak_pss_mib, proportional)
            self._pss_due = time.monotonic() + self.pss_interval

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
        self._sample(pss=True)

    @property
    def sum_of_peaks_mib(self) -> float:
        """Each process's own peak, summed: an upper bound of the group's footprint."""
        return sum(self._hwm.values())
