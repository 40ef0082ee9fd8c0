"""Item 1: the model alone. One segment's forward pass per backend and batch size.

    python -m benchmarks.model_forward                       # official config, 8 s segments
    python -m benchmarks.model_forward --segment 40          # the served segment length
    python -m benchmarks.model_forward --config small --segment 1 --batches 1,2 --repeats 1

Every backend runs in its own child process, one after the other, so that one backend's
memory, thread pools or crash never touch the next; a child that runs past its time budget
is killed and its remaining rows say so. All backends see the same random-weight network
(seeded; timing does not depend on weights) and the same seeded input, and each reports its
largest difference from PyTorch eager on the first batch.

For each backend and batch the row gives the median wall time of one forward call (warm-up
excluded), the time per item, the real-time factor (seconds of compute per second of audio
in the segment), the achieved GFLOP/s against :func:`benchmarks.flops.demucs_flops`, and
that rate as a fraction of this machine's measured fp32 matmul rate (the practical ceiling).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import multiprocessing
import queue as queue_module
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

from .flops import demucs_flops, matmul_ceiling
from .machine import describe, machine_name, now, usable_cpus
from .memory import peak_rss_mib
from .results import add_output_arguments, new_section, save_section
from .timing import loadavg, measure

SCRIPT = "model_forward"
TITLE = "Model forward pass (item 1)"
SEED = 0

#: Demucs constructor arguments per --config. "default" is the official v2 ``demucs``.
CONFIGS = {"default": {}, "small": {"channels": 4}}


@dataclasses.dataclass(frozen=True)
class Backend:
    """One way of running the network."""

    name: str
    description: str
    family: str                      # "torch" or "ort"
    torch_mode: str = "no_grad"      # no_grad | inference_mode | compile
    device: str = "cpu"              # torch device
    half: bool = False               # torch: run the model in fp16
    graph: str = "model.onnx"        # ort: the exported file the backend starts from
    prepare: str = ""                # ort: "" | "save_extended" | "save_all" | "slim"
    level: str = "all"               # ort: graph optimisation level of the measured session
    providers: tuple = ("CPUExecutionProvider",)
    gpu: bool = False
    ceiling: str = "cpu_fp32"        # which measured ceiling its GFLOP/s is compared with


BACKENDS = {backend.name: backend for backend in (
    Backend("torch_eager", "PyTorch eager under torch.no_grad()", "torch"),
    Backend("torch_inference_mode", "PyTorch eager under torch.inference_mode()", "torch",
            torch_mode="inference_mode"),
    Backend("torch_compile", "torch.compile (inductor, default mode) under inference_mode",
            "torch", torch_mode="compile"),
    Backend("ort", "ONNX Runtime fp32, ORT_ENABLE_ALL (the default)", "ort"),
    Backend("ort_no_opt", "ONNX Runtime fp32, ORT_DISABLE_ALL (what the optimizer buys)",
            "ort", level="disabled"),
    Backend("ort_saved_extended", "graph optimised at ORT_ENABLE_EXTENDED, saved, loaded with "
            "optimizations disabled (portable)", "ort", prepare="save_extended",
            level="disabled"),
    Backend("ort_saved_all", "graph optimised at ORT_ENABLE_ALL, saved, loaded with "
            "optimizations disabled (hardware-specific)", "ort", prepare="save_all",
            level="disabled"),
    Backend("ort_slim", "onnxslim-simplified graph, then ORT_ENABLE_ALL", "ort",
            prepare="slim"),
    Backend("ort_fp16", "model.fp16.onnx (fp16 weights and compute behind fp32 I/O), "
            "ORT_ENABLE_ALL", "ort", graph="model.fp16.onnx"),
    Backend("ort_cuda", "ONNX Runtime CUDA execution provider, fp32", "ort",
            providers=("CUDAExecutionProvider", "CPUExecutionProvider"), gpu=True,
            ceiling="cuda_fp32"),
    Backend("ort_cuda_fp16", "ONNX Runtime CUDA execution provider, model.fp16.onnx", "ort",
            graph="model.fp16.onnx",
            providers=("CUDAExecutionProvider", "CPUExecutionProvider"), gpu=True,
            ceiling="cuda_fp16"),
    Backend("ort_tensorrt", "ONNX Runtime TensorRT execution provider, fp32", "ort",
            providers=("TensorrtExecutionProvider", "CUDAExecutionProvider",
                       "CPUExecutionProvider"), gpu=True, ceiling="cuda_fp32"),
    Backend("ort_tensorrt_fp16", "ONNX Runtime TensorRT execution provider, trt_fp16_enable",
            "ort", providers=("TensorrtExecutionProvider", "CUDAExecutionProvider",
                              "CPUExecutionProvider"), gpu=True, half=True,
            ceiling="cuda_fp16"),
    Backend("torch_cuda", "PyTorch eager on CUDA under inference_mode", "torch",
            torch_mode="inference_mode", device="cuda", gpu=True, ceiling="cuda_fp32"),
    Backend("torch_cuda_fp16", "PyTorch eager on CUDA, model.half(), inference_mode", "torch",
            torch_mode="inference_mode", device="cuda", half=True, gpu=True,
            ceiling="cuda_fp16"),
)}
CPU_BACKENDS = [name for name, backend in BACKENDS.items() if not backend.gpu]
QUICK_BACKENDS = ["torch_eager", "torch_inference_mode", "ort", "ort_no_opt",
                  "ort_saved_extended", "ort_slim", "ort_fp16"]

ORT_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
              "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def available_gpu_backends() -> list[str]:
    """The GPU backends whose provider or device this machine has."""
    names = []
    try:
        import onnxruntime

        providers = set(onnxruntime.get_available_providers())
    except ImportError:
        providers = set()
    if "CUDAExecutionProvider" in providers:
        names += ["ort_cuda", "ort_cuda_fp16"]
    if "TensorrtExecutionProvider" in providers:
        names += ["ort_tensorrt", "ort_tensorrt_fp16"]
    try:
        import torch

        if torch.cuda.is_available():
            names += ["torch_cuda", "torch_cuda_fp16"]
    except ImportError:
        pass
    return names


# --------------------------------------------------------------------------- child side

def _inputs(batch: int, channels: int, length: int):
    """The seeded input: item 0 is the same array at every batch size."""
    import numpy as np

    return np.random.default_rng(SEED).standard_normal((batch, channels, length),
                                                       dtype=np.float32)


def _build_model(config: dict):
    import torch

    from stemserve.defaults import SOURCES

    from stemserve.model import Demucs

    torch.manual_seed(SEED)
    return Demucs(SOURCES, **config).eval()


def _ort_session(path: Path, backend: Backend, threads: int, level: str,
                 optimized_path: Path | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[level])
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    providers: list = list(backend.providers)
    if backend.half and "TensorrtExecutionProvider" in providers:
        providers[0] = ("TensorrtExecutionProvider", {"trt_fp16_enable": True})
    return ort.InferenceSession(str(path), options, providers=providers)


def _count_nodes(path: Path) -> int | None:
    try:
        import onnx

        return len(onnx.load(str(path), load_external_data=False).graph.node)
    except Exception:  # noqa: BLE001 - a count is informative only
        return None


def _prepared_path(backend: Backend, work: Path) -> Path:
    """The graph file that ``backend`` measures."""
    if backend.prepare.startswith("save_"):
        return work / f"model.optimized-{backend.prepare.removeprefix('save_')}.onnx"
    if backend.prepare == "slim":
        return work / "model.slim.onnx"
    return work / backend.graph


def _prepare_ort(backend: Backend, job: dict, info: dict) -> Path:
    """Make the graph file the backend measures (saved optimised, or slimmed); return it."""
    work = Path(job["work_dir"])
    source = work / backend.graph
    info["source_nodes"] = _count_nodes(source)
    if backend.prepare.startswith("save_"):
        level = backend.prepare.removeprefix("save_")
        target = _prepared_path(backend, work)
        start = time.perf_counter()
        session = _ort_session(source, backend, job["threads"], level, optimized_path=target)
        info["optimize_and_save_s"] = time.perf_counter() - start
        del session
        gc.collect()
        info["graph_nodes"] = _count_nodes(target)
        return target
    if backend.prepare == "slim":
        import onnxslim

        target = _prepared_path(backend, work)
        start = time.perf_counter()
        onnxslim.slim(str(source), str(target))
        info["slim_s"] = time.perf_counter() - start
        info["graph_nodes"] = _count_nodes(target)
        return target
    info["graph_nodes"] = info["source_nodes"]
    return source


def _prepare_child(job: dict, queue) -> None:
    """Prepare one ORT backend's graph in its own process (its memory is not the session's)."""
    try:
        info: dict = {}
        with contextlib.redirect_stdout(io.StringIO()):  # onnxslim prints a summary table
            _prepare_ort(BACKENDS[job["backend"]], job, info)
        info["prepare_peak_rss_mib"] = peak_rss_mib()
        queue.put(("done", info))
    except BaseException as err:  # noqa: BLE001
        queue.put(("error", f"{type(err).__name__}: {err}".splitlines()[0][:300]))


def _make_runner(backend: Backend, job: dict, info: dict, report):
    """Build the backend; return ``run(x: np.ndarray) -> np.ndarray`` (stems, fp32)."""
    threads = job["threads"]
    if backend.family == "ort":
        path = _prepared_path(backend, Path(job["work_dir"]))
        start = time.perf_counter()
        session = _ort_session(path, backend, threads, backend.level)
        info["session_start_s"] = time.perf_counter() - start
        info["providers"] = session.get_providers()
        if backend.gpu and backend.providers[0] not in info["providers"]:
            raise RuntimeError(f"{backend.providers[0]} did not load: {info['providers']}")
        name_in = session.get_inputs()[0].name

        def run(x):
            return session.run(None, {name_in: x})[0]

        return run

    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = _build_model(job["model_config"])
    info["model_build_s"] = time.perf_counter() - start
    device = torch.device(backend.device)
    model = model.to(device)
    if backend.half:
        model = model.half()
    dtype = torch.float16 if backend.half else torch.float32
    context = torch.no_grad if backend.torch_mode == "no_grad" else torch.inference_mode
    forward = model
    if backend.torch_mode == "compile":
        import logging

        # Dynamo warns at length about julius' data-dependent slicing; the graph breaks
        # there and the rest compiles. The warning is not a failure.
        torch._logging.set_logs(dynamo=logging.ERROR)
        forward = torch.compile(model)

    def run(x):
        with context():
            out = forward(torch.from_numpy(x).to(device=device, dtype=dtype))
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out.float().cpu().numpy()

    if backend.torch_mode == "compile":
        # Compile on the first batch size now, under the compile budget; recompilations for
        # other batch sizes happen in each batch's warm-up and show in its first_call_s.
        first = _inputs(job["batches"][0], job["channels"], job["padded_length"])
        start = time.perf_counter()
        run(first)
        info["compile_s"] = time.perf_counter() - start
        report("info", dict(info))
    return run


def _child(job: dict, queue) -> None:
    """Measure one backend at every batch size; talk to the parent through ``queue``."""
    import numpy as np

    backend = BACKENDS[job["backend"]]
    info: dict = {"backend": backend.name}
    report = lambda kind, payload: queue.put((kind, payload))  # noqa: E731
    try:
        run = _make_runner(backend, job, info, report)
        report("info", dict(info))
        reference_path = Path(job["work_dir"]) / "reference.npy"
        last = {}

        def call():
            last["out"] = run(x)

        for index, batch in enumerate(job["batches"]):
            x = _inputs(batch, job["channels"], job["padded_length"])
            measurement = measure(call, repeats=job["repeats"], warmup=job["warmup"],
                                  budget_s=job["budget_s"], min_repeats=job["min_repeats"])
            row = {"backend": backend.name, "batch": batch, "status": "ok",
                   "measurement": measurement.to_dict()}
            if index == 0:
                first = np.asarray(last["out"][0], dtype=np.float32)
                if backend.name == "torch_eager" and backend.device == "cpu":
                    np.save(reference_path, first)
                    row["max_abs_diff_vs_eager"] = 0.0
                elif reference_path.exists():
                    reference = np.load(reference_path)
                    if reference.shape == first.shape:
                        row["max_abs_diff_vs_eager"] = float(np.abs(reference - first).max())
            report("row", row)
        info["peak_rss_mib"] = peak_rss_mib()
        report("info", info)
        report("done", None)
    except BaseException as err:  # noqa: BLE001 - the parent records any failure as a row
        message = f"{type(err).__name__}: {err}".strip()
        report("error", message.splitlines()[0][:300] if message else type(err).__name__)


# --------------------------------------------------------------------------- parent side

def _export_child(job: dict, queue) -> None:
    """Export the seeded model (fp32 and, if asked, fp16) into the work folder."""
    try:
        import torch

        from stemserve.export.to_onnx import export_onnx

        torch.set_num_threads(job["threads"])
        model = _build_model(job["model_config"])
        info = types.SimpleNamespace(name=f"random-{job['config_name']}-seed{SEED}",
                                     sha256="0" * 64)
        start = time.perf_counter()
        spec = export_onnx(model, info, Path(job["work_dir"]), segment_length=job["segment_length"],
                           fp16=job["fp16"])
        export_s = time.perf_counter() - start
        work = Path(job["work_dir"])
        nodes = {path.name: _count_nodes(path) for path in sorted(work.glob("model*.onnx"))}
        queue.put(("done", {"export_s": export_s, "padded_length": spec.padded_length,
                            "graph_nodes": nodes,
                            "graph_mib": {path.name: path.stat().st_size / 2**20
                                          for path in sorted(work.glob("model*.onnx"))}}))
    except BaseException as err:  # noqa: BLE001
        queue.put(("error", f"{type(err).__name__}: {err}"))


def _run_child(target, job: dict, *, first_timeout: float, timeout: float,
               on_message) -> str | None:
    """Run ``target(job, queue)`` in a spawned process; feed its messages to ``on_message``.

    ``first_timeout`` bounds the wait for the first message, ``timeout`` each later one; past
    either the child is killed. Returns None on success, else the reason it failed.
    """
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(job, queue), daemon=True)
    process.start()
    wait = first_timeout
    try:
        while True:
            try:
                kind, payload = queue.get(timeout=wait)
            except queue_module.Empty:
                if process.is_alive():
                    process.kill()
                    return f"failed: timed out, no progress within {wait:g} s"
                process.join(5)
                return f"failed: child exited with code {process.exitcode}" + (
                    " (killed: out of memory?)" if process.exitcode == -9 else "")
            wait = timeout
            if kind == "done":
                on_message(kind, payload)
                return None
            if kind == "error":
                return f"failed: {payload}"
            on_message(kind, payload)
    finally:
        if process.is_alive():
            process.join(10)
        if process.is_alive():
            process.kill()
            process.join()
        queue.close()


def _prepare_work_dir(args, model_config: dict, segment_length: int, needs_fp16: bool,
                      notes: list[str]) -> tuple[Path, dict]:
    """Export into the work folder unless an export with the same stamp is already there."""
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="model_forward-"))
    work.mkdir(parents=True, exist_ok=True)
    from .machine import versions

    found = versions()
    stamp = {"config": model_config, "segment_length": segment_length, "seed": SEED,
             "torch": found.get("torch"), "onnx": found.get("onnx"),
             "stemserve": found.get("stemserve")}
    stamp_path = work / "stamp.json"
    have = [work / "model.onnx", work / "model.json", work / "export.json"] + (
        [work / "model.fp16.onnx"] if needs_fp16 else [])
    if (stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp
            and all(path.exists() for path in have)):
        notes.append(f"Reused the ONNX export in {work}.")
        result = json.loads((work / "export.json").read_text())
        result["reused"] = True
        return work, result
    for pattern in ("model*.onnx", "model*.json", "reference.npy", "stamp.json", "export.json"):
        for stale in work.glob(pattern):
            stale.unlink()
    result: dict = {}
    job = {"model_config": model_config, "config_name": args.config, "work_dir": str(work),
           "segment_length": segment_length, "fp16": needs_fp16, "threads": args.threads}
    error = _run_child(_export_child, job, first_timeout=args.timeout, timeout=args.timeout,
                       on_message=lambda kind, payload: result.update(payload or {}))
    if error:
        raise SystemExit(f"ONNX export failed: {error}")
    result["reused"] = False
    (work / "export.json").write_text(json.dumps(result))
    stamp_path.write_text(json.dumps(stamp))
    return work, result


def _parse_batches(text: str) -> list[int]:
    batches = sorted({int(part) for part in text.split(",") if part.strip()})
    if not batches or batches[0] < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers: {text!r}")
    return batches


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model_forward",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="default",
                        help="default: the official v2 demucs (265.7 M parameters); "
                             "small: channels=4, for tests")
    parser.add_argument("--segment", type=float, default=8.0,
                        help="segment length in seconds (default 8; the served default is 40)")
    parser.add_argument("--batches", type=_parse_batches, default=[1, 2, 4, 8],
                        help="comma-separated batch sizes (default 1,2,4,8)")
    parser.add_argument("--batches-for", action="append", default=[], metavar="BACKEND=B,B",
                        help="other batch sizes for one backend, e.g. ort=1,2,4,8 (repeatable)")
    parser.add_argument("--backends", default=None,
                        help=f"comma-separated, from {', '.join(BACKENDS)} "
                             "(default: every CPU backend, plus the GPU ones this machine has)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (default 3)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed calls before the timed ones, per batch (default 1)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for one batch's timed repetitions; later repetitions "
                             "are skipped once spent (at least --min-repeats run)")
    parser.add_argument("--min-repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=usable_cpus(),
                        help="torch and ONNX Runtime intra-op threads (default: usable CPUs)")
    parser.add_argument("--compile-budget", type=float, default=900.0,
                        help="seconds torch.compile may take on the first batch (default 900)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds any one step of a backend may take before it is killed")
    parser.add_argument("--ceiling-size", type=int, default=2048,
                        help="matrix size of the fp32 matmul ceiling (default 2048)")
    parser.add_argument("--work-dir", default=None,
                        help="keep the exported graphs here and reuse them on the next run "
                             "(default: a temporary folder, removed afterwards)")
    add_output_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    machine = describe()
    gpu_names = available_gpu_backends()
    names = (args.backends.split(",") if args.backends else CPU_BACKENDS + gpu_names)
    unknown = [name for name in names if name not in BACKENDS]
    if unknown:
        raise SystemExit(f"unknown backends {unknown}; choose from {list(BACKENDS)}")
    batches_for = {}
    for item in args.batches_for:
        name, _, text = item.partition("=")
        if name not in names:
            raise SystemExit(f"--batches-for {item!r}: {name} is not among the backends")
        batches_for[name] = _parse_batches(text)

    model_config = dict(CONFIGS[args.config])
    import torch

    from stemserve.defaults import SOURCES

    from stemserve.model import Demucs

    torch.set_num_threads(args.threads)
    with torch.device("meta"):
        meta_model = Demucs(SOURCES, **model_config)
    sample_rate = meta_model.samplerate
    segment_length = int(round(args.segment * sample_rate))
    padded_length = meta_model.valid_length(segment_length)
    flops = demucs_flops(meta_model, padded_length)
    parameters = sum(p.numel() for p in meta_model.parameters())
    del meta_model

    config = {"model": args.config, "model_args": model_config, "parameters": parameters,
              "segment_s": args.segment, "segment_samples": segment_length,
              "padded_samples": padded_length, "threads": args.threads, "repeats": args.repeats,
              "warmup": args.warmup, "budget_s": args.budget, "backends": names,
              "batches": args.batches, "batches_for": batches_for, "seed": SEED}
    section = new_section(SCRIPT, TITLE, config=config, machine=machine)
    notes = section["notes"]
    notes.append(
        f"Random weights (seed {SEED}); timing does not depend on the weights. One "
        f"{args.segment:g} s stereo segment = {segment_length} samples, fed at the network's "
        f"valid length {padded_length}; FLOPs count that padded input, RTF divides by the "
        f"{args.segment:g} s of audio.")
    notes.append(f"{args.threads} intra-op threads everywhere (torch.set_num_threads, ORT "
                 "intra_op_num_threads; ORT inter-op 1, sequential). Each backend runs in "
                 "its own process, one after another.")
    if args.segment != 40:
        notes.append("The server's default segment is the model's 40 s training segment; "
                     "cost per audio second is nearly independent of segment length (every "
                     "layer is linear in time), so RTF carries over. --segment 40 measures it.")

    # Ceiling before (and after) the backends: a busy machine shows as a gap between them.
    ceilings = {"cpu_fp32": [matmul_ceiling(args.threads, size=args.ceiling_size)]}
    if any(BACKENDS[name].gpu for name in names) and torch.cuda.is_available():
        ceilings.update(_gpu_ceilings())

    needs_fp16 = any(BACKENDS[name].graph == "model.fp16.onnx" for name in names)
    needs_onnx = any(BACKENDS[name].family == "ort" for name in names)
    temporary = not args.work_dir
    work, export = (_prepare_work_dir(args, model_config, segment_length, needs_fp16, notes)
                    if needs_onnx else (Path(tempfile.mkdtemp(prefix="model_forward-")),
                                        {"export_s": None, "padded_length": padded_length}))
    if export["padded_length"] != padded_length:
        raise SystemExit(f"export padded length {export['padded_length']} != {padded_length}")

    rows: list[dict] = []
    backend_info: list[dict] = []
    graph_nodes = export.get("graph_nodes", {})
    try:
        if "torch_eager" in names:  # first, so that every other backend can compare with it
            names = ["torch_eager"] + [name for name in names if name != "torch_eager"]
        for name in names:
            backend = BACKENDS[name]
            batches = batches_for.get(name, args.batches)
            probe = matmul_ceiling(args.threads, size=args.ceiling_size, repeats=5)
            ceilings["cpu_fp32"].append(probe)
            print(f"[{now()}] {name}: batches {batches}, load {loadavg()}, "
                  f"matmul {probe['gflops']:.0f} GFLOP/s", flush=True)
            info = {"backend": name, "description": backend.description,
                    "probe_gflops": probe["gflops"]}
            skip = _skip_reason(backend)
            if skip:
                rows += [_failed_row(name, batch, f"skipped: {skip}") for batch in batches]
                info["status"] = f"skipped: {skip}"
                backend_info.append(info)
                continue
            job = {"backend": name, "model_config": model_config, "work_dir": str(work),
                   "batches": batches, "channels": 2, "padded_length": padded_length,
                   "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
                   "budget_s": args.budget, "min_repeats": min(args.min_repeats, args.repeats)}
            if backend.prepare:
                prepared: dict = {}
                error = _run_child(_prepare_child, job, first_timeout=args.timeout,
                                   timeout=args.timeout,
                                   on_message=lambda kind, payload: prepared.update(payload))
                info.update(prepared)
                if error:
                    info["status"] = f"preparation {error}"
                    backend_info.append(info)
                    rows += [_failed_row(name, batch, f"preparation {error}") for batch in batches]
                    print(f"    preparation {error}", flush=True)
                    continue
            else:
                info["graph_nodes"] = graph_nodes.get(backend.graph) if backend.family == "ort" else None
            got: list[dict] = []

            def on_message(kind, payload, got=got, info=info):
                if kind == "row":
                    got.append(payload)
                    print(f"    batch {payload['batch']}: "
                          f"{payload['measurement']['wall_s']['median']:.3f} s", flush=True)
                elif kind == "info":
                    info.update(payload)

            first_timeout = args.compile_budget if backend.torch_mode == "compile" else args.timeout
            error = _run_child(_child, job, first_timeout=first_timeout, timeout=args.timeout,
                               on_message=on_message)
            if error and backend.torch_mode == "compile" and "compile_s" not in info:
                error = f"{error} (torch.compile budget {args.compile_budget:g} s)"
            info["status"] = error or "ok"
            backend_info.append(info)
            done = {row["batch"] for row in got}
            for row in got:
                row["probe_gflops"] = probe["gflops"]
            rows += got + [_failed_row(name, batch, error or "failed: no result")
                           for batch in batches if batch not in done]
            if error:
                print(f"    {error}", flush=True)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)

    ceilings["cpu_fp32"].append(matmul_ceiling(args.threads, size=args.ceiling_size))
    best = {key: max(item["gflops"] for item in values) for key, values in ceilings.items()}
    probes = [item["gflops"] for item in ceilings["cpu_fp32"]]
    _derive(rows, flops["total"], args.segment, best)
    section["rows"] = rows
    section["columns"] = COLUMNS
    section["tables"] = [{"title": "Backends: preparation, session start, memory",
                          "columns": BACKEND_COLUMNS, "rows": backend_info}]
    section["extra"] = {"flops_per_item": flops, "gflop_per_item": flops["total"] / 1e9,
                        "gflop_per_audio_second": flops["total"] / 1e9 / args.segment,
                        "ceilings": ceilings, "ceiling_gflops": best,
                        "export": export, "backends": backend_info,
                        "loadavg_end": loadavg()}
    notes.append(
        f"Counted cost: {flops['total'] / 1e9:.1f} GFLOP per item "
        f"({flops['total'] / 1e9 / args.segment:.1f} GFLOP per audio second; LSTM "
        f"{flops['lstm'] / flops['total']:.0%}). Ceiling: fp32 torch.mm "
        f"{args.ceiling_size}x{args.ceiling_size} at "
        f"{args.threads} threads, the best of {len(probes)} measurements taken before, between "
        f"and after the backends: {max(probes):.0f} GFLOP/s (lowest {min(probes):.0f}; "
        "'matmul now' is the one just before each backend, a gauge of how busy the machine "
        "was).")
    notes.append("cpu util = process CPU seconds / wall seconds over the timed calls: at "
                 f"{args.threads} threads, well below {args.threads} means the cores were "
                 "shared with other work (see load). CPU s/item counts only the time the "
                 "process ran, so it is the steadier figure on a busy machine (thread-pool "
                 "spinning counts in it too).")
    notes += _findings(rows, backend_info, machine)
    section["duration_s"] = time.perf_counter() - started
    path = save_section(section, results_dir=args.results_dir,
                        machine=args.machine or machine_name(machine))
    print(f"wrote {path}", flush=True)
    return path


def _gpu_ceilings() -> dict:
    """fp32 and fp16 matmul rates of the first CUDA device (for the GPU backends' rows)."""
    import torch

    found = {}
    for key, dtype, size in (("cuda_fp32", torch.float32, 8192), ("cuda_fp16", torch.float16, 8192)):
        a = torch.randn(size, size, device="cuda", dtype=dtype)
        b = torch.randn(size, size, device="cuda", dtype=dtype)
        torch.mm(a, b)
        torch.cuda.synchronize()
        seconds = []
        for _ in range(10):
            start = time.perf_counter()
            torch.mm(a, b)
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        seconds.sort()
        found[key] = [{"gflops": 2.0 * size ** 3 / seconds[len(seconds) // 2] / 1e9,
                       "size": size}]
    return found


def _skip_reason(backend: Backend) -> str | None:
    if backend.prepare == "slim":
        try:
            import onnxslim  # noqa: F401
        except ImportError:
            return "onnxslim is not installed (pip install onnxslim)"
    if backend.gpu and backend.name not in available_gpu_backends():
        return "no CUDA device or provider here"
    return None


def _failed_row(backend: str, batch: int, status: str) -> dict:
    return {"backend": backend, "batch": batch, "status": status}


def _derive(rows: list[dict], flops_per_item: float, segment_s: float, ceilings: dict) -> None:
    """Per-item time, RTF, GFLOP/s, ceiling fraction and speed-up vs eager, in place."""
    measured = [row for row in rows if row["status"] == "ok"]
    for row in measured:
        _fill(row, flops_per_item, segment_s, ceilings)
    eager = {row["batch"]: row["per_item_s"] for row in measured
             if row["backend"] == "torch_eager"}
    for row in measured:
        if row["batch"] in eager:
            row["speedup_vs_eager"] = eager[row["batch"]] / row["per_item_s"]


def _fill(row: dict, flops_per_item: float, segment_s: float, ceilings: dict) -> None:
    backend = BACKENDS[row["backend"]]
    wall = row["measurement"]["wall_s"]
    batch = row["batch"]
    row["forward_s"] = wall["median"]
    row["forward_min_s"], row["forward_max_s"] = wall["min"], wall["max"]
    row["spread"] = (wall["max"] - wall["min"]) / wall["median"]
    row["repeats"] = wall["n"]
    row["per_item_s"] = wall["median"] / batch
    row["per_item_best_s"] = wall["min"] / batch
    row["rtf"] = row["per_item_s"] / segment_s
    row["gflops"] = flops_per_item * batch / wall["median"] / 1e9
    ceiling = ceilings.get(backend.ceiling)
    row["ceiling"] = backend.ceiling
    row["ceiling_fraction"] = row["gflops"] / ceiling if ceiling else None
    row["cpu_util"] = row["measurement"]["cpu_util"]
    row["cpu_per_item_s"] = row["measurement"]["cpu_s"]["median"] / batch
    row["first_call_s"] = (row["measurement"]["warmup_s"] or [None])[0]
    row["load_1m"] = (row["measurement"]["loadavg_before"] or [None])[0]


def _findings(rows: list[dict], backend_info: list[dict], machine: dict) -> list[str]:
    """Plain sentences on what the saved graph, onnxslim and fp16 do here."""
    ok = {(row["backend"], row["batch"]): row for row in rows if row["status"] == "ok"}
    info = {item["backend"]: item for item in backend_info}
    found = []
    if "ort" in info and "session_start_s" in info["ort"]:
        for name in ("ort_saved_extended", "ort_saved_all", "ort_no_opt", "ort_slim"):
            if "session_start_s" in info.get(name, {}):
                found.append(f"Session start: {name} {info[name]['session_start_s']:.1f} s vs "
                             f"ort {info['ort']['session_start_s']:.1f} s.")
    for name in ("ort_no_opt", "ort_saved_extended", "ort_saved_all", "ort_slim", "ort_fp16",
                 "torch_inference_mode", "torch_compile"):
        base = "torch_eager" if name.startswith("torch") else "ort"
        shared = sorted(batch for (backend, batch) in ok if backend == name and (base, batch) in ok)
        if shared:
            def ratios(key):
                return ", ".join(f"{ok[(base, b)][key] / ok[(name, b)][key]:.2f}x" for b in shared)
            found.append(f"{name} vs {base} at batch {', '.join(map(str, shared))} "
                         f"(>1: {name} is faster): wall time per item {ratios('per_item_s')}; "
                         f"CPU time per item {ratios('cpu_per_item_s')}.")
    if "ort_fp16" in info and not machine.get("gpus"):
        native = "avx512_fp16" in machine.get("cpu_flags", []) or "amx_fp16" in machine.get("cpu_flags", [])
        found.append("fp16 on this CPU: " + ("it has native fp16 arithmetic (AVX512-FP16/AMX)."
                     if native else "no native fp16 arithmetic (no AVX512-FP16/AMX-FP16; F16C "
                     "only converts), so ONNX Runtime runs fp16 nodes through its few fp16 "
                     "CPU kernels or inserts fp32 casts around the rest."))
    return found


COLUMNS = [
    {"key": "backend", "title": "backend"},
    {"key": "batch", "title": "batch"},
    {"key": "status", "title": "status"},
    {"key": "forward_s", "title": "s/forward (median)", "format": ".2f"},
    {"key": "spread", "title": "spread (max-min)/med", "format": ".0%"},
    {"key": "repeats", "title": "n"},
    {"key": "per_item_s", "title": "s/item", "format": ".3f"},
    {"key": "per_item_best_s", "title": "s/item best", "format": ".3f"},
    {"key": "rtf", "title": "RTF", "format": ".3f"},
    {"key": "gflops", "title": "GFLOP/s", "format": ".1f"},
    {"key": "ceiling_fraction", "title": "of ceiling", "format": ".0%"},
    {"key": "speedup_vs_eager", "title": "x eager", "format": ".2f"},
    {"key": "first_call_s", "title": "first call s", "format": ".1f"},
    {"key": "cpu_per_item_s", "title": "CPU s/item", "format": ".2f"},
    {"key": "cpu_util", "title": "cpu util", "format": ".2f"},
    {"key": "probe_gflops", "title": "matmul now", "format": ".0f"},
    {"key": "load_1m", "title": "load", "format": ".1f"},
    {"key": "max_abs_diff_vs_eager", "title": "max abs diff", "format": ".1e"},
]
BACKEND_COLUMNS = [
    {"key": "backend", "title": "backend"},
    {"key": "status", "title": "status"},
    {"key": "description", "title": "what"},
    {"key": "session_start_s", "title": "session start s", "format": ".1f"},
    {"key": "optimize_and_save_s", "title": "optimise+save s", "format": ".1f"},
    {"key": "slim_s", "title": "onnxslim s", "format": ".1f"},
    {"key": "model_build_s", "title": "model build s", "format": ".1f"},
    {"key": "compile_s", "title": "compile s", "format": ".1f"},
    {"key": "source_nodes", "title": "nodes in"},
    {"key": "graph_nodes", "title": "nodes run"},
    {"key": "peak_rss_mib", "title": "peak RSS MiB", "format": ".0f"},
    {"key": "probe_gflops", "title": "matmul GFLOP/s before", "format": ".0f"},
]


if __name__ == "__main__":
    main()
    sys.exit(0)
