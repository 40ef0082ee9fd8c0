"""One command for every benchmark scenario: parsing, running, saving and plots.

    python -m benchmarks.run_all                        # every scenario, full configuration
    python -m benchmarks.run_all --quick                # tiny configurations: checks they run
    python -m benchmarks.run_all --only forward.backends,tracks.reference --machine my-box
    python -m benchmarks.run_all forward.backends --help    # one scenario, its own flags
    python -m benchmarks.run_all forward.backends --batches 1,2,4 --repeats 3

Each scenario of :data:`GROUPS` runs in its own process, one after another, so that none
measures while another works. A scenario's flags are generated from its config dataclass
(:func:`benchmarks.scenario.add_flags`); its rows are saved through
:func:`benchmarks.results.save_section` and its plots redrawn. Adding a benchmark means a
module with a ``SCENARIO`` in one of the groups' folders and its name in that folder's
``SCENARIOS``.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import subprocess
import sys
import time
from pathlib import Path

from .machine import describe, machine_name
from .results import add_output_arguments, new_section, results_path
from .scenario import Scenario, add_flags, config_from

ROOT = Path(__file__).resolve().parents[1]

#: The scenario folders, in the order a full run measures them.
GROUPS = ("forward", "serving", "tracks", "quality")


def scenario_names() -> list[str]:
    """Every scenario a full run measures: each group's ``SCENARIOS``, in order."""
    return [name for group in GROUPS
            for name in importlib.import_module(f"benchmarks.{group}").SCENARIOS]


def load_scenario(name: str) -> Scenario:
    """The ``SCENARIO`` of ``benchmarks.<name>``; a clear error for a name that is not one."""
    module = None
    if name.split(".")[0] in GROUPS:
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as err:
            if not (err.name and f"benchmarks.{name}".startswith(err.name)):
                raise
    scenario = getattr(module, "SCENARIO", None)
    if not isinstance(scenario, Scenario):
        raise SystemExit(f"unknown scenario {name!r}: scenarios are {', '.join(scenario_names())}")
    return scenario


def scenario_parser(name: str) -> tuple[Scenario, argparse.ArgumentParser]:
    """The scenario ``name`` and its command line: ``--quick``, the output options, and one
    flag per field of its config."""
    scenario = load_scenario(name)
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.run_all {name}",
                                     description=scenario.title)
    parser.add_argument("--quick", action="store_true",
                        help="the tiny configuration (each flag's --quick value)")
    add_output_arguments(parser)
    parser.add_argument("--label", type=_label, default=None,
                        help="save as section <scenario>-<label>, beside the scenario's own: "
                             "two configurations measured on one machine (letters, digits, _)")
    add_flags(parser, scenario.config)
    return scenario, parser


def _label(text: str) -> str:
    if not re.fullmatch(r"[a-z0-9_]{1,32}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: a label is 1 to 32 of a-z, 0-9, _")
    return text


def run_scenario(name: str, argv: list[str]) -> int:
    """Parse ``argv`` into the scenario's config, run it, save its section and plots."""
    from .plots import save_and_plot

    scenario, parser = scenario_parser(name)
    args = parser.parse_args(argv)
    config = config_from(args, scenario.config, quick=args.quick)
    key = f"{name}-{args.label}" if args.label else name
    section = new_section(key, scenario.title, config=dataclasses.asdict(config))
    start = time.perf_counter()
    section["rows"] = scenario.run(config)
    section["duration_s"] = time.perf_counter() - start
    section["notes"] = list(scenario.notes)
    section["columns"] = [dataclasses.asdict(column) for column in scenario.columns]
    machine = args.machine or machine_name(section["machine"])
    save_and_plot(section, results_dir=args.results_dir, machine=machine,
                  plots=scenario.plots, log=lambda line: print(line, flush=True))
    failed = [row for row in section["rows"] if str(row.get("status", "ok")).startswith("failed")]
    for row in failed:
        print(f"-- {key}: {row['status']}", flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        return run_scenario(argv[0], argv[1:])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="every scenario in its tiny configuration")
    parser.add_argument("--only", default=None,
                        help="comma-separated scenario names (default: all)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)

    machine = args.machine or machine_name(describe())
    names = scenario_names()
    wanted = args.only.split(",") if args.only else names
    for name in wanted:
        load_scenario(name)
    failures = []
    for name in wanted:
        command = [sys.executable, "-m", "benchmarks.run_all", name,
                   *(["--quick"] if args.quick else []),
                   "--machine", machine, "--results-dir", str(args.results_dir)]
        print(f"-- {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(command, cwd=ROOT)
        print(f"-- {name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failures.append(name)
    print(f"results: {results_path(args.results_dir, machine)}", flush=True)
    if failures:
        print(f"failed: {', '.join(failures)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
