"""Cleaning of the free-text names, attributes and predicates of Visual Genome.

The raw dumps carry the same word in many spellings (``"Tree "``, ``"tree."``,
``"Café"``, ``"T-Shirt"``). :func:`clean_phrase` brings them to one form:

1. Unicode NFKD decomposition, then the combining marks are dropped (accents folded:
   ``"café"`` -> ``"cafe"``);
2. lower case;
3. apostrophes are deleted (``"man's"`` -> ``"mans"``); every other punctuation or
   symbol character (Unicode categories P* and S*) becomes a space
   (``"t-shirt"`` -> ``"t shirt"``);
4. runs of whitespace collapse to one space and the ends are stripped.

:class:`AliasMap` then maps each cleaned phrase to its canonical form, read from the
Visual Genome alias files (``object_alias.txt``, ``relationship_alias.txt``: one
group per line, comma-separated, the first term canonical; the terms are cleaned
with the same rule).
"""
from __future__ import annotations

import unicodedata
from pathlib import Path

from .errors import DataPrepError

_APOSTROPHES = frozenset("'\u2019\u2018`\u00b4")


def clean_phrase(text: object) -> str:
    """Return the cleaned form of ``text`` (rules in the module docstring); ``""`` if nothing is left.

    A value that is not a string (``None``, a number from a malformed record) gives ``""``.
    """
    if not isinstance(text, str):
        return ""
    decomposed = unicodedata.normalize("NFKD", text)
    characters: list[str] = []
    for char in decomposed:
        if unicodedata.combining(char):
            continue
        if char in _APOSTROPHES:
            continue
        category = unicodedata.category(char)
        if category[0] in ("P", "S") or category[0] == "C":
            characters.append(" ")
        else:
            characters.append(char.lower())
    return " ".join("".join(characters).split())


class AliasMap:
    """A mapping of cleaned phrases to their canonical phrase (identity for unknown phrases)."""

    def __init__(self, canonical_of: dict[str, str] | None = None) -> None:
        self.canonical_of: dict[str, str] = dict(canonical_of or {})

    @classmethod
    def from_file(cls, path: str | Path) -> "AliasMap":
        """Read an alias file: one group per line, comma-separated terms, the first one canonical.

        Empty lines are skipped. A term listed in two groups raises :class:`DataPrepError`.
        """
        path = Path(path)
        canonical_of: dict[str, str] = {}
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as exc:
            raise DataPrepError(f"cannot read alias file {path}: {exc.strerror or exc}") from None
        for line_number, line in enumerate(lines, start=1):
            terms = [clean_phrase(term) for term in line.split(",")]
            terms = [term for term in terms if term]
            if not terms:
                continue
            canonical = terms[0]
            for term in terms[1:]:
                previous = canonical_of.get(term)
                if previous is not None and previous != canonical:
                    raise DataPrepError(
                        f"{path}:{line_number}: alias {term!r} maps to both {previous!r} and {canonical!r}; "
                        "keep it in one group"
                    )
                if term != canonical:
                    canonical_of[term] = canonical
        return cls(canonical_of)

    def __len__(self) -> int:
        return len(self.canonical_of)

    def __call__(self, cleaned: str) -> str:
        """Return the canonical phrase of the already-cleaned phrase ``cleaned``."""
        return self.canonical_of.get(cleaned, cleaned)

    def clean(self, text: object) -> str:
        """Clean ``text`` with :func:`clean_phrase`, then map it to its canonical phrase."""
        cleaned = clean_phrase(text)
        return self.canonical_of.get(cleaned, cleaned) if cleaned else ""
