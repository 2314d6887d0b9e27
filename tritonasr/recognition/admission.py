"""Admission control for live streams: at most `max_streams` open on one server and at most
`max_streams_per_client` per caller (per API key), counted across all of asr_stream's instances;
none at all, nor offline requests, once the server is draining for its shutdown.

Triton runs each model instance in its own process and gives a new sequence to whichever instance
it picks, so a share per instance (N / instances) would refuse a stream while another instance
has room. The instances share slots instead: a slot is one byte of a file, held with an exclusive
fcntl record lock. Taking or giving back a slot is one system call, and the kernel drops a
process's locks when it dies, so a killed or crashed instance cannot leak slots and there is no
counter to repair. The files live in a directory named after the tritonserver process (every
model process's parent), so each server start has its own and instances of one server find it
without being told; `TritonServer.stop` removes it.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tritonasr.errors import OverloadError
from tritonasr.recognition.settings import StreamSettings

# The label values of tritonasr_rejected_total{reason}: the setting that refused the stream, or
# the server's shutdown.
SERVER_LIMIT = "max_streams"
CLIENT_LIMIT = "max_streams_per_client"
DRAINING = "draining"


def slot_directory(server_pid: int) -> Path:
    return Path(tempfile.gettempdir()) / f"tritonasr-slots-{server_pid}"


def own_directory(directory: Path) -> Path:
    """`directory`, made if missing, and refused unless it is this user's and closed to others:
    its name in the shared temporary directory is predictable (the server's pid), and whoever
    could write in it could hold every stream slot or announce a drain."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    status = directory.lstat()
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.geteuid() or status.st_mode & 0o077:
        raise PermissionError(f"{directory} is not a directory of this user's alone (mode 0700): "
                              "someone else made it; remove it and restart the server")
    return directory


def start_draining(server_pid: int) -> None:
    """From now on the server `server_pid` takes no new streams or requests (`refuse_if_draining`);
    those it holds go on. A file beside the slots: every model process sees it at once."""
    (own_directory(slot_directory(server_pid)) / DRAINING).touch()


def refuse_if_draining(directory: Path, what: str) -> None:
    """In a model process of the server whose slot directory is `directory`."""
    if (directory / DRAINING).exists():
        raise OverloadError(f"this server is shutting down (draining) and takes no new {what}: "
                            "retry on another server", reason=DRAINING)


class SlotFile:
    """`size` slots shared by every process that opens `path`: slot i is byte i, held by an
    exclusive fcntl lock. A process must open a path once (closing any descriptor of a file drops
    all of the process's locks on it)."""

    def __init__(self, path: Path, size: int):
        self.size = size
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._held: set[int] = set()
        self._next = 0  # where the next search starts: past the slots this process just took

    def take(self) -> int | None:
        """A free slot, or None when every slot is held (by any process)."""
        for step in range(self.size):
            slot = (self._next + step) % self.size
            if slot in self._held:  # a process's own locks never conflict with each other
                continue
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EAGAIN):  # held by another process
                    continue
                raise
            self._held.add(slot)
            self._next = slot + 1
            return slot
        return None

    def give_back(self, slot: int) -> None:
        if slot in self._held:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, slot)
            self._held.discard(slot)


@dataclass
class Ticket:
    """The slots one open stream holds; `release` gives them back (once)."""

    slots: list[tuple[SlotFile, int]] = field(default_factory=list)

    def release(self) -> None:
        slots, self.slots = self.slots, []
        for slots_file, slot in slots:
            slots_file.give_back(slot)


class Admission:
    """The stream limits of one server (0: no limit), shared by the processes that use the same
    `directory`. `admit(principal)` returns the new stream's Ticket or raises OverloadError."""

    def __init__(self, directory: Path, max_streams: int, max_streams_per_client: int = 0):
        self.directory = own_directory(Path(directory))
        self.max_streams = max_streams
        self.max_streams_per_client = max_streams_per_client
        self._server = SlotFile(self.directory / "streams", max_streams) if max_streams else None
        self._clients: dict[str, SlotFile] = {}  # one per principal: a few API keys' digests

    @classmethod
    def for_this_server(cls, settings: StreamSettings) -> "Admission":
        """In a model process: the limits of `settings`, shared with the server's other instances."""
        return cls(slot_directory(os.getppid()), settings.max_streams, settings.max_streams_per_client)

    def _client(self, principal: str) -> SlotFile | None:
        if not self.max_streams_per_client:
            return None
        # Principals are key digests or "anonymous"; anything else must not name a path.
        name = principal if re.fullmatch(r"[0-9A-Za-z_-]{1,64}", principal) else "other"
        if name not in self._clients:  # one SlotFile per file: see SlotFile
            self._clients[name] = SlotFile(self.directory / f"client-{name}", self.max_streams_per_client)
        return self._clients[name]

    def admit(self, principal: str) -> Ticket:
        refuse_if_draining(self.directory, "streams")
        ticket = Ticket()
        client = self._client(principal)
        if client is not None:
            slot = client.take()
            if slot is None:
                raise OverloadError(f"this caller already has {self.max_streams_per_client} open streams, the most "
                                    "one client may hold on this server: end one, or retry later",
                                    reason=CLIENT_LIMIT)
            ticket.slots.append((client, slot))
        if self._server is not None:
            slot = self._server.take()
            if slot is None:
                ticket.release()
                raise OverloadError(f"this server is at its limit of {self.max_streams} open streams: "
                                    "retry later or on another server", reason=SERVER_LIMIT)
            ticket.slots.append((self._server, slot))
        return ticket
