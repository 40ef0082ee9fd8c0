"""One command for every benchmark, then the plots.

    python -m benchmarks.run_all                 # the full configuration (about 115 min on 2 CPUs)
    python -m benchmarks.run_all --quick         # a tiny configuration, to check the scripts run
    python -m benchmarks.run_all --only model_forward --machine my-box

Each script runs in its own process, one after another, so that none measures while another
works. A script listed in :data:`SCRIPTS` whose module does not exist yet is reported and
skipped; adding a benchmark means writing ``benchmarks/<name>.py`` (a ``main()`` that takes
``--machine`` and ``--results-dir`` and saves one section through
:func:`benchmarks.results.save_section`) and its entry here.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

from .machine import describe, machine_name
from .results import add_output_arguments, results_path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(__file__).resolve().parent / ".cache"


@dataclasses.dataclass(frozen=True)
class Script:
    """A benchmark script and its arguments in the full and the quick configuration."""

    name: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    what: str


SCRIPTS = (
    Script("model_forward",
           full=("--segment", "8", "--batches", "1,2,4", "--batches-for", "ort=1,2,4,8",
                 "--batches-for", "torch_compile=1,2", "--repeats", "3", "--budget", "60",
                 "--compile-budget", "600", "--work-dir", str(CACHE / "model_forward")),
           quick=("--config", "small", "--segment", "1", "--batches", "1,2", "--repeats", "1",
                  "--ceiling-size", "512",
                  "--backends", "torch_eager,torch_inference_mode,ort,ort_no_opt,"
                  "ort_saved_extended,ort_slim,ort_fp16"),
           what="item 1: one segment's forward pass per backend and batch size"),
    Script("server_sweep", full=("--config", "medium", "--segment", "2", "--duration", "10"), quick=("--quick",),
           what="item 2: concurrency sweep against tritonserver, batching on/off, vs in-process"),
    Script("end_to_end", full=("--tracks", "60,600", "--repeats", "2"), quick=("--quick",),
           what="item 3: 1- and 10-minute tracks: wall time, RTF, peak memory per path"),
    Script("transport", full=("--segments", "1,10,40"), quick=("--quick",),
           what="item 4: plain gRPC vs system shared memory for the segment tensors"),
    Script("releases", full=("--tracks", "60,600", "--repeats", "2", "--forward-repeats", "3",
                             "--budget", "60"), quick=("--quick",),
           what="issue 13: htdemucs forward (torch, ORT, OpenVINO bf16), cost vs "
                "demucs_quantized, 1- and 10-minute tracks: Triton (fp32, int8, bf16) / "
                "in-process vs demucs 4.0.1"),
    Script("cpu_levers", full=(), quick=("--quick",),
           what="issue 14: batch sizes, int8, ONNX Runtime's arena, two-segment tracks on "
                "the CPU"),
    Script("quality", full=("--train-minutes", "4", "--mixes", "6", "--mix-seconds", "8"),
           quick=("--quick",),
           what="issue 14: SDR of each fast path (torch bf16, ONNX fp16, int8) against fp32, "
                "small models trained on synthetic stems"),
)


def available(script: Script) -> bool:
    return importlib.util.find_spec(f"benchmarks.{script.name}") is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny configuration (small model, short segment, 1 repetition)")
    parser.add_argument("--only", default=None,
                        help="comma-separated script names (default: all that exist)")
    parser.add_argument("--no-plots", action="store_true")
    add_output_arguments(parser)
    args = parser.parse_args(argv)

    machine = args.machine or machine_name(describe())
    wanted = args.only.split(",") if args.only else [script.name for script in SCRIPTS]
    unknown = set(wanted) - {script.name for script in SCRIPTS}
    if unknown:
        parser.error(f"unknown scripts {sorted(unknown)}")
    failures = []
    for script in SCRIPTS:
        if script.name not in wanted:
            continue
        if not available(script):
            print(f"-- {script.name}: not written yet ({script.what}); skipped", flush=True)
            continue
        command = [sys.executable, "-m", f"benchmarks.{script.name}",
                   *(script.quick if args.quick else script.full),
                   "--machine", machine, "--results-dir", str(args.results_dir)]
        print(f"-- {script.name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(command, cwd=ROOT)
        print(f"-- {script.name}: exit {code} after {time.perf_counter() - start:.0f} s",
              flush=True)
        if code:
            failures.append(script.name)
    json_path = results_path(args.results_dir, machine)
    if not args.no_plots and json_path.exists():
        from .plots import plot_results

        try:
            for path in plot_results(json_path):
                print(f"wrote {path}", flush=True)
        except ImportError as err:  # matplotlib comes with the bench extras only
            print(f"-- plots: skipped, {err}", flush=True)
    if failures:
        print(f"failed: {', '.join(failures)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
