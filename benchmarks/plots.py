"""PNG plots from a results file, chosen by the fields its rows carry.

    python -m benchmarks.plots                                  # every results/*.json
    python -m benchmarks.plots benchmarks/results/amd-epyc-2c.json

A scenario names the plots it wants (``Scenario.plots``); each is drawn from rows carrying
the fields below; rows whose ``status`` is not ``"ok"`` are left out. Plots are written beside the JSON
as ``<machine>-<section>-<plot>.png`` and the markdown is rewritten to embed them.

``per_item``, ``cpu_per_item`` and ``gflops`` (the network alone)
    rows: ``backend`` (str), ``batch`` (int), ``per_item_s`` (float), ``gflops`` (float);
    optional ``forward_min_s``/``forward_max_s`` (error bars) and ``cpu_per_item_s``.
    ``ceiling_gflops`` (float) on any row, if present, is drawn as the matmul ceiling.

``concurrency`` (the server sweep; also any transport comparison by concurrency)
    rows: ``series`` (str: e.g. ``"batching on"``, ``"batching off"``, ``"grpc"``,
    ``"shm"``), ``concurrency`` (int clients), ``audio_s_per_s`` (float: seconds of audio
    separated per wall second; ``requests_per_s`` is used where it is absent) and
    ``latency_s`` (``{"p50", "p95", "p99"}`` seconds). Rows with a ``reference_line``
    (str label, e.g. ``"in-process ONNX Runtime"``) and an ``audio_s_per_s`` are drawn as
    horizontal lines on the throughput panel instead.

``stages`` (whole tracks)
    rows: ``series`` (str: ``"triton"``, ``"onnx"``, ``"torch"``), ``track_s`` (float, the
    track's length), ``stages_s`` (``{stage name: seconds}``, in pipeline order). One
    stacked horizontal bar per row.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from .results import (DEFAULT_RESULTS_DIR, ResultsError, get, load, plot_name, save_section,
                      write_markdown)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(section: dict, *fields: str) -> list[dict]:
    return [row for row in section["rows"] if row.get("status", "ok") == "ok"
            and all(get(row, field) is not None for field in fields)]


def _groups(rows: list[dict], key: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row[key]), []).append(row)
    return groups


def _title(section: dict, what: str) -> str:
    machine = section.get("machine", {})
    return f"{what}\n{machine.get('cpu_model', '?')}, {machine.get('usable_cpus', '?')} CPUs"


def _save(fig, path: Path) -> Path:
    """Lay out, write and release a figure (pyplot keeps every open figure in memory)."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def _batch_axes(plt, ax, rows: list[dict], xlabel: str, ylabel: str) -> None:
    """Batch sizes on a log2 axis with plain tick labels, y from 0, legend beside the plot."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({row["batch"] for row in rows}))
    ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_per_item(section: dict, path: Path, key: str = "per_item_s",
                  what: str = "wall time per segment (median, bars: min-max)") -> Path | None:
    """Seconds per item vs batch size, one line per backend (bars: fastest to slowest run)."""
    rows = _ok(section, "backend", "batch", key)
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5))
    for name, group in _groups(rows, "backend").items():
        group.sort(key=lambda row: row["batch"])
        batches = [row["batch"] for row in group]
        values = [row[key] for row in group]
        errors = None
        if key == "per_item_s" and all("forward_min_s" in row for row in group):
            errors = [[value - row["forward_min_s"] / row["batch"] for value, row in zip(values, group)],
                      [row["forward_max_s"] / row["batch"] - value for value, row in zip(values, group)]]
        ax.errorbar(batches, values, yerr=errors, marker="o", capsize=3, label=name)
    segment = section.get("config", {}).get("segment_s")
    unit = "CPU seconds" if key.startswith("cpu") else "seconds"
    _batch_axes(plt, ax, rows, "batch size (segments per forward call)",
                f"{unit} per {segment:g} s segment" if segment else f"{unit} per item")
    ax.set_title(_title(section, f"Model forward: {what} (lower is better)"))
    return _save(fig, path)


def plot_cpu_per_item(section: dict, path: Path) -> Path | None:
    """CPU seconds per item vs batch size: the steadier view on a shared machine."""
    return plot_per_item(section, path, key="cpu_per_item_s",
                         what="CPU time per segment, all threads (median)")


def plot_gflops(section: dict, path: Path) -> Path | None:
    """Achieved GFLOP/s vs batch size per backend, with the measured matmul ceiling."""
    rows = _ok(section, "backend", "batch", "gflops")
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5))
    for name, group in _groups(rows, "backend").items():
        group.sort(key=lambda row: row["batch"])
        ax.plot([row["batch"] for row in group], [row["gflops"] for row in group],
                marker="o", label=name)
    ceiling = next((row["ceiling_gflops"] for row in section["rows"]
                    if row.get("ceiling_gflops")), None)
    if ceiling:
        ax.axhline(ceiling, color="black", linestyle="--",
                   label=f"fp32 matmul ceiling {ceiling:.0f} GFLOP/s")
    _batch_axes(plt, ax, rows, "batch size", "GFLOP/s (counted FLOPs / wall time)")
    ax.set_title(_title(section, "Model forward: achieved rate (higher is better)"))
    return _save(fig, path)


def plot_concurrency(section: dict, path: Path) -> Path | None:
    """Throughput and p95 latency vs concurrent clients, one line per series."""
    lines = [row for row in section["rows"] if row.get("reference_line")]
    rows = _ok(section, "series", "concurrency", "latency_s.p95")
    rate_key = "audio_s_per_s" if all(get(r, "audio_s_per_s") is not None for r in rows) \
        else "requests_per_s"
    rows = [row for row in rows if get(row, rate_key) is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    for name, group in _groups(rows, "series").items():
        group.sort(key=lambda row: row["concurrency"])
        clients = [row["concurrency"] for row in group]
        top.plot(clients, [row[rate_key] for row in group], marker="o", label=name)
        bottom.plot(clients, [row["latency_s"]["p95"] for row in group], marker="o", label=name)
    for line in lines:
        if line.get(rate_key) is not None:
            top.axhline(line[rate_key], linestyle="--", color="gray", label=line["reference_line"])
    top.set_ylabel("audio seconds separated per second" if rate_key == "audio_s_per_s"
                   else "requests per second")
    bottom.set_ylabel("p95 latency (s)")
    bottom.set_xlabel("concurrent clients")
    bottom.set_xscale("log", base=2)
    bottom.set_xticks(sorted({row["concurrency"] for row in rows}))
    bottom.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    for ax in (top, bottom):
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    top.set_title(_title(section, f"{section.get('title', 'Server')}: throughput and p95 latency"))
    return _save(fig, path)


def plot_stages(section: dict, path: Path) -> Path | None:
    """Wall time split by pipeline stage: one stacked bar per series and track length."""
    rows = _ok(section, "series", "stages_s")
    if not rows:
        return None
    plt = _pyplot()
    stages: list[str] = []
    for row in rows:
        stages += [stage for stage in row["stages_s"] if stage not in stages]
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
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(stages), 4), loc="lower right")
    ax.set_title(_title(section, f"{section.get('title', 'End to end')}: time per stage"))
    return _save(fig, path)


#: Plot name -> function(section, path) -> path or None (None: the rows lack its fields).
PLOTS = {"per_item": plot_per_item, "cpu_per_item": plot_cpu_per_item, "gflops": plot_gflops, "concurrency": plot_concurrency,
         "stages": plot_stages}


def save_and_plot(section: dict, *, results_dir: Path, machine: str, plots: tuple[str, ...],
                  log: Callable[[str], None]) -> Path:
    """Save a scenario's section, then redraw only its own ``plots`` and the markdown.

    The other sections' PNGs stay as their scenarios left them. Without matplotlib (the bench
    extras) the numbers are saved and the plots skipped.
    """
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
    json_path = Path(json_path)
    data = load(json_path)
    written = []
    for name, section in data["sections"].items():
        for plot, draw in PLOTS.items():
            target = json_path.parent / plot_name(data["machine_name"], name, plot)
            if draw(section, target):
                written.append(target)
            elif target.exists():
                target.unlink()  # stale: the section no longer has data for it
    write_markdown(data, json_path.with_suffix(".md"))
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plots", description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", type=Path,
                        help=f"results JSON files (default: all in {DEFAULT_RESULTS_DIR})")
    args = parser.parse_args(argv)
    written = []
    for path in args.files or sorted(DEFAULT_RESULTS_DIR.glob("*.json")):
        try:
            written += plot_results(path)
        except ResultsError as err:
            raise SystemExit(f"{path}: {err}") from None
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
