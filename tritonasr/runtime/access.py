"""Who may call what on a tritonasr server.

- Callers of the pipelines (asr_offline, asr_stream, speaker_registry) show an API key
  (`authorization: Bearer KEY`) when the server has any; several keys may be valid at once.
- Changes (speaker enroll/replace/remove) and Triton's own admin APIs need the admin key.
- Leaf models (vad, sensevoice, speaker, …) answer only the pipelines, which prove themselves with
  a token made for each server start, unless the operator opens them.

Triton checks only one header value per API group and cannot answer UNAUTHENTICATED from a
model, so the API keys are checked in the pipelines (Triton forwards the headers to them as
request parameters); refusals (errors.AccessDenied) come back as INVALID_ARGUMENT, their
message starting with "unauthenticated:" or "permission denied:".
The admin key guards Triton's own admin APIs through its restricted-protocol options.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass

from tritonasr.errors import AccessDenied

API_KEY_HEADER = "authorization"  # "Bearer KEY"
# Triton's restricted-protocol key of the admin APIs. gRPC callers send it as the header
# triton-grpc-protocol-<key>, HTTP callers as <key>; both reach the pipelines as parameters.
ADMIN_KEY = "tritonasr-admin-key"
ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_KEY}"
HEADER_FORWARD_PATTERN = f"^({API_KEY_HEADER}|(triton-grpc-protocol-)?{ADMIN_KEY})$"
# Triton's API groups a caller never needs: model loading (runs code), shared memory (reads and
# writes server memory), logging, tracing, configs (file paths), statistics and metadata.
ADMIN_APIS = ("model-repository", "shared-memory", "logging", "trace", "model-config", "statistics", "metadata")

# What `tritonasr serve` hands the model processes: digests of the keys, never the keys.
ENV_API_KEY_DIGESTS = "TRITONASR_API_KEY_SHA256"
ENV_ADMIN_KEY_DIGEST = "TRITONASR_ADMIN_KEY_SHA256"
ENV_INTERNAL_TOKEN = "TRITONASR_INTERNAL_TOKEN"
ENV_OPEN_LEAF_MODELS = "TRITONASR_OPEN_LEAF_MODELS"
# The BLS request parameter that carries the internal token to the leaf models.
INTERNAL_PARAMETER = "tritonasr-internal"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def split_keys(value: str | None) -> list[str]:
    """Keys from a comma-separated setting ($TRITONASR_API_KEY may hold several)."""
    return [key.strip() for key in (value or "").split(",") if key.strip()]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_environment(api_keys: list[str], admin_key: str | None, open_leaf_models: bool) -> dict[str, str]:
    """The model processes' view of the access settings (a fresh internal token each start)."""
    env = {ENV_API_KEY_DIGESTS: ",".join(digest(key) for key in api_keys),
           ENV_ADMIN_KEY_DIGEST: digest(admin_key) if admin_key else "",
           ENV_INTERNAL_TOKEN: secrets.token_hex(32)}
    if open_leaf_models:
        env[ENV_OPEN_LEAF_MODELS] = "1"
    return env


@dataclass(frozen=True)
class Access:
    """The checks one model process makes, from the environment `tritonasr serve` set."""

    api_key_digests: tuple[str, ...]
    admin_key_digest: str
    internal_token: str
    open_leaf_models: bool

    @classmethod
    def from_environment(cls) -> "Access":
        return cls(tuple(split_keys(os.environ.get(ENV_API_KEY_DIGESTS))),
                   os.environ.get(ENV_ADMIN_KEY_DIGEST, ""),
                   os.environ.get(ENV_INTERNAL_TOKEN, ""),
                   os.environ.get(ENV_OPEN_LEAF_MODELS) == "1")

    @property
    def open(self) -> bool:
        """No keys at all: a local server (serve binds loopback unless told otherwise)."""
        return not self.api_key_digests and not self.admin_key_digest

    def caller(self, parameters: dict) -> str:
        """The caller's principal (a short digest of its key; "anonymous" on an open server)."""
        if not self.api_key_digests:
            return "anonymous"
        value = str(parameters.get(API_KEY_HEADER, ""))
        scheme, _, key = value.partition(" ")
        if not value:
            raise AccessDenied("unauthenticated: this server needs an API key: send the header "
                              f"'{API_KEY_HEADER}: Bearer KEY' (tritonasr clients: --api-key or $TRITONASR_API_KEY)")
        if scheme.lower() != "bearer" or not _matches(key.strip(), self.api_key_digests):
            raise AccessDenied("unauthenticated: the API key is not valid on this server")
        return digest(key.strip())[:16]

    def check_admin(self, parameters: dict, action: str) -> None:
        """Changes need the admin key; an open server (no keys at all) allows them."""
        if self.open:
            return
        if not self.admin_key_digest:
            raise AccessDenied(f"permission denied: {action} needs the admin key, and this server has none "
                              "(start it with --admin-key or $TRITONASR_ADMIN_KEY)")
        key = parameters.get(ADMIN_HEADER) or parameters.get(ADMIN_KEY) or ""
        if not key:
            raise AccessDenied(f"permission denied: {action} needs the admin key (--admin-key or "
                              f"$TRITONASR_ADMIN_KEY; header '{ADMIN_HEADER}')")
        if not _matches(str(key), (self.admin_key_digest,)):
            raise AccessDenied("permission denied: the admin key is not valid on this server")

    def internal_parameters(self) -> dict[str, str]:
        """What a pipeline's inner request carries to show a leaf model who is calling."""
        return {INTERNAL_PARAMETER: self.internal_token}

    def check_internal(self, parameters: dict) -> None:
        """Leaf models answer the pipelines only, unless the operator opened them."""
        if self.open_leaf_models:
            return
        token = str(parameters.get(INTERNAL_PARAMETER, ""))
        if not (self.internal_token and token and hmac.compare_digest(token, self.internal_token)):
            raise AccessDenied("permission denied: this model is internal to the tritonasr pipelines "
                              "(call asr_offline, asr_stream or speaker_registry; an operator may open the "
                              "leaf models with `tritonasr serve --open-leaf-models`)")


def parameters_of(raw: str | None) -> dict:
    """A request's parameters (Triton hands them over as JSON): the forwarded headers among them."""
    try:
        parameters = json.loads(raw or "{}")
    except ValueError:
        return {}
    return parameters if isinstance(parameters, dict) else {}


def _matches(key: str, digests: tuple[str, ...]) -> bool:
    wanted = digest(key)
    # Every digest is compared, so the time taken says nothing about which one matched.
    return sum(hmac.compare_digest(wanted, d) for d in digests) > 0
