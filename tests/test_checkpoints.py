"""Checkpoints: names and URLs, download/cache/checksum over a loopback server, local files,
the restricted unpickler, demucs training packages and the diffq-quantized release.

The official demucs 2.0.3 (and diffq) serve as oracles where a test compares outputs; the
real release files are never fetched: a loopback server publishes small random-weight
files under official-style names, with the signature table patched to match.
"""
from __future__ import annotations

import argparse
import hashlib
import http.server
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from stemserve import checkpoints
from stemserve.checkpoints import (KNOWN_MODELS, ROOT_URL, CheckpointError, CheckpointInfo,
                                   Release, checkpoint_cache_dir, checkpoint_url,
                                   download_checkpoint, load_model)
from stemserve.model import SOURCES, Demucs

OFFICIAL_URLS = {
    "demucs": "https://dl.fbaipublicfiles.com/demucs/v3.0/demucs-e07c671f.th",
    "demucs48_hq": "https://dl.fbaipublicfiles.com/demucs/v3.0/demucs48_hq-28a1282c.th",
    "demucs_extra": "https://dl.fbaipublicfiles.com/demucs/v3.0/demucs_extra-3646af93.th",
    "demucs_quantized": "https://dl.fbaipublicfiles.com/demucs/v3.0/demucs_quantized-07afea75.th",
    "demucs_unittest": "https://dl.fbaipublicfiles.com/demucs/v3.0/demucs_unittest-09ebc15f.th",
}


# --------------------------------------------------------------------------- helpers


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files``; ``server.mode`` "cut" / "cut-no-length" sends half a file."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.requests.append(self.path)
        body = self.server.files.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        if self.server.mode != "cut-no-length":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body if self.server.mode == "ok" else body[:len(body) // 2])

    def log_message(self, *args) -> None:
        pass


class LoopbackServer:
    """An HTTP server on 127.0.0.1 in a thread, standing in for dl.fbaipublicfiles.com."""

    def __init__(self) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.files, self.httpd.requests, self.httpd.mode = {}, [], "ok"
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        self.running = True

    files = property(lambda self: self.httpd.files)
    requests = property(lambda self: self.httpd.requests)

    def set_mode(self, mode: str) -> None:
        self.httpd.mode = mode

    def stop(self) -> None:
        if self.running:
            self.httpd.shutdown()
            self.httpd.server_close()
            self._thread.join()
            self.running = False


@pytest.fixture
def server():
    srv = LoopbackServer()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A private torch home, so nothing reads or writes the real cache; no URL override."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(checkpoints.URL_ENV, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


def _dead_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def _saved(obj, **kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


def _publish(server: LoopbackServer, monkeypatch, name: str, payload: bytes,
             config: dict) -> Path:
    """Serve ``payload`` as release ``name``, its signature patched to the payload's sha256."""
    signature = hashlib.sha256(payload).hexdigest()[:8]
    monkeypatch.setitem(checkpoints.RELEASES, name, Release(signature, config))
    server.files[f"{name}-{signature}.th"] = payload
    return Path(f"{name}-{signature}.th")


def _small_state(seed: int = 0, channels: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return Demucs(SOURCES, channels=channels).state_dict()


def _assert_same_weights(model: Demucs, state: dict[str, torch.Tensor]) -> None:
    ours = model.state_dict()
    assert ours.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(ours[key], value), key


def _mix(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(1, 2, model.valid_length(4096))


def _max_err(a: torch.nn.Module, b: torch.nn.Module) -> float:
    mix = _mix(a)
    with torch.no_grad():
        return (a.eval()(mix) - b.eval()(mix)).abs().max().item()


@contextmanager
def _demucs_own_loads(monkeypatch):
    """demucs 2.0.3 calls torch.load without weights_only, which torch >= 2.6 turns into a
    weights-only load that rejects demucs' own files: let the oracle load them as it did."""
    with monkeypatch.context() as patch, warnings.catch_warnings():
        patch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
        warnings.filterwarnings("ignore", message="Environment variable TORCH_FORCE_NO_WEIGHTS")
        yield


@pytest.fixture
def demucs_oracle():
    pytest.importorskip("diffq")
    return (pytest.importorskip("demucs.model"), pytest.importorskip("demucs.utils"),
            pytest.importorskip("demucs.pretrained"))


# --------------------------------------------------------------------------- names, URLs


def test_release_names_resolve_to_official_urls():
    assert ROOT_URL == "https://dl.fbaipublicfiles.com/demucs/v3.0/"
    assert set(KNOWN_MODELS) == set(OFFICIAL_URLS)
    for name, url in OFFICIAL_URLS.items():
        assert checkpoint_url(name) == url
    assert checkpoints.RELEASES["demucs48_hq"].config == {"channels": 48}
    assert checkpoints.RELEASES["demucs_unittest"].config == {"channels": 4}
    for name in ("demucs", "demucs_extra", "demucs_quantized"):
        assert checkpoints.RELEASES[name].config == {}


def test_signature_table_matches_demucs_2_0_3(demucs_oracle):
    pretrained = demucs_oracle[2]
    assert set(KNOWN_MODELS) | {"tasnet", "tasnet_extra"} == set(pretrained.PRETRAINED_MODELS)
    for name in KNOWN_MODELS:
        assert checkpoint_url(name) == pretrained.get_url(name)


def test_url_and_cache_overrides(cache, monkeypatch):
    assert checkpoint_cache_dir() == cache
    mirrored = checkpoint_url("demucs", base_url="http://mirror/x")
    assert mirrored == "http://mirror/x/demucs-e07c671f.th"
    monkeypatch.setenv(checkpoints.URL_ENV, "http://mirror/y/")
    assert checkpoint_url("demucs") == "http://mirror/y/demucs-e07c671f.th"


def test_unknown_and_unsupported_names_are_clear_errors():
    with pytest.raises(CheckpointError) as unknown:
        load_model("demucs_v4")
    assert "'demucs_v4'" in str(unknown.value)
    assert all(name in str(unknown.value) for name in KNOWN_MODELS)
    for name in ("tasnet", "tasnet_extra"):
        with pytest.raises(CheckpointError, match="ConvTasNet.*not support"):
            download_checkpoint(name)
    with pytest.raises(CheckpointError, match="applies to local files"):
        load_model("demucs_unittest", config="demucs")
    with pytest.raises(CheckpointError, match="no checkpoint file at missing.th"):
        load_model("missing.th")


# --------------------------------------------------------------------------- download, cache


def test_download_then_load_equals_saved_weights(server, cache, monkeypatch):
    state = _small_state()
    payload = _saved(state)
    file_name = _publish(server, monkeypatch, "demucs_unittest", payload, {"channels": 4})

    model, info = load_model("demucs_unittest", base_url=server.url, progress=True)

    _assert_same_weights(model, state)
    assert not model.training
    assert info == CheckpointInfo(name="demucs_unittest", path=cache / file_name,
                                  sha256=hashlib.sha256(payload).hexdigest(),
                                  config=info.config)
    assert info.config["channels"] == 4 and info.config["sources"] == list(SOURCES)
    assert sorted(os.listdir(cache)) == [str(file_name)]  # no temp file left behind
    assert server.requests == [f"/{file_name}"]


def test_cache_is_reused_without_network(server, cache, monkeypatch):
    state = _small_state()
    _publish(server, monkeypatch, "demucs_unittest", _saved(state), {"channels": 4})
    path = download_checkpoint("demucs_unittest", base_url=server.url, progress=False)
    server.stop()

    monkeypatch.setenv(checkpoints.URL_ENV, server.url)
    assert download_checkpoint("demucs_unittest") == path
    model, info = load_model("demucs_unittest", progress=False)
    _assert_same_weights(model, state)
    assert info.path == path and len(server.requests) == 1


def test_explicit_cache_dir(server, tmp_path, cache, monkeypatch):
    _publish(server, monkeypatch, "demucs_unittest", _saved(_small_state()), {"channels": 4})
    path = download_checkpoint("demucs_unittest", cache_dir=tmp_path / "elsewhere",
                               base_url=server.url, progress=False)
    assert path.parent == tmp_path / "elsewhere" and path.is_file()
    assert not cache.exists()


def test_corrupt_download_is_rejected_and_removed(server, cache, monkeypatch):
    file_name = _publish(server, monkeypatch, "demucs_unittest", _saved(_small_state()),
                         {"channels": 4})
    server.files[str(file_name)] = _saved(_small_state(seed=1))  # other bytes, same name
    with pytest.raises(CheckpointError, match="checksum mismatch") as error:
        load_model("demucs_unittest", base_url=server.url, progress=False)
    assert server.url + str(file_name) in str(error.value)
    assert os.listdir(cache) == []


@pytest.mark.parametrize("mode", ["cut", "cut-no-length"])
def test_interrupted_download_leaves_nothing_trusted(server, cache, monkeypatch, mode):
    state = _small_state()
    file_name = _publish(server, monkeypatch, "demucs_unittest", _saved(state), {"channels": 4})
    server.set_mode(mode)
    with pytest.raises(CheckpointError, match="cut short" if mode == "cut" else "checksum"):
        load_model("demucs_unittest", base_url=server.url, progress=False)
    assert os.listdir(cache) == []

    server.set_mode("ok")  # the next attempt downloads again and succeeds
    model, info = load_model("demucs_unittest", base_url=server.url, progress=False)
    _assert_same_weights(model, state)
    assert os.listdir(cache) == [str(file_name)] and len(server.requests) == 2


def test_corrupt_cached_file_is_replaced(server, cache, monkeypatch):
    state = _small_state()
    file_name = _publish(server, monkeypatch, "demucs_unittest", _saved(state), {"channels": 4})
    cache.mkdir(parents=True)
    (cache / file_name).write_bytes(_saved(_small_state(seed=1)))  # e.g. a truncated copy

    model, _ = load_model("demucs_unittest", base_url=server.url, progress=False)
    _assert_same_weights(model, state)
    assert len(server.requests) == 1


def test_corrupt_cached_file_offline_is_an_error_and_removed(cache, monkeypatch):
    payload = _saved(_small_state())
    signature = hashlib.sha256(payload).hexdigest()[:8]
    monkeypatch.setitem(checkpoints.RELEASES, "demucs_unittest", Release(signature, {}))
    cache.mkdir(parents=True)
    cached = cache / f"demucs_unittest-{signature}.th"
    cached.write_bytes(payload[:-10])
    with pytest.raises(CheckpointError, match="could not download"):
        load_model("demucs_unittest", base_url=_dead_url(), progress=False)
    assert not cached.exists()


def test_offline_without_cache_names_url_and_folder(cache, monkeypatch):
    url = _dead_url()
    monkeypatch.setenv(checkpoints.URL_ENV, url)
    with pytest.raises(CheckpointError) as error:
        load_model("demucs_unittest", progress=False)
    message = str(error.value)
    assert url + "demucs_unittest-09ebc15f.th" in message and str(cache) in message
    assert os.listdir(cache) == []


def test_missing_file_on_server_is_a_clear_error(server, cache):
    with pytest.raises(CheckpointError, match="404") as error:
        download_checkpoint("demucs_unittest", base_url=server.url, progress=False)
    assert checkpoint_url("demucs_unittest", base_url=server.url) in str(error.value)
    assert os.listdir(cache) == []


# --------------------------------------------------------------------------- local files


def test_local_state_dict_with_named_config(tmp_path):
    state = _small_state(seed=2)
    path = tmp_path / "mine.th"
    path.write_bytes(_saved(state))
    model, info = load_model(path, config="demucs_unittest")
    _assert_same_weights(model, state)
    assert (info.name, info.path) == ("mine", path)
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.config["channels"] == 4 and not model.training


def test_wrong_shapes_name_the_assumed_config(tmp_path, monkeypatch):
    path = tmp_path / "six.th"
    path.write_bytes(_saved(_small_state(channels=6)))
    with pytest.raises(CheckpointError, match="'demucs_unittest' configuration") as error:
        load_model(str(path), config="demucs_unittest")
    assert str(path) in str(error.value) and "size mismatch" in str(error.value)
    # Without config= the file is taken for the default "demucs" release configuration
    # (shrunk here so the test does not build a 265M-parameter model).
    monkeypatch.setitem(checkpoints.RELEASES, "demucs", Release("e07c671f", {"channels": 8}))
    with pytest.raises(CheckpointError, match="'demucs' configuration"):
        load_model(path)


@pytest.mark.parametrize("content", ["random", "text", "empty", "zip", "list"])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / f"{content}.th"
    if content == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("readme.txt", "hello")
    else:
        path.write_bytes({"random": random.Random(0).randbytes(4096),
                          "text": b"this is not a checkpoint\n" * 10,
                          "empty": b"",
                          "list": _saved([torch.zeros(3)])}[content])
    with pytest.raises(CheckpointError) as error:
        load_model(path, config="demucs_unittest")
    assert str(path) in str(error.value)
    assert "weights_only` set to `False`" not in str(error.value)  # torch's unsafe advice


class _Payload:
    """Pickles as a call to ``function(argument)``: what a malicious checkpoint does."""

    def __init__(self, function, argument: str) -> None:
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("forbidden", ["system", "exec"])
def test_forbidden_global_is_refused_without_running(tmp_path, forbidden, zip_format):
    marker = tmp_path / "executed"
    payload = {"system": _Payload(os.system, f"touch {marker}"),
               "exec": _Payload(exec, f"open({str(marker)!r}, 'w').close()")}[forbidden]
    # torch names builtins without their module in legacy files.
    global_name = {"system": f"{os.system.__module__}.system",
                   "exec": "builtins.exec" if zip_format else "exec"}[forbidden]
    path = tmp_path / "evil.th"
    package = {"klass": None, "args": (), "kwargs": {}, "state": {}, "training_args": payload}
    path.write_bytes(_saved(package, _use_new_zipfile_serialization=zip_format))

    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert f"{path} refers to {global_name}, " in str(error.value)
    assert not marker.exists()


# --------------------------------------------------------------------------- demucs formats

_WITHOUT_DEMUCS = r"""
import sys
sys.modules["demucs"] = None  # from here on, any import of demucs fails
import json
import torch
from stemserve.checkpoints import load_model

reference = torch.load(sys.argv[2])
model, info = load_model(sys.argv[1])
with torch.no_grad():
    err = (model(reference["mix"]) - reference["out"]).abs().max().item()
try:
    import demucs.model
    importable = True
except ImportError:
    importable = False
print(json.dumps({"err": err, "name": info.name, "channels": info.config["channels"],
                  "importable": importable,
                  "imported": sorted(m for m in sys.modules if m.startswith("demucs."))}))
"""


def test_training_package_loads_without_demucs(demucs_oracle, tmp_path):
    demucs_model, demucs_utils, _ = demucs_oracle
    torch.manual_seed(3)
    official = demucs_model.Demucs(sources=list(SOURCES), channels=4).eval()
    training_args = argparse.Namespace(diffq=0, qat=None, q_min_size=1, epochs=180, lr=3e-4,
                                       musdb=Path("/data/musdb"), models=Path("models"))
    package = tmp_path / "trained.th"
    demucs_utils.save_model(official, None, training_args, package)
    mix = _mix(official)
    with torch.no_grad():
        torch.save({"mix": mix, "out": official(mix)}, tmp_path / "reference.pt")

    run = subprocess.run([sys.executable, "-c", _WITHOUT_DEMUCS, str(package),
                          str(tmp_path / "reference.pt")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"err": result["err"], "name": "trained", "channels": 4,
                      "importable": False, "imported": []}
    assert result["err"] < 1e-5


def test_training_package_drops_unknown_kwargs(demucs_oracle, tmp_path):
    demucs_model, demucs_utils, _ = demucs_oracle
    torch.manual_seed(4)
    official = demucs_model.Demucs(sources=list(SOURCES), channels=4)
    path = tmp_path / "old.th"
    torch.save({"klass": demucs_model.Demucs, "args": (list(SOURCES),),
                "kwargs": {"channels": 4, "upsample": False},
                "state": demucs_utils.get_state(official, None),
                "training_args": argparse.Namespace(diffq=0, qat=None)}, path)
    with pytest.warns(UserWarning, match="dropping unknown Demucs parameter 'upsample'"):
        model, info = load_model(path)
    _assert_same_weights(model, official.state_dict())
    assert "upsample" not in info.config


def test_package_of_another_class_is_refused(demucs_oracle, tmp_path):
    tasnet = pytest.importorskip("demucs.tasnet")
    path = tmp_path / "tasnet.th"
    torch.save({"klass": tasnet.ConvTasNet, "args": (), "kwargs": {}, "state": {},
                "training_args": argparse.Namespace(diffq=0, qat=None)}, path)
    with pytest.raises(CheckpointError, match="demucs.tasnet.ConvTasNet"):
        load_model(path)


@pytest.mark.parametrize("kind", ["diffq", "qat"])
def test_quantized_training_package_matches_demucs(demucs_oracle, tmp_path, monkeypatch, kind):
    import diffq

    demucs_model, demucs_utils, _ = demucs_oracle
    torch.manual_seed(5)
    official = demucs_model.Demucs(sources=list(SOURCES), channels=4)
    if kind == "diffq":
        quantizer = diffq.DiffQuantizer(official, min_size=0.01, group_size=8)
        training_args = argparse.Namespace(diffq=3e-4, qat=None, q_min_size=0.01)
    else:
        quantizer = diffq.UniformQuantizer(official, bits=8, min_size=0.01)
        training_args = argparse.Namespace(diffq=0, qat=8, q_min_size=0.01)
    path = tmp_path / f"{kind}.th"
    demucs_utils.save_model(official, quantizer, training_args, path)
    with _demucs_own_loads(monkeypatch):
        oracle = demucs_utils.load_model(path)

    model, _ = load_model(path)
    assert _max_err(model, oracle) < 1e-5
    assert model.state_dict().keys() == Demucs(SOURCES, channels=4).state_dict().keys()
    # The weights really went through quantization.
    floats = dict(official.named_parameters())
    assert any(not torch.equal(p, floats[k]) for k, p in model.named_parameters())


def test_quantized_release_matches_demucs(demucs_oracle, server, cache, monkeypatch):
    """demucs_quantized: DiffQuantizer(group_size=8, min_size=1) over a compressed state.

    With min_size=1 only tensors over 2**18 entries are quantized, so the stand-in model
    needs 9 channels or more (4 would leave every tensor in float and test nothing).
    """
    import diffq

    demucs_model, demucs_utils, pretrained = demucs_oracle
    torch.manual_seed(6)
    official = demucs_model.Demucs(sources=list(SOURCES), channels=9)
    quantizer = diffq.DiffQuantizer(official, group_size=8, min_size=1)
    assert quantizer._qparams, "nothing would be quantized"
    payload = _saved(demucs_utils.get_state(official, quantizer))
    file_name = _publish(server, monkeypatch, "demucs_quantized", payload, {"channels": 9})

    model, info = load_model("demucs_quantized", base_url=server.url, progress=False)
    assert info.path == cache / file_name and info.config["channels"] == 9
    assert model.state_dict().keys() == Demucs(SOURCES, channels=9).state_dict().keys()
    floats = dict(official.named_parameters())
    assert any(not torch.equal(p, floats[k]) for k, p in model.named_parameters())

    # demucs' own path: torch.hub download with check_hash (here a hit on the shared cache
    # that stemserve filled), set_state, detach.
    monkeypatch.setattr(pretrained, "ROOT", server.url)
    monkeypatch.setitem(pretrained.PRETRAINED_MODELS, "demucs_quantized", str(file_name)[-11:-3])
    oracle = demucs_model.Demucs(sources=list(SOURCES), channels=9)
    with _demucs_own_loads(monkeypatch):
        pretrained._load_state("demucs_quantized", oracle,
                               diffq.DiffQuantizer(oracle, group_size=8, min_size=1))
    assert len(server.requests) == 1
    assert _max_err(model, oracle) < 1e-5


def test_quantized_state_without_diffq_is_a_clear_error(demucs_oracle, tmp_path, monkeypatch):
    import diffq

    torch.manual_seed(7)
    model = Demucs(SOURCES, channels=4)
    quantizer = diffq.DiffQuantizer(model, group_size=8, min_size=1)
    path = tmp_path / "quantized.th"
    path.write_bytes(_saved(demucs_oracle[1].get_state(model, quantizer)))
    quantizer.detach()

    loaded, _ = load_model(path, config="demucs_unittest")  # a copied demucs_quantized file
    _assert_same_weights(loaded, model.state_dict())
    monkeypatch.setitem(sys.modules, "diffq", None)
    with pytest.raises(CheckpointError, match="needs diffq"):
        load_model(path, config="demucs_unittest")
