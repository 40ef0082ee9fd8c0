"""The page in a real browser: headless Chromium (Debian's) driven by Selenium.

A short generated track is uploaded to a real ``stemserve web`` backed by the session's
real tritonserver; the test waits for the player, checks the stems are listed, playable and
downloadable, and the errors shown for an oversized and a non-audio file. It saves a
screenshot of the finished page as ``web.png`` in its temporary folder (``docs/web.png`` is
a copy). The browser has no network beyond loopback, so ``/docs`` must render from what the
server itself serves; no page may break the server's Content-Security-Policy; a server
started with a token is used through the page's token form.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import soundfile as sf
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait
from test_web import make_track, running_web

TOKEN = "correct-horse-battery-staple"

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"),  # CI must run them: fail
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium "
           "chromium-driver)")]

STEMS = ["drums", "bass", "other", "vocals"]
# What the probe found to work here, as root, on a machine with no network but loopback.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--mute-audio",
                  "--autoplay-policy=no-user-gesture-required", "--window-size=1100,900")


@pytest.fixture(scope="module")
def web(triton_server, small_export, tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("web-browser")
    with running_web(0, root / "jobs", "--url", triton_server.grpc_url,
                     "--model", str(small_export), "--max-upload-mb", "1") as base:
        yield base


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def console_errors(browser) -> list[str]:
    """Script errors and Content-Security-Policy refusals the page logged since the last
    call; answers with an error status (a refused upload, no favicon) are left out."""
    return [entry["message"] for entry in browser.get_log("browser")
            if "Content Security Policy" in entry["message"]
            or (entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"])]


def wait_for(browser, condition, timeout: float = 60):
    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(lambda _: condition())


def choose_file(browser, path: Path) -> None:
    browser.find_element(By.ID, "file").send_keys(str(path))


def shown_error(browser) -> str:
    error = browser.find_element(By.ID, "error")
    wait_for(browser, error.is_displayed, timeout=30)
    return error.text


@pytest.fixture(scope="module")
def page(browser, web):
    browser.get(web)
    wait_for(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#model option"))
    return browser


def test_oversized_upload_shows_the_limit(page, tmp_path):
    big = tmp_path / "big.wav"
    big.write_bytes(bytes(2 << 20))
    choose_file(page, big)
    assert shown_error(page) == "big.wav is 2.0 MB: uploads are limited to 1 MB."


def test_non_audio_file_shows_why(page, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("these are not the drums you are looking for\n" * 20)
    choose_file(page, notes)
    message = shown_error(page)
    assert message.startswith("Upload refused: notes.txt: not audio that libsndfile can read")


def test_upload_separate_play_and_download(page, web, tmp_path):
    choose_file(page, make_track(tmp_path / "demo song.wav", seconds=3.0))
    wait_for(page, page.find_element(By.ID, "result").is_displayed)
    assert not page.find_element(By.ID, "error").is_displayed()
    rows = page.find_elements(By.CSS_SELECTOR, "#tracks .track")
    assert [row.get_attribute("data-stem") for row in rows] == ["mix", *STEMS]
    assert page.find_element(By.ID, "track-name").text == "demo song.wav"

    durations = wait_for(page, lambda: page.execute_script(
        "const d = [...document.querySelectorAll('#tracks audio')].map(a => a.duration);"
        "return d.every(x => x > 0 && isFinite(x)) ? d : null;"))
    assert durations == pytest.approx([3.0] * 5, abs=0.05)
    # Every waveform is drawn from the decoded audio: some pixels are painted.
    wait_for(page, lambda: page.execute_script(
        "return [...document.querySelectorAll('#tracks canvas')].every(c => "
        "c.getContext('2d').getImageData(0, 0, c.width, c.height).data"
        ".some((v, i) => i % 4 === 3 && v > 0));"))

    # Solo the vocals: every other row goes silent, the vocals stay audible.
    page.find_element(By.CSS_SELECTOR, '.track[data-stem="vocals"] .solo').click()
    muted = page.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#tracks .track')]"
        ".map(r => [r.dataset.stem, r.querySelector('audio').muted]));")
    assert muted == {"mix": True, "drums": True, "bass": True, "other": True, "vocals": False}

    # One transport: play moves every stem together; pause stops them all.
    page.find_element(By.ID, "play").click()
    times = wait_for(page, lambda: page.execute_script(
        "const t = [...document.querySelectorAll('#tracks audio')].map(a => a.currentTime);"
        "return Math.min(...t) > 1.2 ? t : null;"), timeout=10)
    page.find_element(By.ID, "play").click()
    assert max(times) - min(times) < 0.2
    assert page.execute_script(
        "return [...document.querySelectorAll('#tracks audio')].every(a => a.paused);")

    links = {row.get_attribute("data-stem"): row.find_element(By.CLASS_NAME, "download")
             .get_attribute("href") for row in rows}
    vocals = httpx.get(links["vocals"])
    assert vocals.status_code == 200
    info = sf.info(io.BytesIO(vocals.content))
    assert (info.format, info.samplerate, info.channels) == ("WAV", 44100, 2)
    archive = httpx.get(page.find_element(By.ID, "zip").get_attribute("href"))
    with zipfile.ZipFile(io.BytesIO(archive.content)) as stems:
        assert sorted(stems.namelist()) == sorted(f"{stem}.wav" for stem in STEMS)

    assert console_errors(page) == []

    # The whole page, not just the window: as tall as its content.
    height = page.execute_script("return document.documentElement.scrollHeight")
    page.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 1100, "height": height, "deviceScaleFactor": 1, "mobile": False})
    # The resize redraws every waveform at the new size: wait until each canvas is as large
    # as it is shown, and painted.
    wait_for(page, lambda: page.execute_script(
        "const ratio = window.devicePixelRatio || 1;"
        "return [...document.querySelectorAll('#tracks canvas')].every(c => "
        "c.width === Math.max(1, Math.round(c.clientWidth * ratio)) && "
        "c.height === Math.round(c.clientHeight * ratio) && "
        "c.getContext('2d').getImageData(0, 0, c.width, c.height).data"
        ".some((v, i) => i % 4 === 3 && v > 0));"), timeout=10)
    screenshot = tmp_path / "web.png"
    page.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
    print(f"screenshot of the finished page: {screenshot}")


def small_sha256(small_export: Path) -> str:
    return json.loads((small_export / "model.json").read_text())["checkpoint_sha256"]


def set_width(browser, width: int) -> None:
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False})


def name_fits(browser) -> dict[str, dict]:
    """Each row's name: whether its box ends before its mute button, whether its text is
    wider than that box (drawn over the button, or cut), how it is cut, and its tooltip."""
    return browser.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#tracks .track')].map(r => {"
        "  const name = r.querySelector('.name'), mute = r.querySelector('.mute');"
        "  const style = getComputedStyle(name);"
        "  return [r.dataset.stem, {"
        "    clear: name.getBoundingClientRect().right <= mute.getBoundingClientRect().left,"
        "    wider: name.scrollWidth > name.clientWidth,"
        "    cut: style.overflow + ' ' + style.textOverflow, title: name.title}];}));")


def buttons(browser, stem: str) -> tuple[str, str, bool]:
    """A row's M and S (pressed or not) and whether its audio is muted."""
    return tuple(browser.execute_script(
        f"const r = document.querySelector('.track[data-stem=\"{stem}\"]');"
        "return [r.querySelector('.mute').getAttribute('aria-pressed'),"
        "        r.querySelector('.solo').getAttribute('aria-pressed'),"
        "        r.querySelector('audio').muted];"))


def test_two_stems_names_fit_the_buttons_show_what_is_heard_and_the_model_is_named(
        browser, web, small_export, tmp_path):
    """"No_vocals" ran into its M button; the mix's M stayed lit while the mix was soloed
    (and heard); nothing said which checkpoint made the stems; /favicon.ico was a 404."""
    browser.get(web)
    wait_for(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#model option"))
    prefix = small_sha256(small_export)[:12]
    assert browser.find_element(By.ID, "model-info").text == (
        f"Separates with model small (Demucs v2, fp32, checkpoint small, sha256 {prefix}) "
        "on Triton.")
    Select(browser.find_element(By.ID, "two-stems")).select_by_value("vocals")
    choose_file(browser, make_track(tmp_path / "two stems.wav", seconds=1.5))
    wait_for(browser, browser.find_element(By.ID, "result").is_displayed)
    rows = browser.find_elements(By.CSS_SELECTOR, "#tracks .track")
    assert [row.get_attribute("data-stem") for row in rows] == ["mix", "vocals", "no_vocals"]
    info = browser.find_element(By.ID, "track-info").text
    assert f"model small (Demucs v2, fp32, checkpoint small, sha256 {prefix})" in info
    assert "vocals + no_vocals" in info

    for width in (1100, 380):  # the desktop and the page's narrow layout (under 560 px)
        set_width(browser, width)
        fits = wait_for(browser, lambda: name_fits(browser), timeout=5)
        assert {stem: (fit["clear"], fit["wider"], fit["cut"], fit["title"])
                for stem, fit in fits.items()} == {
            stem: (True, False, "hidden ellipsis", stem) for stem in ("mix", "vocals",
                                                                        "no_vocals")}, width
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    # The mix starts muted: M lit. Soloed, it is heard: S lit, M not, the stems silent.
    assert buttons(browser, "mix") == ("true", "false", True)
    browser.find_element(By.CSS_SELECTOR, '.track[data-stem="mix"] .solo').click()
    assert buttons(browser, "mix") == ("false", "true", False)
    assert buttons(browser, "vocals") == ("false", "false", True)
    # The solo's end brings its mute back; M on a soloed row ends the solo and mutes it.
    browser.find_element(By.CSS_SELECTOR, '.track[data-stem="mix"] .solo').click()
    assert buttons(browser, "mix") == ("true", "false", True)
    assert buttons(browser, "vocals") == ("false", "false", False)
    browser.find_element(By.CSS_SELECTOR, '.track[data-stem="vocals"] .solo').click()
    browser.find_element(By.CSS_SELECTOR, '.track[data-stem="vocals"] .mute').click()
    assert buttons(browser, "vocals") == ("true", "false", True)
    assert buttons(browser, "no_vocals") == ("false", "false", False)

    icon = browser.execute_script("return document.querySelector('link[rel=icon]').href")
    assert httpx.get(icon).status_code == 200
    assert [entry for entry in browser.get_log("browser")
            if "favicon" in entry["message"]] == []


def test_the_stage_is_named_beside_the_bar(page):
    """A job's stage text (here a model being prepared: exported, the first time) is shown
    on the bar's line, to its right."""
    page.execute_script(
        "showStatus(...describe({state: 'running', stage: 'preparing', stage_text: "
        "'preparing the model', name: 'song.wav', model: 'htdemucs', progress: 0, "
        "seconds: 3, stage_progress: 0}));")
    stage = page.find_element(By.ID, "status-stage")
    bar = page.find_element(By.ID, "status-bar")
    assert stage.text == "preparing the model"
    assert page.find_element(By.ID, "status-text").text.startswith("Preparing htdemucs for "
                                                                   "song.wav")
    stage_box, bar_box = stage.rect, bar.rect
    assert stage_box["x"] >= bar_box["x"] + bar_box["width"]
    assert abs((stage_box["y"] + stage_box["height"] / 2)
               - (bar_box["y"] + bar_box["height"] / 2)) < 6


def test_docs_render_the_api_offline(browser, web):
    browser.get(f"{web}/docs")
    operations = wait_for(browser, lambda: browser.find_elements(By.CSS_SELECTOR, ".operation"))
    titles = [operation.find_element(By.TAG_NAME, "h2").text for operation in operations]
    assert "POST /api/jobs" in titles and "POST /api/music/{file_name}" in titles
    assert "GET /api/jobs/{job_id}/stems/{stem}" in titles
    submit = browser.find_element(By.ID, "submit_api_jobs_post").text
    assert "two_stems" in submit and '"wav" | "wav24"' in submit and "422" in submit
    assert console_errors(browser) == []


@pytest.fixture(scope="module")
def web_with_token(triton_server, small_export, tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("web-token")
    with running_web(0, root / "jobs", "--url", triton_server.grpc_url,
                     "--model", str(small_export), "--token", TOKEN) as base:
        yield base


def test_a_server_with_a_token_is_used_through_the_page(browser, web_with_token, tmp_path):
    browser.get(web_with_token)
    wait_for(browser, browser.find_element(By.ID, "login").is_displayed)
    assert not browser.find_element(By.ID, "upload").is_displayed()
    browser.find_element(By.ID, "token").send_keys("wrong")
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
    error = browser.find_element(By.ID, "login-error")
    wait_for(browser, error.is_displayed)
    assert error.text == "Wrong token."

    browser.find_element(By.ID, "token").clear()
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait_for(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#model option"))
    assert not browser.find_element(By.ID, "login").is_displayed()
    choose_file(browser, make_track(tmp_path / "token song.wav", seconds=1.5))
    wait_for(browser, browser.find_element(By.ID, "result").is_displayed)
    # The players fetch the stems with the login cookie: all of them load.
    durations = wait_for(browser, lambda: browser.execute_script(
        "const d = [...document.querySelectorAll('#tracks audio')].map(a => a.duration);"
        "return d.every(x => x > 0 && isFinite(x)) ? d : null;"))
    assert durations == pytest.approx([1.5] * 5, abs=0.05)
    assert console_errors(browser) == []
