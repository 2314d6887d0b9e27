"""Pure logic: features, CTC collapse, rich tags, segment splitting, batching of ragged requests."""
import asyncio

import numpy as np
import pytest
from funasr_onnx.utils.frontend import WavFrontend

from tritonasr.models.fbank import Frontend, in_pieces
from tritonasr.models.transcript import ctc_greedy, parse_rich_text
from tritonasr.models.vad import chunk_bounds, split_long_segments


@pytest.mark.parametrize("lfr", [(5, 1), (7, 6)])
@pytest.mark.parametrize("samples", [399, 400, 401, 32057, 112123])
def test_features_equal_funasr_frontend(lfr, samples):
    wave = (np.random.default_rng(samples).standard_normal(samples) * 0.1).astype(np.float32)
    ours = Frontend(lfr_m=lfr[0], lfr_n=lfr[1]).features(wave)
    ref = WavFrontend(cmvn_file=None, lfr_m=lfr[0], lfr_n=lfr[1], dither=0.0)
    fbank, _ = ref.fbank(wave)
    if len(fbank) == 0:
        assert ours.shape == (0, 80 * lfr[0])
        return
    expected, _ = ref.lfr_cmvn(fbank)
    np.testing.assert_array_equal(ours, expected)


def test_lfr_row_ranges_equal_whole():
    frontend = Frontend(lfr_m=5, lfr_n=1)
    fbank = np.random.default_rng(0).standard_normal((1234, 80)).astype(np.float32)
    whole = frontend.lfr(fbank)
    parts = np.concatenate([frontend.lfr(fbank, a, b) for a, b in chunk_bounds(len(whole), 500)])
    np.testing.assert_array_equal(parts, whole)


def test_fbank_of_a_slice_equals_slice_of_fbank():
    """What lets the pipeline reuse the VAD's fbank for SenseVoice segments."""
    frontend = Frontend(lfr_m=7, lfr_n=6)
    wave = (np.random.default_rng(1).standard_normal(16000 * 5) * 0.1).astype(np.float32)
    whole = frontend.fbank(wave)
    start_ms, end_ms = 1230, 3470
    seg = wave[start_ms * 16: end_ms * 16]
    frame0 = start_ms // 10
    np.testing.assert_array_equal(frontend.fbank(seg), whole[frame0: frame0 + frontend.num_frames(seg.size)])


@pytest.mark.parametrize("seconds", [0.01, 3.0, 7.0, 12.345])
def test_fbank_in_pieces_equals_the_whole(seconds):
    """How the served fbank takes long recordings: in 3 s pieces here (60 s when served)."""
    frontend = Frontend()
    wave = (np.random.default_rng(2).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)
    sizes = []

    async def fbank(samples):
        sizes.append(samples.size)
        return frontend.fbank(samples)

    got = asyncio.run(in_pieces(fbank, frontend, piece_s=3.0)(wave))
    np.testing.assert_array_equal(got, frontend.fbank(wave))
    assert max(sizes) <= 3 * 16000 + 240 and len(sizes) == max(1, -(-got.shape[0] // 300))


def test_ctc_greedy_uses_own_length():
    ids = np.array([0, 5, 5, 0, 5, 7, 7, 0, 9, 9, 9])
    assert ctc_greedy(ids, 8) == [5, 5, 7]
    assert ctc_greedy(ids, 11) == [5, 5, 7, 9]
    assert ctc_greedy(ids, 0) == []


def test_rich_text_tags_to_fields():
    rich = parse_rich_text("<|en|><|HAPPY|><|Laughter|><|woitn|>hello  world")
    assert (rich.text, rich.language, rich.emotion, rich.event) == ("hello world", "en", "happy", "laughter")
    rich = parse_rich_text("<|zh|><|EMO_UNKNOWN|><|Event_UNK|><|withitn|>你好。")
    assert (rich.text, rich.language, rich.emotion, rich.event) == ("你好。", "zh", None, None)
    assert parse_rich_text("plain").language is None


def test_split_long_segments_caps_length():
    pieces = split_long_segments([(0, 1000), (2000, 62000), (70000, 100000)], 30000)
    assert pieces[0] == (0, 1000)
    assert pieces[1:3] == [(2000, 32000), (32000, 62000)]
    assert pieces[3] == (70000, 100000)
    pieces = split_long_segments([(0, 59990)], 30000)
    assert all(e - s <= 30000 for s, e in pieces) and pieces[0][0] == 0 and pieces[-1][1] == 59990
    assert all(s % 10 == 0 and e % 10 == 0 for s, e in pieces)


def test_segment_slots_go_to_the_request_due_first():
    """Slots are taken while free; once they are all taken, each freed one goes to the waiting
    segment whose request is due first (one request's segments in order), so a short request's
    segments pass a long one's, and a request due later than the long one waits behind it."""
    from tritonasr.recognition.offline import SegmentSlots

    slots, order, gates = SegmentSlots(2, short_first=0.5), [], {}

    async def segment(owner: str, due: float, i: int):
        async with slots.slot(due):
            order.append(f"{owner}{i}")
            gates[owner, i] = asyncio.Event()
            await gates[owner, i].wait()

    async def run():
        now = asyncio.get_running_loop().time()
        assert slots.due(60) == pytest.approx(now + 30, abs=1)  # 0.5 s per second of audio
        tasks = [asyncio.ensure_future(segment("long", 30, i)) for i in range(4)]
        await asyncio.sleep(0)
        tasks += [asyncio.ensure_future(segment("late", 40, i)) for i in range(2)]
        tasks += [asyncio.ensure_future(segment("short", 7.5, i)) for i in range(2)]
        await asyncio.sleep(0)
        assert order == ["long0", "long1"]  # both slots taken, the rest wait
        cancelled = asyncio.ensure_future(segment("gone", 0, 0))  # a cancelled waiter's turn is skipped
        await asyncio.sleep(0)
        cancelled.cancel()
        while len(order) < 8:
            gates[next(key for key in gates if not gates[key].is_set())].set()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        for gate in gates.values():
            gate.set()
        await asyncio.gather(*tasks)
        assert slots.free == 2 and not slots._waiting

    asyncio.run(run())
    assert order == ["long0", "long1", "short0", "short1", "long2", "long3", "late0", "late1"]


def test_a_failed_batch_fails_each_of_its_calls_and_the_next_turn_runs_anew():
    from tritonasr.runtime.onnx_session import LoopBatcher

    class Flaky:  # fails its first batch, then echoes
        calls = 0

        def run_batch(self, requests, outputs):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("ort failed")
            return [{"y": r["x"] * 2} for r in requests]

    batcher = LoopBatcher(Flaky())

    async def turn(values):
        return await asyncio.gather(*(batcher.infer({"x": np.array([v])}, ["y"]) for v in values),
                                    return_exceptions=True)

    async def main():
        return await turn([1, 2]), await turn([3])

    failed, fine = asyncio.run(main())
    assert [type(e) for e in failed] == [RuntimeError, RuntimeError]
    assert fine[0][0].tolist() == [6] and Flaky.calls == 2


def test_retry_waits_double_up_to_the_most_with_jitter():
    from tritonasr.client.connection import NO_RETRY, Retry

    assert list(NO_RETRY.delays()) == []
    delays = list(Retry(attempts=7, first_s=0.25, max_s=2.0).delays())
    nominal = [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert len(delays) == 6
    assert all(0.5 * n <= d <= 1.5 * n for d, n in zip(delays, nominal))
    assert len({round(d, 6) for d in list(Retry(attempts=30).delays())[-10:]}) > 1  # jittered, not in step
    with pytest.raises(ValueError):
        Retry(attempts=0)
