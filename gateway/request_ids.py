"""Request ids: the caller's own when it is a plain token, else a new one; on every HTTP response,
in WebSocket sessions' first message, and in the gateway's log lines."""
from __future__ import annotations

import re
import uuid

REQUEST_ID_HEADER = "X-Request-ID"
_PLAIN_TOKEN = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(given: str | None) -> str:
    return given if given and _PLAIN_TOKEN.fullmatch(given) else uuid.uuid4().hex
