"""Every bound stemserve puts on what it is given, at its limit, just inside it and just past
it, so that moving a bound by one (or ``>`` to ``>=``) fails a test.

Bounds whose edges other files already test are not repeated here: the unpickler's nesting
(``_MAX_NESTING``), a package's and a bag YAML's item counts (``_MAX_CONFIG_ITEMS``,
``_MAX_BAG_ITEMS``) and segments of 1 to 120 s in packages and bag YAMLs
(test_hostile_checkpoints.py); the export's segment (test_export_hardening.py);
:func:`~stemserve.untrusted.check_size` and :data:`~stemserve.untrusted.SAFE_NAME`'s 128
characters (test_untrusted.py); the token throttle's free failures, doubling, cap and
capacity (test_web_security.py); the queue's length (test_web_service.py). Everything here
runs in-process, without a server or a model, in a few seconds.
"""
from __future__ import annotations

import asyncio
import io
import json
import math
import re
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
from test_web_service import Catalog, Runner

from stemserve.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, MIN_SECONDS, check_sample_rate, probe
from stemserve.checkpoints import bounds, unpickle
from stemserve.checkpoints import diffq as quantized
from stemserve.errors import (CheckpointError, InputError, ModelError, SpecError, StemserveError,
                              StoreFull, TooLarge)
from stemserve.releases import read_bag_yaml
from stemserve.models.arguments import DEMUCS4_RULES
from stemserve.spec import MAX_BAG_MEMBERS, MAX_SIDECAR_CHARS, MAX_SOURCES, BagSpec, ModelSpec
from stemserve.untrusted import brief

RATE = 44100
UP = math.inf
DOWN = -math.inf


def just_past(value: float, direction: float) -> float:
    """The next float after ``value`` towards ``direction``."""
    return math.nextafter(value, direction)


def write_wav(path: Path, frames: int, rate: int = 8000) -> Path:
    """A mono 16-bit WAV of exactly ``frames`` samples."""
    sf.write(path, np.zeros(frames, dtype=np.float32), rate, subtype="PCM_16")
    return path


# =============================================================================================
# The web service: duration, upload size, disk budget, shifts, throttle, body rate

@pytest.fixture
def service_for(tmp_path):
    """``service_for(**settings)``: a started JobService (the test catalog and runner of
    test_web_service.py) with those settings; closed after the test."""
    from stemserve.web.jobs import JobQueue
    from stemserve.web.service import JobService
    from stemserve.web.settings import Settings

    opened = []

    def make(**changes) -> JobService:
        settings = Settings(jobs_dir=tmp_path / f"jobs{len(opened)}", **changes)
        queue = JobQueue(settings.jobs_dir, Runner(), queue_size=settings.queue_size)
        service = JobService(settings, queue, Catalog())
        service.start()
        opened.append(service)
        return service

    yield make
    for service in opened:
        service.close()


@pytest.mark.parametrize("frames, accepted", [(39_999, True), (40_000, True), (40_001, False)])
def test_web_duration_limit(service_for, tmp_path, frames, accepted):
    """``--max-duration 5``: 5 s (40,000 samples at 8 kHz) and less are taken, one sample
    more is refused (``>``, not ``>=``)."""
    service = service_for(max_duration=5)
    upload = io.BytesIO(write_wav(tmp_path / "track.wav", frames).read_bytes())
    if accepted:
        assert service.accept(upload, "track.wav").seconds == frames / 8000
        return
    with pytest.raises(TooLarge, match=r"^track.wav is \S+ long: tracks up to 0:05 are "):
        service.accept(upload, "track.wav")


@pytest.mark.parametrize("over, accepted", [(-1, True), (0, True), (1, False)])
def test_web_upload_size_limit(service_for, tmp_path, over, accepted):
    """``--max-upload-mb``: a file of exactly the limit's bytes is taken (checked as audio),
    one byte more is refused before anything is stored."""
    from stemserve.web.settings import MB

    content = write_wav(tmp_path / "track.wav", 8000).read_bytes()
    service = service_for(max_upload_mb=(len(content) - over) / MB)
    assert service.settings.max_upload_bytes == len(content) - over
    if accepted:
        assert service.accept(io.BytesIO(content), "track.wav").seconds == 1
        return
    with pytest.raises(TooLarge, match="^The file is 0.0 MB: uploads are limited to"):
        service.accept(io.BytesIO(content), "track.wav")
    assert not any(service.settings.jobs_dir.glob("*/track.wav"))


LIMIT = 1000
"""The upload guard's ``max_bytes`` in the tests below."""


class _Budget:
    """Stands in for the job service: records what the guard reserves."""

    def __init__(self):
        self.reserved: list[int] = []

    def reserve(self, size: int):
        self.reserved.append(size)
        return SimpleNamespace(size=size)

    def release(self, reservation) -> None:
        pass


def _post(body: list[bytes], declared: int | None):
    """POST ``body`` (its chunks) through an UploadGuard of :data:`LIMIT` bytes to an app that
    reads it all; returns (status, bytes the app read, sizes reserved)."""
    from stemserve.web.guards import UploadGuard

    read = []
    sent = []
    budget = _Budget()

    async def app(scope, receive, send):
        total = 0
        while True:
            message = await receive()
            total += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        read.append(total)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    chunks = iter([{"type": "http.request", "body": chunk, "more_body": index < len(body) - 1}
                   for index, chunk in enumerate(body)])

    async def receive():
        return next(chunks)

    async def send(message):
        sent.append(message)

    headers = [(b"content-type", b"multipart/form-data; boundary=x")]
    if declared is not None:
        headers.append((b"content-length", str(declared).encode()))
    scope = {"type": "http", "method": "POST", "path": "/api/jobs", "headers": headers}
    guard = UploadGuard(app, max_bytes=LIMIT, message="too large", service=budget)
    asyncio.run(guard(scope, receive, send))
    return sent[0]["status"], read, budget.reserved


@pytest.mark.parametrize("size, status", [(LIMIT - 1, 200), (LIMIT, 200), (LIMIT + 1, 413)])
def test_upload_guard_refuses_a_declared_length_over_the_limit(size, status):
    """A Content-Length of the limit passes (and is what the disk budget holds); one byte
    more is answered 413 before the body is read or budget held."""
    answer, read, reserved = _post([b"x" * size], declared=size)
    assert answer == status
    assert (read, reserved) == (([size], [size]) if status == 200 else ([], []))


@pytest.mark.parametrize("size, refused", [(LIMIT - 1, False), (LIMIT, False),
                                           (LIMIT + 1, True)])
def test_upload_guard_cuts_a_chunked_body_off_past_the_limit(size, refused):
    """Without a Content-Length the body is counted as it arrives (the budget holds the
    limit): the limit's bytes pass, one more raises 413 to FastAPI's handler."""
    from fastapi import HTTPException

    body = [b"x" * (size // 2), b"x" * (size - size // 2)]
    if not refused:
        assert _post(body, declared=None) == (200, [size], [LIMIT])
        return
    with pytest.raises(HTTPException) as caught:
        _post(body, declared=None)
    assert caught.value.status_code == 413


def test_disk_budget_admits_exactly_what_is_left(tmp_path):
    """A reservation of exactly what the budget has left is granted, one byte more is not."""
    from stemserve.web.jobs import JobQueue, folder_bytes

    queue = JobQueue(tmp_path / "jobs", Runner(), max_disk_bytes=10_000)
    try:
        left = 10_000 - folder_bytes(queue.root)
        queue.release(queue.reserve(left - 1))
        exact = queue.reserve(left)
        with pytest.raises(StoreFull):
            queue.reserve(1)
        queue.release(exact)
        with pytest.raises(StoreFull, match="storage for uploads and stems is full"):
            queue.reserve(left + 1)
    finally:
        queue.close()


def test_disk_budget_deletes_a_finished_job_only_when_it_must(service_for, tmp_path):
    """A reservation that fits exactly keeps the finished jobs; one byte more deletes the
    oldest to make room."""
    from stemserve.web.jobs import folder_bytes

    service = service_for()
    wav = write_wav(tmp_path / "track.wav", 8000).read_bytes()
    job = service.accept(io.BytesIO(wav), "track.wav")
    assert asyncio.run(service.wait(job.id)).state == "done"
    queue = service.queue
    queue.max_disk_bytes = folder_bytes(queue.root) + 500
    queue.release(queue.reserve(500))
    assert queue.get(job.id) is not None
    queue.release(queue.reserve(501))
    assert queue.get(job.id) is None and not job.folder.exists()


@pytest.mark.parametrize("shifts, accepted", [(-1, False), (0, True), (10, True)])
def test_web_shifts_bounds(shifts, accepted):
    """0 to MAX_SHIFTS (10); 11 is test_web_service.py's."""
    from stemserve.web.options import MAX_SHIFTS, JobOptions

    assert MAX_SHIFTS == 10
    if accepted:
        assert JobOptions(shifts=shifts).shifts == shifts
        return
    with pytest.raises(InputError, match="shifts must be from 0 to 10"):
        JobOptions(shifts=shifts)


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("after, forgotten", [(-1e-6, False), (0.0, False), (1e-6, True)])
def test_throttle_forgets_an_address_just_after_forget_after(after, forgotten):
    """An address's failures are kept FORGET_AFTER seconds after its last failure, or after
    the end of its wait (whichever is later), and forgotten just after."""
    from stemserve.web import guards

    # The values test_web_security.py's throttle test takes by name.
    assert (guards.FREE_FAILURES, guards.FIRST_WAIT, guards.FORGET_AFTER, guards.MAX_WAIT,
            guards.TokenThrottle().capacity) == (5, 1.0, 60.0, 900.0, 4096)
    clock = _Clock()
    throttle = guards.TokenThrottle(clock=clock)
    for _ in range(guards.FREE_FAILURES - 1):  # the last free one: no wait yet
        throttle.failed("a")
    clock.now += guards.FORGET_AFTER + after
    throttle.failed("a")
    assert throttle.wait("a") == (0 if forgotten else guards.FIRST_WAIT)

    clock = _Clock()
    throttle = guards.TokenThrottle(clock=clock)
    for _ in range(guards.FREE_FAILURES):
        throttle.failed("b")
    clock.now += guards.FIRST_WAIT + guards.FORGET_AFTER + after  # counted from the wait's end
    throttle.failed("b")
    assert throttle.wait("b") == (0 if forgotten else 2 * guards.FIRST_WAIT)


@pytest.mark.parametrize("extra, delay", [(-1, 0.0), (0, 0.0), (1, 1 / (16 << 10)),
                                          (16 << 10, 1.0)])
def test_an_upload_must_average_16_kb_per_second(extra, delay):
    """After its first ``body_timeout`` (1 s here), 10 s into its body, an upload that has
    sent exactly 10 s of MIN_BODY_RATE owes more now (a deadline of 0 s); each byte ahead
    buys 1/16384 s, up to ``body_timeout``."""
    from stemserve.web.server import MIN_BODY_RATE, TimedH11Protocol

    assert MIN_BODY_RATE == 16 << 10
    protocol = object.__new__(TimedH11Protocol)
    protocol.body_timeout = 1.0
    protocol._body_started = 0.0
    protocol._body_bytes = 10 * MIN_BODY_RATE + extra
    protocol.loop = SimpleNamespace(time=lambda: 11.0)
    assert protocol._body_delay() == pytest.approx(delay, abs=1e-12)


# =============================================================================================
# Sidecars (stemserve.spec)

def sidecar(**changes) -> dict:
    fields = dict(model_name="demucs", checkpoint="small", checkpoint_sha256="ab" * 32,
                  sample_rate=RATE, audio_channels=2, sources=("drums", "bass"),
                  segment_length=RATE, padded_length=RATE, output_length=RATE,
                  valid_length_params=None, family="hdemucs")
    fields.update(changes)
    return fields


V2_PARAMS = dict(resample=True, depth=6, kernel_size=8, stride=4, context=3)
LONGEST = 2 * 120 * RATE
"""The longest request length a sidecar may state at 44.1 kHz: twice the longest segment."""

SIDECAR_CASES = [
    # (field changes, accepted)
    (dict(sources=("s0",)), True),
    (dict(sources=tuple(f"s{i}" for i in range(8))), True),  # MAX_SOURCES
    (dict(sources=tuple(f"s{i}" for i in range(9))), False),
    (dict(sources=()), False),
    (dict(sample_rate=8000), True),
    (dict(sample_rate=7999), False),
    (dict(sample_rate=192_000), True),
    (dict(sample_rate=192_001), False),
    (dict(audio_channels=1), True),
    (dict(audio_channels=0), False),
    (dict(audio_channels=2), True),
    (dict(audio_channels=3), False),
    (dict(segment_length=1), True),
    (dict(segment_length=0), False),
    (dict(segment_length=120 * RATE - 1), True),
    (dict(segment_length=120 * RATE), True),
    (dict(segment_length=120 * RATE + 1), False),
    (dict(padded_length=LONGEST), True),
    (dict(padded_length=LONGEST + 1), False),
    (dict(padded_length=0), False),
    (dict(output_length=LONGEST), True),
    (dict(output_length=LONGEST + 1), False),
    (dict(forward_randrange=0), True),
    (dict(forward_randrange=-1), False),
    (dict(forward_randrange=1 << 16), True),
    (dict(forward_randrange=(1 << 16) + 1), False),
    (dict(input_name="m" * 64), True),
    (dict(input_name="m" * 65), False),
    (dict(output_name="s" * 64), True),
    (dict(output_name="s" * 65), False),
    (dict(checkpoint_sha256="a"), True),
    (dict(checkpoint_sha256="a" * 64), True),
    (dict(checkpoint_sha256="a" * 65), False),
    (dict(checkpoint_sha256=""), False),
    *((dict(family="demucs", valid_length_params=dict(V2_PARAMS, **{key: value})), ok)
      for key, low, high in [("depth", 1, 8), ("kernel_size", 1, 16), ("stride", 1, 8),
                             ("context", 0, 9)]
      for value, ok in [(low - 1, False), (low, True), (high, True), (high + 1, False)]),
]


@pytest.mark.parametrize("changes, accepted", SIDECAR_CASES,
                         ids=[f"{'-'.join(f'{k}={brief(v)[:24]}' for k, v in c.items())}"
                              for c, _ in SIDECAR_CASES])
def test_sidecar_field_bounds(changes, accepted):
    fields = sidecar(**changes)
    if accepted:
        ModelSpec(**fields)
        return
    field = next(key for key in changes if key != "family")
    with pytest.raises(SpecError, match=field.replace("segment_length", "segment")):
        ModelSpec(**fields)


@pytest.mark.parametrize("padding, accepted", [(-1, True), (0, True), (1, False)])
def test_sidecar_text_length(padding, accepted):
    """A sidecar of MAX_SIDECAR_CHARS characters (65536) is parsed, one more is refused
    unparsed."""
    assert MAX_SIDECAR_CHARS == 1 << 16
    text = json.dumps({**sidecar(sources=["drums"]), "spec_version": 1})
    text += " " * (MAX_SIDECAR_CHARS - len(text) + padding)
    if accepted:
        assert ModelSpec.from_json(text).sources == ("drums",)
        return
    with pytest.raises(SpecError, match=f"a sidecar of {MAX_SIDECAR_CHARS + 1} characters, "
                                        f"over {MAX_SIDECAR_CHARS}"):
        ModelSpec.from_json(text)


def bag_json(members: int = 1, row: int = 4, **changes) -> str:
    data = {"name": "bag", "members": [f"m{i}" for i in range(members)],
            "weights": [[1.0] * row for _ in range(members)], "spec_version": 1, **changes}
    return json.dumps(data)


@pytest.mark.parametrize("text, accepted", [
    (bag_json(members=MAX_BAG_MEMBERS - 1), True),
    (bag_json(members=MAX_BAG_MEMBERS), True),
    (bag_json(members=MAX_BAG_MEMBERS + 1), False),
    (bag_json(members=0), False),
    (bag_json(row=1), True),
    (bag_json(row=MAX_SOURCES), True),
    (bag_json(row=MAX_SOURCES + 1), False),
    (bag_json(row=0), False),
    (bag_json(segment=120), True),
    (bag_json(segment=just_past(120, UP)), False),
    (bag_json(segment=5e-324), True),
    (bag_json(segment=0), False),
], ids=["members-15", "members-16", "members-17", "members-0", "row-1", "row-8", "row-9",
        "row-0", "segment-120", "segment-past-120", "segment-tiny", "segment-0"])
def test_bag_sidecar_bounds(text, accepted):
    """Up to MAX_BAG_MEMBERS (16) members, rows of 1 to MAX_SOURCES (8) weights, a segment
    above 0 up to 120 s, read from JSON (whose own pre-check bounds the lists first)."""
    assert (MAX_BAG_MEMBERS, MAX_SOURCES) == (16, 8)
    if accepted:
        BagSpec.from_json(text)
        return
    with pytest.raises(SpecError, match="^bag sidecar: not a bag sidecar: "):
        BagSpec.from_json(text)


@pytest.mark.parametrize("weight, accepted", [(0.0, True), (just_past(0.0, DOWN), False),
                                              (math.inf, False)])
def test_bag_sidecar_weights_are_finite_and_not_negative(weight, accepted):
    if accepted:
        BagSpec("bag", ("m",), ((weight,),))
        return
    with pytest.raises(SpecError, match="weights"):
        BagSpec("bag", ("m",), ((weight,),))


# =============================================================================================
# Bag YAMLs (stemserve.releases)

@pytest.mark.parametrize("count, accepted", [(15, True), (16, True), (17, False), (0, False)])
def test_bag_yaml_model_count(tmp_path, count, accepted):
    """1 to _MAX_BAG_MODELS (16) models."""
    path = tmp_path / "bag.yaml"
    path.write_text(f"models: [{', '.join(['a'] * count)}]\n")
    if accepted:
        assert len(read_bag_yaml(path).models) == count
        return
    with pytest.raises(CheckpointError, match=r"is not a list of 1 to 16 signatures"):
        read_bag_yaml(path)


@pytest.mark.parametrize("padding, accepted", [(-1, True), (0, True), (1, False)])
def test_bag_yaml_file_size(tmp_path, padding, accepted):
    """A bag YAML of _MAX_BAG_YAML bytes (64 KiB) is read, one byte more is refused unread."""
    head = "models: [a]\n#"
    path = tmp_path / "bag.yaml"
    path.write_text(head + "x" * ((64 << 10) - len(head) - 1 + padding) + "\n")
    assert path.stat().st_size == (64 << 10) + padding
    if accepted:
        assert read_bag_yaml(path).models == ("a",)
        return
    with pytest.raises(CheckpointError, match=r"is over 64 KiB"):
        read_bag_yaml(path)


@pytest.mark.parametrize("text, accepted", [
    ("models: [" + "a" * 64 + "]", True),
    ("models: [" + "a" * 65 + "]", False),
    ("models: [a]\nweights: [[" + ", ".join(["1"] * 8) + "]]", True),
    ("models: [a]\nweights: [[" + ", ".join(["1"] * 9) + "]]", False),
    ("models: [a]\nweights: [[1]]", True),
    ("models: [a]\nweights: [[]]", False),
    ("models: [a]\nweights: [[0]]", True),
    ("models: [a]\nweights: [[-1.0e-300]]", False),
], ids=["signature-64", "signature-65", "row-8", "row-9", "row-1", "row-0", "weight-0",
        "weight-negative"])
def test_bag_yaml_signature_and_weights(tmp_path, text, accepted):
    """Signatures of 1 to 64 characters; rows of 1 to MAX_SOURCES weights, each >= 0."""
    path = tmp_path / "bag.yaml"
    path.write_text(text + "\n")
    if accepted:
        read_bag_yaml(path)
        return
    with pytest.raises(CheckpointError, match=r"(models|weights)=.* is not "):
        read_bag_yaml(path)


# =============================================================================================
# Checkpoints (stemserve.checkpoints)

@pytest.mark.parametrize("count, accepted", [(699_999_999, True), (700_000_000, True),
                                             (700_000_001, False)])
def test_parameter_count_limit(monkeypatch, count, accepted):
    """A network of _MAX_PARAMETERS (700 M) loads; one parameter more is refused (counted on
    the meta device, before anything is allocated)."""
    from stemserve.defaults import SOURCES

    used = bounds._configuration((list(SOURCES),), {"channels": 4}, "x.th")
    monkeypatch.setattr(bounds, "_parameter_count", lambda model: count)
    if accepted:
        bounds._skeleton("demucs", used, "x.th")
        return
    with pytest.raises(CheckpointError, match=r"^x\.th: .* parameters; stemserve loads at "
                                              r"most 700 M"):
        bounds._skeleton("demucs", used, "x.th")


@pytest.mark.parametrize("sources, accepted", [
    ([f"s{i}" for i in range(8)], True), ([f"s{i}" for i in range(9)], False), ([], False),
    (["a" * 32], True), (["a" * 33], False),
], ids=["8", "9", "0", "name-32", "name-33"])
def test_checkpoint_sources(sources, accepted):
    """1 to MAX_SOURCES distinct names of 1 to 32 characters."""
    if accepted:
        assert bounds._sources(sources, "x.th") == sources
        return
    with pytest.raises(CheckpointError, match=r"is not a list of 1 to 8 distinct names"):
        bounds._sources(sources, "x.th")


V2_LIMITS = {  # name: (low, high, integers only)
    "audio_channels": (1, 2, True), "channels": (1, 128, True), "depth": (1, 8, True),
    "kernel_size": (1, 16, True), "stride": (1, 8, True), "growth": (1, 4, False),
    "lstm_layers": (0, 4, True), "context": (1, 9, True), "rescale": (0, 10, False),
    "samplerate": (8000, 192_000, True),
}


def edges(low: float, high: float, integer: bool) -> list[tuple[float, bool]]:
    """``(value, accepted)`` just past, at and just inside each end of [low, high]."""
    if integer:
        return [(low - 1, False), (low, True), (low + 1, True), (high - 1, True), (high, True),
                (high + 1, False)]
    return [(just_past(low, DOWN), False), (low, True), (just_past(low, UP), True),
            (just_past(high, DOWN), True), (high, True), (just_past(high, UP), False)]


def test_every_v2_argument_bound_is_tested():
    assert set(bounds._LIMITS) == set(V2_LIMITS)


@pytest.mark.parametrize("name", sorted(V2_LIMITS))
def test_v2_argument_bounds(name):
    """Each Demucs v2 argument at, inside and past both ends of its range (a 1 s segment, so
    that no range meets the segment's own bounds)."""
    from stemserve.defaults import SOURCES

    low, high, integer = V2_LIMITS[name]
    for value, accepted in edges(low, high, integer):
        kwargs = {"segment_length": RATE, name: value}
        if accepted:
            assert bounds._configuration((list(SOURCES),), kwargs, "x.th")[name] == value
            continue
        with pytest.raises(CheckpointError, match=rf"^x\.th: {name}=\S+ is out of bounds: "
                                                  rf"stemserve loads (integers|numbers) from "
                                                  rf"{low} to {high} "):
            bounds._configuration((list(SOURCES),), kwargs, "x.th")


@pytest.mark.parametrize("segment, accepted", [(1, True), (0, False), (120 * RATE, True),
                                               (120 * RATE + 1, False)])
def test_v2_segment_length_bounds(segment, accepted):
    """A v2 package's segment_length: 1 sample to 120 s."""
    from stemserve.defaults import SOURCES

    kwargs = {"segment_length": segment}
    if accepted:
        bounds._configuration((list(SOURCES),), kwargs, "x.th")
        return
    with pytest.raises(CheckpointError, match=r"segment_length=\d+ is out of bounds"):
        bounds._configuration((list(SOURCES),), kwargs, "x.th")


@pytest.mark.parametrize("padded, accepted", [(LONGEST - 1, True), (LONGEST, True),
                                              (LONGEST + 1, False)])
def test_network_input_is_at_most_twice_the_longest_segment(padded, accepted):
    used = {"samplerate": RATE, "stride": 4, "depth": 6}
    if accepted:
        bounds._check_padded(padded, 40, used, "x.th")
        return
    with pytest.raises(CheckpointError, match="stemserve loads at most 240 s"):
        bounds._check_padded(padded, 40, used, "x.th")


@pytest.mark.parametrize("extra, accepted", [(-1, True), (0, True), (1, False)])
def test_quantized_state_inflates_to_at_most_twice_the_float32_weights(extra, accepted):
    """diffq's zlib state of a 1000-parameter model: 8000 bytes and 1 MiB of framing, not one
    byte more (read no further than that)."""
    import zlib

    limit = 2 * 4 * 1000 + (1 << 20)
    state = {"compressed": zlib.compress(bytes(limit + extra))}
    if accepted:
        assert len(quantized._inflate(state, 1000, "x.th")) == limit + extra
        return
    with pytest.raises(CheckpointError, match="inflates to more than 1 MiB"):
        quantized._inflate(state, 1000, "x.th")


@pytest.mark.parametrize("bits, accepted", [(-1, False), (0, True), (16, True), (17, False)])
def test_quantization_aware_training_bits(bits, accepted):
    """A v2 package's ``training_args.qat``: 0 (none) to 16 bits."""
    import argparse

    training = argparse.Namespace(diffq=0, qat=bits)
    if accepted:
        quantized._package_quantizer(training, "x.th")
        return
    with pytest.raises(CheckpointError, match=r"training_args.qat=-?\d+ is not a bit width in "
                                              r"0..16"):
        quantized._package_quantizer(training, "x.th")


@pytest.mark.parametrize("args, accepted", [
    (("9" * 30,), True), (("9" * 31,), False), (("1/" + "9" * 30,), True),
    (("1/" + "9" * 31,), False), ((10**30 - 1, 1), True), ((10**30, 1), False),
    ((1, 10**30 - 1), True), ((1, -10**30), False),
], ids=["text-30-digits", "text-31-digits", "text-denominator-30", "text-denominator-31",
        "int-under-1e30", "int-1e30", "int-denominator-under-1e30", "int-denominator-1e30"])
def test_a_pickled_fraction_is_a_ratio_of_small_integers(args, accepted):
    """htdemucs' 39/5 s segment as pickled: numbers of up to 30 digits (below 10**30)."""
    if accepted:
        assert unpickle._fraction(*args) == Fraction(*args)
        return
    with pytest.raises(unpickle._Refused, match="not a ratio of two small integers"):
        unpickle._fraction(*args)


# The demucs 4 classes' ranged arguments (the others are flags, choices, the mask type and the
# segment, which test_hostile_checkpoints.py bounds): (low, high, integers only).
V4_RANGES = {
    "audio_channels": (1, 2, True), "channels": (1, 128, True), "growth": (1, 4, False),
    "depth": (1, 8, True), "kernel_size": (1, 16, True), "stride": (1, 8, True),
    "context": (0, 9, True), "norm_starts": (0, 16, True), "norm_groups": (1, 16, True),
    "dconv_mode": (0, 3, True), "dconv_depth": (0, 8, True), "dconv_comp": (1, 64, False),
    "dconv_attn": (0, 16, True), "dconv_lstm": (0, 16, True), "dconv_init": (0, 1, False),
    "rescale": (0, 10, False), "samplerate": (8000, 192_000, True),
    "channels_time": (1, 128, True), "wiener_iters": (-16, 16, True),
    "end_iters": (-16, 16, True), "multi_freqs_depth": (0, 8, True), "freq_emb": (0, 1, False),
    "emb_scale": (0, 100, False), "time_stride": (1, 8, True), "context_enc": (0, 9, True),
    "bottom_channels": (0, 2048, True), "t_layers": (0, 16, True),
    "t_hidden_scale": (0, 16, False), "t_heads": (1, 32, True), "t_dropout": (0, 1, False),
    "t_max_positions": (1, 100_000, True), "t_norm_in_group": (0, 64, True),
    "t_group_norm": (0, 64, True), "t_norm_out": (0, 64, True),
    "t_max_period": (1, 1e6, False), "t_weight_decay": (0, 1, False), "t_lr": (0, 1, False),
    "t_weight_pos_embed": (0, 100, False), "t_sin_random_shift": (0, 10_000, True),
    "t_mask_random_seed": (0, 2**32 - 1, True), "t_sparse_attn_window": (1, 100_000, True),
    "t_global_window": (1, 100_000, True), "t_sparsity": (0, 1, False),
    "lstm_layers": (0, 4, True),
}
V4_LISTS = {  # name: (shortest, longest, low, high)
    "multi_freqs": (0, 4, 0, 1), "t_cape_glob_loc_scale": (3, 3, 0, 1e6),
}
QUANTIZER_RANGES = {
    "min_size": (0, 1e6, False), "group_size": (0, 1024, True), "min_bits": (1, 15, False),
    "max_bits": (1, 15, False), "init_bits": (1, 15, False), "extra_bits": (0, 15, False),
    "bits": (1, 15, False),
}


def test_every_ranged_v4_argument_is_tested():
    ranged = {name for name, rule in DEMUCS4_RULES.items()
              if " from " in rule.accepted and name != "segment"}
    assert ranged == set(V4_RANGES) | set(V4_LISTS) | {"nfft"}
    quantizer = {name for rules in bounds._QUANTIZER_RULES.values()
                 for name, rule in rules.items() if " from " in rule.accepted}
    assert quantizer == set(QUANTIZER_RANGES)


def _rule_edges(rule, low, high, integer):
    for value, accepted in edges(low, high, integer):
        assert rule.accepts(value) is accepted, (value, accepted)
    words = (f"integer(s)? from {low} to {high}" if integer
             else re.escape(f"numbers from {low:g} to {high:g}"))
    assert re.search(words, rule.accepted), (words, rule.accepted)


@pytest.mark.parametrize("name", sorted(V4_RANGES))
def test_v4_argument_bounds(name):
    """Each ranged argument at, inside and past both ends, and its words say the same."""
    rule = DEMUCS4_RULES[name]
    _rule_edges(rule, *V4_RANGES[name])
    if rule.accepted.startswith("None or "):
        assert rule.accepts(None)


@pytest.mark.parametrize("name", sorted(QUANTIZER_RANGES))
def test_quantizer_argument_bounds(name):
    for rules in bounds._QUANTIZER_RULES.values():
        if name in rules:
            _rule_edges(rules[name], *QUANTIZER_RANGES[name])


@pytest.mark.parametrize("name", sorted(V4_LISTS))
def test_v4_number_list_bounds(name):
    shortest, longest, low, high = V4_LISTS[name]
    accepts = DEMUCS4_RULES[name].accepts
    assert accepts([low] * longest) and accepts([high] * shortest or [high] * longest)
    assert not accepts([low] * (longest + 1))
    if shortest:
        assert accepts([low] * shortest) and not accepts([low] * (shortest - 1))
    assert not accepts([just_past(low, DOWN)] * max(shortest, 1))
    assert not accepts([just_past(high, UP)] * max(shortest, 1))


def test_v4_nfft_is_a_power_of_two_from_256_to_16384():
    accepts = DEMUCS4_RULES["nfft"].accepts
    assert [n for n in (128, 255, 256, 257, 4096, 16384, 16385, 32768) if accepts(n)] == \
        [256, 4096, 16384]


@pytest.mark.parametrize("count, length, accepted", [(64, 256, True), (65, 1, False),
                                                     (1, 257, False)])
def test_quantizer_exclude_patterns(count, length, accepted):
    """diffq's exclude: up to 64 names of up to 256 characters."""
    assert bounds._PATTERNS.accepts(["p" * length] * count) is accepted


# =============================================================================================
# Quotes of untrusted values (stemserve.untrusted)

@pytest.mark.parametrize("length", [199, 200, 201])
def test_a_quote_is_whole_up_to_200_characters(length):
    """Four strings of up to 60 characters as reprlib quotes them, in a list of ``length``
    characters: whole up to _BRIEF_CHARS (200), cut to 200 with '...' past it."""
    value = ["a" * 46, "b" * 46, "c" * 46, "d" * (46 + length - 200)]
    assert len(repr(value)) == length
    if length <= 200:
        assert brief(value) == repr(value)
    else:
        assert brief(value) == repr(value)[:197] + "..."


def test_an_int_is_quoted_up_to_128_bits():
    assert brief(2**128 - 1) == str(2**128 - 1)
    assert brief(2**128) == "<an int of 129 bits>"


# =============================================================================================
# Audio (stemserve.audio)

@pytest.mark.parametrize("frames, accepted", [(799, False), (800, True), (801, True)])
def test_shortest_track(tmp_path, frames, accepted):
    """MIN_SECONDS (0.1 s: 800 samples at 8 kHz) is separated, one sample less is not."""
    assert MIN_SECONDS == 0.1
    path = write_wav(tmp_path / "short.wav", frames)
    if accepted:
        assert probe(path).frames == frames
        return
    with pytest.raises(InputError, match=r"too short to separate \(799 samples"):
        probe(path)


@pytest.mark.parametrize("rate, accepted", [(7999, False), (8000, True), (8001, True),
                                            (383_999, True), (384_000, True),
                                            (384_001, False)])
def test_track_sample_rates(rate, accepted):
    assert (MIN_SAMPLE_RATE, MAX_SAMPLE_RATE) == (8000, 384_000)
    if accepted:
        check_sample_rate(rate, "x.wav")
        return
    with pytest.raises(InputError, match=rf"sample rate {rate} Hz is outside"):
        check_sample_rate(rate, "x.wav")


# =============================================================================================
# Lower bounds of the command line and the web's settings

@pytest.mark.parametrize("field, value, accepted", [
    ("in_flight", 1, True), ("in_flight", 0, False),
    ("shifts", 0, True), ("shifts", -1, False),
    ("overlap", 0.0, True), ("overlap", just_past(0.0, DOWN), False),
    ("overlap", just_past(1.0, DOWN), True), ("overlap", 1.0, False),
    ("transition_power", 1.0, True), ("transition_power", just_past(1.0, DOWN), False),
])
def test_separation_option_bounds(field, value, accepted):
    """``--in-flight`` of at least 1, ``--shifts`` of at least 0, ``--overlap`` in [0, 1),
    ``--transition-power`` of at least 1."""
    from stemserve.pipeline import SeparationOptions

    if accepted:
        assert getattr(SeparationOptions(**{field: value}), field) == value
        return
    with pytest.raises(StemserveError, match=field):
        SeparationOptions(**{field: value})


def test_server_window_is_at_least_one(monkeypatch):
    """``--server-window`` for several servers: 0 is refused before connecting, 1 goes on to
    connect."""
    from stemserve.client.backends import fleet

    with pytest.raises(StemserveError, match="server_window must be >= 1, got 0"):
        fleet.FleetBackend(["a:1", "b:2"], server_window=0)

    class Connecting(Exception):
        pass

    def connect(self, spec):
        raise Connecting

    monkeypatch.setattr(fleet.FleetBackend, "_open_all", connect)
    with pytest.raises(Connecting):
        fleet.FleetBackend(["a:1", "b:2"], server_window=1)


@pytest.mark.parametrize("workers, queue_size, accepted", [(1, 1, True), (0, 1, False),
                                                           (1, 0, False)])
def test_web_workers_and_queue_are_at_least_one(tmp_path, workers, queue_size, accepted):
    from stemserve.web.jobs import JobQueue

    if not accepted:
        with pytest.raises(StemserveError, match="at least one worker and one queue slot"):
            JobQueue(tmp_path / "jobs", Runner(), workers=workers, queue_size=queue_size)
        return
    JobQueue(tmp_path / "jobs", Runner(), workers=workers, queue_size=queue_size).close()


# =============================================================================================
# What the client reads back from its caches (source.json, the bf16 self-check's records)

def _model_source(**changes):
    from stemserve.client.models import ModelSource

    fields = dict(kind="file", name="mine", files=(("mine.th", "ab" * 32),))
    fields.update(changes)
    return ModelSource(**fields)


@pytest.mark.parametrize("padding, read", [(-1, True), (0, True), (1, False)])
def test_source_json_is_read_up_to_64_kib(tmp_path, padding, read):
    from stemserve.client.models import SOURCE_FILE, ModelSource

    text = _model_source().to_json()
    (tmp_path / SOURCE_FILE).write_text(text + " " * ((1 << 16) - len(text) + padding))
    assert (ModelSource.read(tmp_path) == _model_source()) is read


@pytest.mark.parametrize("changes, accepted", [
    (dict(files=tuple((f"f{i}", "ab") for i in range(64))), True),
    (dict(files=tuple((f"f{i}", "ab") for i in range(65))), False),
    (dict(files=()), False),
    (dict(files=(("f" * 256, "a" * 64),)), True),
    (dict(files=(("f" * 257, "a"),)), False),
    (dict(files=(("f", "a" * 65),)), False),
], ids=["64-files", "65-files", "no-file", "name-256-digest-64", "name-257", "digest-65"])
def test_model_source_files(changes, accepted):
    """1 to 64 (name, sha256) pairs, names of up to 256 characters, digests of up to 64."""
    if accepted:
        _model_source(**changes)
        return
    with pytest.raises(ModelError, match="are not \\(name, sha256\\) pairs"):
        _model_source(**changes)


@pytest.mark.parametrize("padding, read", [(-1, True), (0, True), (1, False)])
def test_bf16_self_check_record_is_read_up_to_4096_bytes(tmp_path, monkeypatch, padding, read):
    from stemserve.runtime import openvino_session

    monkeypatch.setenv("STEMSERVE_CACHE", str(tmp_path))
    key = {"graph": "ab" * 32}
    path = openvino_session._check_file(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"key": key, "error": 1e-3})
    path.write_text(text + " " * (openvino_session._RECORD_LIMIT - len(text) + padding))
    assert openvino_session._RECORD_LIMIT == 4096
    assert openvino_session._cached_error(key) == (1e-3 if read else None)



@pytest.mark.parametrize("text, accepted", [("5e-324", True), ("0", False), ("-5e-324", False)])
def test_seconds_flags_are_above_zero(text, accepted):
    """``--segment`` and the other seconds flags: anything above 0 gets as far as the bounds
    of its own (the export's 1 s: test_export_hardening.py); 0 and less are refused."""
    import argparse

    from stemserve.cli.flags import seconds as _seconds

    if accepted:
        assert _seconds(text) == float(text)
        return
    with pytest.raises(argparse.ArgumentTypeError, match="not a number of seconds above 0"):
        _seconds(text)


@pytest.mark.parametrize("port, accepted", [(0, False), (1, True), (65_535, True),
                                            (65_536, False)])
def test_triton_endpoint_ports(port, accepted):
    from stemserve.client.backends.fleet import parse_endpoints

    if accepted:
        assert parse_endpoints(f"host:{port}") == [f"host:{port}"]
        return
    with pytest.raises(StemserveError, match="is not host:port"):
        parse_endpoints(f"host:{port}")


@pytest.mark.parametrize("batch, accepted", [(0, False), (1, True)])
def test_repository_max_batch_size_is_at_least_one(tmp_path, batch, accepted):
    """When a config is written (``--max-batch-size``) and when one is read back."""
    from stemserve.errors import RepositoryError
    from stemserve.model_repository import writer

    spec = ModelSpec(**sidecar())
    if not accepted:
        with pytest.raises(RepositoryError, match="max_batch_size must be at least 1, got 0"):
            writer.render_config(spec, "cpu", max_batch_size=batch)
    config = writer.render_config(spec, "cpu", max_batch_size=1)
    config.max_batch_size = batch
    if accepted:
        writer._check_config(config, spec, tmp_path)
        return
    with pytest.raises(RepositoryError, match="max_batch_size must be at least 1"):
        writer._check_config(config, spec, tmp_path)
