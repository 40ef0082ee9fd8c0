"""One segment's forward pass per network family, backend (runtime and precision) and batch.

Each backend (and the graph it prepares) runs in a process of its own, so that its memory,
thread pools or crash never touch the next. The fp32 matmul rate read before each backend
gauges how busy the machine was; the best reading is the GFLOP/s ceiling.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..flops import demucs_flops, matmul_ceiling
from ..isolated import IsolatedFailed, run_isolated
from ..machine import usable_cpus
from ..memory import peak_rss_mib
from ..scenario import CACHE, Column, Scenario, option
from ..timing import measure
from .. import models

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


@dataclasses.dataclass(frozen=True)
class Backend:
    """One way of running the network."""

    what: str
    runtime: str = "ort"            # ort | torch | openvino (fp32 arithmetic)
    graph: str = "fp32"             # ort: the export's precision variant it loads
    level: str = "ORT_ENABLE_ALL"   # ort: optimisation level of the measured session
    prepare: str = ""               # ort: slim, portable, or the level to save the graph at
    provider: str = CPU             # ort
    mode: str = "no_grad"           # torch: no_grad | inference_mode | compile
    device: str = "cpu"             # torch
    half: str = ""                  # torch on CUDA: autocast dtype; TensorRT: fp16

    @property
    def gpu(self) -> bool:
        return self.device == "cuda" or self.provider != CPU


BACKENDS = {
    "torch_eager": Backend("PyTorch eager under torch.no_grad()", "torch"),
    "torch_inference_mode": Backend("PyTorch, inference_mode()", "torch", mode="inference_mode"),
    "torch_compile": Backend("torch.compile (inductor), inference_mode", "torch", mode="compile"),
    "ort": Backend("ONNX Runtime fp32, ORT_ENABLE_ALL (stemserve's CPU session)"),
    "ort_no_opt": Backend("ONNX Runtime fp32, ORT_DISABLE_ALL", level="ORT_DISABLE_ALL"),
    "ort_saved_extended": Backend("saved at ORT_ENABLE_EXTENDED (portable), run unoptimised",
                                  prepare="ORT_ENABLE_EXTENDED", level="ORT_DISABLE_ALL"),
    "ort_saved_all": Backend("saved at ORT_ENABLE_ALL (this CPU's), run unoptimised",
                             prepare="ORT_ENABLE_ALL", level="ORT_DISABLE_ALL"),
    "ort_slim": Backend("onnxslim-simplified graph, ORT_ENABLE_ALL", prepare="slim"),
    "ort_portable": Backend("export --portable (no fused attention), ORT_ENABLE_ALL",
                            prepare="portable"),
    "ort_fp16": Backend("the fp16 graph (fp32 I/O), ORT_ENABLE_ALL", graph="fp16"),
    "ort_int8": Backend("the int8 graph (export --int8), ORT_ENABLE_ALL", graph="int8"),
    "openvino_bf16": Backend("OpenVINO, bf16 arithmetic on the fp32 graph", graph="bf16"),
    "openvino_bf16_portable": Backend("OpenVINO bf16 on the export --portable graph",
                                      graph="bf16", prepare="portable"),
    "openvino_fp32": Backend("OpenVINO, fp32 arithmetic (no stemserve path runs it)",
                             "openvino"),
    "ort_cuda": Backend("ONNX Runtime CUDA provider, fp32", provider=CUDA),
    "ort_cuda_fp16": Backend("ONNX Runtime CUDA, the fp16 graph", provider=CUDA, graph="fp16"),
    "ort_tensorrt": Backend("ONNX Runtime TensorRT provider, fp32", provider=TRT),
    "ort_tensorrt_fp16": Backend("TensorRT provider, trt_fp16_enable", provider=TRT, half="fp16"),
    "torch_cuda": Backend("PyTorch on CUDA under no_grad", "torch", device="cuda"),
    **{f"torch_cuda_{half}": Backend(f"PyTorch on CUDA, {half} autocast", "torch",
                                     device="cuda", half=half) for half in ("fp16", "bf16")},
}


@dataclasses.dataclass(frozen=True)
class Config:
    families: tuple[str, ...] = option(("v2",), "v2 (demucs_quantized's), htdemucs, in order; "
                                       "the first is the cost's unit", quick=("v2", "htdemucs"))
    size: str = option("default", "default (as released), small; v2 also medium", quick="small")
    segment: float = option(8.0, "seconds per v2 segment (HT Demucs: its training one)", quick=1.0)
    backends: tuple[str, ...] = option(
        ("cpu", "gpu"), f"from {', '.join(BACKENDS)}; cpu: all CPU ones, gpu: the GPU ones "
        "here", quick=("torch_eager", "ort", "ort_no_opt", "ort_saved_extended", "ort_fp16",
                       "ort_int8", "openvino_bf16"))
    batches: tuple[int, ...] = option((1, 2, 4), "batch sizes", quick=(1, 2))
    batches_for: tuple[str, ...] = option(("ort=1/2/4/8", "torch_compile=1/2"),
                                          "other batch sizes, BACKEND=B/B/...", quick=())
    repeats: int = option(3, "timed calls per batch", quick=1)
    warmup: int = option(1, "untimed calls before them, per batch")
    budget: float | None = option(60.0, "seconds of one batch's timed calls after which no "
                                  "more start, past 2 (none: no limit)", quick=None)
    threads: int = option(usable_cpus(), "torch and ONNX Runtime intra-op threads")
    compile_budget: float = option(600.0, "seconds torch.compile may take on the first batch")
    timeout: float = option(1800.0, "seconds one backend's process may take")
    ceiling_size: int = option(2048, "matrix size of the fp32 matmul ceiling", quick=512)


def backends_of(config: Config) -> dict[str, tuple[int, ...]]:
    """Each backend to measure, eager first (the others compare with it) -> its batches."""
    groups = {"cpu": [name for name, backend in BACKENDS.items() if not backend.gpu],
              "gpu": [name for name, backend in BACKENDS.items()
                      if backend.gpu and _skip(name, "v2") is None]}
    names = list(dict.fromkeys(item for entry in config.backends
                               for item in groups.get(entry, [entry])))
    special = dict(entry.partition("=")[::2] for entry in config.batches_for)
    if unknown := sorted((set(names) | set(special)) - set(BACKENDS)):
        raise SystemExit(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}")
    return {name: tuple(int(size) for size in special[name].split("/")) if name in special
            else config.batches for name in sorted(names, key=lambda name: name != "torch_eager")}


def _skip(name: str, family: str) -> str | None:
    """Why backend ``name`` cannot run ``family`` here, or None."""
    import onnxruntime
    import torch

    from stemserve.models.registry import by_name
    from stemserve.runtime.openvino_session import cpu_has_bf16

    backend = BACKENDS[name]
    unsupported = by_name(models.FAMILIES[family]).unsupported
    if backend.runtime == "openvino" and importlib.util.find_spec("openvino") is None:
        return "no OpenVINO here"
    if backend.graph == "bf16" and not cpu_has_bf16():
        return "this CPU has no bf16 arithmetic (AMX or AVX512_BF16), or no OpenVINO"
    if backend.graph in unsupported:
        return f"no {backend.graph} graph: {unsupported[backend.graph]}"
    if backend.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if backend.provider not in (CPU, *onnxruntime.get_available_providers()):
        return f"ONNX Runtime here has no {backend.provider}"
    return None


def describe(family: str, size: str, segment_s: float) -> dict:
    """Parameters, segment, input length and counted GFLOP (v2 only) of one segment, from a
    weightless copy; a fixed-length network (HT Demucs) takes its training segment."""
    import torch

    from stemserve.models.families import segment_samples
    from stemserve.spec import ModelSpec, family_rule

    with torch.device("meta"):
        model = models.build(family, size)
    name = models.FAMILIES[family]
    segment = (segment_samples(model) if family_rule(name).lengths == "fixed"
               else int(round(segment_s * model.samplerate)))
    spec = ModelSpec.for_model(model, checkpoint=family, checkpoint_sha256="0" * 64,
                               segment_length=segment, model_name="demucs", family=name)
    return {"parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "segment_length": segment, "padded_length": spec.padded_length,
            "channels": spec.audio_channels, "segment_s": segment / spec.sample_rate,
            "gflop": demucs_flops(model, spec.padded_length)["total"] / 1e9
            if family == "v2" else None}


def _inputs(job: dict, batch: int) -> np.ndarray:
    """Seeded noise; item 0 is the same at every batch size."""
    return np.random.default_rng(models.SEED).standard_normal(
        (batch, job["channels"], job["padded_length"]), dtype=np.float32)


def _session(path: Path, backend: Backend, threads: int, level: str, saved: Path | None = None):
    """A session as stemserve makes them, at ``level``, on the backend's provider."""
    import onnxruntime as ort

    from stemserve.runtime.ort_session import cpu_session_options

    options = cpu_session_options(threads)
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.log_severity_level = 3
    if saved is not None:
        options.optimized_model_filepath = str(saved)
    first = (TRT, {"trt_fp16_enable": True}) if backend.half else backend.provider
    providers = [first] + [CUDA] * (backend.provider == TRT) + [CPU] * backend.gpu
    return ort.InferenceSession(str(path), options, providers=providers)


def prepare(job: dict) -> dict:
    """Write the graph a prepared ORT backend loads: optimised and saved at its level,
    simplified by onnxslim, or exported again in standard operators only (isolated: its
    memory is not the measured session's)."""
    import onnx

    backend, source = BACKENDS[job["backend"]], Path(job["export"]) / "model.onnx"
    target = Path(job["export"]) / f"prepared-{job['backend']}.onnx"
    start = time.perf_counter()
    if backend.prepare == "slim":
        import onnxslim

        onnxslim.slim(str(source), str(target))  # its summary table: the child's stdout
    elif backend.prepare == "portable":  # the same seeded weights as the export's
        from stemserve.export.to_onnx import export_onnx

        with tempfile.TemporaryDirectory(dir=target.parent) as folder:
            spec = export_onnx(models.build(job["family"], job["size"]),
                               models.checkpoint_info(job["family"], job["size"]), Path(folder),
                               segment_length=job["segment_length"], portable=True)
            os.replace(Path(folder) / spec.onnx_file, target)
    else:
        _session(source, backend, job["threads"], backend.prepare, saved=target)
    nodes = {key: len(onnx.load(str(path), load_external_data=False).graph.node)
             for key, path in (("source_nodes", source), ("graph_nodes", target))}
    return {"prepare_s": time.perf_counter() - start, **nodes,
            "prepare_peak_rss_mib": peak_rss_mib()}


def _ort_runner(backend: Backend, job: dict, info: dict):
    from stemserve.runtime.ort_session import cpu_session
    from stemserve.spec import load_export_spec

    spec = load_export_spec(Path(job["export"]), backend.graph)
    path = Path(job["export"]) / (f"prepared-{job['backend']}.onnx" if backend.prepare
                                  else spec.onnx_file)
    start = time.perf_counter()
    if backend.graph == "bf16":
        session = cpu_session(path, job["threads"], "bf16",
                              (spec.audio_channels, spec.padded_length))
    else:
        session = _session(path, backend, job["threads"], backend.level)
        if backend.provider not in session.get_providers():
            raise RuntimeError(f"{backend.provider} did not load: {session.get_providers()}")
    info["session_start_s"] = time.perf_counter() - start
    return lambda x: session.run([spec.output_name], {spec.input_name: x})[0]


def _openvino_runner(backend: Backend, job: dict, info: dict):
    """OpenVINO on the fp32 graph with fp32 arithmetic, as the bf16 path's self-check
    compiles it, on the first batch's shape (one compile per shape, as the bf16 session)."""
    import openvino

    from stemserve.spec import load_export_spec

    spec = load_export_spec(Path(job["export"]))
    start = time.perf_counter()
    core = openvino.Core()
    network = core.read_model(str(Path(job["export"]) / spec.onnx_file))
    compiled = {}

    def run(x):
        if x.shape not in compiled:
            network.reshape({network.inputs[0]: openvino.PartialShape(list(x.shape))})
            compiled[x.shape] = core.compile_model(network, "CPU", {
                "INFERENCE_NUM_THREADS": job["threads"], "INFERENCE_PRECISION_HINT": "f32"})
        return compiled[x.shape](x)[0]

    run(_inputs(job, job["batches"][0]))
    info["session_start_s"] = time.perf_counter() - start
    return run


def _torch_runner(backend: Backend, job: dict, info: dict):
    import torch

    torch.set_num_threads(job["threads"])
    torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    forward = models.build(job["family"], job["size"]).to(backend.device)
    info["load_s"] = time.perf_counter() - start
    context = torch.no_grad if backend.mode == "no_grad" else torch.inference_mode
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(backend.half)

    def run(x):
        with context(), (torch.autocast(backend.device, dtype=dtype) if dtype
                         else contextlib.nullcontext()):
            return forward(torch.from_numpy(x).to(backend.device)).float().cpu().numpy()

    if backend.mode == "compile":  # other batch sizes recompile in their warm-up
        torch._logging.set_logs(dynamo=logging.ERROR)  # its graph breaks are no failure
        forward = torch.compile(forward)  # what ``run`` calls from now on
        signal.signal(signal.SIGALRM, lambda *_: (print(  # a compile cannot be interrupted
            f"torch.compile ran past its budget of {job['compile_budget']:g} s",
            file=sys.stderr, flush=True), os._exit(124)))
        signal.setitimer(signal.ITIMER_REAL, job["compile_budget"])
        start = time.perf_counter()
        run(_inputs(job, job["batches"][0]))
        info["compile_s"] = time.perf_counter() - start
        signal.setitimer(signal.ITIMER_REAL, 0)
    return run


def measure_backend(job: dict) -> dict:
    """One backend at each of ``job["batches"]`` (run isolated): its rows and its setup."""
    backend = BACKENDS[job["backend"]]
    info: dict = {}
    run = {"torch": _torch_runner, "openvino": _openvino_runner}.get(
        backend.runtime, _ort_runner)(backend, job, info)
    cuda = backend.device == "cuda" and importlib.import_module("torch").cuda
    reference, rows, last = Path(job["reference"]), [], {}
    for index, batch in enumerate(job["batches"]):
        x = _inputs(job, batch)
        if cuda:
            cuda.reset_peak_memory_stats()
        got = measure(lambda: last.update(out=run(x)), repeats=job["repeats"], warmup=job["warmup"],
                      budget_s=job["budget"], min_repeats=min(2, job["repeats"]))
        row = {"batch": batch, "measurement": got.to_dict(), "peak_rss_mib": peak_rss_mib(),
               "gpu_peak_gib": cuda.max_memory_allocated() / 2**30 if cuda else None}
        first = np.asarray(last["out"][0], dtype=np.float32)
        if index == 0 and job["backend"] == "torch_eager":
            np.save(reference, first)
        if index == 0 and reference.is_file():
            row["max_abs_diff_vs_eager"] = float(np.abs(np.load(reference) - first).max())
        rows.append(row)
    return {"rows": rows, **info}


def _measure(family: str, name: str, batches: tuple[int, ...], job: dict,
             config: Config) -> list[dict]:
    """Rows of one backend on one family: measured, or failed or skipped with the reason."""
    backend = BACKENDS[name]
    if reason := _skip(name, family):
        return [{"batch": batch, "status": f"skipped: {reason}"} for batch in batches]
    if backend.runtime != "torch" and job["export"].startswith("failed"):
        return [{"batch": batch, "status": job["export"]} for batch in batches]
    job = dict(job, backend=name, batches=list(batches))
    try:
        setup = (run_isolated("benchmarks.forward.backends:prepare", job, timeout=config.timeout)
                 if backend.prepare else {})
        result = run_isolated("benchmarks.forward.backends:measure_backend", job,
                              timeout=config.timeout + config.compile_budget
                              * (backend.mode == "compile"))
    except IsolatedFailed as err:
        return [{"batch": batch, "status": f"failed: {err}"} for batch in batches]
    for part in (setup, result):  # the whole process's CPU time: the rows have the calls'
        part.pop("cpu_s", None)
    return [{**setup, **result, **row, "status": "ok"} for row in result.pop("rows")]


def _derive(row: dict, network: dict, ceiling: float) -> None:
    """The fields the table and the plots read, from a measured row, in place."""
    measured, batch, audio_s = row["measurement"], row["batch"], row["batch"] * network["segment_s"]
    wall, cpu = measured["wall_s"], measured["cpu_s"]
    row.update(forward_s=wall["median"], forward_min_s=wall["min"], forward_max_s=wall["max"],
               spread=(wall["max"] - wall["min"]) / wall["median"], repeats=wall["n"],
               per_item_s=wall["median"] / batch, cpu_per_item_s=cpu["median"] / batch,
               rtf=wall["median"] / audio_s, cpu_rtf=cpu["median"] / audio_s,
               cpu_util=measured["cpu_util"], first_call_s=(measured["warmup_s"] or [None])[0],
               load_1m=(measured["loadavg_before"] or [None])[0],
               ceiling_gflops=None if BACKENDS[row["kind"]].gpu else ceiling)
    if network["gflop"]:
        row["gflops"] = network["gflop"] * batch / wall["median"]
        if row["ceiling_gflops"]:
            row["ceiling_fraction"] = row["gflops"] / row["ceiling_gflops"]


def run(config: Config) -> list[dict]:
    wanted, shapes, probes, rows = backends_of(config), {}, [], []
    for family in config.families:
        network = shapes[family] = describe(family, config.size, config.segment)
        graphs = {BACKENDS[name].graph for name in wanted
                  if BACKENDS[name].runtime != "torch" and _skip(name, family) is None}
        try:
            export = models.exported(family, config.size, precisions=graphs,
                                     segment_length=network["segment_length"],
                                     timeout=config.timeout) if graphs else None
        except IsolatedFailed as err:
            export = f"failed: export: {err}"
        reference = CACHE / "forward" / f"reference-{family}-{os.getpid()}.npy"  # this run's
        reference.parent.mkdir(parents=True, exist_ok=True)
        job = {**dataclasses.asdict(config), **network, "family": family,
               "export": str(export), "reference": str(reference)}
        for name, batches in wanted.items():
            probes.append(matmul_ceiling(config.threads, size=config.ceiling_size,
                                         repeats=5)["gflops"])
            print(f"{family} {name} {batches}: matmul {probes[-1]:.0f} GFLOP/s", flush=True)
            rows += [{"family": family, "kind": name, "backend": f"{family} {name}",
                      "what": BACKENDS[name].what, "probe_gflops": probes[-1],
                      "parameters_m": network["parameters_m"], "segment_s": network["segment_s"],
                      **row} for row in _measure(family, name, batches, job, config)]
        reference.unlink(missing_ok=True)
    probes.append(matmul_ceiling(config.threads, size=config.ceiling_size)["gflops"])
    ok = {(row["family"], row["kind"], row["batch"]): row for row in rows if row["status"] == "ok"}
    for (family, _, _), row in ok.items():
        _derive(row, shapes[family], max(probes))
    for (family, kind, batch), row in ok.items():  # eager's and the first family's rows
        if eager := ok.get((family, "torch_eager", batch)):
            row["vs_eager"] = eager["per_item_s"] / row["per_item_s"]
        if first := ok.get((config.families[0], kind, batch)):
            row["cost_vs_first_family"] = row["rtf"] / first["rtf"]
    return rows


SCENARIO = Scenario(
    name="forward.backends",
    title="The network alone: one segment's forward pass per family, backend and batch",
    config=Config, run=run,
    columns=tuple(Column(*column) for column in (
        ("backend", "backend"), ("batch", "batch"), ("status", "status"), ("repeats", "n"),
        ("forward_s", "s/forward (median)", ".3f"), ("spread", "spread", ".0%"),
        ("per_item_s", "s/item", ".3f"), ("rtf", "RTF (s per audio s)", ".3f"),
        ("cpu_per_item_s", "CPU s/item", ".2f"), ("cpu_util", "cpu util", ".2f"),
        ("gflops", "GFLOP/s", ".1f"), ("ceiling_fraction", "of ceiling", ".0%"),
        ("vs_eager", "x eager", ".2f"), ("cost_vs_first_family", "cost vs first", ".2f"),
        ("first_call_s", "first call s", ".2f"), ("session_start_s", "session s", ".1f"),
        ("prepare_s", "prepare s", ".1f"), ("compile_s", "compile s", ".1f"),
        ("peak_rss_mib", "peak RSS MiB", ".0f"), ("gpu_peak_gib", "GPU peak GiB", ".2f"),
        ("probe_gflops", "matmul now", ".0f"), ("load_1m", "load", ".1f"),
        ("max_abs_diff_vs_eager", "max abs diff vs eager", ".1e"))),
    notes=(
        "Random weights from a seed; input: seeded noise, one segment at the input length. "
        "RTF: s/item per audio second (a track costs 1 / (1 - overlap) of it); cost vs first: "
        "RTF over the first family's at the same backend and batch.",
        "Threads as configured (ONNX Runtime: stemserve's CPU session). Peak RSS: the backend "
        "process's VmHWM after the batch (batches in order), weights included. max abs diff: "
        "item 0 of the first batch vs eager's.",
        "GFLOP/s: counted FLOPs (v2 only) / median wall time; ceiling (CPU rows): the best fp32 "
        "torch.mm rate read before each backend and at the end; matmul now: the row's. cpu "
        "util: CPU s / wall s of the timed calls (below the thread count: shared cores).",
    ),
    plots=("per_item", "cpu_per_item", "gflops"),
)
