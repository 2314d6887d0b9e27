"""Access end to end, as an attacker who reaches the ports would try it: the real tritonserver with
real TLS handshakes (certificates made here), API keys, the admin key, Triton's admin APIs and
the leaf models. Every refusal is followed by a good caller's unchanged result."""
from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tritonasr.audio import load_audio
from tritonasr.client.connection import NO_RETRY, AccessDeniedError, Credentials
from tritonasr.client.offline import OfflineClient, ServerUnavailableError
from tritonasr.client.speakers import SpeakerRegistryClient
from tritonasr.client.stream import StreamingClient, split_chunks
from tritonasr.runtime.access import ADMIN_HEADER, API_KEY_HEADER
from tritonasr.serving.server import ServerConfig, TlsFiles, TritonServer, free_port

from conftest import DATA
from tls_certs import CertificateAuthority

pytestmark = pytest.mark.e2e

KEYS = ["key-one-0123456789", "key-two-9876543210"]
ADMIN = "admin-key-abcdef0123456789"
PHRASE = DATA / "one_phrase.wav"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory, "test-ca")
    rogue = CertificateAuthority(directory, "rogue-ca")
    return {"ca": ca.pair, "server": ca.issue("server", server=True), "client": ca.issue("client", server=False),
            "rogue_ca": rogue.pair, "rogue_client": rogue.issue("rogue-client", server=False)}


@pytest.fixture(scope="module")
def secured(model_repository, pki):
    """TLS, two API keys, an admin key, leaf models closed, model control off (the defaults)."""
    config = ServerConfig(model_repository, free_port(), free_port(), free_port(),
                          models=["vad", "sensevoice", "speaker", "asr_offline", "asr_stream", "speaker_registry"],
                          tls=TlsFiles(pki["server"].cert, pki["server"].key), api_keys=KEYS, admin_key=ADMIN,
                          extra_args=["--exit-timeout-secs=5"])
    with TritonServer(config) as server:
        yield server


def _credentials(pki, **given) -> Credentials:
    return Credentials(tls_ca=pki["ca"].cert, **given)


def _transcribe(server, credentials: Credentials) -> list[dict]:
    with OfflineClient(server.grpc_url, timeout_s=300, credentials=credentials) as client:
        return client.transcribe_file(PHRASE)["segments"]


@pytest.fixture(scope="module")
def reference(secured, pki):
    segments = _transcribe(secured, _credentials(pki, api_key=KEYS[0]))
    assert segments and segments[0]["text"] is not None
    return segments


def test_every_valid_key_is_served_the_same(secured, pki, reference):
    assert _transcribe(secured, _credentials(pki, api_key=KEYS[1])) == reference


@pytest.mark.parametrize("key", [None, "wrong-key", KEYS[0][:-1]])
def test_offline_without_a_valid_key_is_refused(secured, pki, reference, key):
    with pytest.raises(AccessDeniedError, match="unauthenticated"):
        _transcribe(secured, _credentials(pki, api_key=key))
    assert _transcribe(secured, _credentials(pki, api_key=KEYS[0])) == reference


def test_raw_grpc_refusal_is_invalid_argument_and_says_why(secured, pki):
    client = grpcclient.InferenceServerClient(secured.grpc_url, ssl=True, root_certificates=str(pki["ca"].cert))
    audio = grpcclient.InferInput("AUDIO", [1, 16000], "FP32")
    audio.set_data_from_numpy(np.zeros((1, 16000), np.float32))
    for headers in (None, {API_KEY_HEADER: "Basic " + KEYS[0]}, {API_KEY_HEADER: "Bearer nope"}):
        with pytest.raises(InferenceServerException) as refused:
            client.infer("asr_offline", [audio], headers=headers)
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert refused.value.message().startswith("unauthenticated:")
        assert KEYS[0] not in refused.value.message()


def test_stream_without_a_valid_key_is_refused(secured, pki, reference):
    chunks = split_chunks(load_audio(PHRASE).samples, 100)

    async def finals(credentials):
        async with StreamingClient(secured.grpc_url, credentials=credentials) as client:
            return [s async for s in client.stream(chunks) if s.final]

    with pytest.raises(AccessDeniedError, match="unauthenticated"):
        asyncio.run(finals(_credentials(pki)))
    with pytest.raises(AccessDeniedError, match="unauthenticated"):
        asyncio.run(finals(_credentials(pki, api_key="wrong")))
    good = asyncio.run(finals(_credentials(pki, api_key=KEYS[1])))
    assert [s.text for s in good] == [s["text"] for s in reference]


def test_plain_text_and_untrusted_certificates_get_no_answer(secured, pki):
    for credentials in (Credentials(api_key=KEYS[0]), Credentials(api_key=KEYS[0], tls_ca=pki["rogue_ca"].cert)):
        with pytest.raises(ServerUnavailableError):
            with OfflineClient(secured.grpc_url, timeout_s=10, credentials=credentials, retry=NO_RETRY) as client:
                client.transcribe_file(PHRASE)


def test_leaf_models_answer_only_the_pipelines(secured, pki, reference):
    client = grpcclient.InferenceServerClient(secured.grpc_url, ssl=True, root_certificates=str(pki["ca"].cert))
    def tensor(name, shape):
        value = grpcclient.InferInput(name, list(shape), "FP32")
        value.set_data_from_numpy(np.zeros(shape, np.float32))
        return value

    vad = [tensor("speech", (1, 100, 400)), *(tensor(f"in_cache{i}", (1, 128, 19, 1)) for i in range(4))]
    speaker = [tensor("feats", (1, 200, 80))]
    headers = {API_KEY_HEADER: f"Bearer {KEYS[0]}", ADMIN_HEADER: ADMIN}
    for model, inputs in (("vad", vad), ("speaker", speaker)):
        with pytest.raises(InferenceServerException, match="permission denied: this model is internal") as refused:
            client.infer(model, inputs, headers=headers)
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        # A caller cannot forge the pipelines' token either.
        with pytest.raises(InferenceServerException, match="permission denied"):
            client.infer(model, inputs, headers=headers, parameters={"tritonasr-internal": "guess"})
    assert _transcribe(secured, _credentials(pki, api_key=KEYS[0])) == reference


def test_admin_apis_are_closed_without_the_admin_key(secured, pki, reference):
    client = grpcclient.InferenceServerClient(secured.grpc_url, ssl=True, root_certificates=str(pki["ca"].cert))
    user = {API_KEY_HEADER: f"Bearer {KEYS[0]}"}
    model_py = b"import os\nos.system('touch /tmp/tritonasr-pwned')\n"
    attempts = [
        lambda h: client.load_model("evil", config='{"backend": "python"}', files={"file:1/model.py": model_py},
                                    headers=h),
        lambda h: client.unload_model("asr_offline", headers=h),
        lambda h: client.get_model_repository_index(headers=h),
        lambda h: client.register_system_shared_memory("steal", "/triton_python_backend_shm_region_1", 1024,
                                                       headers=h),
        lambda h: client.update_log_settings({"log_verbose_level": 1}, headers=h),
        lambda h: client.get_model_config("speaker_registry", headers=h),
        lambda h: client.get_inference_statistics("asr_offline", headers=h),
        lambda h: client.get_model_metadata("sensevoice", headers=h),
    ]
    for attempt in attempts:
        for headers in (None, user, {**user, ADMIN_HEADER: "not-the-admin-key"}):
            with pytest.raises(InferenceServerException, match="restricted"):
                attempt(headers)
    # With the admin key: statistics are readable, and model control is off, so even the admin
    # cannot load code over the network.
    admin = {**user, ADMIN_HEADER: ADMIN}
    assert client.get_inference_statistics("asr_offline", headers=admin, as_json=True)["model_stats"]
    with pytest.raises(InferenceServerException, match="not allowed"):
        client.load_model("evil", config='{"backend": "python"}', files={"file:1/model.py": model_py}, headers=admin)
    assert client.is_server_ready() and client.is_model_ready("asr_offline")
    assert _transcribe(secured, _credentials(pki, api_key=KEYS[0])) == reference


def test_speaker_changes_need_the_admin_key(secured, pki):
    def registry(**given):
        return SpeakerRegistryClient(secured.grpc_url, credentials=_credentials(pki, **given))

    recording = sorted((DATA / "speakers").glob("utt*.wav"))[0]
    with registry(api_key=KEYS[0]) as user:
        with pytest.raises(AccessDeniedError, match="permission denied"):
            user.enroll("mallory", [recording])
        assert user.list() == []
    with registry(api_key=KEYS[0], admin_key="wrong") as impostor:
        with pytest.raises(AccessDeniedError, match="permission denied"):
            impostor.enroll("mallory", [recording])
    with registry(admin_key=ADMIN) as admin_without_api_key:
        with pytest.raises(AccessDeniedError, match="unauthenticated"):
            admin_without_api_key.list()
    with registry(api_key=KEYS[0], admin_key=ADMIN) as admin:
        assert admin.enroll("alice", [recording])["enrolled"] == "alice"
        with registry(api_key=KEYS[1]) as user:
            assert [s["name"] for s in user.list()] == ["alice"]
            with pytest.raises(AccessDeniedError, match="permission denied"):
                user.remove("alice")
        assert admin.remove("alice")["removed"] == "alice"


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent, the route picks an address
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_ports_listen_on_loopback_only(secured):
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address")
    for port in (secured.config.grpc_port, secured.config.http_port, secured.config.metrics_port):
        with socket.socket() as sock:
            sock.settimeout(2)
            assert sock.connect_ex((address, port)) != 0, f"port {port} answers on {address}"
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass


def test_serve_refuses_an_open_address_without_a_key(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tritonasr.cli", "serve", "--model-repository", str(tmp_path),
                             "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert "--api-key" in result.stderr


@pytest.fixture(scope="module")
def mutual(model_repository, pki):
    """Mutual TLS, model control explicit (admin key required), only the VAD loaded."""
    config = ServerConfig(model_repository, free_port(), free_port(), free_port(), models=["vad"],
                          tls=TlsFiles(pki["server"].cert, pki["server"].key, pki["ca"].cert),
                          admin_key=ADMIN, model_control="explicit", extra_args=["--exit-timeout-secs=5"])
    with TritonServer(config) as server:
        yield server


def test_mutual_tls_needs_a_client_certificate_from_the_ca(mutual, pki):
    def ready(**given) -> bool:
        client = grpcclient.InferenceServerClient(mutual.grpc_url, **Credentials(**given).grpc_options())
        try:
            return client.is_server_ready(client_timeout=10)
        finally:
            client.close()

    assert ready(tls_ca=pki["ca"].cert, tls_cert=pki["client"].cert, tls_key=pki["client"].key)
    for given in ({"tls_ca": pki["ca"].cert},
                  {"tls_ca": pki["ca"].cert, "tls_cert": pki["rogue_client"].cert, "tls_key": pki["rogue_client"].key}):
        with pytest.raises(InferenceServerException):
            ready(**given)


def test_explicit_model_control_is_the_admins_only(mutual, pki):
    options = Credentials(tls_ca=pki["ca"].cert, tls_cert=pki["client"].cert, tls_key=pki["client"].key).grpc_options()
    client = grpcclient.InferenceServerClient(mutual.grpc_url, **options)
    with pytest.raises(InferenceServerException, match="restricted"):
        client.unload_model("vad")
    assert client.is_model_ready("vad")
    client.unload_model("vad", headers={ADMIN_HEADER: ADMIN})
    client.load_model("vad", headers={ADMIN_HEADER: ADMIN})
    assert client.is_model_ready("vad")
