"""Queries against a trained run: image → facts and text → images and facts.

- **image → facts**: the image is decoded (PIL), the box ``(x, y, w, h)`` in pixels is
  cropped (``floor(x), floor(y), ceil(x+w), ceil(y+h)``, clipped to the image, as
  ``data_prep`` crops regions), resized to the fact file's ``image_size`` (bilinear),
  scaled to [0, 1], embedded with the method's model (``embed``: the L2-normalised S‖P‖O
  vector) and searched in the fact index: the cosine with every known fact's language
  vector, as in the generalized evaluation.
- **text → images and facts**: the text is parsed into a fact (:func:`parse_fact_text`),
  embedded with the run's text encoder in the same slot layout (S‖P‖O, a missing slot a
  zero vector) — so facts never seen in training work (zero-shot) — and searched in the
  image index (the model's embeddings of all test images) and the fact index. Both rank
  by cosine. A fact already in the vocabulary uses its cached vector from the fact file
  (identical to what the encoder gives, and no encoder needs loading).

Indexes: ``RUN/<method>/index/facts.faiss`` and ``images.faiss`` when the training run
saved them (they must carry the fingerprint of the method's model and of the fact
vocabulary, else a :class:`RunFolderError` names both; delete the folder to rebuild);
otherwise exact (flat) indexes are built in memory and nothing is written.

Scripts use :func:`query_image` and :func:`query_text`, or :func:`open_query` to keep one
model, encoder and pair of indexes loaded across many queries.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from data_prep.image_decode import (
    DECODE_ERRORS, DEFAULT_MAX_IMAGE_PIXELS, ImageTooLargeError, decode_rgb, to_rgb8,
)

from ..errors import RunFolderError, TripletsError
from ..facts.data import fact_image_dataset
from ..facts.evaluate import embed_images
from ..fingerprint import VOCABULARY_KEY, fact_vocabulary_fingerprint, model_fingerprint
from ..index import build_index, check_exact_backend, load_index
from ..run_folder import load_run
from ..runner import method_folder

Fact = tuple[str, "str | None", "str | None"]


# ----------------------------------------------------------------------------- text → fact
def _normalise_phrase(text: str) -> str:
    return " ".join(text.lower().split())


def parse_fact_text(text: str, vocabulary: Sequence[Sequence[Any]] = ()) -> Fact:
    """Parse a query text into a fact ``(S, P | None, O | None)``.

    Accepted forms, in this order:

    1. ``"<S, P, O>"``, ``"<S, P>"``, ``"<S>"``: angle brackets, slots separated by commas;
    2. ``"S|P|O"``, ``"S|P"``, ``"S"`` with at least one ``|``: slots separated by bars;
    3. a plain phrase such as ``"man riding horse"``, matched against the nouns of
       ``vocabulary`` (the subjects and objects of the known facts, compared lowercased with
       single spaces): S is the longest known noun that starts the phrase; O is the longest
       known noun that ends the rest while leaving at least one word; the words between are
       P. No O found: ``<S, rest>``; nothing after S: ``<S>``; no known noun starts the
       phrase: the whole phrase is S.

    Raises :class:`TripletsError` for an empty text, more than three slots, an empty
    subject, or an object without a predicate.
    """
    stripped = text.strip() if isinstance(text, str) else ""
    if not stripped:
        raise TripletsError("the query text is empty; give a fact like 'man|riding|horse' or 'man riding horse'")
    bracketed = re.fullmatch(r"<(.*)>", stripped, flags=re.DOTALL)
    if bracketed or "|" in stripped:
        parts = [" ".join(part.split()) for part in (bracketed.group(1).split(",") if bracketed else stripped.split("|"))]
        if len(parts) > 3:
            raise TripletsError(f"query {text!r} has {len(parts)} slots; a fact has at most 3 (subject, predicate, object)")
        parts += [""] * (3 - len(parts))
        subject, predicate, obj = (part or None for part in parts)
        if subject is None:
            raise TripletsError(f"query {text!r} has an empty subject; give at least the subject")
        if obj is not None and predicate is None:
            raise TripletsError(f"query {text!r} has an object but no predicate; give <S, P, O>")
        return subject, predicate, obj
    nouns: dict[str, str] = {}
    for fact in vocabulary:
        for slot in (fact[0], fact[2] if len(fact) > 2 else None):
            if slot:
                nouns.setdefault(_normalise_phrase(str(slot)), str(slot))
    words = _normalise_phrase(stripped).split()
    subject_length = next((n for n in range(len(words), 0, -1) if " ".join(words[:n]) in nouns), 0)
    if subject_length == 0:
        return " ".join(words), None, None
    subject = nouns[" ".join(words[:subject_length])]
    rest = words[subject_length:]
    if not rest:
        return subject, None, None
    object_length = next((n for n in range(len(rest) - 1, 0, -1) if " ".join(rest[-n:]) in nouns), 0)
    if object_length == 0:
        return subject, " ".join(rest), None
    return subject, " ".join(rest[:-object_length]), nouns[" ".join(rest[-object_length:])]


def fact_text(fact: Sequence[Any]) -> str:
    """``<S, P, O>`` rendering of a fact with its absent slots left out."""
    return "<" + ", ".join(str(part) for part in fact if part) + ">"


# ----------------------------------------------------------------------------- images
def load_image(image: Any, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Any:
    """An RGB ``PIL.Image`` from a path, a ``PIL.Image`` or a uint8 array [H, W, 3].

    A file is decoded as every prepared image is (:func:`data_prep.image_decode.decode_rgb`):
    once, after checking from its header that ``width * height <= max_pixels``, and converted to
    8-bit RGB by scaling (16-bit, float, palette and alpha images included), so a query image
    looks like the training crops. A PIL image is converted by the same rules.
    Raises :class:`TripletsError` for a missing file, one that does not decode or a too large one.
    """
    if isinstance(image, Image.Image):
        try:
            return to_rgb8(image)
        except ValueError as exc:
            raise TripletsError(f"cannot use this image ({exc})") from None
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise TripletsError(f"an image array must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        return Image.fromarray(np.ascontiguousarray(image))
    if not isinstance(image, (str, os.PathLike)):
        raise TripletsError(f"give an image file path, a PIL image or a uint8 array, not {type(image).__name__}")
    path = Path(image)
    if not path.is_file():
        raise TripletsError(f"image file not found: {path}")
    try:
        return decode_rgb(path, max_pixels)
    except ImageTooLargeError as exc:  # prepare's advice (raise --max-image-pixels) is not an option of a query
        declared = str(exc).split("; raise --max-image-pixels")[0]
        raise TripletsError(f"{declared}; a query decodes at most {max_pixels:,} pixels: scale the image down "
                            "(or crop it to the region) and query again") from None
    except (*DECODE_ERRORS, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise TripletsError(f"cannot decode {path} as an image ({reason}); give a PNG or JPEG file") from None


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``"x,y,w,h"`` → four floats (pixels); TripletsError when malformed or w, h ≤ 0."""
    parts = [part.strip() for part in str(text).split(",")]
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise TripletsError(f"--box expects four numbers x,y,w,h in pixels, got {text!r}")
    return values  # type: ignore[return-value]


def crop_and_resize(image: Any, box: Sequence[float] | None, size: int) -> np.ndarray:
    """The region ``box`` = (x, y, w, h) of an RGB PIL image, resized to uint8 [size, size, 3].

    The crop is ``(floor x, floor y, ceil(x+w), ceil(y+h))`` clipped to the image; a box of
    non-positive size or outside the image raises :class:`TripletsError`.
    """
    if box is not None:
        if len(box) != 4:
            raise TripletsError(f"a box is (x, y, w, h), got {tuple(box)!r}")
        x, y, w, h = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            raise TripletsError(f"box {tuple(box)!r} must have positive width and height")
        left, top = max(0, math.floor(x)), max(0, math.floor(y))
        right, bottom = min(image.width, math.ceil(x + w)), min(image.height, math.ceil(y + h))
        if right <= left or bottom <= top:
            raise TripletsError(f"box {tuple(box)!r} lies outside the {image.width}×{image.height} image")
        image = image.crop((left, top, right, bottom))
    return np.asarray(image.resize((int(size), int(size)), Image.BILINEAR), dtype=np.uint8)


# ----------------------------------------------------------------------------- the engine
def _default_method(methods: Sequence[str]) -> str:
    return next((m for m in methods if m == "mas"), next((m for m in methods if m.startswith("mas")), methods[0]))


class QueryEngine:
    """One method of a run, loaded once: its model, the fact and image indexes, the text encoder.

    Build it with :func:`open_query`; use as a context manager (closes the run's fact file
    when the engine opened the run itself).
    """

    def __init__(self, run: Any, method: str | None = None, *, device: str = "cpu", encoder: Any = None,
                 owns_run: bool = False, exact_backend: str | None = None) -> None:
        self.run = run
        # how the flat indexes search: the argument, else the run's eval.exact_backend, else "auto"
        configured = getattr(getattr(getattr(run, "config", None), "eval", None), "exact_backend", "auto")
        self.exact_backend = check_exact_backend(configured if exact_backend is None else exact_backend)
        self._owns_run = owns_run
        methods = list(run.methods)
        if not methods:
            raise RunFolderError(f"{run.dir} has no trained method")
        self.method = _default_method(methods) if method is None else method
        self.device = device
        self.fact_file = run.fact_file
        if self.fact_file.fact_embeddings is None:
            raise RunFolderError(f"the run's fact file {self.fact_file.path} holds no language embeddings")
        self.model = run.load_model(self.method, device=device)
        self.model.eval()
        self.fingerprint = model_fingerprint(self.model)
        self.facts: list[Fact] = [tuple(f) for f in self.fact_file.facts]  # type: ignore[misc]
        self._fact_lookup = {tuple(_normalise_phrase(s) if s else None for s in f): i for i, f in enumerate(self.facts)}
        self._encoder_spec = encoder
        self._encoder: Any = None
        self._fact_index: Any = None
        self._image_index: Any = None

    # -- resources ---------------------------------------------------------------------------
    @property
    def index_dir(self) -> Path:
        """Where the run keeps this method's FAISS indexes."""
        return Path(self.run.dir) / method_folder(self.method) / "index"

    def _vocabulary_fingerprint(self) -> str | None:
        return fact_vocabulary_fingerprint(self.fact_file)

    def _load_or_build(self, name: str, vectors_and_ids) -> Any:
        path = self.index_dir / f"{name}.faiss"
        if path.is_file():
            index = load_index(path, expected_fingerprint=self.fingerprint, exact_backend=self.exact_backend)
            saved = index.metadata.get(VOCABULARY_KEY)
            current = self._vocabulary_fingerprint()
            if saved is not None and current is not None and saved != current:
                raise RunFolderError(f"index {path} was built for fact vocabulary {saved}, the run's fact file has "
                                     f"{current}; delete {self.index_dir} to rebuild it")
            self._check_contents(path, name, index)
            return index
        vectors, ids = vectors_and_ids()
        return build_index(vectors, kind="flat", ids=ids, fingerprint=self.fingerprint, exact_backend=self.exact_backend)

    def _check_contents(self, path: Path, name: str, index: Any, samples: int = 8) -> None:
        """What a forged index whose checksum and fingerprint were updated too cannot hide: its ids
        (the fact ids 0..F-1, or the fact file's test samples in order) and, for the exact kinds
        (flat, hnsw), ``samples`` of its vectors, spread over the ids: the known vector (a fact's
        language vector, or the model's embedding of a test image) must find itself (cosine
        ≥ 0.999). :class:`RunFolderError` names the index otherwise."""
        if name == "facts":
            expected_ids = np.arange(len(self.facts))
        else:
            expected_ids = np.asarray(self.fact_file.sample_indices(None, "test"), dtype=np.int64)
        ids = index.ids if index.ids is not None else np.arange(index.count)
        if index.count != len(expected_ids) or not np.array_equal(np.asarray(ids), expected_ids):
            raise RunFolderError(f"index {path} holds {index.count} vectors whose ids are not the run's "
                                 f"{'facts' if name == 'facts' else 'test images'}; delete {self.index_dir} to rebuild it")
        if index.kind not in ("flat", "hnsw") or not len(expected_ids):
            return
        chosen = np.unique(np.linspace(0, len(expected_ids) - 1, num=min(samples, len(expected_ids))).round().astype(int))
        if name == "facts":
            queries = np.asarray(self.fact_file.fact_embeddings[np.sort(expected_ids[chosen])], dtype=np.float32)
        else:
            queries = self.embed_pixels(self.fact_file.pixels(np.sort(expected_ids[chosen])))
        scores, _ = index.search(queries, 1)
        if not bool(np.all(scores[:, 0] >= 0.999)):
            raise RunFolderError(f"index {path} does not hold the vectors of this run's "
                                 f"{'facts' if name == 'facts' else 'model on its test images'} (checked {len(chosen)}); "
                                 f"delete {self.index_dir} to rebuild it")

    @property
    def fact_index(self) -> Any:
        """The index of the known facts' language vectors (ids = fact ids)."""
        if self._fact_index is None:
            vectors = np.asarray(self.fact_file.fact_embeddings, dtype=np.float32)
            self._fact_index = self._load_or_build("facts", lambda: (vectors, np.arange(len(vectors))))
        return self._fact_index

    @property
    def image_index(self) -> Any:
        """The index of the model's embeddings of every test image (ids = sample indices)."""
        if self._image_index is None:
            def embed_test_images():
                vectors, _ = embed_images(self.model, fact_image_dataset(self.fact_file, None, "test"), device=self.device)
                return vectors, self.fact_file.sample_indices(None, "test")

            self._image_index = self._load_or_build("images", embed_test_images)
        return self._image_index

    @property
    def encoder(self) -> Any:
        """The run's text encoder, loaded on first use and checked against the fact file's.

        Default: ``"minilm"`` when the fact file was prepared with MiniLM (its
        ``encoder_name`` starts with ``minilm:``); other encoders (a local model folder, a
        word2vec file) must be given as ``encoder=`` (a spec for
        ``triplets.facts.language.load_text_encoder`` or an encoder object). The encoder's ``name``
        (kind, model and a fingerprint of its files) must equal the fact file's
        ``encoder_name``, else :class:`RunFolderError`: vectors of another encoder would not
        live in the space the model was trained on.
        """
        if self._encoder is None:
            expected = self.fact_file.encoder_name
            spec = self._encoder_spec
            if spec is None:
                if not expected:
                    raise RunFolderError(f"the fact file {self.fact_file.path} does not name its text encoder; "
                                         "pass --encoder (the spec used by prepare)")
                if not str(expected).startswith("minilm:"):
                    raise RunFolderError(f"the fact file was embedded with {expected}; pass --encoder with that "
                                         "model folder or word2vec file to embed unseen facts")
                spec = "minilm"
            if isinstance(spec, (str, os.PathLike)):
                from ..facts.language import load_text_encoder  # noqa: PLC0415

                encoder = load_text_encoder(str(spec))
            else:
                encoder = spec
            name = getattr(encoder, "name", None)
            if expected and name != expected:
                raise RunFolderError(f"the text encoder {name} is not the one that embedded the run's facts "
                                     f"({expected}); pass the original encoder with --encoder")
            self._encoder = encoder
        return self._encoder

    # -- embeddings --------------------------------------------------------------------------
    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Model embeddings (unit rows, float32 [k, D]) of uint8 regions [k, S, S, 3]."""
        import torch  # noqa: PLC0415
        import torch.nn.functional as F  # noqa: PLC0415

        batch = torch.from_numpy(np.array(pixels, dtype=np.uint8, copy=True)).permute(0, 3, 1, 2).float().div_(255.0)
        with torch.no_grad():
            embed = getattr(self.model, "embed", None)
            output = embed(batch.to(self.device)) if callable(embed) else F.normalize(self.model(batch.to(self.device)), dim=1)
        return output.float().cpu().numpy()

    def embed_fact(self, fact: Sequence[Any]) -> np.ndarray:
        """The language vector [3d] of ``fact``: cached for a known fact, else from the text encoder."""
        key = tuple(_normalise_phrase(s) if s else None for s in (tuple(fact) + (None, None))[:3])
        known = self._fact_lookup.get(key)
        vectors = np.asarray(self.fact_file.fact_embeddings, dtype=np.float32)
        if known is not None:
            return vectors[known]
        from ..facts.language import embed_facts  # noqa: PLC0415

        embedded, _masks = embed_facts([tuple((tuple(fact) + (None, None))[:3])], self.encoder)
        embedded = np.asarray(embedded, dtype=np.float32).reshape(-1)
        if embedded.shape[0] != vectors.shape[1]:
            raise RunFolderError(
                f"the text encoder {getattr(self.encoder, 'name', self.encoder)!r} gives {embedded.shape[0]}-d fact "
                f"vectors, the run's fact file holds {vectors.shape[1]}-d; pass the encoder used by prepare")
        return embedded

    # -- queries -----------------------------------------------------------------------------
    def _facts_result(self, scores: np.ndarray, ids: np.ndarray) -> list[dict[str, Any]]:
        return [{"fact_id": int(i), "fact": self.facts[int(i)], "fact_text": fact_text(self.facts[int(i)]),
                 "score": float(s)} for s, i in zip(scores, ids) if i >= 0]

    def image_to_facts(self, image: Any, *, box: Sequence[float] | None = None, k: int = 10) -> list[dict[str, Any]]:
        """The ``k`` known facts nearest to an image region: dicts with fact_id, fact, fact_text, score."""
        size = self.fact_file.image_size
        if not size:
            raise RunFolderError(f"the run's fact file {self.fact_file.path} has no image size (prepared without images)")
        pixels = crop_and_resize(load_image(image), box, int(size))
        scores, ids = self.fact_index.search(self.embed_pixels(pixels[None]), k)
        return self._facts_result(scores[0], ids[0])

    def image_to_facts_by_sample(self, sample_index: int, *, k: int = 10) -> list[dict[str, Any]]:
        """Like :meth:`image_to_facts` for a region stored in the fact file (its sample index)."""
        pixels = self.fact_file.pixels([int(sample_index)])
        scores, ids = self.fact_index.search(self.embed_pixels(pixels), k)
        return self._facts_result(scores[0], ids[0])

    def text_to_facts(self, text: str, *, k: int = 10) -> list[dict[str, Any]]:
        """The ``k`` known facts nearest to the parsed text fact (cosine of language vectors)."""
        fact = parse_fact_text(text, self.facts)
        scores, ids = self.fact_index.search(self.embed_fact(fact), k)
        return self._facts_result(scores[0], ids[0])

    def text_to_images(self, text: str, *, k: int = 10) -> list[dict[str, Any]]:
        """The ``k`` test images nearest to the parsed text fact: dicts with sample, image_id, fact_id,
        fact, fact_text (the sample's true fact) and score (cosine with the model's image embedding)."""
        fact = parse_fact_text(text, self.facts)
        scores, ids = self.image_index.search(self.embed_fact(fact), k)
        hits = []
        for score, sample in zip(scores[0], ids[0]):
            if sample < 0:
                continue
            fact_id = int(self.fact_file.sample_fact[int(sample)])
            hits.append({"sample": int(sample), "image_id": int(self.fact_file.sample_image_id[int(sample)]),
                         "fact_id": fact_id, "fact": self.facts[fact_id], "fact_text": fact_text(self.facts[fact_id]),
                         "score": float(score)})
        return hits

    def parse(self, text: str) -> Fact:
        """:func:`parse_fact_text` against this run's vocabulary."""
        return parse_fact_text(text, self.facts)

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Close the run's fact file if this engine opened the run."""
        if self._owns_run and hasattr(self.run, "close"):
            self.run.close()

    def __enter__(self) -> "QueryEngine":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_query(run: Any, *, method: str | None = None, device: str = "cpu", encoder: Any = None,
               exact_backend: str | None = None) -> QueryEngine:
    """A :class:`QueryEngine` for ``run`` (a :class:`triplets.facts.train.Run` or a run folder path).

    ``method``: the trained method to query (default: "mas" if trained, else the first);
    ``encoder``: a text-encoder spec or object (default: the fact file's encoder);
    ``exact_backend``: how flat indexes search ("auto", "faiss-rescored", "blas", "torch", "faiss"; default: the run's
    ``eval.exact_backend``, see :func:`triplets.index.choose_exact_backend`).
    """
    owns = False
    if isinstance(run, (str, os.PathLike)):
        path = Path(run)
        if not path.is_dir():
            raise RunFolderError(f"no run folder at {path}; train one with mas-triplets train --out {path}")
        run, owns = load_run(path), True
    try:
        return QueryEngine(run, method, device=device, encoder=encoder, owns_run=owns, exact_backend=exact_backend)
    except BaseException:
        if owns:
            run.close()
        raise


def query_image(run: Any, image: Any, *, box: Sequence[float] | None = None, k: int = 10, method: str | None = None,
                device: str = "cpu") -> list[tuple[Fact, float]]:
    """Image → the ``k`` nearest known facts as ``[(fact tuple, cosine score)]``, best first.

    ``image``: a file path, PIL image or uint8 [H, W, 3] array; ``box``: (x, y, w, h) pixels.
    """
    with open_query(run, method=method, device=device) as engine:
        return [(hit["fact"], hit["score"]) for hit in engine.image_to_facts(image, box=box, k=k)]


def query_text(run: Any, text: str, *, k: int = 10, method: str | None = None, device: str = "cpu",
               encoder: Any = None) -> dict[str, list[tuple]]:
    """Text → ``{"images": [(sample index, image_id, fact of that sample, score)], "facts": [(fact, score)]}``.

    The text is parsed by :func:`parse_fact_text`; unseen facts are embedded by the text encoder.
    """
    with open_query(run, method=method, device=device, encoder=encoder) as engine:
        images = [(h["sample"], h["image_id"], h["fact"], h["score"]) for h in engine.text_to_images(text, k=k)]
        facts = [(h["fact"], h["score"]) for h in engine.text_to_facts(text, k=k)]
    return {"images": images, "facts": facts}
