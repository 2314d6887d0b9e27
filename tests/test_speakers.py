"""The speaker stage's own logic, without models: windows, clustering, the store, identification."""
import asyncio
import multiprocessing
import time

import numpy as np
import pytest

from tritonasr.models.fbank import Frontend
from tritonasr.models.speaker import Embedder, SpeakerSpec, unit, window_starts
from tritonasr.recognition.clustering import OnlineClusters, label_name
from tritonasr.recognition.settings import SpeakerSettings
from tritonasr.recognition.speakers import (PostgresSpeakerStore, SpeakerError, SpeakerIdentifier, SqliteSpeakerStore,
                                          combine, open_store)

DIM = 192


def _groups(rng, sizes, noise):
    """Unit embeddings around len(sizes) random centres; returns (embeddings, group of each)."""
    centres = [unit(rng.standard_normal(DIM)) for _ in sizes]
    items = [(unit(centres[g] + noise * rng.standard_normal(DIM) / np.sqrt(DIM)), g)
             for g, n in enumerate(sizes) for _ in range(n)]
    order = rng.permutation(len(items))
    return [items[i][0] for i in order], [items[i][1] for i in order]


def test_label_names_run_like_spreadsheet_columns():
    assert [label_name(i) for i in (0, 1, 25, 26, 27, 51, 52, 701, 702)] == \
        ["A", "B", "Z", "AA", "AB", "AZ", "BA", "ZZ", "AAA"]


@pytest.mark.parametrize("seed", range(5))
def test_clustering_recovers_known_groups(seed):
    rng = np.random.default_rng(seed)
    embeddings, groups = _groups(rng, sizes=[7, 5, 3], noise=0.8)  # members ~0.78 to their centre
    clusters = OnlineClusters(threshold=0.5)
    labels = [clusters.assign(e)[0] for e in embeddings]
    # The same partition as the groups, labels given in order of first appearance.
    assert len(set(zip(groups, labels))) == len(set(groups)) == len(set(labels)) == 3
    first_seen = list(dict.fromkeys(labels))
    assert first_seen == ["A", "B", "C"]


def test_clustering_threshold_splits_and_merges():
    rng = np.random.default_rng(0)
    a, b = unit(rng.standard_normal(DIM)), unit(rng.standard_normal(DIM))  # near-orthogonal
    clusters = OnlineClusters(threshold=0.5)
    assert clusters.assign(a) == ("A", 1.0)
    label, score = clusters.assign(b)
    assert label == "B" and score == 1.0
    label, score = clusters.assign(unit(a + 0.1 * b))
    assert label == "A" and score > 0.99
    assert len(clusters) == 2
    merged = OnlineClusters(threshold=-1.0)
    assert [merged.assign(v)[0] for v in (a, b)] == ["A", "A"]


def test_windows_cover_the_segment_in_a_few_shapes():
    assert window_starts(300, 300) == [0]
    assert window_starts(1000, 300) == [0, 300, 600, 700]
    assert window_starts(900, 300) == [0, 300, 600]
    spec = SpeakerSpec(Frontend(window="povey", scale=1.0), DIM)
    embedder = Embedder(spec, run_speaker=None, min_segment_ms=1000, window_ms=3000)
    assert embedder.windows(99) == []  # under 1 s: no embedding
    assert embedder.windows(100) == [(0, 100)]
    assert embedder.windows(237) == [(0, 200), (37, 237)]  # 2.37 s -> two 2 s windows
    shapes = set()
    for frames in range(100, 3000, 7):
        windows = embedder.windows(frames)
        assert windows[0][0] == 0 and windows[-1][1] == frames
        assert all(b2 >= a1 for (_, b2), (a1, _) in zip(windows, windows[1:]))  # no gaps
        shapes |= {b - a for a, b in windows}
    assert shapes == {100, 150, 200, 250, 300}


def test_embedder_averages_unit_window_embeddings():
    spec = SpeakerSpec(Frontend(window="povey", scale=1.0), 4)
    calls = []

    async def run_speaker(feats):
        calls.append(feats.shape)
        assert abs(float(feats[0].mean(axis=0).max())) < 1e-4  # each window's mean is removed
        return np.array([1.0, 0.0, 0.0, 0.0]) * (len(calls) + 1)

    embedder = Embedder(spec, run_speaker, min_segment_ms=1000, window_ms=3000)
    samples = np.random.default_rng(0).standard_normal(16000 * 5).astype(np.float32) * 0.1
    vector = asyncio.run(embedder.embed(samples))
    assert calls and all(shape == (1, 300, 80) for shape in calls)
    np.testing.assert_allclose(vector, [1, 0, 0, 0], atol=1e-6)
    assert asyncio.run(embedder.embed(samples[:15000])) is None


def test_combine_weights_unit_vectors():
    vector = combine(np.array([[2.0, 0.0], [0.0, 5.0]]), np.array([3.0, 1.0]))
    np.testing.assert_allclose(vector, unit(np.array([3.0, 1.0])), atol=1e-6)


@pytest.fixture(params=["sqlite", "postgresql"])
def reopen(request, tmp_path):
    """Opens the test's own store, SQLite or a real PostgreSQL; each call is another process's
    view of the same store."""
    if request.param == "sqlite":
        yield lambda: SqliteSpeakerStore(tmp_path / "speakers.db")
        return
    url, opened = request.getfixturevalue("postgres").new_database(), []
    yield lambda: opened.append(PostgresSpeakerStore(url)) or opened[-1]
    for store in opened:
        store.close()


def test_store_enroll_list_remove_and_survive_reopening(reopen):
    store = reopen()
    version = store.version()
    store.enroll("alice", np.ones(DIM), speech_ms=4200)
    store.enroll("  bob ", np.arange(DIM, dtype=np.float32) + 1, speech_ms=1500)
    assert store.version() > version
    assert [(s.name, s.embedding_dim, s.speech_ms) for s in store.speakers()] == [("alice", DIM, 4200), ("bob", DIM, 1500)]
    with pytest.raises(SpeakerError, match="'alice' is already enrolled"):
        store.enroll("alice", np.ones(DIM), speech_ms=1000)
    store.enroll("alice", -np.ones(DIM), speech_ms=1000, replace=True)
    reopened = reopen()
    names, matrix = reopened.voiceprints(DIM)
    assert names == ["alice", "bob"]
    np.testing.assert_allclose(matrix[0], -np.ones(DIM) / np.sqrt(DIM), atol=1e-6)
    assert reopened.voiceprints(64) == ([], pytest.approx(np.zeros((0, 64))))
    reopened.remove("bob")
    with pytest.raises(SpeakerError, match="no speaker named 'bob' is enrolled"):
        store.remove("bob")
    assert [s.name for s in store.speakers()] == ["alice"]


def test_names_are_one_name_however_they_are_composed(reopen):
    store = reopen()
    store.enroll("Zoe\u0308", np.ones(4), speech_ms=1000)  # e + combining diaeresis
    assert [s.name for s in store.speakers()] == ["Zo\u00eb"]
    store.remove(" Zo\u00eb ")
    assert store.speakers() == []


@pytest.mark.parametrize("name, message", [("", "must not be empty"), ("  ", "must not be empty"),
                                           ("x" * 101, "at most 100 characters"), ("a\nb", "control characters")])
def test_store_rejects_bad_names(reopen, name, message):
    with pytest.raises(SpeakerError, match=message):
        reopen().enroll(name, np.ones(4), speech_ms=1000)


@pytest.mark.parametrize("vector", [np.zeros(4), np.array([1.0, np.nan, 0, 0]), np.zeros(0)])
def test_store_rejects_bad_embeddings(reopen, vector):
    with pytest.raises(SpeakerError, match="non-zero vector of finite numbers"):
        reopen().enroll("alice", vector, speech_ms=1000)


def _open_at(path, start_at: float) -> None:
    time.sleep(max(0.0, start_at - time.time()))
    SqliteSpeakerStore(path)


def test_a_new_store_opens_in_many_processes_at_once(tmp_path):
    """A server's instances all open the store as they load; the first to switch the new file to
    WAL used to make the others fail with "database is locked" (about 1 load in 2 with 6)."""
    context = multiprocessing.get_context("fork")
    for trial in range(10):
        start_at = time.time() + 0.3
        processes = [context.Process(target=_open_at, args=(tmp_path / f"{trial}.db", start_at)) for _ in range(6)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=60)
        assert [process.exitcode for process in processes] == [0] * 6


def test_open_store_locations(tmp_path, postgres):
    assert isinstance(open_store(tmp_path / "a.db"), SqliteSpeakerStore)
    assert open_store(f"sqlite://{tmp_path}/b.db").path == tmp_path / "b.db"
    shared = open_store(postgres.new_database())
    assert isinstance(shared, PostgresSpeakerStore)
    shared.close()
    with pytest.raises(SpeakerError, match="unknown speaker store 'redis://x'"):
        open_store("redis://x")
    # A password belongs in the environment or a password file, not in a URL that configs and logs show.
    for url in (postgres.url().replace("tritonasr@", f"tritonasr:{postgres.PASSWORD}@"),
                postgres.url() + f"?password={postgres.PASSWORD}"):
        with pytest.raises(SpeakerError, match=r"must not hold a password: give it in \$PGPASSWORD"):
            open_store(url)


def test_two_servers_enrolling_one_new_name_at_once_enroll_it_once(postgres):
    from concurrent.futures import ThreadPoolExecutor

    url = postgres.new_database()
    stores = [PostgresSpeakerStore(url) for _ in range(8)]
    before = stores[0].version()

    def enroll(store):
        try:
            store.enroll("carol", np.ones(DIM), speech_ms=1000)
            return "enrolled"
        except SpeakerError as exc:
            return exc.code

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(enroll, stores))
    assert sorted(outcomes) == ["ALREADY_EXISTS"] * 7 + ["enrolled"]
    assert [s.name for s in stores[3].speakers()] == ["carol"] and stores[5].version() == before + 1
    for store in stores:
        store.close()


def test_identifier_sees_enrollments_made_elsewhere(reopen):
    rng = np.random.default_rng(1)
    alice, bob = unit(rng.standard_normal(DIM)), unit(rng.standard_normal(DIM))
    writer = reopen()  # e.g. the registry model's process, or another server's
    identifier = SpeakerIdentifier(reopen(), DIM, threshold=0.5)
    assert identifier.identify(alice) == (None, None)  # nobody enrolled
    writer.enroll("alice", alice, speech_ms=3000)
    name, score = identifier.identify(unit(alice + 0.3 * bob))
    assert name == "alice" and 0.9 < score < 1.0
    name, score = identifier.identify(bob)
    assert name is None and abs(score) < 0.3  # someone else: below the threshold
    writer.remove("alice")
    assert identifier.identify(alice) == (None, None)


def test_serve_puts_the_speaker_settings_in_the_models_environment(tmp_path):
    from tritonasr.serving.server import ServerConfig, ServerError

    env = ServerConfig(tmp_path, speaker_settings={"cluster_threshold": 0.8}).environment()
    assert env["TRITONASR_SPEAKER_CLUSTER_THRESHOLD"] == "0.8"
    assert SpeakerSettings.from_parameters({}, env).cluster_threshold == 0.8
    with pytest.raises(ServerError, match="speaker_cluster_threshold must be a cosine similarity"):
        ServerConfig(tmp_path, speaker_settings={"cluster_threshold": -2})

