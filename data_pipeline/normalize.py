"""Text normalisation and n-gram hashing shared by deduplication and decontamination.

A document's *words* are its text after Unicode NFKC, case folding, every run of punctuation and
symbols (anything that is not a letter, digit, underscore or whitespace) replaced by a space, and
a split on whitespace — the "simplified text" of datatrove/FineWeb, but with letters kept as they
are (no accent stripping: å, ø and æ are Norwegian letters, not accents). "Hei, Verden!" and
"hei verden" have the same words.

Hashes are stable across processes, machines and runs (never Python's salted ``hash``): a word is
hashed with xxh64, an n-gram of word hashes with a polynomial over 64-bit integers (wrapping), and
a document's normalised text with blake2b.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np
import xxhash

_NOT_WORD = re.compile(r"[^\w\s]+")
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd, so each step is a bijection mod 2**64


def words(text: str) -> list[str]:
    """The normalised words of ``text`` (see the module doc)."""
    return _NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split()


def exact_hash(text: str, normalised: list[str]) -> int:
    """64-bit hash of the normalised text; a text without words is hashed as written (so that
    documents of punctuation only are duplicates only of the same punctuation)."""
    joined = " ".join(normalised) if normalised else "\x00" + text
    return int.from_bytes(hashlib.blake2b(joined.encode("utf-8"), digest_size=8).digest(), "little")


def word_hashes(normalised: list[str]) -> np.ndarray:
    """One xxh64 per word, uint64."""
    return np.fromiter((xxhash.xxh64_intdigest(w.encode("utf-8")) for w in normalised), dtype=np.uint64,
                       count=len(normalised))


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """Hashes of every run of ``n`` consecutive words (uint64; empty when there are fewer words)."""
    m = len(hashes) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    acc = hashes[:m].copy()
    for j in range(1, n):
        acc *= _MULTIPLIER
        acc += hashes[j : j + m]
    return acc


def shingles(text: str, normalised: list[str], n: int) -> np.ndarray:
    """The document's MinHash shingles: hashes of its n-word runs; a document with fewer than
    ``n`` words is one shingle (its whole word sequence, or its text when it has no words), so
    that two different short documents do not look alike."""
    if len(normalised) >= n:
        return ngram_hashes(word_hashes(normalised), n)
    whole = " ".join(normalised) if normalised else "\x00" + text
    return np.array([xxhash.xxh64_intdigest(whole.encode("utf-8"))], dtype=np.uint64)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64: every input bit moves every output bit."""
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
