"""Checkpoints: names and URLs, download/cache/checksum over a loopback server and folder
mirrors, local files and their zip CRCs, the restricted unpickler, malformed packages and
resource bombs, demucs training packages and the diffq-quantized release.

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
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import types
import warnings
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from stemserve import checkpoints
from stemserve.checkpoints import (KNOWN_MODELS, ROOT_URL, CheckpointError, CheckpointInfo,
                                   Release, checkpoint_cache_dir, checkpoint_url,
                                   download_checkpoint, load_model)
from stemserve.defaults import SOURCES
from stemserve.model import Demucs
from oracle_v2 import demucs2

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
    return demucs2("demucs.model"), demucs2("demucs.utils"), demucs2("demucs.pretrained")


# --------------------------------------------------------------------------- names, URLs


def test_release_names_resolve_to_official_urls():
    assert ROOT_URL == "https://dl.fbaipublicfiles.com/demucs/v3.0/"
    assert set(checkpoints.RELEASES) == set(OFFICIAL_URLS)
    assert KNOWN_MODELS[:len(OFFICIAL_URLS)] == tuple(checkpoints.RELEASES)  # then demucs 4's
    for name, url in OFFICIAL_URLS.items():
        assert checkpoint_url(name) == url
    assert checkpoints.RELEASES["demucs48_hq"].config == {"channels": 48}
    assert checkpoints.RELEASES["demucs_unittest"].config == {"channels": 4}
    for name in ("demucs", "demucs_extra", "demucs_quantized"):
        assert checkpoints.RELEASES[name].config == {}


def test_signature_table_matches_demucs_2_0_3(demucs_oracle):
    pretrained = demucs_oracle[2]
    assert set(checkpoints.RELEASES) | {"tasnet", "tasnet_extra"} == \
        set(pretrained.PRETRAINED_MODELS)
    for name in checkpoints.RELEASES:
        assert checkpoint_url(name) == pretrained.get_url(name)


def test_url_and_cache_overrides(cache, monkeypatch):
    assert checkpoint_cache_dir() == cache
    mirrored = checkpoint_url("demucs", base_url="http://mirror/x")
    assert mirrored == "http://mirror/x/demucs-e07c671f.th"
    monkeypatch.setenv(checkpoints.URL_ENV, "http://mirror/y/")
    assert checkpoint_url("demucs") == "http://mirror/y/demucs-e07c671f.th"
    folder = cache.parent / "mirror dir"
    assert checkpoint_url("demucs", base_url=str(folder)) == \
        (folder / "demucs-e07c671f.th").as_uri()
    assert checkpoint_url("demucs", base_url=folder.as_uri()) == \
        (folder / "demucs-e07c671f.th").as_uri()


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


def test_mismatching_cached_file_is_kept_aside_and_replaced(server, cache, monkeypatch, caplog):
    """A file under a release's name that is not that release (here a fine-tuned model saved
    over it) is never deleted: it is renamed <stem>.mismatch-<sha8>.th, and the log says so."""
    state = _small_state()
    file_name = _publish(server, monkeypatch, "demucs_unittest", _saved(state), {"channels": 4})
    cache.mkdir(parents=True)
    mine = _saved(_small_state(seed=1))
    (cache / file_name).write_bytes(mine)
    mine_sha = hashlib.sha256(mine).hexdigest()
    aside = cache / f"{file_name.stem}.mismatch-{mine_sha[:8]}.th"

    with caplog.at_level(logging.WARNING, logger="stemserve.checkpoints"):
        model, _ = load_model("demucs_unittest", base_url=server.url, progress=False)
    _assert_same_weights(model, state)
    assert len(server.requests) == 1
    assert aside.read_bytes() == mine
    assert str(aside) in caplog.text and "does not match" in caplog.text
    # The kept file still loads as what it is: a local state dict.
    _assert_same_weights(load_model(aside, config="demucs_unittest")[0], _small_state(seed=1))

    # The same bytes there again: a second name, the first copy untouched.
    (cache / file_name).write_bytes(mine)
    download_checkpoint("demucs_unittest", base_url=server.url, progress=False)
    assert (cache / f"{file_name.stem}.mismatch-{mine_sha[:8]}-1.th").read_bytes() == mine
    assert aside.read_bytes() == mine


def test_mismatching_cached_file_offline_is_kept_and_named(cache, monkeypatch):
    payload = _saved(_small_state())
    signature = hashlib.sha256(payload).hexdigest()[:8]
    monkeypatch.setitem(checkpoints.RELEASES, "demucs_unittest", Release(signature, {}))
    cache.mkdir(parents=True)
    cached = cache / f"demucs_unittest-{signature}.th"
    cached.write_bytes(payload[:-10])  # a truncated copy
    with pytest.raises(CheckpointError, match="could not download") as error:
        load_model("demucs_unittest", base_url=_dead_url(), progress=False)
    (aside,) = cache.glob("demucs_unittest-*.mismatch-*.th")
    assert aside.read_bytes() == payload[:-10] and not cached.exists()
    assert f"kept as {aside}" in str(error.value)


def test_offline_message_names_every_way_out(cache, monkeypatch):
    """The URL, and both fixes: the exact file to copy into the exact folder, or a mirror."""
    url = _dead_url()
    monkeypatch.setenv(checkpoints.URL_ENV, url)
    with pytest.raises(CheckpointError) as error:
        load_model("demucs_unittest", progress=False)
    message = str(error.value)
    assert url + "demucs_unittest-09ebc15f.th" in message
    assert f"copy demucs_unittest-09ebc15f.th into {cache}" in message
    assert f"set {checkpoints.URL_ENV} to a mirror" in message and "a folder" in message
    assert os.listdir(cache) == []


def test_missing_file_on_server_is_a_clear_error(server, cache):
    with pytest.raises(CheckpointError, match="404") as error:
        download_checkpoint("demucs_unittest", base_url=server.url, progress=False)
    assert checkpoint_url("demucs_unittest", base_url=server.url) in str(error.value)
    assert os.listdir(cache) == []


# --------------------------------------------------------------------------- folder mirrors


def _mirror(tmp_path: Path, monkeypatch, payload: bytes) -> tuple[Path, str]:
    """A folder holding ``payload`` as demucs_unittest, signature patched to match."""
    signature = hashlib.sha256(payload).hexdigest()[:8]
    monkeypatch.setitem(checkpoints.RELEASES, "demucs_unittest", Release(signature,
                                                                         {"channels": 4}))
    folder = tmp_path / "mirror"
    folder.mkdir()
    (folder / f"demucs_unittest-{signature}.th").write_bytes(payload)
    return folder, f"demucs_unittest-{signature}.th"


@pytest.mark.parametrize("spelling", ["folder", "file-url"])
def test_folder_mirror_is_copied_with_verification(tmp_path, cache, monkeypatch, spelling):
    state = _small_state()
    folder, file_name = _mirror(tmp_path, monkeypatch, _saved(state))
    monkeypatch.setenv(checkpoints.URL_ENV,
                       str(folder) if spelling == "folder" else folder.as_uri())
    model, info = load_model("demucs_unittest", progress=False)
    _assert_same_weights(model, state)
    assert info.path == cache / file_name and os.listdir(cache) == [file_name]
    assert (folder / file_name).read_bytes() == (cache / file_name).read_bytes()


def test_folder_mirror_with_other_bytes_is_refused(tmp_path, cache, monkeypatch):
    folder, file_name = _mirror(tmp_path, monkeypatch, _saved(_small_state()))
    (folder / file_name).write_bytes(_saved(_small_state(seed=1)))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        download_checkpoint("demucs_unittest", base_url=str(folder), progress=False)
    assert os.listdir(cache) == [] and (folder / file_name).is_file()


def test_folder_mirror_without_the_file_is_a_clear_error(tmp_path, cache, monkeypatch):
    folder, file_name = _mirror(tmp_path, monkeypatch, _saved(_small_state()))
    (folder / file_name).unlink()
    monkeypatch.setenv(checkpoints.URL_ENV, str(folder))
    with pytest.raises(CheckpointError) as error:
        download_checkpoint("demucs_unittest", progress=False)
    message = str(error.value)
    assert message.startswith(f"the mirror folder {folder} has no {file_name}")
    assert f"copy {file_name} into {cache}" in message and checkpoints.URL_ENV in message
    assert os.listdir(cache) == []
    with pytest.raises(CheckpointError, match=f"mirror folder {tmp_path / 'nowhere'} does not"):
        download_checkpoint("demucs_unittest", base_url=str(tmp_path / "nowhere"),
                            progress=False)


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


def test_state_dict_of_another_release_suggests_its_config(tmp_path, monkeypatch):
    """The error names the channels found and the release whose configuration fits.

    Release configurations are shrunk (demucs 8 channels, demucs48_hq 6) so that the test
    builds no 265M-parameter model; the messages are those of the real table.
    """
    for name, channels in {"demucs": 8, "demucs_extra": 8, "demucs_quantized": 8,
                           "demucs48_hq": 6}.items():
        monkeypatch.setitem(checkpoints.RELEASES, name,
                            Release(checkpoints.RELEASES[name].signature, {"channels": channels}))
    path = tmp_path / "hq.th"
    path.write_bytes(_saved(_small_state(channels=6)))
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    message = str(error.value)
    assert f"{path} does not fit the 'demucs' configuration" in message
    assert "its first encoder layer has 6 channels" in message
    assert "try --config demucs48_hq (config='demucs48_hq' in Python).\n" in message
    model, info = load_model(path, config="demucs48_hq")
    assert info.config["channels"] == 6

    path.write_bytes(_saved(_small_state(channels=5)))
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    message = str(error.value)
    assert "its first encoder layer has 5 channels, and no release configuration fits" in message
    assert "demucs48_hq: 6 channels; demucs_unittest: 4 channels" in message
    assert "'config'" in message and "'state'" in message  # how to save it so that it loads


def test_flipped_bits_in_a_tensor_record_are_refused(tmp_path):
    """torch does not check zip CRCs: a flipped byte in a weight would load silently."""
    path = tmp_path / "mine.th"
    torch.save(_small_state(), path)
    with zipfile.ZipFile(path) as archive:
        record = next(info for info in archive.infolist() if info.filename.endswith("/data/0"))
    data = bytearray(path.read_bytes())
    # Data start: 30-byte local header, then the name and the extra field.
    name_length, extra_length = (int.from_bytes(data[record.header_offset + at:][:2], "little")
                                 for at in (26, 28))
    data[record.header_offset + 30 + name_length + extra_length + 5] ^= 0x10
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)  # what made this check necessary

    with pytest.raises(CheckpointError) as error:
        load_model(path, config="demucs_unittest")
    assert f"{path} is corrupt: its record {record.filename} does not match its CRC" in \
        str(error.value)


def test_zip_without_crcs_still_loads(tmp_path):
    """torch's compute_crc32=False writes CRC 0 records: nothing to check, nothing refused."""
    from torch.utils.serialization import config

    state = _small_state()
    path = tmp_path / "nocrc.th"
    with config.patch({"save.compute_crc32": False}):
        torch.save(state, path)
    assert zipfile.ZipFile(path).testzip() is not None  # zipfile itself would refuse it
    _assert_same_weights(load_model(path, config="demucs_unittest")[0], state)


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


def test_unknown_format_says_which_formats_load(tmp_path):
    path = tmp_path / "trainer.th"
    path.write_bytes(_saved({"model": _small_state(), "optimizer": {}, "epoch": 3}))
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    message = str(error.value)
    assert f"{path} holds a dict with keys 'model', 'optimizer', 'epoch'" in message
    for fmt in ("a plain state dict", "--config RELEASE", "a demucs 2.x training package",
                "a diffq-compressed state", "{'config': arguments, 'state': state dict} with an "
                "optional 'family'"):
        assert fmt in message


def test_whole_pickled_model_is_refused_with_advice(tmp_path):
    path = tmp_path / "module.th"
    torch.save(Demucs(SOURCES, channels=4), path)
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert "torch.nn.modules.conv.Conv1d" in str(error.value)
    assert "save model.state_dict() instead" in str(error.value)


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


# --------------------------------------------------------------------------- malformed packages


@pytest.fixture
def demucs_class(monkeypatch):
    """A class that pickles as demucs.model.Demucs, the way a training package names it,
    so that these tests need no demucs."""
    module = types.ModuleType("demucs.model")
    module.Demucs = type("Demucs", (), {"__module__": "demucs.model"})
    monkeypatch.setitem(sys.modules, "demucs", types.ModuleType("demucs"))
    monkeypatch.setitem(sys.modules, "demucs.model", module)
    return module.Demucs


def _package(demucs, **fields) -> dict:
    """A demucs 2.x training package of a 4-channel model, with ``fields`` replaced."""
    return {"klass": demucs, "args": (), "kwargs": {"sources": list(SOURCES), "channels": 4},
            "state": _small_state(), "training_args": argparse.Namespace(diffq=0, qat=None),
            **fields}


_KWARGS = {"sources": list(SOURCES), "channels": 4}

MALFORMED = {
    "state-str": ({"state": "x"}, "its state is a str, not a state dict"),
    "state-int-tensor": ({"state": {"encoder.0.0.weight": torch.zeros(4, 2, 8, dtype=torch.long)}},
                         "'encoder.0.0.weight' is a torch.int64 torch.strided tensor on cpu"),
    "state-compressed-unquantized": ({"state": {"compressed": b"x"}},
                                     "training_args name no quantizer"),
    "channels-negative": ({"kwargs": {**_KWARGS, "channels": -4}},
                          "channels=-4 is out of bounds: stemserve loads integers from 1 to 128"),
    "channels-float": ({"kwargs": {**_KWARGS, "channels": 4.5}}, "channels=4.5 is out of bounds"),
    "samplerate-zero": ({"kwargs": {**_KWARGS, "samplerate": 0}},
                        "samplerate=0 is out of bounds: stemserve loads integers from 8000"),
    "growth-nan": ({"kwargs": {**_KWARGS, "growth": float("nan")}}, "growth=nan is out of bounds"),
    "glu-str": ({"kwargs": {**_KWARGS, "glu": "yes"}}, "glu='yes' is not True or False"),
    "segment-hour": ({"kwargs": {**_KWARGS, "segment_length": 3600 * 44100}},
                     "segment_length=158760000 is out of bounds"),
    "stride-depth": ({"kwargs": {**_KWARGS, "stride": 8, "depth": 8}},
                     "its network needs 571 s of input for its 40 s segment"),
    "sources-path": ({"kwargs": {**_KWARGS, "sources": ["drums", "../../evil"]}},
                     "sources=['drums', '../../evil'] is not a list of 1 to 8 distinct names"),
    "sources-none": ({"kwargs": {**_KWARGS, "sources": []}}, "sources=[] is not a list"),
    "kwargs-int": ({"kwargs": 5}, "'kwargs' is an int, not a dict of Demucs arguments"),
    "args-str": ({"args": "abc"}, "'args' is a str, not a tuple of Demucs arguments"),
    "args-too-many": ({"args": tuple(range(20)), "kwargs": {}}, "bad Demucs arguments (too many"),
    "klass-str": ({"klass": "demucs.model.Demucs"},
                  "is a training package of 'demucs.model.Demucs', not of demucs.model.Demucs"),
    "klass-none": ({"klass": None}, "is a training package of None"),
    "no-state": ({"state": None}, "its state is None, not a state dict"),
    "training-args-str": ({"training_args": "abc"},
                          "'training_args' is a str, not the argparse.Namespace demucs saves"),
    "diffq-str": ({"training_args": argparse.Namespace(diffq="yes")},
                  "training_args.diffq='yes' is not a penalty >= 0"),
    "qat-99": ({"training_args": argparse.Namespace(diffq=0, qat=99)},
               "training_args.qat=99 is not a bit width in 0..16"),
    "min-size-negative": ({"training_args": argparse.Namespace(diffq=1, q_min_size=-1)},
                          "training_args.q_min_size=-1 is not a size"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_training_package_is_a_clear_error(tmp_path, demucs_class, case):
    fields, expected = MALFORMED[case]
    path = tmp_path / f"{case}.th"
    torch.save(_package(demucs_class, **fields), path)
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert str(error.value).startswith(str(path)) and expected in str(error.value)


def test_package_of_the_demucs_name_loads(tmp_path, demucs_class):
    path = tmp_path / "named.th"
    torch.save(_package(demucs_class, kwargs={**_KWARGS, "samplerate": 48000}), path)
    model, info = load_model(path)
    _assert_same_weights(model, _small_state())
    assert info.config["samplerate"] == model.samplerate == 48000


def test_packages_saved_by_stemserve_load(tmp_path):
    """A package naming stemserve.model.Demucs (not demucs'), and the {'config', 'state'}
    file that benchmarks/models.py writes beside an export."""
    state = _small_state(seed=8)
    package = tmp_path / "package.th"
    torch.save(_package(Demucs, state=state, training_args=None), package)
    model, info = load_model(package)
    _assert_same_weights(model, state)
    assert info.config["channels"] == 4

    weights = tmp_path / "weights.th"
    torch.save({"config": {"channels": 4, "segment_length": 44100}, "state": state}, weights)
    with pytest.warns(UserWarning, match="carries its own configuration; ignoring config="):
        model, info = load_model(weights, config="demucs")
    _assert_same_weights(model, state)
    assert (info.config["channels"], info.config["segment_length"]) == (4, 44100)
    assert info.config["sources"] == list(SOURCES)


# --------------------------------------------------------------------------- resource bombs

# Loads a file in a child whose address space is capped at 1 GiB over what it holds after
# importing: an allocation of gigabytes fails there with MemoryError instead of swapping this
# machine, and the child reports the outcome and how much its peak resident memory grew.
_LIMITED = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
try:
    import diffq  # imported before the cap: only the load is measured
except ImportError:
    pass
from stemserve.checkpoints import load_model

with open("/proc/self/status") as status:
    held = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (held + (1 << 30), held + (1 << 30)))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_model(sys.argv[1], config=sys.argv[2] or None)
    error, message = None, ""
except BaseException as exc:
    error, message = type(exc).__name__, str(exc)
grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"error": error, "message": message, "grown_mb": grown_mb}))
"""

# GLOBAL demucs.model.Demucs, then REDUCE with (['a'], 2, 96): Demucs(['a'], 2, 96), a 2.4 GB
# model, if the unpickler called the class it names.
_CALLS_DEMUCS = b"\x80\x02cdemucs.model\nDemucs\n]X\x01\x00\x00\x00aaK\x02K\x60\x87R."


def _zlib_bomb(megabytes: int) -> bytes:
    """zlib data of ``megabytes`` MiB of zeros in about 1/1000 of that, built in a blink:
    after a full flush the compressor emits the same bytes for the same input."""
    chunk, compressor = bytes(1 << 20), zlib.compressobj(9)
    head = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    body = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(megabytes):
        adler = zlib.adler32(chunk, adler)
    tail = compressor.flush()[:-4] + adler.to_bytes(4, "big")  # the checksum of it all
    return head + body * (megabytes - 1) + tail


def test_zlib_bomb_helper_is_valid_zlib():
    assert zlib.decompress(_zlib_bomb(3)) == bytes(3 << 20)


BOMBS = {
    "pickle-calls-demucs": (lambda demucs: _CALLS_DEMUCS, "",
                            "calls the Demucs class while unpickling"),
    "channels-65536": (lambda demucs: _saved(_package(demucs, kwargs={**_KWARGS,
                                                                      "channels": 65536})),
                       "", "channels=65536 is out of bounds"),
    "over-parameter-cap": (lambda demucs: _saved(_package(demucs, kwargs={**_KWARGS,
                                                                          "channels": 128})),
                           "", "has 1063 M parameters; stemserve loads at most 700 M"),
    "tiny-state-big-model": (lambda demucs: _saved(_package(demucs, kwargs={**_KWARGS,
                                                                            "channels": 96})),
                             "", "does not fit its own configuration, Demucs(channels=96)"),
    "zlib-bomb": (lambda demucs: _saved({"compressed": _zlib_bomb(2048)}), "demucs_unittest",
                  "its compressed quantized state inflates to more than 9 MiB"),
}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("bomb", BOMBS)
@pytest.mark.slow
def test_resource_bomb_is_refused_without_allocating(tmp_path, demucs_class, bomb):
    make, config, expected = BOMBS[bomb]
    path = tmp_path / f"{bomb}.th"
    path.write_bytes(make(demucs_class))
    run = subprocess.run([sys.executable, "-c", _LIMITED, str(path), config],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    assert outcome["error"] == "CheckpointError", outcome
    assert outcome["message"].startswith(str(path)) and expected in outcome["message"], outcome
    assert outcome["grown_mb"] < 200, outcome


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
    tasnet = demucs2("demucs.tasnet")
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
