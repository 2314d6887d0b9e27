"""Memory and CPU time of a running tritonserver and its model processes, read from /proc.

RSS counts a process's touched shared memory too (the Python backend's /dev/shm regions, mapped by
tritonserver and by the stub), so `anon` (private heap) and `shmem` are given apart; the regions'
own size in /dev/shm is `shm_files`.

Summed RSS overstates what the server takes from the machine: a region's pages count in every
process that maps it, and again for each of its mappings (the backend maps a region anew each time
it grows). PSS counts each page once, shared pages split between their mappers: the sum of PSS is
the server's footprint, what a container's memory limit sees.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tritonasr.serving.server import stub_processes

SERVER = "tritonserver"


@dataclass(frozen=True)
class Usage:
    rss_kb: int = 0
    anon_kb: int = 0
    shmem_kb: int = 0
    pss_kb: int = 0

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(self.rss_kb + other.rss_kb, self.anon_kb + other.anon_kb, self.shmem_kb + other.shmem_kb,
                     self.pss_kb + other.pss_kb)

    @property
    def rss_mb(self) -> float:
        return self.rss_kb / 1024

    @property
    def pss_mb(self) -> float:
        return self.pss_kb / 1024


def process_usage(pid: int) -> Usage:
    """RSS and PSS of one process (zero if it is gone)."""
    fields = {}
    try:
        for name in ("status", "smaps_rollup"):
            with open(f"/proc/{pid}/{name}") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in ("VmRSS", "RssAnon", "RssShmem", "Pss"):
                        fields[key] = int(value.split()[0])
    except OSError:
        return Usage()
    return Usage(fields.get("VmRSS", 0), fields.get("RssAnon", 0), fields.get("RssShmem", 0), fields.get("Pss", 0))


def model_of(argv: list[str]) -> str:
    """The model a stub serves: its model.py is <repository>/<model>/<version>/model.py."""
    return Path(argv[1]).parent.parent.name


@dataclass(frozen=True)
class Snapshot:
    """One reading: per model (all its instances summed) and for tritonserver itself."""

    by_process: dict[str, Usage]  # "tritonserver" and each model name
    shm_files_kb: int  # what the model processes' /dev/shm regions hold

    @property
    def total(self) -> Usage:
        return sum(self.by_process.values(), Usage())


def snapshot(server_pid: int) -> Snapshot:
    usage = {SERVER: process_usage(server_pid)}
    regions = set()
    for pid, argv in stub_processes(server_pid).items():
        model = model_of(argv)
        usage[model] = usage.get(model, Usage()) + process_usage(pid)
        regions.add(argv[2].lstrip("/"))
    shm = 0
    for region in regions:
        try:
            shm += os.stat(Path("/dev/shm") / region).st_blocks // 2  # 512-byte blocks actually held
        except OSError:
            pass
    return Snapshot(usage, shm)


def cpu_seconds(server_pid: int) -> dict[str, float]:
    """CPU time (user + system) used so far by tritonserver and by each model (its instances
    summed); a process that has gone is left out."""
    used: dict[str, float] = {}
    for pid, name in [(server_pid, SERVER), *((pid, model_of(argv)) for pid, argv in stub_processes(server_pid).items())]:
        seconds = process_cpu_seconds(pid)
        if seconds is not None:
            used[name] = used.get(name, 0.0) + seconds
    return used


def process_cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) one process has used so far; None once it has gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def find_server_pid(grpc_port: int) -> int | None:
    """The pid of the local tritonserver serving gRPC on `grpc_port`, found by its command line."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv[0].endswith("/" + SERVER) or argv[0] == SERVER:
            if f"--grpc-port={grpc_port}" in argv:
                return int(entry.name)
    return None
