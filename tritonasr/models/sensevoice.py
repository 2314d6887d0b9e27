"""SenseVoice's spec: what the pipelines need to know beside its graph (its meta.json): the fbank
front end, the tokenizer, and the ids of its language and text-normalisation queries."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tritonasr.errors import InputError
from tritonasr.models.fbank import Frontend
from tritonasr.models.meta import read_meta
from tritonasr.models.transcript import Tokenizer


@dataclass(frozen=True)
class SenseVoiceSpec:
    """What the pipeline needs to know about the exported `sensevoice` graph (its meta.json)."""

    frontend: Frontend
    tokenizer: Tokenizer
    blank_id: int
    lid_dict: dict[str, int]
    textnorm_dict: dict[str, int]

    @staticmethod
    def meta(*, frontend: Mapping, blank_id: int, lid_dict: Mapping[str, int],
             textnorm_dict: Mapping[str, int]) -> dict:
        """The meta.json keys `load` reads. frontend: FunASR's frontend_conf."""
        return {"frontend": dict(frontend), "blank_id": blank_id, "lid_dict": dict(lid_dict),
                "textnorm_dict": dict(textnorm_dict)}

    @staticmethod
    def frontend_of(meta: Mapping) -> Frontend:
        return Frontend.from_config(meta["frontend"])

    @classmethod
    def load(cls, model_dir: Path) -> "SenseVoiceSpec":
        meta = read_meta(model_dir)
        return cls(cls.frontend_of(meta), Tokenizer(Path(model_dir) / "tokenizer.model"),
                   int(meta.get("blank_id", 0)), meta["lid_dict"], meta["textnorm_dict"])

    def query_ids(self, language: str, use_itn: bool) -> tuple[int, int]:
        if language not in self.lid_dict:
            known = ", ".join(sorted(k for k in self.lid_dict if k != "nospeech"))
            raise InputError(f"unknown language {language!r}; use one of: {known}")
        return self.lid_dict[language], self.textnorm_dict["withitn" if use_itn else "woitn"]
