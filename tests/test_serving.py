"""The real tritonserver (nvidia-pytriton's binary, python backend) serving the small model.

One server is started per session by the ``triton_server`` fixture; the ``stemserve serve``
tests start their own through the command line, as a user would.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from stemserve.errors import ServerError, StemserveError
from stemserve.spec import ModelSpec, load_export_spec
from stemserve.model_repository.ports import free_ports, start_on_free_ports
from stemserve.model_repository.server import TritonServer

pytestmark = pytest.mark.server

TIMEOUT_S = 60


@pytest.fixture(scope="module")
def spec(small_export) -> ModelSpec:
    return ModelSpec.load(small_export / "model.json")


@pytest.fixture(scope="module")
def reference(small_export, spec):
    """In-process ONNX Runtime on the same graph: what the server must return."""
    session = ort.InferenceSession(str(small_export / spec.onnx_file),
                                   providers=["CPUExecutionProvider"])
    return lambda mix: session.run([spec.output_name], {spec.input_name: mix})[0]


@pytest.fixture
def client(triton_server):
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
        yield client


def _inputs(mix: np.ndarray, name: str = "mix", datatype: str = "FP32") -> list:
    tensor = grpcclient.InferInput(name, list(mix.shape), datatype)
    tensor.set_data_from_numpy(mix)
    return [tensor]


def _infer(client, spec: ModelSpec, mix: np.ndarray) -> np.ndarray:
    result = client.infer(spec.model_name, _inputs(mix, spec.input_name),
                          client_timeout=TIMEOUT_S)
    return result.as_numpy(spec.output_name)


def _mix(spec: ModelSpec, batch: int = 1, length: int | None = None, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, spec.audio_channels, length or spec.padded_length),
                               dtype=np.float32)


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


def test_model_is_ready_with_the_sidecars_tensors(client, spec):
    assert client.is_server_ready() and client.is_model_ready(spec.model_name)
    metadata = client.get_model_metadata(spec.model_name, as_json=True)
    assert [(t["name"], t["shape"]) for t in metadata["inputs"]] == \
        [(spec.input_name, ["-1", str(spec.audio_channels), "-1"])]
    assert [(t["name"], t["shape"]) for t in metadata["outputs"]] == \
        [(spec.output_name, ["-1", str(len(spec.sources)), str(spec.audio_channels), "-1"])]


@pytest.mark.parametrize("batch, length", [(1, None), (2, None), (1, 20000)],
                         ids=["padded", "full-batch", "last-segment"])
def test_served_stems_equal_onnxruntime(client, spec, reference, batch, length):
    length = spec.valid_length(length) if length else spec.padded_length
    mix = _mix(spec, batch, length, seed=batch)
    got = _infer(client, spec, mix)
    expected = reference(mix)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-4


def _counts(client, spec: ModelSpec) -> tuple[int, int]:
    (stats,) = client.get_inference_statistics(spec.model_name, as_json=True)["model_stats"]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def test_concurrent_clients_are_batched_and_get_their_own_stems(triton_server, client, spec,
                                                                reference):
    clients, per_client = 8, 3
    mixes = {(c, r): _mix(spec, seed=100 + per_client * c + r)
             for c in range(clients) for r in range(per_client)}
    results: dict = {}
    errors: list = []
    start = threading.Barrier(clients)

    def run(index: int) -> None:
        try:
            with grpcclient.InferenceServerClient(triton_server.grpc_url) as own:
                start.wait()
                for r in range(per_client):
                    results[index, r] = _infer(own, spec, mixes[index, r])
        except Exception as err:  # reported below, with the thread's own traceback text
            errors.append(repr(err))

    inferences_before, executions_before = _counts(client, spec)
    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    assert not errors
    # Triton records a batch's statistics just after answering it: let the last one land.
    deadline = time.monotonic() + 5
    while (counts := _counts(client, spec))[0] - inferences_before < clients * per_client \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    inferences, executions = counts
    assert inferences - inferences_before == clients * per_client
    assert executions - executions_before < inferences - inferences_before, \
        "no request was batched with another"
    expected = reference(np.concatenate([mixes[key] for key in sorted(mixes)]))
    got = np.concatenate([results[key] for key in sorted(mixes)])
    assert np.abs(got - expected).max() < 1e-4  # each response belongs to its request


BAD_REQUESTS = {
    "three-channels": (lambda spec: _inputs(_mix(spec)[:, :1].repeat(3, axis=1)),
                       "unexpected shape for input 'mix'"),
    "float64": (lambda spec: _inputs(_mix(spec).astype(np.float64), datatype="FP64"),
                "expects 'FP32'"),
    "missing-input": (lambda spec: [], "missing required input(s) ['mix']"),
    "batch-above-max": (lambda spec: _inputs(_mix(spec, batch=3)),
                        "batch-size must be <= 2"),
    "too-short": (lambda spec: _inputs(_mix(spec, length=100)), "the model takes"),
    "too-long": (lambda spec: _inputs(_mix(spec, length=spec.max_request_length + 1)),
                 "the model takes"),
    "no-batch-dim": (lambda spec: _inputs(_mix(spec)[0]), "unexpected shape"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_gets_a_clear_error_and_the_server_goes_on(client, spec, case):
    make, message = BAD_REQUESTS[case]
    with pytest.raises(InferenceServerException) as raised:
        client.infer(spec.model_name, make(spec), client_timeout=TIMEOUT_S)
    assert message in raised.value.message()
    assert _infer(client, spec, _mix(spec)).shape[:3] == \
        (1, len(spec.sources), spec.audio_channels)


def test_http_health_endpoints(triton_server):
    for endpoint in ("ready", "live"):
        assert _get(f"{triton_server.http_url}/v2/health/{endpoint}")[0] == 200


def test_metrics_count_inferences(triton_server, client, spec):
    _infer(client, spec, _mix(spec))
    status, text = _get(triton_server.metrics_url)
    assert status == 200
    counts = [line for line in text.splitlines()
              if line.startswith("nv_inference_count{") and 'model="demucs"' in line]
    assert counts and float(counts[0].rsplit(" ", 1)[1]) >= 1


def test_server_that_dies_at_start_up_reports_its_log(tmp_path):
    model_dir = tmp_path / "repository" / "broken"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(
        'backend: "python"\nmax_batch_size: 1\n'
        'input [{name: "x" data_type: TYPE_FP32 dims: [1]}]\n'
        'output [{name: "y" data_type: TYPE_FP32 dims: [1]}]\n')
    (model_dir / "1" / "model.py").write_text(
        "class TritonPythonModel:\n"
        "    def initialize(self, args):\n"
        "        raise RuntimeError('broken on purpose')\n")
    servers = []

    def start(ports: list[int]) -> None:
        http, grpc, metrics = ports
        servers.append(TritonServer(tmp_path / "repository", http_port=http, grpc_port=grpc,
                                    metrics_port=metrics, log_file=tmp_path / "server.log"))
        servers[-1].start(timeout=60)

    with pytest.raises(StemserveError, match="exited with code 1 during start-up") as raised:
        start_on_free_ports(start)
    assert "failed to load 'broken' version 1: Internal: RuntimeError: broken on purpose" \
        in str(raised.value)
    assert servers[-1].pid is None


def _process_tree(root: int) -> dict[int, str]:
    """pid -> command name of ``root`` and all its descendants, read from /proc."""
    parents: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:]
        pid, ppid = int(entry.name), int(rest.split()[1])
        names[pid] = name
        parents.setdefault(ppid, []).append(pid)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        tree[pid] = names.get(pid, "?")
        todo.extend(parents.get(pid, []))
    return tree


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _serve(export: Path, repository: Path, ports: list[int]) -> list[str]:
    http, grpc, metrics = ports
    return [sys.executable, "-m", "stemserve", "serve", "--cpu", "-n", str(export),
            "--repository", str(repository), "--http-port", str(http),
            "--grpc-port", str(grpc), "--metrics-port", str(metrics)]


def _start_serve(export: Path, repository: Path, stderr: Path
                 ) -> tuple[subprocess.Popen, list[int], list[str]]:
    """`stemserve serve` on free ports, once it says it is ready (its stdout lines so far),
    started again on fresh ones if a port was taken before the server bound it."""
    def start(ports: list[int]) -> tuple[subprocess.Popen, list[int], list[str]]:
        with stderr.open("w") as log:
            process = subprocess.Popen(_serve(export, repository, ports),
                                       stdout=subprocess.PIPE, stderr=log, text=True)
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C stops it"):
                return process, ports, lines
        process.wait(TIMEOUT_S)
        raise ServerError("stemserve serve did not start:\n" + "".join(lines)
                          + stderr.read_text())

    return start_on_free_ports(start)


def test_serve_command_is_ready_and_sigterm_leaves_no_process(small_export, tmp_path):
    process, ports, lines = _start_serve(small_export, tmp_path / "repository",
                                         tmp_path / "stderr")
    try:
        assert any(f"127.0.0.1:{ports[1]}" in line for line in lines), lines
        with grpcclient.InferenceServerClient(f"127.0.0.1:{ports[1]}") as client:
            assert client.is_model_ready("demucs")
        tree = _process_tree(process.pid)
        assert {"tritonserver", "triton_python_b"} <= set(tree.values()), tree
        process.send_signal(signal.SIGTERM)
        assert process.wait(TIMEOUT_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
    deadline = time.monotonic() + 10
    while any(map(_alive, tree)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [tree[pid] for pid in tree if _alive(pid)]
    # What it serves, and what it waits for, in a few lines: no option tables without -v.
    told = (tmp_path / "stderr").read_text()
    assert "serving small (Demucs v2, sha256 " in told and "fp32) from " in told
    assert "starting tritonserver on 127.0.0.1" in told
    assert "demucs: loading small (" in told and "a warm-up request follows" in told
    assert "+----" not in told and "Started GRPCInferenceService" not in told
    assert len(told.splitlines()) < 12, told


def test_serve_command_reports_a_port_in_use(small_export, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        http, metrics = free_ports(2)
        ports = [http, taken.getsockname()[1], metrics]
        result = subprocess.run(_serve(small_export, tmp_path / "repository", ports),
                                capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 1
    assert f"stemserve: error: gRPC port {ports[1]} is already in use" in result.stderr


def test_a_track_ending_in_a_one_sample_segment_is_served(triton_server, small_export):
    """The pipeline sends the shortest request the contract allows; the CPU server takes it."""
    from stemserve.client import separate_array
    from stemserve.client.backends.onnx import OnnxBackend
    from stemserve.client.backends.triton import TritonBackend

    spec = load_export_spec(small_export)
    stride = int(0.75 * spec.segment_length)  # the default overlap of 0.25
    mix = np.random.default_rng(1).standard_normal((2, 3 * stride + 1)).astype(np.float32)
    with TritonBackend(triton_server.grpc_url) as served, OnnxBackend(small_export) as local:
        got = separate_array(mix, spec.sample_rate, backend=served)
        expected = separate_array(mix, spec.sample_rate, backend=local)
    assert max(np.abs(got[name] - expected[name]).max() for name in got) < 1e-5


# ---------------------------------------------------------------------------------------------
# Ports for servers that take port numbers (tritonserver)

def test_free_ports_are_below_the_ephemeral_range_and_never_handed_out_twice():
    """Clients' connections take their local ports from the ephemeral range: a port picked
    there and released could be taken by one before the server binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    picked = [port for _ in range(20) for port in free_ports(3)]
    assert len(set(picked)) == len(picked)
    assert all(10000 <= port < low for port in picked), picked


def test_a_start_that_finds_a_port_taken_goes_again_on_fresh_ports():
    from stemserve.model_repository.ports import PortInUse, check_port_free, port_in_use

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(PortInUse, match="gRPC port .* already in use"):
            check_port_free("127.0.0.1", taken.getsockname()[1], "gRPC")
    # tritonserver's own words when a port is taken after that check: in its log's tail.
    bound_late = ServerError("tritonserver exited with code 1 during start-up; its log:\n"
                             "E1207 main.cc:245] \"failed to start GRPC service: Unavailable "
                             "- Socket '127.0.0.1:14767' already in use \"")
    assert port_in_use(bound_late) and not port_in_use(ServerError("model failed to load"))

    tries: list[list[int]] = []

    def start(ports: list[int]) -> str:
        tries.append(ports)
        if len(tries) == 1:
            raise PortInUse("HTTP port in use")
        if len(tries) == 2:
            raise bound_late
        return "started"

    assert start_on_free_ports(start) == "started"
    assert len(tries) == 3 and len({port for ports in tries for port in ports}) == 9

    def failing(error: ServerError):
        def start(ports: list[int]) -> None:
            tries.append(ports)
            raise error
        return start

    tries.clear()
    with pytest.raises(ServerError, match="model failed"):  # any other error: at once
        start_on_free_ports(failing(ServerError("model failed to load")))
    assert len(tries) == 1
    with pytest.raises(PortInUse):  # taken every time: the last refusal, after 3 tries
        start_on_free_ports(failing(PortInUse("taken")))
    assert len(tries) == 1 + 3


def test_local_servers_start_again_when_a_port_was_taken(small_export, tmp_path, monkeypatch):
    """The race the pick leaves open, forced: the first ports handed out are taken by the
    time the server binds them; local_server (separate --serve, the fixtures) starts on
    fresh ones."""
    from stemserve.model_repository import ports
    from stemserve.model_repository.local import local_server

    real = ports.free_ports
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        handed: list[list[int]] = []

        def first_taken(count: int, host: str = "127.0.0.1") -> list[int]:
            picked = real(count, host)
            if not handed:
                picked[1] = taken.getsockname()[1]  # gRPC's port: someone else's by now
            handed.append(picked)
            return picked

        monkeypatch.setattr(ports, "free_ports", first_taken)
        with local_server(small_export, root=tmp_path, logs=tmp_path) as server:
            assert len(handed) == 2 and server.ports["gRPC"] == handed[1][1]
            with grpcclient.InferenceServerClient(server.grpc_url) as client:
                assert client.is_model_ready("demucs")
