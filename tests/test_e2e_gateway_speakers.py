"""`/v1/speakers` (gateway/speakers.py) on the real gateway process in front of the session's real
tritonserver and its speaker_registry: enroll from uploads with the admin key the caller sends
(the server judges it; the gateway keeps none), list, transcribe with the enrolled name, replace,
remove; wrong keys, bad uploads and unknown names get the status that says whose fault it is.

Random speaker weights tell recordings apart, not voices (conftest.TEST_SPEAKER_THRESHOLD): the
recording enrolled is the one transcribed."""
from __future__ import annotations

from urllib.parse import quote

import httpx
import numpy as np
import pytest
import soundfile as sf

from tritonasr.audio import load_audio

from conftest import DATA, TEST_ADMIN_KEY, conversation
from test_e2e_gateway import KEY, Gateway

pytestmark = pytest.mark.e2e

SPEAKERS = sorted((DATA / "speakers").glob("utt*.wav"))
MAX_AUDIO_SECONDS = 30
BEARER = {"Authorization": f"Bearer {KEY}"}
ADMIN = {**BEARER, "X-Admin-Key": TEST_ADMIN_KEY}


@pytest.fixture(scope="module")
def gateway(server, tmp_path_factory):
    running = Gateway(server.grpc_url, "--api-key", KEY, "--max-audio-seconds", str(MAX_AUDIO_SECONDS),
                      log=tmp_path_factory.mktemp("gateway_speakers") / "log")
    yield running
    running.stop()


@pytest.fixture()
def api(gateway):
    """An HTTP client on the gateway; the registry is left empty, as other tests expect it."""
    with httpx.Client(base_url=gateway.url, timeout=120) as client:
        yield client
        for speaker in client.get("/v1/speakers", headers=BEARER).json()["data"]:
            client.delete(f"/v1/speakers/{speaker['name']}", headers=ADMIN)


def _recording(path, i: int) -> bytes:
    """Speaker utterance i alone with a second of silence around it (as tests/test_e2e_speakers.py
    makes them), as a file's bytes."""
    sf.write(path, conversation([0], [load_audio(SPEAKERS[i]).samples], 1.0), 16000)
    return path.read_bytes()


def _error(response: httpx.Response) -> dict:
    return response.json()["error"]


def _names(api) -> list[str]:
    listed = api.get("/v1/speakers", headers=BEARER)
    assert listed.status_code == 200 and listed.json()["object"] == "list"
    return [s["name"] for s in listed.json()["data"]]


def test_enroll_list_transcribe_replace_remove(api, tmp_path):
    alice = _recording(tmp_path / "alice.wav", 0)
    assert _names(api) == []
    enrolled = api.post("/v1/speakers", headers=ADMIN, data={"name": "alice"}, files={"file": ("alice.wav", alice)})
    assert enrolled.status_code == 201, enrolled.text
    body = enrolled.json()
    assert body["object"] == "speaker" and body["name"] == "alice" and body["recordings"] == 1
    assert body["speech_ms"] > 1000
    speaker = api.get("/v1/speakers", headers=BEARER).json()["data"][0]
    assert speaker["name"] == "alice" and speaker["speech_ms"] == body["speech_ms"] and speaker["enrolled_at"]

    # The next transcription names her; another recording stays anonymous.
    for data, expected in ((alice, "alice"), (_recording(tmp_path / "other.wav", 4), None)):
        result = api.post("/v1/audio/transcriptions", headers=BEARER, files={"file": ("a.wav", data)},
                          data={"model": "sensevoice", "response_format": "verbose_json"}).json()
        assert [s["speaker"]["id"] for s in result["segments"]] == [expected]

    # Once only, unless replaced; from two recordings (one of them an mp3).
    again = api.post("/v1/speakers", headers=ADMIN, data={"name": "alice"}, files={"file": ("alice.wav", alice)})
    assert again.status_code == 409 and "already enrolled" in _error(again)["message"]
    samples, _ = sf.read(tmp_path / "other.wav", dtype="float32")
    sf.write(tmp_path / "other.mp3", samples, 16000)
    both = api.post("/v1/speakers", headers=ADMIN, data={"name": "alice", "replace": "true"},
                    files=[("file", ("alice.wav", alice)), ("file", ("other.mp3", (tmp_path / "other.mp3").read_bytes()))])
    assert both.status_code == 201 and both.json()["recordings"] == 2
    assert _names(api) == ["alice"]

    # A name with what a URL path must escape.
    odd = "Zoë / O'Brien?"
    assert api.post("/v1/speakers", headers=ADMIN, data={"name": odd}, files={"file": ("a.wav", alice)}).status_code == 201
    assert sorted(_names(api)) == sorted([odd, "alice"])
    gone = api.delete(f"/v1/speakers/{quote(odd, safe='')}", headers=ADMIN)
    assert gone.status_code == 200 and gone.json() == {"object": "speaker", "name": odd, "deleted": True}

    removed = api.delete("/v1/speakers/alice", headers=ADMIN)
    assert removed.status_code == 200 and removed.json()["deleted"] is True
    assert _names(api) == []
    missing = api.delete("/v1/speakers/alice", headers=ADMIN)
    assert missing.status_code == 404 and "alice" in _error(missing)["message"]


def test_changes_need_the_servers_admin_key(api, tmp_path):
    alice = _recording(tmp_path / "alice.wav", 0)
    for headers in (BEARER, {**BEARER, "X-Admin-Key": "not-the-admin-key"}):
        refused = api.post("/v1/speakers", headers=headers, data={"name": "alice"}, files={"file": ("a.wav", alice)})
        assert refused.status_code == 403, refused.text
        assert _error(refused)["code"] == "permission_denied" and "admin key" in _error(refused)["message"]
    assert _names(api) == []
    api.post("/v1/speakers", headers=ADMIN, data={"name": "alice"}, files={"file": ("a.wav", alice)})
    refused = api.delete("/v1/speakers/alice", headers=BEARER)
    assert refused.status_code == 403 and "admin key" in _error(refused)["message"]
    assert _names(api) == ["alice"]

    # The caller's API key first, as on every endpoint, before the upload is looked at.
    for headers in ({}, {"Authorization": "Bearer wrong", "X-Admin-Key": TEST_ADMIN_KEY}):
        assert api.get("/v1/speakers", headers=headers).status_code == 401
        assert api.post("/v1/speakers", headers=headers, data={"name": "bob"},
                        files={"file": ("a.wav", alice)}).status_code == 401
        assert api.delete("/v1/speakers/alice", headers=headers).status_code == 401
    assert _names(api) == ["alice"]


@pytest.mark.parametrize("data, file, status, code, message", [
    ({}, ("a.wav", "SPEECH"), 400, "missing_name", "`name` is required"),
    ({"name": "  "}, ("a.wav", "SPEECH"), 400, "missing_name", "`name` is required"),
    ({"name": "bob"}, None, 400, "missing_file", "`file` is required"),
    ({"name": "bob", "replace": "maybe"}, ("a.wav", "SPEECH"), 400, None, "`replace` must be true or false"),
    ({"name": "bob"}, ("a.wav", b"this is no audio" * 64), 415, "unsupported_format", "a.wav"),
    ({"name": "bob"}, ("long.wav", "LONG"), 413, "audio_too_long", "long.wav"),
    ({"name": "bob"}, ("silence.wav", "SILENCE"), 400, "invalid_argument", "silence.wav: "),  # the server's word
])
def test_bad_enrollments_say_what_is_wrong(api, tmp_path, data, file, status, code, message):
    made = {"SPEECH": _recording(tmp_path / "a.wav", 1),
            "LONG": _wav(tmp_path / "long.wav", np.zeros((MAX_AUDIO_SECONDS + 5) * 16000, np.float32)),
            "SILENCE": _wav(tmp_path / "silence.wav", np.zeros(3 * 16000, np.float32))}
    files = {"file": (file[0], made.get(file[1], file[1]))} if file else {"other": ("x.txt", b"x")}
    response = api.post("/v1/speakers", headers=ADMIN, data=data, files=files)
    assert response.status_code == status, response.text
    error = _error(response)
    assert error["code"] == code and error["message"].startswith(message), error
    assert _names(api) == []


def test_too_many_recordings(api, tmp_path):
    from tritonasr.gateway.speakers import MAX_RECORDINGS

    speech = _recording(tmp_path / "a.wav", 1)
    response = api.post("/v1/speakers", headers=ADMIN, data={"name": "bob"},
                        files=[("file", (f"{i}.wav", speech)) for i in range(MAX_RECORDINGS + 1)])
    assert response.status_code == 400, response.text
    assert _error(response)["code"] == "too_many_files" and str(MAX_RECORDINGS) in _error(response)["message"]
    assert _names(api) == []


def _wav(path, samples: np.ndarray) -> bytes:
    sf.write(path, samples, 16000)
    return path.read_bytes()
