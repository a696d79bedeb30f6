"""Task-by-task training of the fact embedding (triplets.train, `mas-triplets train`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data_prep.facts_h5 import write_fact_file
from mas_core.errors import CheckpointMismatchError
from triplets.config import to_dict
from triplets.errors import ConfigError, RunFolderError


def make_tiny_fact_file(path: Path, *, num_tasks: int = 4, facts_per_task: int = 12, train_per_fact: int = 8,
                        test_per_fact: int = 3, image_size: int = 16, slot_dim: int = 16, seed: int = 0) -> Path:
    """A small fact world: every fact has its own smooth colour template (8×8 random colours
    upsampled), every sample is that template plus noise; language vectors are random per word.
    Each task mixes <S>, <S,P> and <S,P,O> facts with task-specific subjects."""
    rng = np.random.default_rng(seed)
    predicates = [f"pred{i}" for i in range(4)]
    facts, task_of_fact = [], []
    for task in range(num_tasks):
        for k in range(facts_per_task):
            subject = f"subj{task}_{k % 6}"
            order = 1 + k % 3
            if order == 1:
                fact = (subject, None, None)
            elif order == 2:
                fact = (subject, predicates[k % 4], None)
            else:
                fact = (subject, predicates[(k + 1) % 4], f"obj{(task * 7 + k) % 10}")
            if fact in facts:
                fact = (f"{subject}x{k}", fact[1], fact[2])
            facts.append(fact)
            task_of_fact.append(task)
    words: dict[str, np.ndarray] = {}

    def vector(word):
        if word is None:
            return np.zeros(slot_dim, np.float32)
        if word not in words:
            words[word] = rng.normal(size=slot_dim).astype(np.float32)
        return words[word]

    fact_embeddings = np.stack([np.concatenate([vector(s), vector(p), vector(o)]) for s, p, o in facts])
    templates = rng.uniform(0, 1, size=(len(facts), 8, 8, 3))
    templates = templates.repeat(image_size // 8, axis=1).repeat(image_size // 8, axis=2)
    sample_fact, sample_split, pixels = [], [], []
    for fact_id in range(len(facts)):
        for split, count in ((0, train_per_fact), (1, test_per_fact)):
            for _ in range(count):
                image = np.clip(templates[fact_id] + rng.normal(0, 0.15, templates[fact_id].shape), 0, 1)
                pixels.append((image * 255).round().astype(np.uint8))
                sample_fact.append(fact_id)
                sample_split.append(split)
    n = len(sample_fact)
    return write_fact_file(
        path, facts=facts, sample_fact=np.array(sample_fact), sample_image_id=np.arange(n),
        sample_box=np.tile(np.array([0, 0, image_size, image_size], np.float32), (n, 1)),
        sample_split=np.array(sample_split, np.int8), task_of_fact=np.array(task_of_fact),
        sample_pixels=np.stack(pixels), provenance={"source": "tests/test_train.py tiny world"},
        fact_embeddings=fact_embeddings, encoder_name="random-words",
    )
