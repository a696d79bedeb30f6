"""The samples a reader collects while streaming a source, in compact arrays (:class:`FactCollector`)."""
from __future__ import annotations

import array
from collections import Counter
from typing import Sequence

import numpy as np

from .fact_file import Fact


class FactCollector:
    """Accumulates samples in compact arrays while streaming.

    A sample is three phrase ids (subject, predicate/attribute, object; -1 = absent slot),
    an image id, a box x, y, w, h and a split code: 37 bytes. Facts are not interned one by one (a
    Visual Genome dump holds about a million distinct facts, most of them seen once);
    :meth:`fact_table` finds the distinct facts with numpy at the end. Phrase id 0 is
    reserved for the empty phrase ("nothing left after cleaning").
    """

    def __init__(self) -> None:
        self.phrases: list[str] = [""]
        self.phrase_ids: dict[str, int] = {"": 0}
        self.sample_subject = array.array("i")
        self.sample_predicate = array.array("i")
        self.sample_object = array.array("i")
        self.sample_image = array.array("q")
        self.sample_box = array.array("f")
        self.sample_split = array.array("b")
        self.dropped: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()

    def phrase_id(self, phrase: str) -> int:
        """Id of the (cleaned) phrase, added to the table on first sight; 0 for ``""``."""
        phrase_id = self.phrase_ids.get(phrase)
        if phrase_id is None:
            phrase_id = self.phrase_ids[phrase] = len(self.phrases)
            self.phrases.append(phrase)
        return phrase_id

    def add_ids(self, subject: int, predicate: int, obj: int, image_id: int, x: float, y: float, w: float, h: float,
                split: int = -1) -> None:
        """Record one sample by phrase ids (-1 for an absent slot); ``split`` -1 means "decide later"."""
        self.sample_subject.append(subject)
        self.sample_predicate.append(predicate)
        self.sample_object.append(obj)
        self.sample_image.append(image_id)
        self.sample_box.extend((x, y, w, h))
        self.sample_split.append(split)

    def add(self, fact: Fact, image_id: int, x: float, y: float, w: float, h: float, split: int = -1) -> None:
        """Record one sample of ``fact`` (cleaned strings) in image ``image_id`` with region box x, y, w, h."""
        subject, predicate, obj = fact
        self.add_ids(self.phrase_id(subject), -1 if predicate is None else self.phrase_id(predicate),
                     -1 if obj is None else self.phrase_id(obj), image_id, x, y, w, h, split)

    def __len__(self) -> int:
        return len(self.sample_subject)

    def fact_table(self) -> tuple[np.ndarray, np.ndarray]:
        """``(slots int64 [U, 3], sample_fact int64 [N])``: the distinct (s, p, o) phrase-id triples and each sample's row."""
        subjects = np.frombuffer(self.sample_subject, dtype=np.int32)
        predicates = np.frombuffer(self.sample_predicate, dtype=np.int32)
        objects = np.frombuffer(self.sample_object, dtype=np.int32)
        if len(subjects) == 0:
            return np.zeros((0, 3), dtype=np.int64), np.zeros(0, dtype=np.int64)
        base = len(self.phrases) + 1
        if base ** 3 < 2 ** 62:
            # pack (s, p, o) into one int64 key; -1 (absent) becomes 0
            keys = subjects.astype(np.int64)
            keys += 1
            keys *= base
            keys += predicates
            keys += 1
            keys *= base
            keys += objects
            keys += 1
            unique_keys, sample_fact = np.unique(keys, return_inverse=True)
            del keys
            unique = np.stack([unique_keys // (base * base) - 1, (unique_keys // base) % base - 1,
                               unique_keys % base - 1], axis=1)
        else:  # more than ~1.6M distinct phrases: compare rows instead of packed keys
            slots = np.stack([subjects, predicates, objects], axis=1)
            unique, sample_fact = np.unique(slots, axis=0, return_inverse=True)
            unique = unique.astype(np.int64)
        return unique, sample_fact.reshape(-1).astype(np.int64, copy=False)

    def fact(self, slots: Sequence[int]) -> Fact:
        """The fact tuple of one row of :meth:`fact_table`."""
        subject, predicate, obj = (int(v) for v in slots)
        phrases = self.phrases
        return (phrases[subject], phrases[predicate] if predicate >= 0 else None, phrases[obj] if obj >= 0 else None)
