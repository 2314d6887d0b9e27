"""Admission control without Triton: slots shared between real processes (as asr_stream's
instances share them), freed when a process dies, per-client caps, the settings' precedence,
and a stream registry that gives its slot back however a stream ends."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from tritonasr.cli import _server_config, build_parser
from tritonasr.errors import OverloadError, ServiceError
from tritonasr.recognition.admission import CLIENT_LIMIT, SERVER_LIMIT, Admission
from tritonasr.recognition.settings import StreamSettings
from tritonasr.recognition.streaming import StreamKey, StreamOptions, StreamRegistry
from tritonasr.serving.server import ServerConfig, ServerError


def _other_process(directory, max_streams: int, per_client: int, principals: list[str]) -> subprocess.Popen:
    """Another process (as another asr_stream instance) admitting one stream per principal given,
    then holding them until killed; prints what it was refused."""
    code = textwrap.dedent(f"""
        import sys
        from tritonasr.errors import OverloadError
        from tritonasr.recognition.admission import Admission
        admission, tickets = Admission({str(directory)!r}, {max_streams}, {per_client}), []
        for principal in {principals!r}:
            try:
                tickets.append(admission.admit(principal))
            except OverloadError as exc:
                print(exc.reason, flush=True)
        print("holding", flush=True)
        sys.stdin.read()
    """)
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lines = []
    while (line := process.stdout.readline().strip()) != "holding":
        assert line, "the other process died"
        lines.append(line)
    process.refused = lines
    return process


def _admit_all(admission: Admission, principal: str = "anonymous") -> tuple[list, OverloadError]:
    tickets = []
    while True:
        try:
            tickets.append(admission.admit(principal))
        except OverloadError as exc:
            return tickets, exc


def test_the_limit_holds_across_processes_and_a_dead_process_frees_its_slots(tmp_path):
    other = _other_process(tmp_path, 5, 0, ["a", "b", "c"])
    try:
        admission = Admission(tmp_path, 5)
        tickets, refused = _admit_all(admission)
        assert len(tickets) == 2  # 5 on the server, 3 of them in the other process
        assert refused.reason == SERVER_LIMIT and refused.code == "UNAVAILABLE"
        assert str(refused) == "this server is at its limit of 5 open streams: retry later or on another server"
        tickets[0].release()
        tickets[0].release()  # a second release gives nothing back twice
        assert len(_admit_all(admission)[0]) == 1
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()
    # The kernel dropped the killed process's locks: its three slots are free.
    assert len(_admit_all(admission)[0]) == 3


def test_each_client_has_its_own_cap_within_the_servers(tmp_path):
    other = _other_process(tmp_path, 4, 2, ["alice", "alice", "alice", "bob"])
    try:
        assert other.refused == [CLIENT_LIMIT]  # alice's third, in the same process
        admission = Admission(tmp_path, 4, 2)
        with pytest.raises(OverloadError, match="already has 2 open streams") as refused:
            admission.admit("alice")  # her two are held by the other process
        assert refused.value.reason == CLIENT_LIMIT
        bob = admission.admit("bob")
        with pytest.raises(OverloadError) as full:  # carol has room of her own, the server has none
            admission.admit("carol")
        assert full.value.reason == SERVER_LIMIT
        bob.release()
        admission.admit("carol")  # carol's own slot, given back when the server refused her, is free
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()


def test_zero_means_no_limit(tmp_path):
    admission = Admission(tmp_path, 0, 0)
    assert len([admission.admit("a") for _ in range(100)]) == 100


def test_serve_limits_reach_the_models_and_bad_values_are_refused(tmp_path):
    args = build_parser().parse_args(["serve", "--model-repository", str(tmp_path), "--max-streams", "8"])
    env = _server_config(args).environment()
    assert StreamSettings.from_parameters({"max_streams": "2", "max_streams_per_client": "4"}, env) == \
        StreamSettings(max_streams=8, max_streams_per_client=4)  # the flag wins; the config keeps the rest
    with pytest.raises(ServerError, match="max_streams_per_client must be 0 \\(no limit\\) or more"):
        ServerConfig(tmp_path, max_streams_per_client=-2)


class _Stream:
    """What the registry reads of a live stream."""

    def __init__(self, key):
        self.key, self.id, self.token = key, key.id, ""
        self.busy, self.last_active, self.gone = 0, 0.0, False

    def close(self, reason, failed=False, notice=None):
        pass

    def hung_up(self):
        return self.gone


def test_every_way_a_stream_ends_gives_its_slot_back(tmp_path):
    def factory(key, options):
        if options.language == "xx":
            raise ServiceError("unknown language")
        return _Stream(key)

    registry = StreamRegistry(factory, idle_timeout_s=5, admission=Admission(tmp_path, 3, 2))
    full = lambda: [registry.open(StreamKey(i, "p"), StreamOptions()) for i in range(1, 3)] + [  # noqa: E731
        registry.open(StreamKey(3, "q"), StreamOptions())]

    def assert_full():
        with pytest.raises(OverloadError):
            registry.open(StreamKey(99, "r"), StreamOptions())

    ended, failed, idle = full()
    assert_full()
    registry.close(ended, "ended")
    registry.close(failed, "closed after an error", failed=True)
    idle.last_active = 100.0
    registry.expire(now=106.0)
    hung_up, *_ = full()
    assert_full()
    hung_up.gone = True
    registry.expire(now=hung_up.last_active + 2)
    with pytest.raises(ServiceError, match="unknown language"):  # a START that fails after admission
        registry.open(StreamKey(1, "p"), StreamOptions(language="xx"))
    registry.open(StreamKey(1, "p"), StreamOptions())  # the two above gave their slots back
    assert len(registry) == 3
    assert_full()


def test_a_draining_server_refuses_new_streams_and_requests_in_every_process(tmp_path):
    import os
    import shutil

    from tritonasr.recognition.admission import DRAINING, refuse_if_draining, slot_directory, start_draining

    server_pid = 2**22 + os.getpid()  # no real server has this pid: a directory of the test's own
    directory = slot_directory(server_pid)
    try:
        other = _other_process(directory, 4, 0, ["a"])  # holds a stream from before the drain
        try:
            admission = Admission(directory, 4)
            ticket = admission.admit("b")
            start_draining(server_pid)
            with pytest.raises(OverloadError, match="draining") as refused:
                admission.admit("c")
            assert refused.value.reason == DRAINING and refused.value.code == "UNAVAILABLE"
            with pytest.raises(OverloadError, match="takes no new requests"):
                refuse_if_draining(directory, "requests")
            ticket.release()  # the streams open before it end as usual
        finally:
            other.kill()
            other.wait()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_work_left_reads_open_streams_and_offline_requests_from_the_metrics():
    from tritonasr.serving.server import work_left

    text = "\n".join([
        "# TYPE tritonasr_open_streams gauge",
        'tritonasr_open_streams{model="asr_stream",model_instance="asr_stream_0_0"} 2',
        'tritonasr_open_streams{model="asr_stream",model_instance="asr_stream_0_1"} 1',
        "# TYPE tritonasr_inflight_requests gauge",
        'tritonasr_inflight_requests{model="asr_offline",model_instance="asr_offline_0_0"} 1',
        "# TYPE nv_inference_pending_request_count gauge",
        'nv_inference_pending_request_count{model="asr_offline",version="1"} 3',
        'nv_inference_pending_request_count{model="sensevoice",version="1"} 7',  # the pipelines' own calls
    ]) + "\n"
    assert work_left(text) == {"streams": 3, "offline requests": 4}
    assert work_left(text.replace(" 2\n", " 0\n").replace(" 1\n", " 0\n").replace(" 3\n", " 0\n")) == {}


def test_a_slot_directory_someone_else_made_is_refused(tmp_path):
    """The slot directory's name is predictable (/tmp, the server's pid): one made beforehand by
    another user, or left open to others, could be used to hold every slot or announce a drain.
    The server refuses it instead of using it."""
    import os

    from tritonasr.recognition.admission import own_directory

    assert own_directory(tmp_path / "mine") == tmp_path / "mine"  # made here: used
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    with pytest.raises(PermissionError, match="not a directory of this user's alone"):
        Admission(open_to_all, 4)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(elsewhere)
    with pytest.raises(PermissionError):
        own_directory(link)
    if os.geteuid() == 0:  # as root, a directory owned by another user can be made here
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(PermissionError):
            own_directory(theirs)
