"""From SenseVoice's greedy CTC tokens to text and rich tags (language, emotion, event)."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

LANGUAGES = {"zh", "en", "yue", "ja", "ko", "nospeech"}
EMOTIONS = {"HAPPY": "happy", "SAD": "sad", "ANGRY": "angry", "NEUTRAL": "neutral",
            "FEARFUL": "fearful", "DISGUSTED": "disgusted", "SURPRISED": "surprised",
            "EMO_UNKNOWN": None}
EVENTS = {"Speech": "speech", "BGM": "bgm", "Applause": "applause", "Laughter": "laughter",
          "Cry": "cry", "Sneeze": "sneeze", "Breath": "breath", "Cough": "cough",
          "Event_UNK": None}
_TAG = re.compile(r"<\|([^|<>]*)\|>")


def ctc_greedy(token_ids: np.ndarray, length: int, blank_id: int = 0) -> list[int]:
    """Collapse repeats and drop blanks over this sequence's own `length` frames only:
    frames past it are padding from the batch and must not leak into the text."""
    ids = np.asarray(token_ids[: int(length)])
    if ids.size == 0:
        return []
    keep = np.ones(ids.shape, dtype=bool)
    keep[1:] = ids[1:] != ids[:-1]
    ids = ids[keep]
    return ids[ids != blank_id].tolist()


@dataclass
class RichText:
    text: str
    language: str | None = None
    emotion: str | None = None
    event: str | None = None


def parse_rich_text(decoded: str) -> RichText:
    """Split SenseVoice's `<|en|><|NEUTRAL|><|Speech|><|woitn|>text` into fields.
    The first tag of each kind wins; every tag is removed from the text."""
    fields: dict[str, str | None] = {}
    for tag in _TAG.findall(decoded):
        if tag in LANGUAGES:
            fields.setdefault("language", tag)
        elif tag in EMOTIONS:
            fields.setdefault("emotion", EMOTIONS[tag])
        elif tag in EVENTS:
            fields.setdefault("event", EVENTS[tag])
    text = " ".join(_TAG.sub(" ", decoded).split())
    return RichText(text=text, **fields)


class Tokenizer:
    def __init__(self, model_file: Path):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def transcript(self, token_ids: np.ndarray, length: int, blank_id: int = 0) -> RichText:
        return parse_rich_text(self.decode(ctc_greedy(token_ids, length, blank_id)))


@dataclass
class Segment:
    start_ms: int
    end_ms: int
    text: str
    language: str | None = None
    emotion: str | None = None
    event: str | None = None
    speaker: dict | None = None  # {"id", "score", "label"[, "embedding"]}: see speakers.SpeakerSession
    words: list[dict] | None = None  # parakeet: [{"text", "start_ms", "end_ms"}]; sensevoice: None

    def to_dict(self) -> dict:
        return asdict(self)
