"""Endpointing: per-frame FSMN-VAD scores -> speech segments, decided frame by frame.

The decisions are FunASR's (its FSMN-VAD post-processing, `model_conf` in the model's
config.yaml), in the multi-utterance mode it runs by default:

- A frame is speech when its speech probability beats its silence probability by
  `speech_noise_thres` and it is loud enough against the running noise level (`snr_thres`).
- A sliding window of those votes smooths them: speech starts once `speech_start_ms` worth of the
  last `window_ms` are speech, and stops once no more than `speech_stop_ms` worth are.
- A segment opens when the window starts speech, reaching back over the window and
  `start_padding_ms` (never into an earlier segment). It closes after `end_silence_ms` of
  silence (keeping `end_padding_ms` of it), when it grows longer than `max_segment_ms`, or at
  the last frame of the recording.

Offline, a segment is reported once closed (and an open one at the end of the recording);
online, its start is reported as soon as it opens: (start_ms, -1), then (-1, end_ms), or
(start_ms, end_ms) when both fall in one call.

Memory stays bounded over hours: a frame's energy is kept only until its score arrives, and a
segment only until it is reported.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, fields
from enum import Enum

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# The energy of an all-zero frame: energies are 10*log10(sum of squares + 1e-6), never lower.
ENERGY_FLOOR_DB = 10 * math.log10(1e-6)

# FunASR's name (config.yaml `model_conf`) of each option.
_FUNASR_NAMES = {
    "sample_rate": "sample_rate",
    "frame_in_ms": "frame_ms",
    "frame_length_ms": "frame_length_ms",
    "window_size_ms": "window_ms",
    "sil_to_speech_time_thres": "speech_start_ms",
    "speech_to_sil_time_thres": "speech_stop_ms",
    "max_end_silence_time": "end_silence_ms",
    "max_single_segment_time": "max_segment_ms",
    "lookback_time_start_point": "start_padding_ms",
    "lookahead_time_end_point": "end_padding_ms",
    "speech_noise_thres": "speech_noise_thres",
    "speech_2_noise_ratio": "speech_to_noise_ratio",
    "snr_thres": "snr_thres",
    "noise_frame_num_used_for_snr": "noise_frames",
    "decibel_thres": "decibel_thres",
}
# FunASR keys that change nothing here: unused by FunASR itself, or used only by its
# single-utterance mode (max_start_silence_time) or diagnostics (output_frame_probs).
_IGNORED = {"snr_mode", "max_start_silence_time", "do_start_point_detection", "do_end_point_detection",
            "nn_eval_block_size", "dcd_block_size", "speech_noise_thresh_low", "speech_noise_thresh_high",
            "output_frame_probs"}
# FunASR keys with other values whose branches are not implemented: key -> (allowed?, why).
_REQUIRED = {
    "detect_mode": (lambda v: v == 1, "must be 1 (multi-utterance); the single-utterance mode is not implemented"),
    "do_extend": (lambda v: v == 1, "must be 1 (segments padded by the lookback/lookahead times); "
                                    "unpadded segments are not implemented"),
    "silence_pdf_num": (lambda v: v == 1, "must be 1: exactly one silence class is implemented"),
    "fe_prior_thres": (lambda v: v < 1, "must be below 1 (at 1 or more FunASR turns every speech frame "
                                        "into silence)"),
}


@dataclass(frozen=True)
class EndpointOptions:
    """How speech is told from silence and cut into segments; times in whole milliseconds.
    Defaults are FunASR's. Derived frame counts are the `*_frames` properties."""

    sample_rate: int = 16000
    frame_ms: int = 10  # frame shift: one score per frame
    frame_length_ms: int = 25  # the samples a frame's energy is measured over
    window_ms: int = 200  # the sliding vote window
    speech_start_ms: int = 150  # speech votes in the window that start speech
    speech_stop_ms: int = 150  # at most this many speech votes stop it
    end_silence_ms: int = 800  # silence that ends a segment
    max_segment_ms: int = 60000  # longer segments are cut
    start_padding_ms: int = 200  # audio kept before the window that started speech
    end_padding_ms: int = 100  # trailing silence kept in a segment
    speech_noise_thres: float = 0.6  # speech wins when p(speech) >= p(silence)**ratio + this
    speech_to_noise_ratio: float = 1.0
    silence_class: int = 0  # the score column of silence; the others are speech
    snr_thres: float = -100.0  # dB a speech frame must be above the running noise level
    noise_frames: int = 100  # the noise level averages about this many noise frames
    decibel_thres: float = -100.0  # only values that never gate (see __post_init__)

    @classmethod
    def from_config(cls, conf: dict) -> "EndpointOptions":
        """From FunASR's `model_conf` (meta.json's `vad_post`); missing keys take FunASR's
        defaults. Keys or values this implementation cannot honour are refused."""
        unknown = set(conf) - set(_FUNASR_NAMES) - _IGNORED - set(_REQUIRED) - {"sil_pdf_ids"}
        if unknown:
            raise ValueError(f"unknown VAD options: {', '.join(sorted(unknown))}")
        for key, (allowed, why) in _REQUIRED.items():
            if key in conf and not allowed(conf[key]):
                raise ValueError(f"VAD option {key}={conf[key]!r} is not supported: it {why}")
        values = {ours: conf[theirs] for theirs, ours in _FUNASR_NAMES.items() if theirs in conf}
        if "sil_pdf_ids" in conf:
            ids = list(conf["sil_pdf_ids"])
            if len(ids) != 1:
                raise ValueError(f"VAD option sil_pdf_ids={ids!r} is not supported: exactly one silence "
                                 "class is implemented")
            values["silence_class"] = ids[0]
        return cls(**values)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"endpoint option {f.name} must be a finite number, got {value!r}")
            if f.type == "int":
                if value != int(value):
                    raise ValueError(f"endpoint option {f.name} must be a whole number, got {value!r}")
                object.__setattr__(self, f.name, int(value))
        for name in ("sample_rate", "frame_ms", "frame_length_ms", "noise_frames"):
            if getattr(self, name) <= 0:
                raise ValueError(f"endpoint option {name} must be positive, got {getattr(self, name)}")
        for name in ("speech_stop_ms", "end_silence_ms", "start_padding_ms", "end_padding_ms", "silence_class"):
            if getattr(self, name) < 0:
                raise ValueError(f"endpoint option {name} must not be negative, got {getattr(self, name)}")
        if self.window_frames < 1:
            raise ValueError(f"window_ms={self.window_ms} is shorter than a frame ({self.frame_ms} ms)")
        if not 2 <= self.start_votes <= self.window_frames:
            # One vote could reopen a segment on the frame right after one closed, where FunASR's
            # bookkeeping goes stale; more votes than the window holds never start speech.
            raise ValueError(f"speech_start_ms={self.speech_start_ms} must be between 2 frames and the window "
                             f"({2 * self.frame_ms}..{self.window_ms} ms)")
        if self.stop_votes >= self.window_frames:
            raise ValueError(f"speech_stop_ms={self.speech_stop_ms} must be shorter than the window "
                             f"({self.window_ms} ms), or speech stops as soon as it starts")
        if self.max_segment_frames < 1:
            raise ValueError(f"max_segment_ms={self.max_segment_ms} is shorter than a frame")
        if self.speech_to_noise_ratio <= 0:
            raise ValueError(f"speech_to_noise_ratio must be positive, got {self.speech_to_noise_ratio}")
        if self.decibel_thres > ENERGY_FLOOR_DB:
            # FunASR feeds a frame below decibel_thres to its window twice, an accounting slip
            # that shifts later segments; thresholds at or below the floor never gate a frame.
            raise ValueError(f"decibel_thres={self.decibel_thres} is not supported: gating frames by energy is "
                             f"not implemented (use at most {ENERGY_FLOOR_DB:g} dB, where it has no effect; "
                             "snr_thres gates quiet frames)")

    @property
    def window_frames(self) -> int:
        return self.window_ms // self.frame_ms

    @property
    def start_votes(self) -> int:
        return self.speech_start_ms // self.frame_ms

    @property
    def stop_votes(self) -> int:
        return self.speech_stop_ms // self.frame_ms

    @property
    def start_lookback_frames(self) -> int:
        """How far before the frame that started speech a segment begins."""
        return self.window_frames + self.start_padding_ms // self.frame_ms

    @property
    def end_padding_frames(self) -> int:
        return self.end_padding_ms // self.frame_ms

    @property
    def _end_silence_after_stop_ms(self) -> int:
        # FunASR counts end silence from the window's stop decision, and shortens it by
        # speech_stop_ms for that.
        return self.end_silence_ms - self.speech_stop_ms

    @property
    def end_silence_frames(self) -> int:
        """Silent frames after the window stopped speech that close a segment."""
        return max(1, -(-self._end_silence_after_stop_ms // self.frame_ms))

    @property
    def end_lookback_frames(self) -> int:
        """How far before the frame that closes a segment its last frame is (keeping the
        end padding)."""
        return max(0, self._end_silence_after_stop_ms // self.frame_ms - self.end_padding_frames - 1)

    @property
    def max_segment_frames(self) -> int:
        return self.max_segment_ms // self.frame_ms

    @property
    def frame_samples(self) -> int:
        return self.frame_length_ms * self.sample_rate // 1000

    @property
    def hop_samples(self) -> int:
        return self.frame_ms * self.sample_rate // 1000


def frame_energies(samples: np.ndarray, options: EndpointOptions) -> list[float]:
    """Each frame's energy in dB: 10*log10(sum of squares + 1e-6) over frame_length_ms, every
    frame_ms (only whole frames)."""
    samples = np.asarray(samples)
    if not np.issubdtype(samples.dtype, np.floating):
        samples = samples.astype(np.float32)
    size, hop = options.frame_samples, options.hop_samples
    if samples.ndim != 1:
        raise ValueError(f"samples must be one channel (1-D), got shape {samples.shape}")
    if samples.size < size:
        return []
    power = np.square(sliding_window_view(samples, size)[::hop]).sum(axis=1)
    # The logarithm per frame, in double precision: the thresholds compare exact values.
    return [10 * math.log10(p + 1e-6) for p in power.tolist()]


class _Vote(Enum):
    """What the window made of the latest frame."""

    SILENCE = 0  # was silence and stays so
    STARTED = 1  # speech starts here
    SPEECH = 2  # was speech and stays so
    STOPPED = 3  # speech stops here


class _VoteWindow:
    """The last `window_frames` speech/silence votes, with hysteresis: speech starts at
    `start_votes` speech votes, and stops at `stop_votes` or fewer."""

    def __init__(self, options: EndpointOptions):
        self.size, self.start_votes, self.stop_votes = options.window_frames, options.start_votes, options.stop_votes
        self.reset()

    def reset(self) -> None:
        self.votes = deque([False] * self.size, maxlen=self.size)
        self.speech_votes = 0
        self.in_speech = False

    def push(self, speech: bool) -> _Vote:
        self.speech_votes += speech - self.votes[0]
        self.votes.append(speech)
        if not self.in_speech and self.speech_votes >= self.start_votes:
            self.in_speech = True
            return _Vote.STARTED
        if self.in_speech and self.speech_votes <= self.stop_votes:
            self.in_speech = False
            return _Vote.STOPPED
        return _Vote.SPEECH if self.in_speech else _Vote.SILENCE


@dataclass
class _Segment:
    first: int  # frame numbers
    last_voiced: int  # the last frame taken into the segment so far
    closed_at: int | None = None  # its last frame, once closed
    start_reported: bool = False  # online: (start, -1) went out


class EndpointDetector:
    """One recording's (or stream's) endpointing. `feed` it the scores of the next frames with the
    samples they were computed from, in order; it returns the segments decided. After the
    `final` call it starts over for a new recording."""

    def __init__(self, options: EndpointOptions, online: bool = False):
        self.options = options
        self.online = online
        self._unscored_db: deque[float] = deque()  # energies of frames whose scores are to come
        self._start_over()

    def _start_over(self) -> None:
        self._unscored_db.clear()
        self._window = _VoteWindow(self.options)
        self._frame = 0  # the next frame's number
        self._after_last_segment = 0  # a new segment starts here at the earliest
        self._noise_db = -100.0  # FunASR's initial noise level, the SNR reference until a noise frame
        self._noise_heard = False
        self._open: _Segment | None = None
        self._silent_frames = 0  # in a segment, since the window stopped speech
        self._closed: list[_Segment] = []  # closed during this call

    @property
    def pending_frames(self) -> int:
        """Frames whose energy is held, waiting for their scores (0 when samples and scores come
        together, as the pipeline feeds them)."""
        return len(self._unscored_db)

    def closing(self) -> tuple[int, int] | None:
        """In an open segment's trailing silence: (ms of silence still to come before it closes,
        the end it is then reported with), both fixed as long as the silence lasts; None when no
        segment is open, speech goes on, or its maximum length would close it first."""
        segment, o = self._open, self.options
        if segment is None or self._silent_frames == 0:
            return None
        closes_at = self._frame - 1 - self._silent_frames + o.end_silence_frames
        if closes_at - segment.first > o.max_segment_frames:
            return None
        return (closes_at - self._frame + 1) * o.frame_ms, (closes_at - o.end_lookback_frames + 1) * o.frame_ms

    def feed(self, scores: np.ndarray, samples: np.ndarray, final: bool = False) -> list[tuple[int, int]]:
        """scores [T, C] of the next T frames, samples: the audio those frames cover."""
        scores = np.asarray(scores)
        if scores.ndim != 2:
            raise ValueError(f"scores must be [frames, classes], got shape {scores.shape}")
        self._unscored_db.extend(frame_energies(samples, self.options))
        count = scores.shape[0]
        if count > len(self._unscored_db):
            raise ValueError(f"the samples cover {len(self._unscored_db)} frames, fewer than the {count} scored")
        if not 0 <= self.options.silence_class < scores.shape[1]:
            raise ValueError(f"silence_class {self.options.silence_class} is not a column of scores {scores.shape}")
        silence = scores[:, self.options.silence_class].tolist()
        for i, p_silence in enumerate(silence):
            speech = self._is_speech(p_silence, self._unscored_db.popleft())
            self._decide(speech, final and i == count - 1)
            self._frame += 1
        reports = self._reports(final)
        if final:
            self._start_over()
        return reports

    def _is_speech(self, p_silence: float, db: float) -> bool:
        o = self.options
        # FunASR compares the probabilities after a log -> exp round trip; so do we, so that the
        # decisions are the same to the last bit. (Log of 0 is taken as -inf: FunASR fails there.)
        p_speech = _exp_log(1.0 - p_silence)
        p_noise = _exp_log(p_silence, o.speech_to_noise_ratio)
        if p_speech >= p_noise + o.speech_noise_thres:
            return db - self._noise_db >= o.snr_thres
        # Noise frames set the noise level, a running average of about `noise_frames`.
        if self._noise_heard:
            self._noise_db = (db + self._noise_db * (o.noise_frames - 1)) / o.noise_frames
        else:
            self._noise_db, self._noise_heard = db, True
        return False

    def _decide(self, speech: bool, last: bool) -> None:
        """One frame through the window and the segment rules."""
        o, t = self.options, self._frame
        vote = self._window.push(speech)
        segment = self._open
        if segment is None:  # the window is in silence
            if vote is _Vote.STARTED:
                first = max(self._after_last_segment, t - o.start_lookback_frames)
                self._open = _Segment(first, last_voiced=t)
                self._silent_frames = 0
            return  # (a segment opened on the last frame stays open: FunASR does not close it)
        self._silent_frames = self._silent_frames + 1 if vote is _Vote.SILENCE else 0
        if vote is _Vote.SILENCE and self._silent_frames >= o.end_silence_frames:
            self._close(t - o.end_lookback_frames)
        elif t - segment.first + 1 > o.max_segment_frames:
            self._close(t)
        elif last:
            self._close(t)
        elif vote is not _Vote.SILENCE or self._silent_frames <= o.end_padding_frames:
            segment.last_voiced = t
        # else: trailing silence, taken in only if speech resumes

    def _close(self, last_frame: int) -> None:
        self._open.closed_at = last_frame
        self._closed.append(self._open)
        self._open = None
        self._after_last_segment = last_frame + 1
        self._window.reset()
        self._silent_frames = 0

    def _reports(self, final: bool) -> list[tuple[int, int]]:
        ms = self.options.frame_ms
        out = []
        for segment in self._closed:
            start = -1 if self.online and segment.start_reported else segment.first * ms
            out.append((start, (segment.closed_at + 1) * ms))
        self._closed = []
        segment = self._open
        if segment is not None:
            if self.online and not segment.start_reported:
                out.append((segment.first * ms, -1))
                segment.start_reported = True
            elif not self.online and final:  # the recording ends inside it
                out.append((segment.first * ms, (segment.last_voiced + 1) * ms))
        return out


def _exp_log(p: float, power: float = 1.0) -> float:
    """exp(log(p) * power), with log(0) = -inf (p is a probability)."""
    return math.exp(math.log(p) * power) if p > 0 else 0.0
