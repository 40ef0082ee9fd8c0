"""The bf16 CPU fast path: OpenVINO runs the fp32 graph with bf16 arithmetic.

ONNX Runtime has no bf16 CPU kernels, but Intel CPUs with AMX or AVX512_BF16 multiply bf16
several times faster than fp32. OpenVINO reads the exported ONNX graph as it is and, asked
for ``INFERENCE_PRECISION_HINT=bf16``, runs its matrix products and convolutions in bf16
(accumulating in fp32) and keeps the precision-sensitive operators in fp32. The stems change
by what bf16 rounding does; the quality meter (``benchmarks/quality/``) reports it as an SDR
difference. Whether it is faster depends on the CPU and the family:
docs/decisions/0005-bf16-by-cpu-kind.md.

The session mirrors ONNX Runtime's ``run(output_names, feeds)``, so the in-process backend
and the CPU server's python model use either one the same way
(:func:`stemserve.runtime.ort_session.cpu_session`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from stemserve.cpu import bf16_flags, bf16_kind, cpu_model
from stemserve.defaults import cache_root
from stemserve.errors import ModelError, SpecError
from stemserve.files import atomic_write, file_sha256
from stemserve.spec import SIDECAR_FILE, ModelSpec, family_rule, sidecar_name

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'stemserve[openvino]'"
BF16_TOLERANCE = 0.02
"""Largest difference from OpenVINO's own fp32 result (L2 norm, relative) the self-check
accepts. bf16 rounding gives 2e-3 to 4e-3 (full-size v2 2.7e-3, htdemucs 3.8e-3, random
weights). oneDNN's bf16 convolution on AMX gives about 1 for
some layer shapes (Conv1d with 16 or 24 input channels, kernel 8, stride 4, in OpenVINO
2026.4 and in torch 2.13 alike; the released models' 48 and 64 channels are not among
them): a graph with such a layer is refused, not served wrong."""
SHAPES_KEPT = 2
"""Compiled input shapes kept per session, the least recently used dropped first: the hot
path's and the latest last segment's (each holds its own bf16 copy of the weights)."""
CHECK_NOISE = (0, 0.3)
"""The self-check's input: normal noise of this seed and standard deviation."""
CHECK_COST = 4
"""The self-check (an fp32 compile, a run of each) takes about this many times the bf16
compile before it, for the time it announces (full-size v2 and htdemucs, 2-core AMD EPYC)."""
CHECKS_FOLDER = "bf16-checks"
"""The self-check's results, under stemserve's cache: one small JSON file per graph (by
content), CPU model and bf16 flags, OpenVINO version, tolerance, input shape and noise."""
_RECORD_LIMIT = 4096
"""Bytes of a result file read at most: a record is a few hundred."""


class Measured(NamedTuple):
    """``--bf16`` timed against fp32 on the same CPU (docs/decisions/0005-bf16-by-cpu-kind.md)."""

    speedup: float
    """fp32's time over bf16's: below 1, bf16 was the slower."""
    evidence: str
    """The times, as the log quotes them."""


BF16_MEASURED: dict[tuple[str, str], Measured] = {
    # The sources of these four rows: docs/decisions/0005-bf16-by-cpu-kind.md.
    ("demucs", "avx512_bf16"): Measured(6.7 / 13.0, "13.0 s against 6.7 s for 20 s of audio "
                                                    "on a 2-core AMD EPYC"),
    ("demucs", "amx"): Measured(1.80 / 1.15, "1.15 s against 1.80 s per 8 s segment on a "
                                             "2-core Xeon"),
    ("htdemucs", "amx"): Measured(2.16 / 0.87, "0.87 s against 2.16 s per 7.8 s segment on a "
                                               "2-core Xeon"),
    ("htdemucs", "avx512_bf16"): Measured(1.70 / 1.07, "1.70x demucs 4's speed against 1.07x "
                                                       "on a 2-core AMD EPYC"),
}
"""bf16 against fp32 by model family and CPU kind (:func:`stemserve.cpu.bf16_kind`)."""
CPU_KINDS = {"amx": "CPUs with AMX", "avx512_bf16": "CPUs without AMX"}
_warned: set[tuple[str, str]] = set()
"""(family, CPU kind) pairs this process was already told bf16 is slower for."""


def cpu_has_bf16() -> bool:
    """Whether OpenVINO can run bf16 arithmetic on this CPU (AMX or AVX512_BF16); False
    without OpenVINO."""
    try:
        import openvino as ov
    except ImportError:
        return False
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def graph_family(model_file: Path) -> str | None:
    """The model family the sidecar beside ``model_file`` names (an export's bf16 or fp32
    sidecar, or a repository version folder's ``model.json``); None without one."""
    for name in (sidecar_name("bf16"), SIDECAR_FILE):
        try:
            spec = ModelSpec.load(model_file.parent / name)
        except SpecError:
            continue
        if spec.onnx_file == model_file.name:
            return spec.family
    return None


def _note_speed(family: str | None) -> None:
    """Warn, once per process, where ``--bf16`` was measured slower than fp32 for
    ``family`` on this kind of CPU (:data:`BF16_MEASURED`)."""
    kind = bf16_kind()
    measured = BF16_MEASURED.get((family, kind))
    if measured is None:
        return
    name = family_rule(family).title
    if measured.speedup >= 1:
        logger.debug("--bf16 was measured %.2fx as fast as fp32 for %s on %s (%s)",
                     measured.speedup, name, CPU_KINDS[kind], measured.evidence)
    elif (family, kind) not in _warned:
        _warned.add((family, kind))
        logger.warning("--bf16 was measured slower than fp32 for %s on %s (%s): drop --bf16, "
                       "or use --int8", name, CPU_KINDS[kind], measured.evidence)


def _check_file(key: dict[str, Any]) -> Path:
    """Where the self-check's result for ``key`` is kept."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_root() / CHECKS_FOLDER / f"{name}.json"


def _cached_error(key: dict[str, Any]) -> float | None:
    """The self-check's error recorded for ``key``; None where there is no record of that
    very check (missing, unreadable, not a plain file, oversized, not JSON, another key)."""
    try:
        # Non-blocking: a FIFO put in its place must not hang the load.
        fd = os.open(_check_file(key), os.O_RDONLY | os.O_NONBLOCK)
        with open(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            text = file.read(_RECORD_LIMIT + 1)
        record = json.loads(text) if len(text) <= _RECORD_LIMIT else None
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    error = record.get("error")
    return error if type(error) is float and not error < 0 else None


def _record_error(key: dict[str, Any], error: float) -> None:
    """Keep the self-check's result for ``key``; the next session checks again if it
    cannot be written."""
    path = _check_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w") as file:
            json.dump({"key": key, "error": error}, file, indent=1, sort_keys=True)
    except OSError as err:
        logger.warning("cannot keep the bf16 check's result in %s (%s): the next session "
                       "checks the graph again", path.parent, err)


class Bf16Session:
    """``model_file`` compiled by OpenVINO for the CPU with bf16 arithmetic and ``threads``
    threads (0: one per core this process may run on).

    One compiled model per input shape but the batch: OpenVINO 2026.4's CPU plugin computes
    transposed convolutions wrongly in bf16 when the time axis is dynamic (Demucs v2's
    output came back 2,048 samples short, and shorter inputs failed), and right once the
    time axis is fixed. The hot path has one shape (HT Demucs only ever one); a track's
    short last segment compiles its own, and the :data:`SHAPES_KEPT` latest are kept.

    Refuses a CPU without bf16 instructions (OpenVINO would silently fall back to fp32, and
    the stems would be labelled bf16 while being fp32's), and a graph whose bf16 result is
    not within :data:`BF16_TOLERANCE` of fp32's: the first shape compiled is also compiled
    in fp32 once and both run on the same seeded noise. ``check_shape`` (an input shape, the
    batch left out) does that at once, so a refusal comes at load time rather than on the
    first segment; it costs an fp32 compile and a run of each, so its result, a pass or a
    refusal, is kept in the cache (:data:`CHECKS_FOLDER`) and the next session on the same
    graph, CPU and OpenVINO only compiles. Where the graph's family was measured slower in
    bf16 than in fp32 on this kind of CPU (:data:`BF16_MEASURED`, by the sidecar beside the
    graph), it says so. Not thread-safe: one caller at a time, as the python backend and the
    in-process worker are.
    """

    def __init__(self, model_file: Path, threads: int = 0,
                 check_shape: tuple[int, ...] | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise ModelError(f"the bf16 path runs on OpenVINO: {INSTALL_HINT}") from None
        self._ov = ov
        self._core = ov.Core()
        if not cpu_has_bf16():
            raise ModelError("this CPU has no bf16 arithmetic (AMX or AVX512_BF16): OpenVINO "
                             "would run it in fp32; use the fp32 or int8 graph",
                             where=str(model_file))
        _note_speed(graph_family(Path(model_file)))
        self.threads = threads or len(os.sched_getaffinity(0))
        self.version = ov.get_version()
        self._where = str(model_file)
        logger.info("reading %s into OpenVINO", self._where)
        try:
            self._model = self._core.read_model(self._where)
        except RuntimeError as err:
            raise ModelError(f"OpenVINO cannot read it: {err}", where=self._where) from None
        self._requests: dict[tuple[int, ...], object] = {}
        self.checked_error: float | None = None
        """The self-check's relative difference from fp32, once it ran (or was found in the
        cache)."""
        if check_shape is not None:
            self._request(tuple(check_shape))

    def _compile(self, shape: tuple[int, ...], precision: str):
        """The model compiled for inputs of ``shape`` (batch left out) in ``precision``."""
        model = self._model.clone()
        model.reshape(self._ov.PartialShape([-1, *shape]))
        try:
            return self._core.compile_model(model, "CPU", {
                "INFERENCE_PRECISION_HINT": precision,
                "INFERENCE_NUM_THREADS": self.threads,
                # One request at a time, every thread on it: the server's instance and the
                # in-process worker both run one batch after the other.
                "PERFORMANCE_HINT": "LATENCY",
            })
        except RuntimeError as err:
            raise ModelError(f"OpenVINO cannot compile it for inputs of {list(shape)}: "
                             f"{err}", where=self._where) from None

    def _check_key(self, shape: tuple[int, ...]) -> dict[str, Any]:
        """What the self-check's result at ``shape`` depends on: the graph's bytes, the CPU,
        OpenVINO and the check itself."""
        return {"graph_sha256": file_sha256(self._where), "cpu": cpu_model(),
                "cpu_bf16_flags": list(bf16_flags()), "openvino": self.version,
                "tolerance": BF16_TOLERANCE, "input_shape": list(shape),
                "noise": list(CHECK_NOISE)}

    def _self_check(self, shape: tuple[int, ...], bf16) -> float:
        """The relative difference of the ``bf16`` compiled model's result on seeded noise of
        ``shape`` from fp32's."""
        seed, scale = CHECK_NOISE
        mix = scale * np.random.default_rng(seed).standard_normal((1, *shape),
                                                                  dtype=np.float32)
        fp32 = self._compile(shape, "f32")
        expected = fp32.create_infer_request().infer([mix])[fp32.output(0)]
        got = bf16.create_infer_request().infer([mix])[bf16.output(0)]
        return float(np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-12))

    def _accept(self, error: float) -> None:
        """Take the self-check's ``error``, or refuse the graph beyond
        :data:`BF16_TOLERANCE`."""
        if not error <= BF16_TOLERANCE:
            raise ModelError(
                f"OpenVINO's bf16 result on this CPU is {error:.0%} off its fp32 result for "
                f"this graph (bf16 rounding gives about 0.3%): oneDNN's bf16 convolution is "
                "wrong for some layer shapes on AMX CPUs (Conv1d with 16 or 24 input "
                "channels, kernel 8, stride 4); use the fp32 or int8 graph",
                where=self._where)
        self.checked_error = error

    def _cached_check(self, shape: tuple[int, ...]) -> dict[str, Any] | None:
        """Take the self-check's result at ``shape`` from the cache, a refusal included;
        without one, the key to run and keep it under."""
        key = self._check_key(shape)
        error = _cached_error(key)
        if error is None:
            return key
        logger.debug("bf16 check of %s taken from %s: %.1e off fp32", self._where,
                     _check_file(key), error)
        self._accept(error)
        return None

    def _request(self, shape: tuple[int, ...]):
        """The inference request of the model compiled for inputs of ``shape`` (batch
        left out), compiled on first use."""
        request = self._requests.pop(shape, None)
        if request is None:
            key = None if self.checked_error is not None else self._cached_check(shape)
            logger.info("compiling %s for bf16 at input length %d", self._where, shape[-1])
            started = time.perf_counter()
            compiled = self._compile(shape, "bf16")
            if key is not None:
                logger.info("checking the bf16 graph of %s against fp32 (once per graph and "
                            "CPU; about %.0f s)", self._where,
                            max(1., CHECK_COST * (time.perf_counter() - started)))
                error = self._self_check(shape, compiled)
                _record_error(key, error)
                self._accept(error)
            request = compiled.create_infer_request()
            if len(self._requests) >= SHAPES_KEPT:
                self._requests.pop(next(iter(self._requests)))
        self._requests[shape] = request  # the latest used last
        return request

    def run(self, output_names: list[str] | None,
            feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The named outputs for ``feeds`` (None: every output, as ONNX Runtime; one input;
        copies: the request reuses its buffers)."""
        (value,) = feeds.values()
        request = self._request(tuple(value.shape[1:]))
        try:
            results = request.infer(feeds)
        except RuntimeError as err:
            raise ModelError(f"OpenVINO failed on inputs of shape {list(value.shape)}: {err}",
                             where=self._where) from None
        outputs = {output.get_any_name(): output for output in request.model_outputs}
        return [np.array(results[outputs[name]], copy=True)
                for name in (output_names or list(outputs))]
