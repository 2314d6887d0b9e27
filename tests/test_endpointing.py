"""tritonasr.models.endpointing decides as FunASR's FSMN-VAD post-processing does (funasr-onnx's
E2EVadModel, installed for the tests only): call for call, offline and online, on the real VAD's
scores of the test speech and on score sequences built to hit each rule, however the audio is
chunked."""
from __future__ import annotations

import asyncio
import dataclasses
import json

import numpy as np
import pytest

from tritonasr.audio import load_audio
from tritonasr.models.endpointing import ENERGY_FLOOR_DB, EndpointDetector, EndpointOptions, frame_energies
from tritonasr.models.vad import VadSpec, chunk_bounds
from tritonasr.recognition.offline import detect_speech
from tritonasr.runtime.onnx_session import OnnxModel

from conftest import DATA

HOP, WINDOW = 160, 400  # samples: FunASR's 10 ms frame shift and 25 ms frame at 16 kHz
SPEECH, SILENCE = 0.05, 0.9  # silence probabilities of clear speech and clear silence
SPEECH_FILES = ["one_phrase.wav", "pause_0.3s.wav", "pause_1s.wav", "pause_3s.wav", "lead_trail_silence.wav",
                "long_70s.wav"]


# ---- driving both machines -------------------------------------------------------------------

def calls(scores: np.ndarray, samples: np.ndarray, bounds: list[tuple[int, int]]):
    """(scores, samples, final) of each call, for frame bounds [(start, stop), ...]: each call gets
    the samples its frames were computed from, as the pipeline and the streams send them."""
    for i, (start, stop) in enumerate(bounds):
        piece = samples[start * HOP:(stop - 1) * HOP + WINDOW] if stop > start else samples[:0]
        yield scores[start:stop], piece, i == len(bounds) - 1


def funasr_reports(conf: dict, scores, samples, bounds, online: bool) -> list[list[tuple[int, int]]]:
    from funasr_onnx.utils.e2e_vad import E2EVadModel

    machine = E2EVadModel(json.loads(json.dumps(conf)))
    out = []
    for part, piece, final in calls(scores, samples, bounds):
        found = machine(part[None], piece[None], is_final=final, online=online,
                        max_end_sil=conf.get("max_end_silence_time", 800))
        out.append([(int(start), int(end)) for batch in found for start, end in batch])
    return out


def our_reports(conf: dict, scores, samples, bounds, online: bool) -> list[list[tuple[int, int]]]:
    detector = EndpointDetector(EndpointOptions.from_config(conf), online)
    return [detector.feed(part, piece, final) for part, piece, final in calls(scores, samples, bounds)]


def check_parity(conf: dict, scores, samples, bounds) -> tuple[list, list]:
    """Asserts that both modes report exactly as FunASR, call by call; returns (the offline
    segments, the online reports)."""
    result = []
    for online in (False, True):
        expected = funasr_reports(conf, scores, samples, bounds, online)
        assert our_reports(conf, scores, samples, bounds, online) == expected, f"online={online}"
        result.append([report for call in expected for report in call])
    return result[0], result[1]


def check_chunkings(conf: dict, scores, samples, rng) -> list[tuple[int, int]]:
    """Parity for the audio in one call, in the pipeline's 60 s chunks, in the streams' 100 ms steps,
    in 1-frame calls and in random-sized calls; the same offline segments from each."""
    frames = scores.shape[0]
    whole = check_parity(conf, scores, samples, [(0, frames)])[0]
    for bounds in (chunk_bounds(frames), steps(frames, 10), steps(frames, 1), random_bounds(frames, rng)):
        assert check_parity(conf, scores, samples, bounds)[0] == whole
    return whole


def steps(frames: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, frames)) for start in range(0, frames, size)]


def random_bounds(frames: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Chunks of 1 frame, a few frames or hundreds, mixed."""
    bounds, start = [], 0
    while start < frames:
        size = int(rng.choice([1, rng.integers(2, 30), rng.integers(30, 800)]))
        bounds.append((start, min(start + size, frames)))
        start += size
    return bounds


def online_segments(reports: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Online reports joined into segments (an open one ends at -1)."""
    segments = []
    for start, end in reports:
        if start == -1:
            segments[-1] = (segments[-1][0], end)
        else:
            segments.append((start, end))
    return segments


# ---- synthetic scores --------------------------------------------------------------------------

def runs(*parts: tuple[float, int]) -> np.ndarray:
    """Silence probabilities: (probability, frames) runs one after another."""
    return np.concatenate([np.full(count, p, dtype=np.float32) for p, count in parts])


def synthetic(silence_probs, amplitude=0.01, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores [T, 2] (silence first) and white-noise samples of `amplitude` (one per frame when an
    array) covering the T frames."""
    silence = np.asarray(silence_probs, dtype=np.float32)
    frames = silence.size
    scores = np.stack([silence, 1 - silence], axis=1)
    level = np.repeat(np.broadcast_to(np.asarray(amplitude, np.float32), (frames,)), HOP)
    size = (frames - 1) * HOP + WINDOW
    level = np.concatenate([level, np.full(max(0, size - level.size), level[-1], np.float32)])[:size]
    noise = np.random.default_rng(seed).standard_normal(size).astype(np.float32)
    return scores, noise * level


def whole(silence_probs, conf: dict | None = None, amplitude=0.01, step: int = 1) -> tuple[list, list]:
    """Parity in one call and in calls of `step` frames; (offline segments, online reports) of
    the one call."""
    scores, samples = synthetic(silence_probs, amplitude)
    result = check_parity(conf or {}, scores, samples, [(0, scores.shape[0])])
    assert check_parity(conf or {}, scores, samples, steps(scores.shape[0], step))[0] == result[0]
    return result


# ---- options -----------------------------------------------------------------------------------

def test_funasr_config_gives_the_defaults_and_these_frame_counts(model_repository):
    conf = json.loads((model_repository / "vad" / "1" / "meta.json").read_text())["vad_post"]
    options = EndpointOptions.from_config(conf)
    assert options == EndpointOptions() == EndpointOptions.from_config({})
    assert VadSpec.load(model_repository / "vad" / "1").endpoint == options
    assert (options.window_frames, options.start_votes, options.stop_votes) == (20, 15, 15)
    assert (options.start_lookback_frames, options.end_silence_frames, options.end_lookback_frames,
            options.end_padding_frames, options.max_segment_frames) == (40, 65, 54, 10, 6000)
    assert (options.frame_samples, options.hop_samples) == (WINDOW, HOP)
    # Per-stream options are copies with some values replaced, checked again.
    assert dataclasses.replace(options, end_silence_ms=500).end_silence_frames == 35
    with pytest.raises(ValueError, match="max_segment_ms"):
        dataclasses.replace(options, max_segment_ms=5)


@pytest.mark.parametrize("conf, message", [
    ({"detect_mode": 0}, "single-utterance mode is not implemented"),
    ({"do_extend": 0}, "unpadded segments are not implemented"),
    ({"silence_pdf_num": 2, "sil_pdf_ids": [0, 1]}, "exactly one silence class"),
    ({"sil_pdf_ids": [0, 1]}, "exactly one silence class"),
    ({"fe_prior_thres": 1.0}, "fe_prior_thres=1.0 is not supported"),
    ({"decibel_thres": -30.0}, "gating frames by energy is not implemented"),
    ({"decibel_thres": ENERGY_FLOOR_DB + 1e-9}, "gating frames by energy is not implemented"),
    ({"sil_to_speech_time_thres": 10}, "speech_start_ms=10 must be between 2 frames and the window"),
    ({"sil_to_speech_time_thres": 210}, "speech_start_ms=210 must be between"),
    ({"speech_to_sil_time_thres": 200}, "speech_stop_ms=200 must be shorter than the window"),
    ({"window_size_ms": 5}, "shorter than a frame"),
    ({"max_single_segment_time": 9}, "max_segment_ms=9 is shorter than a frame"),
    ({"max_end_silence_time": -1}, "end_silence_ms must not be negative"),
    ({"max_end_silence_time": 800.5}, "must be a whole number"),
    ({"speech_noise_thres": float("nan")}, "must be a finite number"),
    ({"speech_2_noise_ratio": 0.0}, "speech_to_noise_ratio must be positive"),
    ({"frame_in_ms": 0}, "frame_ms must be positive"),
    ({"max_end_silence": 800}, "unknown VAD options: max_end_silence"),
])
def test_unimplemented_or_meaningless_options_are_refused(conf, message):
    with pytest.raises(ValueError, match=message):
        EndpointOptions.from_config(conf)


def test_options_without_effect_are_accepted():
    conf = {"snr_mode": 1, "max_start_silence_time": 10, "do_start_point_detection": False,
            "do_end_point_detection": False, "nn_eval_block_size": 3, "dcd_block_size": 2,
            "speech_noise_thresh_low": 0.0, "speech_noise_thresh_high": 1.0, "output_frame_probs": True,
            "decibel_thres": ENERGY_FLOOR_DB, "detect_mode": 1, "do_extend": 1}
    assert EndpointOptions.from_config(conf) == EndpointOptions(decibel_thres=ENERGY_FLOOR_DB)
    silence = runs((SILENCE, 100), (SPEECH, 300), (SILENCE, 200), (SPEECH, 100))
    assert whole(silence, conf)[0] == whole(silence)[0] == [(740, 4160), (5740, 7000)]


# ---- energies ----------------------------------------------------------------------------------

def test_frame_energies_equal_funasr_decibels():
    from funasr_onnx.utils.e2e_vad import E2EVadModel

    rng = np.random.default_rng(3)
    tests = [load_audio(DATA / "long_70s.wav").samples,
             (rng.standard_normal(50_000) * rng.uniform(0, 2, 50_000)).astype(np.float32),
             rng.standard_normal(20_000) * 1e-3,  # float64
             np.zeros(5_000, np.float32), np.zeros(399, np.float32)]
    for samples in tests:
        machine = E2EVadModel({})
        machine.waveform = samples[None]
        machine.ComputeDecibel()
        assert frame_energies(samples, EndpointOptions()) == machine.decibel
    assert min(frame_energies(np.zeros(1000, np.float32), EndpointOptions())) == ENERGY_FLOOR_DB


# ---- the real VAD's scores ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def vad(model_repository):
    model_dir = model_repository / "vad" / "1"
    model = OnnxModel(model_dir / "model.onnx", intra_op_threads=1)

    async def run_vad(feats, caches):
        feeds = {"speech": feats, **{f"in_cache{i}": c for i, c in enumerate(caches)}}
        out = model.run(feeds, ["logits"] + [f"out_cache{i}" for i in range(len(caches))])
        return out["logits"], [out[f"out_cache{i}"] for i in range(len(caches))]

    conf = json.loads((model_dir / "meta.json").read_text())["vad_post"]
    return VadSpec.load(model_dir), run_vad, conf


@pytest.fixture(scope="module")
def real_scores(vad):
    """name -> (scores [T, C] of the whole file, scored in the pipeline's chunks; its samples)."""
    spec, run_vad, _ = vad
    out = {}

    async def score(samples):
        fbank = spec.frontend.fbank(samples)
        caches, parts = spec.zero_caches(), []
        for start, stop in chunk_bounds(spec.frontend.num_lfr_frames(fbank.shape[0])):
            scores, caches = await run_vad(spec.frontend.lfr(fbank, start, stop)[None], caches)
            parts.append(scores[0])
        return np.concatenate(parts)

    for name in SPEECH_FILES:
        samples = load_audio(DATA / name).samples
        out[name] = asyncio.run(score(samples)), samples
    return out


@pytest.mark.parametrize("name", SPEECH_FILES)
def test_real_speech_decides_as_funasr_however_chunked(vad, real_scores, name, layout):
    scores, samples = real_scores[name]
    segments = check_chunkings(vad[2], scores, samples, np.random.default_rng(11))
    spoken = [(s["start_ms"], s["end_ms"]) for s in layout[name]["speech"]]

    def overlap(a, b):
        return a[0] < b[1] and b[0] < a[1]

    assert all(any(overlap(seg, s) for s in spoken) for seg in segments)
    assert all(any(overlap(seg, s) for seg in segments) for s in spoken)


@pytest.mark.parametrize("change", [
    {"max_end_silence_time": 200}, {"max_end_silence_time": 500}, {"max_end_silence_time": 1500},
    {"max_end_silence_time": 100},  # shorter than speech_to_sil_time_thres
    {"max_single_segment_time": 3000}, {"max_single_segment_time": 1000},
    {"speech_noise_thres": 0.2}, {"speech_noise_thres": 0.9}, {"speech_noise_thres": -0.5},
    {"sil_to_speech_time_thres": 50, "speech_to_sil_time_thres": 20}, {"window_size_ms": 400},
    {"lookback_time_start_point": 0, "lookahead_time_end_point": 0},
    {"lookahead_time_end_point": 900},  # longer than the end silence
    {"snr_thres": 30.0}, {"snr_thres": 45.0, "noise_frame_num_used_for_snr": 10},
    {"speech_2_noise_ratio": 0.5}, {"speech_2_noise_ratio": 3.0},
])
def test_real_speech_with_other_options_decides_as_funasr(vad, real_scores, change):
    """The options a stream may one day set for itself (end silence, segment length,
    sensitivity) and the others, on the 70 s recording."""
    scores, samples = real_scores["long_70s.wav"]
    conf = {**vad[2], **change}
    rng = np.random.default_rng(5)
    segments = check_parity(conf, scores, samples, [(0, scores.shape[0])])[0]
    assert check_parity(conf, scores, samples, random_bounds(scores.shape[0], rng))[0] == segments
    assert check_parity(conf, scores, samples, steps(scores.shape[0], 10))[0] == segments


def test_max_segment_cuts_real_speech(vad, real_scores):
    scores, samples = real_scores["long_70s.wav"]
    default = check_parity(vad[2], scores, samples, [(0, scores.shape[0])])[0]
    cut = check_parity({**vad[2], "max_single_segment_time": 3000}, scores, samples, [(0, scores.shape[0])])[0]
    assert len(cut) > len(default)
    assert max(end - start for start, end in cut) == 3010  # the frame that exceeds it is kept


def test_pipeline_and_streams_segment_as_funasr(vad, real_scores):
    """vad.py's wiring: the offline pipeline's segments and a live stream's reports."""
    spec, run_vad, conf = vad
    scores, samples = real_scores["long_70s.wav"]
    frames = scores.shape[0]
    expected = [seg for call in funasr_reports(conf, scores, samples, [(0, frames)], False) for seg in call]
    assert asyncio.run(detect_speech(spec, run_vad, samples)) == expected
    detector = EndpointDetector(spec.endpoint, online=True)
    bounds = steps(frames, 10)
    got = [detector.feed(part, piece, final) for part, piece, final in calls(scores, samples, bounds)]
    assert got == funasr_reports(conf, scores, samples, bounds, True)
    assert online_segments([r for call in got for r in call]) == expected
    assert detector.pending_frames == 0


# ---- synthetic scores, one rule at a time ------------------------------------------------------

def test_silence_only_gives_no_segment():
    for amplitude in (0.0, 0.01, 1.0):
        assert whole(runs((SILENCE, 3000)), amplitude=amplitude) == ([], [])
    assert whole(runs((0.5, 500))) == ([], [])  # undecided scores are not speech


def test_speech_to_the_end_closes_at_the_last_frame():
    silence = runs((SILENCE, 100), (SPEECH, 300))
    # The window starts speech at its 15th speech frame (114); the segment reaches back over the
    # window and 200 ms more: frame 74.
    assert whole(silence) == ([(740, 4000)], [(740, 4000)])
    scores, samples = synthetic(silence)
    online = check_parity({}, scores, samples, steps(400, 10))[1]
    assert online == [(740, -1), (-1, 4000)]


def test_speech_starting_on_the_last_frame_stays_open():
    """Offline, it is reported up to the last frame; online only its start goes out (FunASR
    never closes it)."""
    assert whole(runs((SILENCE, 100), (SPEECH, 15))) == ([(740, 1150)], [(740, -1)])


def test_a_final_call_without_frames():
    silence = runs((SILENCE, 100), (SPEECH, 300))
    scores, samples = synthetic(silence)
    offline, online = check_parity({}, scores, samples, [(0, 200), (200, 400), (400, 400)])
    assert offline == [(740, 4000)]  # the open segment, up to its last frame
    assert online == [(740, -1)]  # the end is never reported


def test_a_detector_starts_over_after_the_final_call():
    from funasr_onnx.utils.e2e_vad import E2EVadModel

    recordings = [synthetic(runs((SILENCE, 100), (SPEECH, 300), (SILENCE, 100)), seed=1),
                  synthetic(runs((SPEECH, 50), (SILENCE, 20), (SPEECH, 330)), 0.1, seed=2)]
    for online in (False, True):
        reference, detector = E2EVadModel({}), EndpointDetector(EndpointOptions(), online)
        for scores, samples in recordings:
            for part, piece, final in calls(scores, samples, steps(scores.shape[0], 150)):
                found = reference(part[None], piece[None], is_final=final, online=online)
                assert detector.feed(part, piece, final) == [tuple(seg) for batch in found for seg in batch]


def test_blips_shorter_than_the_start_window_are_ignored():
    assert whole(runs((SILENCE, 100), (SPEECH, 14), (SILENCE, 200))) == ([], [])
    # 15 frames start speech. With 15 speech votes both to start and to stop, the window flips
    # until the first speech frame leaves it (frame 120); 65 silent frames later the segment
    # closes, keeping 100 ms of the silence.
    assert whole(runs((SILENCE, 100), (SPEECH, 15), (SILENCE, 200)))[0] == [(740, 1310)]
    assert whole(runs((SILENCE, 100), (SPEECH, 10), (0.5, 10), (SPEECH, 4), (SILENCE, 200))) == ([], [])


def test_segments_longer_than_the_maximum_are_cut():
    silence = runs((SILENCE, 50), (SPEECH, 13_000), (SILENCE, 100))
    offline, online = whole(silence, step=97)
    # Cut at the frame past 60 s; the next segment starts right after (not 400 ms before).
    assert offline == [(240, 60250), (60250, 120260), (120260, 130660)]
    assert online_segments(online) == offline
    cut = whole(silence, {"max_single_segment_time": 3000}, step=13)[0]
    assert len(cut) > 40 and all(end - start <= 3010 for start, end in cut)


@pytest.mark.parametrize("end_ms", [800, 300, 1000])
def test_pauses_just_under_and_over_the_end_silence(end_ms):
    conf = {"max_end_silence_time": end_ms}
    # The end silence is counted from the window's stop (5 silent frames in) through the 14 speech
    # frames before the window starts speech again.
    shortest = EndpointOptions.from_config(conf).end_silence_frames + 5 - 14
    for pause in (shortest - 2, shortest - 1, shortest, shortest + 1):
        silence = runs((SILENCE, 100), (SPEECH, 200), (SILENCE, pause), (SPEECH, 200), (SILENCE, 200))
        assert len(whole(silence, conf)[0]) == (2 if pause >= shortest else 1), pause


@pytest.mark.parametrize("threshold, ratio", [(0.6, 1.0), (0.5, 1.0), (0.0, 1.0), (-0.2, 1.0), (0.5, 0.5),
                                              (0.3, 2.0), (1.0, 1.0)])
def test_speech_noise_threshold_edges(threshold, ratio):
    """Silence probabilities at, and one float32 step either side of, where speech wins."""
    edges = np.linspace(0, 1, 20_001, dtype=np.float32)[1:-1]
    p_speech, p_noise = 1.0 - edges.astype(np.float64), edges.astype(np.float64) ** ratio
    edge = edges[np.argmin(np.abs(p_speech - p_noise - threshold))]
    values = [np.nextafter(edge, np.float32(0)), edge, np.nextafter(edge, np.float32(1)),
              np.float32(0.2), np.float32(0.25), np.float32(0.5)]
    conf = {"speech_noise_thres": threshold, "speech_2_noise_ratio": ratio}
    for value in values:
        whole(runs((SILENCE, 50), (float(value), 300), (SILENCE, 100)), conf)
    rng = np.random.default_rng(int(threshold * 100 + ratio * 10 + 100))
    whole(rng.choice(np.array(values, np.float32), 2000), conf)


def test_certain_scores_decide_as_the_nearest_uncertain_ones():
    """FunASR fails on probabilities of exactly 0 or 1 (log of 0); here they decide like the
    nearest float32 values inside (0, 1)."""
    exact = runs((SILENCE, 50), (1.0, 100), (0.0, 300), (1.0, 100))
    inside = np.clip(exact, np.nextafter(np.float32(0), np.float32(1)), np.nextafter(np.float32(1), np.float32(0)))
    scores, samples = synthetic(exact)
    expected = funasr_reports({}, *synthetic(inside), [(0, exact.size)], False)
    assert our_reports({}, scores, samples, [(0, exact.size)], False) == expected == [[(1240, 4660)]]
    with pytest.raises(ValueError, match="math domain error"):
        funasr_reports({}, scores, samples, [(0, exact.size)], False)


def test_speech_too_quiet_for_the_snr_threshold_is_silence():
    """Speech-scored frames must be `snr_thres` dB above the running noise level (which starts at
    -100 dB, so speech before any noise frame always passes)."""
    silence = runs((SPEECH, 200), (SILENCE, 200), (SPEECH, 200), (SILENCE, 200), (SPEECH, 200), (SILENCE, 200))
    level = runs((0.01, 200), (0.1, 200), (0.01, 200), (0.1, 200), (1.0, 200), (0.1, 200))  # -14, 6, 26 dB
    assert len(whole(silence, {}, level)[0]) == 3
    assert len(whole(silence, {"snr_thres": 0.0}, level)[0]) == 2  # the quiet speech after noise is not
    assert len(whole(silence, {"snr_thres": 30.0}, level)[0]) == 1
    # Digital silence scored as speech is speech when no threshold applies.
    assert len(whole(silence, {}, runs((0.0, 200), (0.1, 200), (0.0, 200), (0.1, 400), (0.0, 200)))[0]) == 3


def test_random_sequences_decide_as_funasr():
    """Random scores, energies, options and chunkings (seeded)."""
    rng = np.random.default_rng(2024)
    cut = 0
    for case in range(120):
        frames = int(rng.integers(1, 1500))
        silence, level, pos = np.empty(frames, np.float32), np.empty(frames, np.float32), 0
        while pos < frames:  # regimes of scores and loudness
            count = min(int(rng.integers(1, 250)), frames - pos)
            low, high = sorted(rng.uniform(0, 1, 2))
            silence[pos:pos + count] = rng.uniform(low, high, count)
            level[pos:pos + count] = 0.0 if rng.random() < 0.1 else 10 ** rng.uniform(-4, 0)
            pos += count
        silence = np.clip(silence, 1e-6, 1 - 1e-6)
        conf = {} if case % 3 == 0 else random_options(rng)
        scores, samples = synthetic(silence, level, seed=case)
        offline = check_parity(conf, scores, samples, [(0, frames)])[0]
        assert check_parity(conf, scores, samples, random_bounds(frames, rng))[0] == offline
        cut += len(offline) > 1
    assert cut > 30  # the cases exercise more than one segment


def test_a_closing_segment_says_when_and_where_it_will_end():
    """`closing()` (what decoding ahead starts from), frame by frame: while the silence lasts it
    counts down a frame at a time to the close, with the end reported then; speech resuming
    withdraws it; a segment cut at its maximum length during the silence is never announced."""
    rng = np.random.default_rng(7)
    announced = 0
    for case in range(60):  # random sequences and options
        frames = int(rng.integers(200, 1500))
        silence = np.clip(np.repeat(rng.choice([SPEECH, SILENCE, 0.5], frames // 20 + 1), 20)[:frames], 1e-6, 1 - 1e-6)
        announced += _check_closing({} if case % 2 == 0 else random_options(rng), silence, case)
    assert announced > 1000
    for speech in range(200, 300, 3):  # the maximum length (3 s) reached in the trailing silence, or not
        _check_closing({"max_single_segment_time": 3000}, runs((SILENCE, 50), (SPEECH, speech), (SILENCE, 200)), speech)


def _check_closing(conf: dict, silence: np.ndarray, seed: int) -> int:
    """Feeds the frames one by one, checking each `closing()` against the next frame's outcome;
    how many frames had one."""
    scores, samples = synthetic(silence, seed=seed)
    detector = EndpointDetector(EndpointOptions.from_config(conf), online=True)
    ms, before, announced = detector.options.frame_ms, None, 0
    for part, piece, final in calls(scores, samples, steps(silence.size, 1)):
        closed = [end for _, end in detector.feed(part, piece, final) if end >= 0]
        now = detector.closing()
        if before is not None:
            left, end = before
            if closed and not final:
                assert (left, closed) == (ms, [end]), seed
            elif now is not None:
                assert now == (left - ms, end), seed
            announced += 1
        before = now
    return announced


def random_options(rng: np.random.Generator) -> dict:
    window = int(rng.integers(2, 30))
    return {"window_size_ms": window * 10 + int(rng.integers(0, 10)),
            "sil_to_speech_time_thres": int(rng.integers(2, window + 1)) * 10,
            "speech_to_sil_time_thres": int(rng.integers(0, window)) * 10 + int(rng.integers(0, 10)),
            "max_end_silence_time": int(rng.integers(0, 1500)),
            "max_single_segment_time": int(rng.integers(10, 5000)),
            "lookback_time_start_point": int(rng.integers(0, 500)),
            "lookahead_time_end_point": int(rng.integers(0, 500)),
            "speech_noise_thres": float(rng.uniform(-0.5, 0.9)),
            "speech_2_noise_ratio": float(rng.choice([1.0, rng.uniform(0.2, 3)])),
            "snr_thres": float(rng.choice([-100.0, rng.uniform(-30, 30)])),
            "noise_frame_num_used_for_snr": int(rng.integers(1, 200))}


# ---- memory ------------------------------------------------------------------------------------

def test_energies_are_held_only_until_their_scores_arrive():
    """Samples may run ahead of the scores (FunASR pairs them by frame number); nothing else
    accumulates over a long stream."""
    silence = runs((SILENCE, 100), (SPEECH, 300), (SILENCE, 300), (SPEECH, 300), (SILENCE, 100))
    scores, samples = synthetic(silence)
    frames = silence.size
    split = [(scores[:250], samples, False), (scores[250:], samples[:0], True)]
    from funasr_onnx.utils.e2e_vad import E2EVadModel

    for online in (False, True):
        reference, detector = E2EVadModel({}), EndpointDetector(EndpointOptions(), online)
        for i, (part, piece, final) in enumerate(split):
            found = reference(part[None], piece[None], is_final=final, online=online)
            assert detector.feed(part, piece, final) == [tuple(seg) for batch in found for seg in batch]
            assert detector.pending_frames == (frames - 250 if i == 0 else 0)
    with pytest.raises(ValueError, match="the samples cover 0 frames, fewer than the 10 scored"):
        EndpointDetector(EndpointOptions()).feed(scores[:10], samples[:0])

    detector = EndpointDetector(EndpointOptions(), online=True)
    long = runs(*[(SPEECH, 300), (SILENCE, 200)] * 200)
    scores, samples = synthetic(long)
    for part, piece, final in calls(scores, samples, steps(long.size, 7)):
        detector.feed(part, piece, final)
        assert detector.pending_frames == 0 and not detector._closed
        assert len(detector._window.votes) == 20


def test_stream_vad_steps_batched_per_loop_turn_equal_each_alone(model_repository):
    """asr_stream scores its streams' VAD steps in-process (LoopBatcher): the steps awaited in one
    turn of the event loop run as one ONNX Runtime call, and each stream gets the scores and
    caches it would get alone; steps of another length run in a call of their own."""
    from tritonasr.runtime.onnx_session import LoopBatcher

    spec = VadSpec.load(model_repository / "vad" / "1")
    model = OnnxModel(model_repository / "vad" / "1" / "model.onnx", intra_op_threads=1)
    batches = []  # the batch size of each ONNX Runtime call
    run = model.run
    model.run = lambda feeds, outputs: batches.append(feeds["speech"].shape[0]) or run(feeds, outputs)
    batcher = LoopBatcher(model)
    outputs = ["logits"] + [f"out_cache{i}" for i in range(len(spec.zero_caches()))]
    rng = np.random.default_rng(5)
    speech = [load_audio(DATA / name).samples for name in SPEECH_FILES[:4]]
    # Each stream: one step of 10 LFR frames (a 12-frame step for the last) from its own audio, with
    # the caches its earlier steps left.
    steps = []
    for i, samples in enumerate(speech):
        fbank = spec.frontend.fbank(samples[:16_000])
        feats = spec.frontend.lfr(fbank, 20, 32 if i == 3 else 30)[None]
        caches = [rng.standard_normal(c.shape).astype(np.float32) for c in spec.zero_caches()]
        steps.append({"speech": feats, **{f"in_cache{j}": c for j, c in enumerate(caches)}})

    async def all_at_once():
        return await asyncio.gather(*(batcher.infer(step, outputs) for step in steps))

    together = asyncio.run(all_at_once())
    assert sorted(batches) == [1, 3]  # the three 10-frame steps in one call, the 12-frame one alone
    for step, got in zip(steps, together):
        alone = run(step, outputs)
        for name, value in zip(outputs, got):
            np.testing.assert_allclose(value, alone[name], rtol=1e-5, atol=1e-6)
