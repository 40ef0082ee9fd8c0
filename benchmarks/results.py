"""The results file: one JSON per machine, one section per scenario, and its markdown table.

``benchmarks/results/<machine-name>.json`` (schema version 2)::

    {
      "schema_version": 2,
      "machine_name": "amd-epyc-2c",
      "machine": {...},            # benchmarks.machine.describe() at the latest write
      "updated": "2026-01-01T00:00:00+00:00",
      "sections": {
        "<scenario>": {            # e.g. "forward.backends"; a rerun replaces its own section
          "scenario": "forward.backends",
          "title": "The network alone, per backend and batch",
          "command": "python -m benchmarks.run_all forward.backends --quick",
          "started": "...", "finished": "...", "duration_s": 1234.5,
          "machine": {...},        # describe() when the scenario started (load included)
          "config": {...},         # the scenario's config dataclass, as run
          "notes": ["..."],        # what was measured and how, beside the numbers
          "columns": [{"key": "per_item_s", "title": "s/item", "format": ".3f"}, ...],
          "rows": [{...}, ...]     # one record per measurement; keys may be dotted paths
        }
      }
    }

Every scenario is saved through :func:`save_section` (this is the one results writer), and
each section's ``columns`` tell :func:`write_markdown` what to put in its table. The row
fields that the plots read are documented in :mod:`benchmarks.plots`.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
from pathlib import Path
from typing import Any, Iterator

from stemserve.files import atomic_write

from .machine import command_line, describe, machine_name, now

SCHEMA_VERSION = 2
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"
SECTION_KEYS = ("scenario", "title", "command", "started", "finished", "duration_s", "machine",
                "config", "notes", "columns", "rows")


class ResultsError(ValueError):
    """A results file or section that does not follow the schema."""


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark script takes: where results go and under what name."""
    parser.add_argument("--machine", default=None,
                        help="results name (default: CPU model slug + usable CPUs [+ GPU])")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR,
                        help=f"folder of the results files (default: {DEFAULT_RESULTS_DIR})")


def results_path(results_dir: Path, machine: str) -> Path:
    return Path(results_dir) / f"{machine}.json"


def plot_name(machine: str, section: str, plot: str) -> str:
    """File name of a section's plot: ``<machine>-<section>-<plot>.png``."""
    return f"{machine}-{section}-{plot}.png"


def new_section(scenario: str, title: str, *, config: dict, machine: dict | None = None) -> dict:
    """An empty section for ``scenario``, stamped with the command line, time and machine."""
    return {"scenario": scenario, "title": title, "command": command_line(), "started": now(),
            "finished": None, "duration_s": None, "machine": machine or describe(),
            "config": config, "notes": [], "columns": [], "rows": []}


def get(row: dict, key: str, default: Any = None) -> Any:
    """``row["a"]["b"]`` for ``key="a.b"``; ``default`` where any step is missing."""
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return default
        value = value[part]
    return value


def validate_section(section: dict) -> None:
    """Raise :class:`ResultsError` unless ``section`` has the schema's keys and types."""
    missing = [key for key in SECTION_KEYS if key not in section]
    problems = [f"lacks {missing}"] if missing else [
        what for what, bad in (
            ("rows must be a list of objects", not isinstance(section["rows"], list)
             or not all(isinstance(row, dict) for row in section["rows"])),
            ("each column needs a key and a title", not isinstance(section["columns"], list)
             or not all(isinstance(c, dict) and {"key", "title"} <= set(c)
                        for c in section["columns"])),
            ("notes must be a list of strings", not isinstance(section["notes"], list)
             or not all(isinstance(note, str) for note in section["notes"])),
            ("command must be the command line that produced it",
             not isinstance(section["command"], str) or not section["command"])) if bad]
    if problems:
        raise ResultsError(f"section {section.get('scenario')!r}: {'; '.join(problems)}")


def validate(data: dict) -> None:
    """Raise :class:`ResultsError` unless ``data`` is a well-formed results file."""
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ResultsError(f"schema_version {data.get('schema_version')!r}, "
                           f"expected {SCHEMA_VERSION}")
    if not {"machine_name", "machine", "sections"} <= set(data):
        raise ResultsError("results need a machine_name, a machine and sections")
    for section in data["sections"].values():
        validate_section(section)


def load(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    validate(data)
    return data


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside ``path`` so two scripts never interleave their writes."""
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become None (JSON has neither), paths strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def save_section(section: dict, *, results_dir: Path = DEFAULT_RESULTS_DIR,
                 machine: str | None = None) -> Path:
    """Merge ``section`` into ``<results_dir>/<machine>.json`` and rewrite the markdown.

    The section replaces any earlier one of the same scenario; the other sections stay.
    Returns the JSON path.
    """
    section = _clean(dict(section))
    section["finished"] = section.get("finished") or now()
    validate_section(section)
    machine = machine or machine_name(section["machine"])
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_path(results_dir, machine)
    with _locked(path):
        if path.exists():
            data = load(path)
        else:
            data = {"schema_version": SCHEMA_VERSION, "machine_name": machine, "sections": {}}
        data["machine"] = section["machine"]
        data["updated"] = now()
        data["sections"][section["scenario"]] = section
        validate(data)
        with atomic_write(path, "w") as file:
            file.write(json.dumps(data, indent=1, sort_keys=False) + "\n")
        write_markdown(data, path.with_suffix(".md"))
    return path


def _format(value: Any, fmt: str | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and fmt:
        try:
            return format(value, fmt)
        except (TypeError, ValueError):
            pass
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(item, None) for item in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: list[dict], rows: list[dict]) -> str:
    """A GitHub markdown table of ``rows`` with ``columns`` ({key, title, format?})."""
    lines = ["| " + " | ".join(column["title"] for column in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_format(get(row, column["key"]), column.get("format"))
                                       for column in columns) + " |")
    return "\n".join(lines)


def _machine_line(machine: dict) -> str:
    gpus = ", ".join(gpu["name"] for gpu in machine.get("gpus") or []) or "none"
    versions = machine.get("versions", {})
    shown = ", ".join(f"{name} {version}" for name, version in versions.items()
                      if version and name != "onnxruntime_providers")
    return (f"{machine.get('cpu_model')} ({machine.get('usable_cpus')} usable CPUs, "
            f"flags {' '.join(machine.get('cpu_flags') or []) or '?'}), "
            f"{machine.get('memory_gib')} GiB, GPU: {gpus}. {shown}.")


def write_markdown(data: dict, path: Path) -> Path:
    """Render a whole results file as markdown: machine, then each section's table.

    PNGs beside ``path`` named by :func:`plot_name` for a section are embedded under it.
    """
    path = Path(path)
    out = [f"# Benchmarks on `{data['machine_name']}`", "",
           "Generated from the JSON beside this file by `benchmarks/results.py`; "
           "do not edit by hand.", "",
           f"Machine: {_machine_line(data['machine'])}", ""]
    for name in sorted(data["sections"]):
        section = data["sections"][name]
        load_now = section["machine"].get("loadavg")
        out += [f"## {section['title']} (`{name}`)", "",
                f"Command: `{section['command']}`  ",
                f"Run: {section['started']} to {section['finished']}"
                + (f" ({section['duration_s']:.0f} s)" if section.get("duration_s") else "")
                + (f", load average at start {load_now}" if load_now else ""), ""]
        if section["config"]:
            out += ["Configuration: " + ", ".join(f"{key}={_format(value, None)}"
                                                  for key, value in section["config"].items()),
                    ""]
        for note in section["notes"]:
            out.append(f"- {note}")
        if section["notes"]:
            out.append("")
        if section["columns"] and section["rows"]:
            out += [markdown_table(section["columns"], section["rows"]), ""]
        for plot in sorted(path.parent.glob(plot_name(data["machine_name"], name, "*"))):
            out += [f"![{plot.stem}]({plot.name})", ""]
    path.write_text("\n".join(out).rstrip() + "\n")
    return path
