"""A real Triton Inference Server as a child process: start, wait until ready, stop cleanly.

``stemserve serve``, ``separate --serve``, the test suite and the benchmarks all start the
server through :class:`TritonServer` (mostly by way of :func:`~.local.local_server`), so they
exercise the same binary, flags and shutdown path. On a GPU host
:class:`DockerTritonServer` runs the NGC image instead, with the same readiness, port and
shutdown handling.
"""
from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Sequence

from stemserve.errors import ServerError
from stemserve.model_repository.binary import prepare_server_dir, pytriton_paths
from stemserve.model_repository.ports import check_port_free

logger = logging.getLogger(__name__)

NGC_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
TRT_CACHE_VOLUME = "stemserve-trt-cache"
LOG_TAIL_LINES = 20
PROBE_TIMEOUT = 5.0
"""Deadline of each readiness probe at start-up: a server that hangs is waited for by the
start timeout, not by one probe."""
WAIT_POLL = 0.2
"""Seconds between checks of a served tritonserver (see :meth:`TritonServer.wait`)."""
# Lines worth quoting when the server fails: Triton's "E<mmdd> ..." lines and its final
# "error: ..." line.
ERROR_LINE = re.compile(r"^(E\d{4} |error: )")
TOLD_LINE = re.compile(r"^([EW]\d{4} |error: )|model\.py:\d+\]")
"""What a server started with ``log_all=False`` forwards: its errors and warnings, and what
stemserve's python model says (which graph, runtime and check it loads). Its option tables
and routine lines are kept for error messages only."""
STAGE_INTERVAL = 10.0
"""Seconds between the notes that say what a slow start is waiting for."""
CPU_HOST_NOISE = re.compile(r"CudaDriverHelper has not been initialized|"
                            r"pinned system memory|pinned memory pool")
"""What the server always logs on a host without a GPU: errors and warnings that are not,
left out of the forwarded log and of error messages."""


def _client_host(host: str) -> str:
    """The address a client on this machine connects to for a server bound to ``host``."""
    return "127.0.0.1" if host in ("", "0.0.0.0") else host


class TritonServer:
    """A tritonserver child process serving ``repository``; use it as a context manager.

    The server runs in its own session (process group), so that Ctrl-C in a terminal reaches
    only this process, which then stops the server and every python-backend stub with it.
    Logs go to ``log_file`` when given, else to this process's stderr; the last lines are
    kept either way for error messages.
    """

    def __init__(self, repository: Path, *, http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, host: str = "127.0.0.1", log_verbose: int = 0,
                 log_file: Path | None = None, extra_args: Sequence[str] = (),
                 log_all: bool = True):
        self.repository = Path(repository).resolve()
        self.ports = {"HTTP": http_port, "gRPC": grpc_port, "metrics": metrics_port}
        self.host = host
        self.log_verbose = log_verbose
        self.log_file = Path(log_file) if log_file else None
        self.extra_args = tuple(extra_args)
        self.log_all = log_all
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._errors: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)

    @property
    def grpc_url(self) -> str:
        """``host:port``, what ``tritonclient.grpc.InferenceServerClient`` takes."""
        return f"{_client_host(self.host)}:{self.ports['gRPC']}"

    @property
    def http_url(self) -> str:
        return f"http://{_client_host(self.host)}:{self.ports['HTTP']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_client_host(self.host)}:{self.ports['metrics']}/metrics"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        """Whether the server process is started and has not exited."""
        return self._process is not None and self._process.poll() is None

    def log_tail(self) -> str:
        """The server's error lines and last log lines, for error messages."""
        errors = "".join(line for line in self._errors if line not in self._tail)
        return (f"{errors}...\n" if errors else "") + "".join(self._tail)

    def _server_args(self, repository: str) -> list[str]:
        """tritonserver flags shared by the local and the docker server."""
        return [f"--model-repository={repository}",
                f"--log-verbose={self.log_verbose}",
                # Fail fast: a model that does not load stops the server at start-up.
                "--exit-on-error=true", "--strict-readiness=true",
                # In-flight requests get this long to finish after SIGINT.
                "--exit-timeout-secs=10",
                *self.extra_args]

    def _command(self) -> tuple[list[str], dict[str, str]]:
        """The command line and environment of the server process."""
        server = prepare_server_dir()
        _, _, libs = pytriton_paths()
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            filter(None, [str(libs), env.get("LD_LIBRARY_PATH")]))
        # The python stub finds numpy, onnxruntime and stemserve through the first python3
        # on PATH: this interpreter's environment.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        command = [str(server / "bin" / "tritonserver"),
                   f"--backend-directory={server / 'backends'}",
                   f"--http-address={self.host}", f"--http-port={self.ports['HTTP']}",
                   f"--grpc-address={self.host}", f"--grpc-port={self.ports['gRPC']}",
                   f"--metrics-address={self.host}",
                   f"--metrics-port={self.ports['metrics']}",
                   "--allow-gpu-metrics=false",
                   *self._server_args(str(self.repository))]
        return command, env

    def start(self, timeout: float = 120) -> None:
        """Start the server and return once it and every model in the repository are ready.

        Raises ServerError naming the port in use, or with the server's last log lines
        when it exits during start-up or is not ready within ``timeout`` seconds.
        """
        if self._process is not None:
            raise ServerError("this TritonServer is already started")
        for what, port in self.ports.items():
            check_port_free(self.host, port, what)
        command, env = self._command()
        logger.debug("starting %s", " ".join(command))
        began = time.monotonic()
        sink = open(self.log_file, "a", encoding="utf-8") if self.log_file else sys.stderr
        self._process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._forward_logs, args=(sink,),
                                        name="tritonserver-log", daemon=True)
        self._reader.start()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        logger.debug("tritonserver ready in %.1f s (gRPC %s, HTTP %s)",
                    time.monotonic() - began, self.grpc_url, self.http_url)

    def _forward_logs(self, sink: IO[str]) -> None:
        """Copy server output to ``sink`` line by line, keeping the tail for errors."""
        assert self._process is not None and self._process.stdout is not None
        try:
            for raw in self._process.stdout:
                line = raw.decode("utf-8", errors="replace")
                if CPU_HOST_NOISE.search(line):
                    continue
                self._tail.append(line)
                if ERROR_LINE.match(line):
                    self._errors.append(line)
                if self.log_all or TOLD_LINE.search(line):
                    sink.write(line)
                    sink.flush()
        finally:
            if sink is not sys.stderr:
                sink.close()

    def _wait_ready(self, timeout: float) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        assert self._process is not None
        began = time.monotonic()
        deadline, next_note = began + timeout, began + STAGE_INTERVAL
        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            while True:
                if time.monotonic() > next_note:
                    next_note += STAGE_INTERVAL
                    logger.info("tritonserver starting for %.0f s: %s",
                                time.monotonic() - began, self._stage(client))
                code = self._process.poll()
                if code is not None:
                    self._reader.join(timeout=5)
                    raise ServerError(
                        f"tritonserver exited with code {code} during start-up "
                        f"(repository {self.repository}); its log:\n" + self.log_tail())
                try:
                    if client.is_server_ready(client_timeout=PROBE_TIMEOUT) \
                            and self._models_ready(client):
                        return
                except InferenceServerException:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"tritonserver was not ready after {timeout:.0f} s "
                        f"(repository {self.repository}); its log:\n" + self.log_tail())
                time.sleep(0.2)
        finally:
            client.close()

    @staticmethod
    def _stage(client) -> str:
        """What a start is waiting for, for a user watching it: the models' states."""
        from tritonclient.utils import InferenceServerException

        try:
            index = client.get_model_repository_index(
                as_json=True, client_timeout=PROBE_TIMEOUT).get("models", [])
        except InferenceServerException:
            return "the server is not listening yet"
        return ", ".join(f"model {model.get('name')} {model.get('state', 'UNKNOWN')}"
                         + (" (its graph, then a warm-up request of one full segment)"
                            if model.get("state") == "LOADING" else "")
                         for model in index) or "no model listed yet"

    @staticmethod
    def _models_ready(client) -> bool:
        """True when the repository lists models and every one of them is READY."""
        index = client.get_model_repository_index(
            as_json=True, client_timeout=PROBE_TIMEOUT).get("models", [])
        return bool(index) and all(model.get("state") == "READY" for model in index)

    def _signal(self, signum: int) -> None:
        """Send ``signum`` to the server's whole process group (server and stubs)."""
        try:
            os.killpg(self._process.pid, signum)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 20) -> int | None:
        """Stop the server: SIGINT, then SIGTERM, then SIGKILL; returns its exit code.

        Whatever is left in its process group afterwards (a stub that outlived the server)
        is killed too.
        """
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            for signum, grace in ((signal.SIGINT, timeout), (signal.SIGTERM, 5),
                                  (signal.SIGKILL, 5)):
                self._signal(signum)
                try:
                    process.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    logger.warning("tritonserver still running %.0f s after %s", grace,
                                   signal.Signals(signum).name)
        self._signal(signal.SIGKILL)
        if self._reader is not None:
            self._reader.join(timeout=5)
        self._process = None
        return process.returncode

    def restart(self, port_wait: float = 120.0) -> None:
        """Stop the server the way an operator would (SIGINT) and start it on its ports.

        A server stopped with clients connected leaves its ports in TIME_WAIT for a minute,
        which :meth:`start` refuses: wait up to ``port_wait`` seconds for them.
        """
        self.stop()
        deadline = time.monotonic() + port_wait
        for what, port in self.ports.items():
            while True:
                try:
                    check_port_free(self.host, port, what)
                    break
                except ServerError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
        self.start()

    def wait(self) -> int:
        """Block until the server exits on its own; returns its exit code (for the CLI).

        Polls instead of blocking in waitpid: a SIGTERM the kernel hands to another thread
        (the log reader's) would not interrupt the main thread's waitpid, so its Python
        handler would never run and ``serve`` would outlive the signal.
        """
        if self._process is None:
            raise ServerError("the server is not started")
        while (code := self._process.poll()) is None:
            time.sleep(WAIT_POLL)
        return code

    def __enter__(self) -> "TritonServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class DockerTritonServer(TritonServer):
    """The NGC tritonserver image on the GPUs of this host, through ``docker run``.

    The container publishes Triton's default ports on the requested host ports; TensorRT
    engines are cached in the named volume ``stemserve-trt-cache`` across runs.
    """

    def __init__(self, repository: Path, *, image: str = NGC_IMAGE, **kwargs):
        super().__init__(repository, **kwargs)
        self.image = image
        self.container = f"stemserve-triton-{os.getpid()}"

    def _command(self) -> tuple[list[str], dict[str, str]]:
        publish = [arg for what, inside in (("HTTP", 8000), ("gRPC", 8001), ("metrics", 8002))
                   for arg in ("-p", f"{self.host}:{self.ports[what]}:{inside}")]
        command = ["docker", "run", "--rm", "--gpus", "all", "--name", self.container,
                   "--shm-size=1g", *publish,
                   "-v", f"{self.repository}:/models:ro", "-v", f"{TRT_CACHE_VOLUME}:/trt_cache",
                   self.image, "tritonserver", *self._server_args("/models")]
        return command, dict(os.environ)

    def stop(self, timeout: float = 20) -> int | None:
        """``docker stop`` the container (the CLI alone may not pass signals on)."""
        if self._process is not None and self._process.poll() is None:
            subprocess.run(["docker", "stop", "-t", str(int(timeout)), self.container],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        return super().stop(timeout)


def docker_gpu_unavailable() -> str | None:
    """Why the docker GPU path cannot run here, or None when it can."""
    for tool in ("nvidia-smi", "docker"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not on PATH"
    for probe in (["nvidia-smi", "-L"], ["docker", "info"]):
        try:
            result = subprocess.run(probe, capture_output=True, text=True, timeout=15)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"`{' '.join(probe)}` failed: {err}"
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            return f"`{' '.join(probe)}` failed: {detail[-1] if detail else result.returncode}"
    return None
