"""Who may call the gateway: the API key a caller shows, checked against the configured keys (the
server's), which the gateway then passes on to Triton with the caller's calls."""
from __future__ import annotations

import hmac

from starlette.requests import HTTPConnection

from tritonasr.gateway.errors import ApiError
from tritonasr.gateway.settings import GatewaySettings


def bearer_key(connection: HTTPConnection) -> str | None:
    """The key of an `Authorization: Bearer KEY` header, if any."""
    scheme, _, key = connection.headers.get("Authorization", "").partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def checked_key(presented: str | None, settings: GatewaySettings) -> str | None:
    """`presented` if it is one of the configured keys; None when the gateway asks for none.
    Raises ApiError 401 otherwise."""
    if not settings.api_keys:
        return None
    if not presented:
        raise ApiError(401, "an API key is required: send `Authorization: Bearer KEY`", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    # Every configured key is compared, in constant time: how long a refusal takes tells nothing.
    if not any([hmac.compare_digest(presented.encode(), known.encode()) for known in settings.api_keys]):
        raise ApiError(401, "the API key is not valid", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return presented
