"""The web console (docs/console.md) in a real browser: Debian's chromium, headless, driven by
Selenium through chromium-driver, with a fake microphone that plays a WAV file, against the real
gateway process in front of the session's real tritonserver. What the pages show is compared with
what the command line gets from the same server for the same audio:

- Transcribe: an upload shows the segments of `tritonasr transcribe` (text, times, voices; with
  Parakeet its words);
- Live: the microphone's stream shows the finals of `tritonasr stream` of the audio the page sent,
  which is the microphone's file;
- Speakers: a speaker enrolled on the page (from a file, and from the microphone) is named in
  the next transcription; removed on the page, gone;
- Jobs: a job of several files completes and each result downloads as json, srt, vtt and txt;
  deleted on the page (from the keyboard), it is gone from the list and from the gateway.

With TRITONASR_SCREENSHOTS=DIR set, each page is saved as DIR/console-PAGE.png from these runs
(docs/ holds them: `TRITONASR_SCREENSHOTS=docs pytest tests/test_e2e_console.py`)."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import soxr

from tritonasr.audio import load_audio
from tritonasr.client.formats import clock, render, speaker_name
from tritonasr.gateway.console import CONTENT_SECURITY_POLICY
from tritonasr.gateway.transcriptions import joined_text

from conftest import DATA, TEST_ADMIN_KEY, conversation
from test_e2e_gateway import Gateway
from test_e2e_speakers import _utterance

pytestmark = pytest.mark.e2e

KEY = "console-test-key"
SPEECH = DATA / "pause_1s.wav"
SPEAKERS = sorted((DATA / "speakers").glob("utt*.wav"))
WAIT_S = 60  # for anything the server computes
WINDOW = (1280, 1000)  # screenshots: readable, the width of a laptop
PHONE = (390, 844)
MAX_SHOT_HEIGHT = 1600  # a whole page, unless it is longer than this
VAD_FRAME_MS = 10  # segment boundaries fall on FSMN-VAD's frames


def _cli(*args: str) -> str:
    """A `tritonasr` command's standard output (the real CLI, in a process of its own)."""
    done = subprocess.run([sys.executable, "-m", "tritonasr.cli", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _cli_transcript(server, path: Path, *options: str) -> dict:
    return json.loads(_cli("transcribe", str(path), "--url", server.grpc_url, "--format", "json", *options))


def _cli_stream_finals(server, path: Path) -> list[dict]:
    lines = _cli("stream", str(path), "--url", server.grpc_url, "--format", "json").splitlines()
    return [s for s in map(json.loads, lines) if s.get("final")]


# --- the browser ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gateway(server, tmp_path_factory):
    directory = tmp_path_factory.mktemp("console_gateway")
    running = Gateway(server.grpc_url, "--api-key", KEY, "--jobs-db", str(directory / "jobs.db"), log=directory / "log")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def microphone_file(tmp_path_factory) -> Path:
    """What the fake microphone plays: SPEECH with a second of silence after it, so that its last
    segment ends by itself (FSMN-VAD's 800 ms), as 16-bit PCM, which Chromium's WAV reader takes.
    Played once (`%noloop`), then silence."""
    samples = load_audio(SPEECH).samples
    path = tmp_path_factory.mktemp("microphone") / "microphone.wav"
    sf.write(path, np.concatenate([samples, np.zeros(16000, np.float32)]), 16000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(microphone_file, downloads):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("the console's browser tests need Debian's chromium and chromium-driver: "
                    "`apt-get install chromium chromium-driver` (scripts/test.sh installs them when missing)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={WINDOW[0]},{WINDOW[1]}", "--use-fake-ui-for-media-stream",
                     "--use-fake-device-for-media-stream",
                     f"--use-file-for-fake-audio-capture={microphone_file}%noloop"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    running = webdriver.Chrome(service=Service(driver), options=options)
    yield running
    running.quit()


class Console:
    """The console in the browser: pages by name, waits, and the browser's own error log."""

    def __init__(self, browser, gateway):
        self.browser, self.gateway = browser, gateway

    def open(self, page: str, key: str | None = KEY) -> None:
        from selenium.webdriver.common.keys import Keys

        self.browser.set_window_size(*WINDOW)
        self.browser.get("about:blank")  # (a new page, not a move between fragments of the last one)
        self.browser.get(f"{self.gateway.url}/#{page}")
        self.wait(lambda: self.browser.execute_script("return document.body.dataset.ready") == "true")
        field = self.find("#api-key")
        field.clear()
        if key:
            field.send_keys(key, Keys.TAB)
        assert self.find(f"#page-{page}").is_displayed()

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.browser.find_element(By.CSS_SELECTOR, css)

    def click(self, css: str) -> None:
        """Clicks `css`, found again if the page redrew it meanwhile (lists redraw as they load)."""
        from selenium.common.exceptions import StaleElementReferenceException

        for _ in range(20):
            try:
                self.find(css).click()
                return
            except StaleElementReferenceException:
                time.sleep(0.1)
        raise AssertionError(f"{css} kept being redrawn")

    def find_all(self, css: str) -> list:
        from selenium.webdriver.common.by import By

        return self.browser.find_elements(By.CSS_SELECTOR, css)

    def wait(self, condition, timeout_s: float = WAIT_S, what: str = ""):
        deadline = time.monotonic() + timeout_s
        while not (result := condition()):
            assert time.monotonic() < deadline, f"waited {timeout_s} s for {what or condition}"
            time.sleep(0.1)
        return result

    def status(self, page: str) -> str:
        return self.find(f"#{page}-status").text

    def choose(self, select_css: str, value: str) -> None:
        from selenium.webdriver.support.select import Select

        Select(self.find(select_css)).select_by_value(value)

    def errors(self) -> list[str]:
        """The browser's errors since the last call: script errors and policy violations (a
        refused request's own log line, which the tests cause on purpose, is not one)."""
        return [entry["message"] for entry in self.browser.get_log("browser")
                if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]]

    def screenshot(self, page: str) -> None:
        """docs/console-PAGE.png from this run, when TRITONASR_SCREENSHOTS names a directory."""
        directory = os.environ.get("TRITONASR_SCREENSHOTS")
        if directory:
            self.browser.execute_script("document.activeElement && document.activeElement.blur()")
            size = self.browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
            shot = self.browser.execute_cdp_cmd("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], MAX_SHOT_HEIGHT),
                         "scale": 1}})
            (Path(directory) / f"console-{page}.png").write_bytes(base64.b64decode(shot["data"]))


@pytest.fixture()
def console(browser, gateway):
    page = Console(browser, gateway)
    page.errors()  # (what earlier tests left)
    yield page
    assert page.errors() == []


def _file_in_sent(sent: np.ndarray, original: np.ndarray, first: int, last: int, rate: int,
                  block_s: float = 0.25) -> list[tuple[int, int]]:
    """Where original[first:last] lies in `sent`, block by block: (the block's index in the file,
    sent index - file index). Chromium's fake microphone, late on a loaded CPU, can leave the audio
    graph a moment of silence before the file goes on (our reading of two full-suite failures where
    the file as a whole, at one shift, was 1-3 dB off), which moves the blocks after it later; what
    the page must not do is lose or change the file's audio. So each block with speech in it is
    searched from the place of the last block that matched on, and must match the file within
    -20 dB, except the two blocks either side of a delay."""
    block, jitter, late = int(block_s * rate), rate // 1000, rate // 2
    energy = float(np.mean(original[first:last] ** 2))
    probe = original[first:first + 2 * rate]  # where the stream began: the first 2 s of speech
    shift = int(np.argmax(_correlation(sent[:first + 4 * rate], probe))) - first
    matched = shift  # the place of the last block that matched (one the delay fell inside matches nowhere)
    found, errors = [], []
    for start in range(first, last - block + 1, block):
        piece = original[start:start + block]
        if np.mean(piece ** 2) > 0.01 * energy:  # (a pause says nothing about where it is)
            low = max(0, start + matched - jitter)
            window = sent[low:low + block + late]
            if window.size < block:
                raise AssertionError(f"the page's audio ends before the file's at {start / rate:.2f} s")
            shift = low + int(np.argmax(_correlation(window, piece))) - start
        found.append((start, shift))
        got = sent[start + shift:start + shift + block]
        difference = np.pad(got, (0, block - got.size)) - piece  # (past the page's audio: none of the file)
        errors.append(10 * np.log10(max(float(np.mean(difference ** 2)), 1e-12) / energy))
        if errors[-1] < -20:
            matched = shift
    # (the delay fell inside one of the two blocks either side of where the shift grew)
    delayed = {i + side for i in range(len(found) - 1) if found[i + 1][1] > found[i][1] + jitter for side in (0, 1)}
    profile = ", ".join(f"{start / rate:.2f} s: {shift * 1000 / rate:+.1f} ms {error:.0f} dB"
                        for (start, shift), error in zip(found, errors))
    bad = [i for i, error in enumerate(errors) if error >= -20 and i not in delayed]
    assert not bad, f"the page sent audio off the file (blocks of the file: where in the page's audio, error): {profile}"
    return found


def _correlation(window: np.ndarray, piece: np.ndarray) -> np.ndarray:
    """Cross-correlation of `piece` at each place it fits whole in `window` (by FFT)."""
    n = window.size + piece.size
    spectrum = np.fft.rfft(window, n) * np.conj(np.fft.rfft(piece, n))
    return np.fft.irfft(spectrum, n)[:window.size - piece.size + 1]


def _shift_at(shifts: list[tuple[int, int]], index: int) -> int:
    """The shift of the last block that starts at or before `index` in the file."""
    return next((shift for start, shift in reversed(shifts) if start <= index), shifts[0][1])


def _shown_segments(console: Console, css: str) -> list[dict]:
    return [{"start_ms": int(item.get_attribute("data-start-ms")), "end_ms": int(item.get_attribute("data-end-ms")),
             "time": item.find_element("css selector", ".time").text,
             "voice": item.find_element("css selector", ".voice").text,
             "text": item.find_element("css selector", ".text").text}
            for item in console.find_all(css)]


def _expected_segments(segments: list[dict]) -> list[dict]:
    return [{"start_ms": s["start_ms"], "end_ms": s["end_ms"],
             "time": f"{clock(s['start_ms'], '.')} – {clock(s['end_ms'], '.')}",
             "voice": speaker_name(s.get("speaker")), "text": s["text"].strip()} for s in segments]


# --- the page and its policy ---------------------------------------------------------------------

def test_page_assets_and_policy(gateway, server):
    """The page and its files with their types and a policy that allows no inline script; the
    FunASR WebSocket at `/` still answers beside the page."""
    import asyncio
    import re

    from websockets.asyncio.client import connect

    page = httpx.get(f"{gateway.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY and "connect-src 'self'" in CONTENT_SECURITY_POLICY
    assert page.headers["x-content-type-options"] == "nosniff"
    scripts = re.findall(r"<script\b[^>]*>", page.text)
    assert scripts and all('src="' in tag for tag in scripts)  # no inline code
    assert not re.search(r"\son[a-z]+=", page.text)  # nor inline handlers
    for path, kind in (("console/app.js", "text/javascript"), ("console/capture-worklet.js", "text/javascript"),
                       ("console/console.css", "text/css"), ("console/icon.svg", "image/svg+xml")):
        asset = httpx.get(f"{gateway.url}/{path}", timeout=10)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind), path
        assert asset.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    for outside in ("console/../gateway/app.py", "console/%2e%2e/app.py", "console/..%2fapp.py"):
        assert httpx.get(f"{gateway.url}/{outside}", timeout=10).status_code == 404
    assert httpx.post(f"{gateway.url}/", timeout=10).status_code == 405

    async def funasr_offline() -> dict:
        async with connect(gateway.url.replace("http", "ws") + "/") as ws:
            await ws.send(json.dumps({"mode": "offline", "wav_name": "a", "wav_format": "wav", "api_key": KEY,
                                      "is_speaking": True}))
            await ws.send(SPEECH.read_bytes())
            await ws.send(json.dumps({"is_speaking": False}))
            return json.loads(await ws.recv())

    answer = asyncio.run(funasr_offline())  # (what it says is tests/test_e2e_gateway_funasr.py's to check)
    assert answer["is_final"] and answer["text"] and answer["wav_name"] == "a"


def test_keyboard_and_phone_width(console):
    """Every control has a name; the tabs move with the arrow keys; no page is wider than a phone."""
    from selenium.webdriver.common.keys import Keys

    console.open("transcribe")
    unnamed = console.browser.execute_script("""
        return [...document.querySelectorAll('input, select, button, meter, progress')]
          .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
          .map((e) => e.outerHTML);""")
    assert unnamed == []
    console.find("#tab-transcribe").send_keys(Keys.ARROW_RIGHT)
    assert console.browser.switch_to.active_element.get_attribute("id") == "tab-live"
    assert console.find("#page-live").is_displayed() and not console.find("#page-transcribe").is_displayed()
    console.browser.switch_to.active_element.send_keys(Keys.END)
    assert console.browser.switch_to.active_element.get_attribute("id") == "tab-jobs"
    console.browser.set_window_size(*PHONE)
    for page in ("transcribe", "live", "speakers", "jobs"):
        console.find(f"#tab-{page}").click()
        overflow = console.browser.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"the {page} page is {overflow} px wider than a phone"


# --- Transcribe ----------------------------------------------------------------------------------

def test_upload_shows_the_segments_of_tritonasr_transcribe(console, server, tmp_path):
    """Three voices (three recordings, which the random-weight speaker model tells apart; the
    first twice): each segment with its time, voice and text as the CLI has them, a block on the
    timeline each, one colour per voice."""
    call = tmp_path / "call.flac"
    sf.write(call, conversation([0, 3, 0, 5], [_utterance(i) for i in range(len(SPEAKERS))], gap_s=1.0), 16000)
    expected = _cli_transcript(server, call)["segments"]
    assert len(expected) == 4

    console.open("transcribe")
    console.find("#t-file").send_keys(str(call))
    console.wait(lambda: len(console.find_all("#t-segments li")) == len(expected), what="the segments")
    assert _shown_segments(console, "#t-segments li") == _expected_segments(expected)
    blocks = console.find_all("#t-timeline .block")
    assert len(blocks) == len(expected)
    colours = [b.get_attribute("class").split()[-1] for b in blocks]
    labels = [speaker_name(s["speaker"]) for s in expected]
    assert labels[0] == labels[2] and len(set(labels)) == 3
    assert colours[0] == colours[2] and len(set(colours)) == 3
    tags = {t.text for t in console.find_all("#t-segments .tag")}
    assert tags >= {s["emotion"] for s in expected if s.get("emotion")} | {s["event"] for s in expected if s.get("event")}
    assert console.status("t").startswith("Done")
    console.screenshot("transcribe")
    console.browser.set_window_size(*PHONE)  # the results fit a phone too
    assert console.browser.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth") <= 0


def test_parakeet_words_and_channels(console, server, tmp_path):
    """Parakeet's words under each segment; a call dropped on the page, its channels recognised
    apart, in a lane each."""
    expected = _cli_transcript(server, SPEECH, "--engine", "parakeet")["segments"]
    console.open("transcribe")
    console.choose("#transcribe-form select[name=engine]", "parakeet")
    console.find("#t-file").send_keys(str(SPEECH))
    console.wait(lambda: len(console.find_all("#t-segments li")) == len(expected)
                 and console.status("t").startswith("Done"), what="the segments")
    assert _shown_segments(console, "#t-segments li") == _expected_segments(expected)
    shown = [[w.text for w in item.find_elements("css selector", ".word")] for item in console.find_all("#t-segments li")]
    assert shown == [[w["text"] for w in s["words"]] for s in expected]

    # A call, one voice per channel, dropped on the page: a lane per channel.
    left, right = load_audio(SPEECH).samples, conversation([0], [_utterance(2)], 2.0)
    right = np.pad(right, (0, left.size - right.size))
    stereo = tmp_path / "call.wav"
    sf.write(stereo, np.stack([left, right], axis=1), 16000)
    expected = _cli_transcript(server, stereo, "--channels", "separate")["segments"]
    assert {s["channel"] for s in expected} == {0, 1}
    console.choose("#transcribe-form select[name=engine]", "sensevoice")
    console.choose("#transcribe-form select[name=channels]", "separate")
    console.browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const dropped = new DataTransfer();
        dropped.items.add(new File([bytes], "call.wav", {type: "audio/wav"}));
        document.getElementById("t-drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dropped, bubbles: true}));
        """, base64.b64encode(stereo.read_bytes()).decode())
    console.wait(lambda: console.status("t").startswith("Done") and "call.wav" in console.find("#t-summary").text,
                 what="the dropped file's segments")
    assert [lane.text for lane in console.find_all("#t-timeline .lane-name")] == ["ch 0", "ch 1"]
    blocks = [len(lane.find_elements("css selector", ".block")) for lane in console.find_all("#t-timeline .lane")]
    assert blocks == [sum(s["channel"] == c for s in expected) for c in (0, 1)]
    assert [(item.find_element("css selector", ".channel").text, item.find_element("css selector", ".text").text)
            for item in console.find_all("#t-segments li")] == [(f"ch {s['channel']}", s["text"].strip()) for s in expected]


# --- Live ----------------------------------------------------------------------------------------

def test_live_microphone_shows_the_finals_of_tritonasr_stream(console, server, microphone_file, downloads):
    """The fake microphone plays microphone_file once from when the page opens it. The page
    streams it as float32 at 16 kHz; partials show and are replaced, finals stay with their
    latency. The audio the page kept (exactly what it sent) is the microphone's file (Chromium
    resamples it to its device rate and back: close, not equal, and delayed by the moment the
    stream started); `tritonasr stream` of it gives the page's finals, text, times and voices,
    and `tritonasr stream` of the file itself the same segments, moved by that delay."""
    played = _cli_stream_finals(server, microphone_file)
    assert len(played) == 2

    console.open("live")
    console.choose("#live-form select[name=endpointing]", "default")
    console.find("#live-form input[name=keep]").click()
    console.find("#l-start").click()
    partials = set()

    def finals_shown() -> bool:
        text = console.find("#l-partial").text
        if text:
            partials.add(text)
        return len(console.find_all("#l-finals li")) == len(played)

    console.wait(finals_shown, timeout_s=30, what="the finals of the microphone's speech")
    assert not console.find("#l-download").is_displayed()  # (only once stopped)
    shown = _shown_segments(console, "#l-finals li")
    latencies = [int(item.find_element("css selector", ".latency").text.split()[1].rstrip("ms"))
                 for item in console.find_all("#l-finals li")]
    console.screenshot("live")
    console.find("#l-stop").click()
    console.wait(lambda: console.status("l").startswith("Stopped"), what="the summary")
    assert console.find("#l-start").is_enabled() and not console.find("#l-stop").is_enabled()
    assert partials, "no partial result was shown"
    assert console.find("#l-partial").text == ""
    assert all(0 < ms < 10_000 for ms in latencies), latencies

    console.find("#l-download").click()
    sent_path = console.wait(lambda: next(iter(downloads.glob("live*.wav")), None), what="the download")
    # What the page sent is the file, from wherever the stream began in it (Chromium starts the
    # file when the page's audio graph pulls it, a little before or after the stream's start),
    # compared at 48 kHz (Chromium's resamplers delay it by a fraction of a sample too).
    rate = 48000
    sent, original = (soxr.resample(load_audio(path).samples, 16000, rate) for path in (sent_path, microphone_file))
    lead = rate // 2  # the file's silence before its speech
    shifts = _file_in_sent(sent, original, lead, original.size - rate, rate)  # its last second of silence left out
    assert shifts[0][1] > -lead, f"the page lost the first {-shifts[0][1] / rate:.3f} s of the microphone's audio"

    expected = _cli_stream_finals(server, sent_path)
    assert shown == _expected_segments(expected)
    # And the file's own segments, moved by where the stream began. (Not their text: a close copy
    # is not the same audio, and the test models' random weights answer any change in it with
    # other tokens; a real model hears the same words.)
    for got, want in zip(shown, played, strict=True):
        for edge in ("start_ms", "end_ms"):
            moved_ms = _shift_at(shifts, want[edge] * rate // 1000) * 1000 / rate
            assert abs(got[edge] - moved_ms - want[edge]) <= 2 * VAD_FRAME_MS, (edge, got, want, moved_ms)
    sent_path.unlink()


# --- Speakers ------------------------------------------------------------------------------------

def test_enroll_then_transcribe_shows_the_name(console, server, tmp_path):
    alice = tmp_path / "alice.wav"
    sf.write(alice, conversation([0], [load_audio(SPEAKERS[0]).samples], 1.0), 16000)

    console.open("speakers")
    console.find("#s-name").send_keys("alice")
    console.find("#s-files").send_keys(str(alice))
    console.find("#s-admin-key").send_keys("not-the-admin-key")
    console.find("#enroll-form button[type=submit]").click()
    console.wait(lambda: "permission denied" in console.status("s"), what="the server's refusal")
    console.find("#s-admin-key").clear()
    console.find("#s-admin-key").send_keys(TEST_ADMIN_KEY)
    console.find("#enroll-form button[type=submit]").click()
    console.wait(lambda: console.status("s").startswith("Enrolled alice"))
    assert [row.get_attribute("data-name") for row in console.find_all("#s-table tbody tr")] == ["alice"]

    # From the microphone: its file again, from the start, for four seconds.
    console.find("#s-name").send_keys("bob")
    console.find("#s-record").click()
    console.wait(lambda: console.find("#s-record-stop").is_enabled())
    time.sleep(4)
    console.find("#s-record-stop").click()
    console.wait(lambda: len(console.find_all("#s-recordings li")) == 1)
    console.find("#enroll-form button[type=submit]").click()
    console.wait(lambda: console.status("s").startswith("Enrolled bob from 1 recording"))
    assert [row.get_attribute("data-name") for row in console.find_all("#s-table tbody tr")] == \
        ["alice", "bob"]
    console.screenshot("speakers")

    console.find("#tab-transcribe").click()
    console.find("#t-file").send_keys(str(alice))
    console.wait(lambda: console.find_all("#t-segments li") and console.status("t").startswith("Done"))
    assert [s["voice"] for s in _shown_segments(console, "#t-segments li")] == ["alice"]

    console.find("#tab-speakers").click()
    for name in ("alice", "bob"):
        console.click(f'#s-table button[aria-label="Remove {name}"]')
        console.wait(lambda: console.status("s") == f"Removed {name}.")
    console.wait(lambda: console.find_all("#s-table tbody tr") == [])
    assert console.find("#s-empty").is_displayed()


# --- Jobs ----------------------------------------------------------------------------------------

def test_a_job_of_several_files_completes_with_downloads(console, server, gateway, downloads):
    mounted = httpx.get(f"{gateway.url}/v1/jobs", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    if mounted.status_code == 404:
        pytest.skip("this gateway serves no /v1/jobs yet (the jobs backend is not mounted in gateway/app.py)")
    files = [DATA / "one_phrase.wav", DATA / "pause_1s.wav", DATA / "pause_0.3s.wav"]
    console.open("jobs")
    console.find("#j-files").send_keys("\n".join(map(str, files)))
    console.find("#job-form button[type=submit]").click()
    console.wait(lambda: console.find("#j-detail").get_attribute("data-status") == "completed", what="the job")
    rows = console.find_all("#j-detail tbody tr")
    assert sorted((r.get_attribute("data-file"), r.get_attribute("data-status")) for r in rows) == \
        sorted((f.name, "done") for f in files)
    console.screenshot("jobs")

    expected = _cli_transcript(server, files[1])
    row = console.find(f'#j-detail tr[data-file="{files[1].name}"]')
    for label in ("json", "srt", "vtt", "txt"):
        row.find_element("css selector", f'button[data-format="{label}"]').click()
        path = downloads / f"{files[1].stem}.{label}"
        console.wait(lambda: path.exists() and path.stat().st_size > 0, what=f"{path.name}")
        content = path.read_text()
        if label == "json":
            assert [s["text"] for s in json.loads(content)["segments"]] == [s["text"] for s in expected["segments"]]
        elif label == "txt":
            assert content == joined_text(expected["segments"]) + "\n"
        else:
            assert content == render(expected, label)
        path.unlink()

    # Deleted from the keyboard: gone from the list, and from the gateway.
    from selenium.webdriver.common.keys import Keys

    job_id = console.find("#j-detail").get_attribute("data-id")
    assert console.find(f'#j-table tr[data-id="{job_id}"] button[data-action="delete"]')
    console.find('#j-detail button[data-action="delete"]').send_keys(Keys.ENTER)
    console.wait(lambda: console.status("j") == f"Deleted job {job_id}.", what="the deletion")
    console.wait(lambda: not console.find_all(f'#j-table tr[data-id="{job_id}"]'), what="the list without the job")
    assert not console.find("#j-detail").is_displayed()
    gone = httpx.get(f"{gateway.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert gone.status_code == 404
