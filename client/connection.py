"""How a client reaches a tritonasr server: TLS files and keys, from arguments or the environment.

Every client class takes a `Credentials`; without one it reads the environment, so the same
variables serve the CLI, the library and the load tests:
TRITONASR_API_KEY, TRITONASR_ADMIN_KEY, TRITONASR_TLS_CA, TRITONASR_TLS_CERT, TRITONASR_TLS_KEY.
"""
from __future__ import annotations

import argparse
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tritonasr.runtime.access import ADMIN_HEADER, API_KEY_HEADER, split_keys

ENVIRONMENT = {"api_key": "TRITONASR_API_KEY", "admin_key": "TRITONASR_ADMIN_KEY",
               "tls_ca": "TRITONASR_TLS_CA", "tls_cert": "TRITONASR_TLS_CERT", "tls_key": "TRITONASR_TLS_KEY"}


class AccessDeniedError(RuntimeError):
    """The server refused the caller: no or a wrong API key, or a change without the admin key."""


@dataclass(frozen=True)
class Credentials:
    api_key: str | None = None
    admin_key: str | None = None
    # TLS: the CA that signed the server's certificate (None: no TLS unless a client
    # certificate is given, then the system's roots); a client certificate and key for mutual TLS.
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def __post_init__(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("a client certificate needs its key: give both --tls-cert and --tls-key")
        for what, path in (("CA", self.tls_ca), ("certificate", self.tls_cert), ("key", self.tls_key)):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS {what} file {path} does not exist")

    @classmethod
    def from_environment(cls, **given) -> "Credentials":
        """Each field from `given` when not None, else from its environment variable."""
        values = {}
        for name, variable in ENVIRONMENT.items():
            value = given.get(name)
            if value is None:
                value = os.environ.get(variable) or None
                # The server's $TRITONASR_API_KEY may list several keys: a client shows the first.
                if value is not None and name == "api_key":
                    value = (split_keys(value) or [None])[0]
            if value is not None and name.startswith("tls_"):
                value = Path(value)
            values[name] = value
        return cls(**values)

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    def grpc_options(self) -> dict:
        """Keyword arguments of tritonclient's gRPC clients (sync and aio)."""
        if not self.tls:
            return {}
        return {"ssl": True, "root_certificates": _str(self.tls_ca), "private_key": _str(self.tls_key),
                "certificate_chain": _str(self.tls_cert)}

    def headers(self, admin: bool = False) -> dict[str, str]:
        """gRPC metadata of every call; the admin key only where `admin` (it goes no further
        than it must)."""
        headers = {}
        if self.api_key:
            headers[API_KEY_HEADER] = f"Bearer {self.api_key}"
        if admin and self.admin_key:
            headers[ADMIN_HEADER] = self.admin_key
        return headers


@dataclass(frozen=True)
class Retry:
    """How a call that no server took is tried again: up to `attempts` tries in all, waiting
    `first_s`, then twice as long each time up to `max_s`, each wait jittered by ±50% so that
    callers refused together do not come back together. Through a balancer the next try may reach
    another server. Which errors count: UNAVAILABLE (unreachable, at capacity, draining), never an
    error in the request itself. (RESOURCE_EXHAUSTED is not one: this server answers UNAVAILABLE
    when it has no room, and gRPC says RESOURCE_EXHAUSTED of a message over its size limit,
    which no retry fixes.)

    Our own, not gRPC's retry policy: that one keeps at most 256 KiB of a request for a retry by
    default (an offline request is megabytes), allows 5 attempts, and tells the caller nothing."""

    attempts: int = 6
    first_s: float = 0.25
    max_s: float = 4.0

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError(f"a call is tried at least once, got attempts={self.attempts}")

    def delays(self) -> Iterator[float]:
        """The waits before the second, third, … attempt."""
        delay = self.first_s
        for _ in range(self.attempts - 1):
            yield random.uniform(0.5, 1.5) * delay
            delay = min(2 * delay, self.max_s)


NO_RETRY = Retry(attempts=1)  # load tests: a refusal is a result to count


def resolve(credentials: Credentials | None) -> Credentials:
    return credentials if credentials is not None else Credentials.from_environment()


def access_denied(message: str) -> AccessDeniedError | None:
    """The error to raise for a server message that refuses the caller (see tritonasr.runtime.access)."""
    if message.startswith(("unauthenticated:", "permission denied:")):
        return AccessDeniedError(message)
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The client commands' options; each defaults to its environment variable."""
    group = parser.add_argument_group("connection (each defaults to its $TRITONASR_* variable)")
    group.add_argument("--api-key", default=None, help="API key of the server ($TRITONASR_API_KEY)")
    group.add_argument("--admin-key", default=None,
                       help="admin key, for speaker enroll/remove ($TRITONASR_ADMIN_KEY)")
    group.add_argument("--tls-ca", type=Path, default=None,
                       help="speak TLS, trusting this CA for the server's certificate ($TRITONASR_TLS_CA)")
    group.add_argument("--tls-cert", type=Path, default=None,
                       help="client certificate for mutual TLS ($TRITONASR_TLS_CERT)")
    group.add_argument("--tls-key", type=Path, default=None, help="its private key ($TRITONASR_TLS_KEY)")


def from_arguments(args: argparse.Namespace) -> Credentials:
    return Credentials.from_environment(api_key=args.api_key, admin_key=args.admin_key,
                                        tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
