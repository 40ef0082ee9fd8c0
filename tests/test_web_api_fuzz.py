"""``stemserve web``'s HTTP API fuzzed from its own OpenAPI schema (schemathesis).

A real ``stemserve web`` (a child process, in-process ONNX Runtime on the small model, with a
token, so that every route is served, ``POST /api/login`` too) is sent requests that
schemathesis generates from the ``/openapi.json`` the server itself serves: valid ones,
and ones that break the schema (wrong types, missing fields, odd path segments, random
uploads). No answer may be a server error (5xx: uvicorn's 500 for an exception the app did
not handle, or a refusal filed as the server's fault), and the server must still separate a
real track afterwards, with nothing in its log that says something broke.

Guesses of the token come from their own loopback address (127.0.0.2), so that the throttle
they trip (429) does not slow down the requests that carry the right token.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from requests.adapters import HTTPAdapter
from schemathesis import Case, GenerationMode
from schemathesis.schemas import APIOperation
from test_web import make_track, running_web, submit, wait_done

pytestmark = pytest.mark.slow

TOKEN = "fuzz-token-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 20
"""Generated requests per operation: 8 operations stay well under a minute."""


@pytest.fixture(scope="module")
def web(small_export, free_ports, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """The server's base URL and its log."""
    root = tmp_path_factory.mktemp("web-fuzz")
    with running_web(free_ports(1)[0], root / "jobs", "--backend", "onnx",
                     "--model", str(small_export), "--max-upload-mb", "1",
                     "--max-duration", "5",
                     env=dict(os.environ, STEMSERVE_WEB_TOKEN=TOKEN)) as base:
        yield base, root / "web.log"


class FromAddress(HTTPAdapter):
    """Connects from ``address`` (another loopback address than 127.0.0.1)."""

    def __init__(self, address: str):
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


@pytest.fixture(scope="module")
def guesser() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.mount("http://", FromAddress("127.0.0.2"))
        yield session


def fuzz(operation: APIOperation, mode: GenerationMode, session: requests.Session,
         headers: dict[str, str]) -> None:
    """Send ``EXAMPLES`` requests generated for ``operation`` that fit its schema (``mode``
    positive) or break it (negative); none may be a server error."""

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(mode))
    def run(case: Case) -> None:
        response = case.call(session=session, headers=headers, timeout=30)
        assert response.status_code < 500, (f"{mode.value}: {case.method} "
                                            f"{case.formatted_path} answered "
                                            f"{response.status_code}: {response.text}")

    try:
        run()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
        # Nothing to break: e.g. a path segment that may be any string.


def test_no_generated_request_is_a_server_error(web, guesser):
    schema = schemathesis.openapi.from_url(f"{web[0]}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 8 and "/api/login" in {op.path for op in operations}
    with requests.Session() as session:
        for operation in operations:
            login = operation.path == "/api/login"
            for mode in GenerationMode:
                fuzz(operation, mode, guesser if login else session, {} if login else BEARER)


def test_the_server_still_separates_a_track_afterwards(web, tmp_path):
    base, log = web
    with httpx.Client(base_url=base, headers=BEARER, timeout=60) as client:
        job = submit(client, make_track(tmp_path / "after.wav", seconds=1.0))
        assert job.status_code == 202, job.text
        done = wait_done(client, job.json()["id"])
        assert done["state"] == "done", done
        assert [stem["name"] for stem in done["stems"]] == ["drums", "bass", "other", "vocals"]
        assert client.get(done["zip_url"]).content.startswith(b"PK")
    text = log.read_text()
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text
