"""``stemserve web`` against other sites and strangers: cross-site writes refused, security
headers on every answer, and an optional token for servers reachable beyond loopback.

A real ``stemserve web`` (a child process on the session's tritonserver) is sent what a
browser sends for a page on another site, what curl sends for the demucs image's API, and
what a page that rebinds its own host name to 127.0.0.1 sends.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from test_web import make_track, running_web, wait_done
from test_web_limits import connect, read_answer, status_of, upload_head

from stemserve.web import guards
from stemserve.web.guards import TokenThrottle, client_key

ALLOWED = "https://music.example.com"
TOKEN = "s3cret-t0ken"
HEADERS = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}


@pytest.fixture(scope="module")
def web(triton_server, small_export, free_ports, tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("web-security")
    with running_web(free_ports(1)[0], root / "jobs", "--url", triton_server.grpc_url,
                     "--model", str(small_export), "--allow-origin", ALLOWED) as base:
        yield base


@pytest.fixture(scope="module")
def track(tmp_path_factory) -> Path:
    return make_track(tmp_path_factory.mktemp("tracks") / "song.wav", seconds=1.0)


def post_job(base: str, track: Path, headers: dict[str, str] | None = None,
             **kwargs) -> httpx.Response:
    with open(track, "rb") as file:
        return httpx.post(f"{base}/api/jobs", files={"file": ("song.wav", file)},
                          headers=headers or {}, timeout=60, **kwargs)


# ---------------------------------------------------------------------------------------------
# Cross-site writes

@pytest.mark.parametrize("headers", [
    {"Origin": "https://evil.example"},
    {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Origin": "null"},
    {"Origin": "http://music.example.com"},  # an allowed host, but not its allowed scheme
])
def test_writes_from_pages_on_other_sites_are_refused(web, track, headers):
    response = post_job(web, track, headers)
    assert response.status_code == 403
    assert response.json()["detail"].startswith("Refused: a page on ")
    assert response.json()["detail"].endswith("Only this server's own page may, or the "
                                              "origins given with --allow-origin.")


def test_a_cross_site_write_is_refused_before_its_body_is_read(web):
    with connect(web) as sock:
        sock.sendall(upload_head(web, 50 << 20).replace(
            b"\r\n\r\n", b"\r\nOrigin: https://evil.example\r\n\r\n"))
        answer = read_answer(sock, timeout=10)
    assert status_of(answer) == 403


def test_a_page_that_rebinds_its_name_to_loopback_is_not_same_origin(web, track):
    """DNS rebinding: the browser thinks evil.example is this server, and says so."""
    port = urlsplit(web).port
    headers = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}",
               "Sec-Fetch-Site": "same-origin"}
    assert post_job(web, track, headers).status_code == 403


@pytest.mark.parametrize("headers", [
    {"Origin": "{web}", "Sec-Fetch-Site": "same-origin"},  # the page itself
    {"Origin": "http://localhost:{port}", "Host": "localhost:{port}"},
    {"Origin": ALLOWED, "Sec-Fetch-Site": "cross-site"},
    {"Origin": ALLOWED.upper()},
    {},  # curl, scripts: no browser, no cross-site request
])
def test_the_page_allowed_origins_and_non_browsers_may_write(web, track, headers):
    port = str(urlsplit(web).port)
    headers = {key: value.replace("{web}", web).replace("{port}", port)
               for key, value in headers.items()}
    response = post_job(web, track, headers)
    assert response.status_code == 202, response.text
    with httpx.Client(base_url=web, timeout=60) as client:
        assert wait_done(client, response.json()["id"])["state"] == "done"


def test_reads_from_other_sites_are_left_to_the_browser(web):
    """A GET changes nothing; the browser's same-origin policy keeps its answer from the
    other page (no CORS headers are sent)."""
    response = httpx.get(f"{web}/api/config", headers={"Origin": "https://evil.example",
                                                       "Sec-Fetch-Site": "cross-site"})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


def test_the_demucs_images_curl_command_still_works(web, track, tmp_path):
    out = tmp_path / "song.zip"
    result = subprocess.run(["curl", "-sS", "-f", "-F", f"file=@{track}", "-o", str(out),
                             f"{web}/api/music/song.wav"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(b"PK")


def test_an_origin_that_is_no_origin_stops_the_start(tmp_path):
    result = subprocess.run([sys.executable, "-m", "stemserve", "web", "--allow-origin",
                             "music.example.com", "--jobs-dir", str(tmp_path / "jobs")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("stemserve: error: --allow-origin 'music.example.com' is "
                                    "not an origin: give the page's scheme, host and port")


# ---------------------------------------------------------------------------------------------
# Headers on every answer

@pytest.mark.parametrize("method,path,status", [
    ("GET", "/", 200), ("GET", "/static/app.js", 200), ("GET", "/api/config", 200),
    ("GET", "/docs", 200), ("GET", "/openapi.json", 200), ("GET", "/api/jobs/x", 404),
    ("GET", "/nothing", 404), ("POST", "/api/config", 405),
])
def test_every_answer_carries_the_security_headers(web, method, path, status):
    response = httpx.request(method, f"{web}{path}")
    assert response.status_code == status
    for name, value in HEADERS.items():
        assert response.headers[name] == value
    policy = dict(part.strip().split(" ", 1)
                  for part in response.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'self'" and policy["frame-ancestors"] == "'none'"


def test_refusals_carry_the_security_headers_too(web, track):
    response = post_job(web, track, {"Origin": "https://evil.example"})
    assert response.status_code == 403
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


# ---------------------------------------------------------------------------------------------
# The token

@pytest.fixture(scope="module")
def locked(triton_server, small_export, free_ports, tmp_path_factory) -> Iterator[str]:
    """A server whose token comes from the environment, as the docs advise."""
    root = tmp_path_factory.mktemp("web-token")
    with running_web(free_ports(1)[0], root / "jobs", "--url", triton_server.grpc_url,
                     "--model", str(small_export),
                     env=dict(os.environ, STEMSERVE_WEB_TOKEN=TOKEN)) as base:
        yield base


def from_address(address: str, **options) -> httpx.Client:
    """A client that connects from another loopback address than 127.0.0.1: the token
    throttle counts wrong tokens per address, so each test's guesses stay its own."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), **options)


@pytest.mark.parametrize("path,address", [("/api/config", "127.0.0.11"),
                                          ("/api/jobs/" + "a" * 22, "127.0.0.12"),
                                          ("/api/jobs/" + "a" * 22 + "/zip", "127.0.0.13")])
def test_without_the_token_the_api_answers_401(locked, path, address):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Cookie": "stemserve_token=wrong"}):
        with from_address(address) as client:
            response = client.get(f"{locked}{path}", headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["detail"] == ("This server needs its token: enter it on the "
                                             "page, or send 'Authorization: Bearer <token>'.")


def test_an_upload_without_the_token_is_refused_before_its_body_is_read(locked):
    with connect(locked) as sock:
        sock.sendall(upload_head(locked, 50 << 20))
        answer = read_answer(sock, timeout=10)
    assert status_of(answer) == 401


def test_the_page_and_its_docs_need_no_token(locked):
    for path in ("/", "/static/app.js", "/docs", "/openapi.json"):
        assert httpx.get(f"{locked}{path}").status_code == 200, path


def test_with_the_token_the_job_api_and_legacy_api_work(locked, track, tmp_path):
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    response = post_job(locked, track, bearer)
    assert response.status_code == 202, response.text
    with httpx.Client(base_url=locked, headers=bearer, timeout=60) as client:
        assert wait_done(client, response.json()["id"])["state"] == "done"
    out = tmp_path / "song.zip"
    result = subprocess.run(["curl", "-sS", "-f", "-H", f"Authorization: Bearer {TOKEN}",
                             "-F", f"file=@{track}", "-o", str(out),
                             f"{locked}/api/music/song.wav"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(b"PK")


def test_the_page_logs_in_once_and_keeps_the_token_in_a_strict_cookie(locked):
    with httpx.Client(base_url=locked) as client:
        wrong = client.post("/api/login", json={"token": "wrong"})
        assert wrong.status_code == 401 and wrong.json() == {"detail": "Wrong token."}
        login = client.post("/api/login", json={"token": TOKEN},
                            headers={"Origin": locked, "Sec-Fetch-Site": "same-origin"})
        assert login.status_code == 204
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        assert client.get("/api/config").status_code == 200  # the cookie, no header
    cross = httpx.post(f"{locked}/api/login", json={"token": TOKEN},
                       headers={"Origin": "https://evil.example"})
    assert cross.status_code == 403


# ---------------------------------------------------------------------------------------------
# Guessing the token

def test_300_wrong_tokens_are_throttled_and_the_right_one_works_after_the_wait(locked):
    """300 guesses used to take 0.3 s: after 5 the address waits (429, Retry-After), longer
    after each further guess; the right token after the wait logs in. Other addresses are
    not slowed down meanwhile."""
    with from_address("127.0.0.21", base_url=locked, timeout=30) as guesser:
        answers = [guesser.post("/api/login", json={"token": f"guess-{index}"})
                   for index in range(300)]
        statuses = [answer.status_code for answer in answers]
        assert statuses[:5] == [401] * 5 and statuses[5] == 429
        assert statuses.count(401) <= 10 and statuses.count(401) + statuses.count(429) == 300
        refused = answers[-1] if statuses[-1] == 429 else answers[statuses.index(429)]
        wait = int(refused.headers["retry-after"])
        assert 1 <= wait <= 64
        assert refused.json() == {"detail": f"Too many wrong tokens from this address: try "
                                            f"again in {wait} s."}
        # The right token is refused unchecked while the address waits ...
        assert guesser.post("/api/login", json={"token": TOKEN}).status_code == 429
        with from_address("127.0.0.22", base_url=locked) as other:
            assert other.get("/api/config", headers={"Authorization": f"Bearer {TOKEN}"}
                             ).status_code == 200
        deadline = time.monotonic() + 70
        while (late := guesser.post("/api/login", json={"token": TOKEN})).status_code == 429 \
                and time.monotonic() < deadline:
            time.sleep(int(late.headers["retry-after"]))
        # ... and logs in once the wait is over.
        assert late.status_code == 204


def test_bearer_and_cookie_guesses_count_as_wrong_tokens(locked):
    with from_address("127.0.0.23", base_url=locked) as guesser:
        statuses = [guesser.get("/api/config", headers=headers).status_code
                    for headers in [{"Authorization": "Bearer wrong"},
                                    {"Cookie": "stemserve_token=wrong"}] * 3]
    assert statuses == [401] * 5 + [429]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_throttle_doubles_the_wait_forgets_and_stays_bounded():
    clock = Clock()
    throttle = TokenThrottle(capacity=3, clock=clock)
    for _ in range(4):
        throttle.failed("a")
    assert throttle.wait("a") == 0  # four free failures
    waits = []
    for _ in range(12):
        throttle.failed("a")
        waits.append(throttle.wait("a"))
        clock.now += waits[-1]  # the next guess comes when the wait is over
    assert waits == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, guards.MAX_WAIT, guards.MAX_WAIT]
    clock.now += guards.FORGET_AFTER + 1
    throttle.failed("a")
    assert throttle.wait("a") == 0  # a fresh start
    for client in ("b", "c", "d"):
        throttle.failed(client)
    assert len(throttle) == 3 and "a" not in throttle._failures  # the least recent went first


def test_clients_count_by_address_ipv6_by_its_64():
    assert client_key({"client": ("192.0.2.7", 50000)}) == "192.0.2.7"
    assert client_key({"client": ("::ffff:192.0.2.7", 50000)}) == "192.0.2.7"
    assert client_key({"client": ("2001:db8:1:2:3:4:5:6", 1)}) == \
        client_key({"client": ("2001:db8:1:2:ffff::1", 2)}) == "2001:db8:1:2::/64"
    assert client_key({"client": None}) == "?"
