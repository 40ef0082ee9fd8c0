"""PNG plots of a results section, drawn from the fields its rows carry.

A scenario names the plots it wants (``Scenario.plots``); rows whose ``status`` is not
``"ok"`` are left out. Plots are written beside the JSON as ``<machine>-<section>-<plot>.png``
and the markdown embeds them.

``per_item``, ``cpu_per_item`` and ``gflops`` (the network alone)
    rows: ``backend`` (str), ``batch`` (int), ``per_item_s``, ``cpu_per_item_s`` or
    ``gflops`` (float); ``ceiling_gflops`` on any row is drawn as the matmul ceiling.

``concurrency`` (serving)
    rows: ``series`` (str: e.g. ``"batching on"``), ``concurrency`` (int clients),
    ``audio_s_per_s`` (seconds of audio separated per wall second; ``requests_per_s`` where it
    is absent) and ``latency_s`` (``{"p50", "p95", "p99"}`` seconds). Rows with a
    ``reference_line`` (a label) and a rate are drawn as horizontal lines instead.

``stages`` (whole tracks)
    rows: ``series`` (str), ``track_s`` (float), ``stages_s`` (``{stage: seconds}``, in
    pipeline order). One stacked horizontal bar per row.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .results import get, load, plot_name, save_section, write_markdown


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(section: dict, *fields: str) -> list[dict]:
    return [row for row in section["rows"] if row.get("status", "ok") == "ok"
            and all(get(row, field) is not None for field in fields)]


def _groups(rows: list[dict], key: str, order: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda row: row[order]):
        groups.setdefault(str(row[key]), []).append(row)
    return groups


def _finish(fig, ax, section: dict, what: str, path: Path) -> Path:
    """Title with the machine, y from 0, grid, legend; write and release the figure."""
    machine = section.get("machine", {})
    ax.set_title(f"{section['title']}: {what}\n{machine.get('cpu_model', '?')}, "
                 f"{machine.get('usable_cpus', '?')} CPUs")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def _log2_axis(plt, ax, values: set, label: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(values))
    ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel(label)


def _by_batch(key: str, ylabel: str, what: str) -> Callable[[dict, Path], Path | None]:
    """A plot of ``key`` against batch size, one line per backend."""
    def draw(section: dict, path: Path) -> Path | None:
        rows = _ok(section, "backend", "batch", key)
        if not rows:
            return None
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(10, 5))
        for name, group in _groups(rows, "backend", "batch").items():
            ax.plot([row["batch"] for row in group], [row[key] for row in group],
                    marker="o", label=name)
        ceiling = next((row["ceiling_gflops"] for row in rows if row.get("ceiling_gflops")),
                       None)
        if key == "gflops" and ceiling:
            ax.axhline(ceiling, color="black", linestyle="--",
                       label=f"fp32 matmul ceiling {ceiling:.0f} GFLOP/s")
        _log2_axis(plt, ax, {row["batch"] for row in rows}, "batch size (segments per call)")
        ax.set_ylabel(ylabel)
        return _finish(fig, ax, section, what, path)
    return draw


def plot_concurrency(section: dict, path: Path) -> Path | None:
    """Throughput and p95 latency against concurrent clients, one line per series."""
    rows = _ok(section, "series", "concurrency", "latency_s.p95")
    rate = ("audio_s_per_s" if all(get(row, "audio_s_per_s") is not None for row in rows)
            else "requests_per_s")
    rows = [row for row in rows if get(row, rate) is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    for name, group in _groups(rows, "series", "concurrency").items():
        clients = [row["concurrency"] for row in group]
        top.plot(clients, [row[rate] for row in group], marker="o", label=name)
        bottom.plot(clients, [row["latency_s"]["p95"] for row in group], marker="o", label=name)
    for line in section["rows"]:
        if line.get("reference_line") and line.get(rate) is not None:
            top.axhline(line[rate], linestyle="--", color="gray", label=line["reference_line"])
    top.set_ylabel(rate.replace("_", " ").replace(" s per s", " s per second"))
    bottom.set_ylabel("p95 latency (s)")
    _log2_axis(plt, bottom, {row["concurrency"] for row in rows}, "concurrent clients")
    top.set_ylim(bottom=0)
    top.grid(True, alpha=0.3)
    top.legend(fontsize=8)
    return _finish(fig, bottom, section, "throughput and p95 latency", path)


def plot_stages(section: dict, path: Path) -> Path | None:
    """Wall time split by pipeline stage: one stacked bar per row."""
    rows = _ok(section, "series", "stages_s")
    if not rows:
        return None
    plt = _pyplot()
    stages = list(dict.fromkeys(stage for row in sorted(rows, key=lambda r: -len(r["stages_s"]))
                                for stage in row["stages_s"]))
    labels = [f"{row['series']}, {row['track_s']:g} s track" if row.get("track_s") is not None
              else str(row["series"]) for row in rows]
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.5 * len(rows)))
    left = [0.0] * len(rows)
    for stage in stages:
        widths = [float(row["stages_s"].get(stage) or 0.0) for row in rows]
        ax.barh(labels, widths, left=left, label=stage)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    return _finish(fig, ax, section, "time per stage", path)


PLOTS: dict[str, Callable[[dict, Path], Path | None]] = {
    "per_item": _by_batch("per_item_s", "seconds per segment", "wall time per segment"),
    "cpu_per_item": _by_batch("cpu_per_item_s", "CPU seconds per segment",
                              "CPU time per segment, all threads"),
    "gflops": _by_batch("gflops", "GFLOP/s (counted FLOPs / wall time)", "achieved rate"),
    "concurrency": plot_concurrency, "stages": plot_stages}
"""Plot name -> function(section, path) -> path, or None where the rows lack its fields."""


def save_and_plot(section: dict, *, results_dir: Path, machine: str, plots: tuple[str, ...],
                  log: Callable[[str], None]) -> Path:
    """Save a scenario's section, then redraw its own ``plots`` and the markdown (the other
    sections' PNGs stay). Without matplotlib (the bench extras) the plots are skipped."""
    path = save_section(section, results_dir=results_dir, machine=machine)
    log(f"wrote {path}")
    try:
        for plot in plots:
            target = path.parent / plot_name(machine, section["scenario"], plot)
            if PLOTS[plot](load(path)["sections"][section["scenario"]], target):
                log(f"wrote {target}")
    except ImportError as err:
        log(f"plots skipped: {err}")
    write_markdown(load(path), path.with_suffix(".md"))
    return path


def plot_results(json_path: Path) -> list[Path]:
    """Draw every plot the file's sections have data for; re-embed them in the markdown."""
    data = load(json_path)
    written = []
    for name, section in data["sections"].items():
        for plot, draw in PLOTS.items():
            target = Path(json_path).parent / plot_name(data["machine_name"], name, plot)
            if draw(section, target):
                written.append(target)
            elif target.exists():
                target.unlink()  # stale: the section no longer has data for it
    write_markdown(data, Path(json_path).with_suffix(".md"))
    return written
