"""The global sample order of a mixture of sources, by arithmetic: nothing is indexed up front.

Per source, samples are fixed windows over its concatenated train shards (window ``j`` covers
tokens ``[j·seq_len, (j+1)·seq_len + 1)``), ``n_s`` of them. Global sample ``g`` is found in three
O(number of sources) steps:

1. **Interleave** — which source, and which of that source's samples (its *local* index ``k``):
   a balanced binary tree over the sources where each node splits its samples between its two
   halves with Bresenham's rounding (the left half gets ``⌊(j·a + ⌊t/2⌋) / t⌋`` of the first ``j``,
   for half-weights ``a`` and ``t − a``). Every prefix of the order holds each source's share to
   within a sample or two, so sources are interleaved evenly through training.
2. **Epoch** — ``e = k // n_s``: a source repeats by reading its windows again.
3. **Permutation** — window ``π_{s,e}(k mod n_s)``, a seeded Feistel bijection (permutation.Permutation)
   keyed by the seed, the source's name and the epoch: every epoch of every source is a different
   shuffle, evaluated on the fly.

A change of mixture (shares, sources added or removed) starts a new **segment** at the global
sample count where it happened; each source's local count at that point becomes its offset, so
no already-read sample comes back early and none is skipped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from data_pipeline.errors import DataError
from data_pipeline.permutation import Permutation, mix64

# Shares become integer weights over this denominator (a resolution of ~1e-6).
WEIGHT_DENOMINATOR = 2**20


def window_count(n_tokens: int, seq_len: int) -> int:
    """How many windows ``n_tokens`` tokens hold: window ``j`` covers tokens
    ``[j·seq_len, (j+1)·seq_len + 1)`` (inputs and shifted targets), so neighbours share one token."""
    return max((n_tokens - 1) // seq_len, 0)


def integer_weights(shares: list[float], denominator: int = WEIGHT_DENOMINATOR) -> list[int]:
    """Integers proportional to ``shares`` that add up to exactly ``denominator`` (largest
    remainder); a positive share never rounds to zero."""
    total = sum(shares)
    if total <= 0 or any(s < 0 for s in shares):
        raise DataError(f"source shares {shares} must be non-negative and not all zero.")
    exact = [s / total * denominator for s in shares]
    out = [max(int(x), 1 if s > 0 else 0) for x, s in zip(exact, shares, strict=True)]
    order = sorted(range(len(shares)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    i = 0
    while sum(out) != denominator:  # terminates: each pass moves the sum one step towards the target
        j = order[i % len(order)]
        step = 1 if sum(out) < denominator else -1
        if out[j] + step >= (1 if shares[j] > 0 else 0):
            out[j] += step
        i += 1
    return out


class Interleave:
    """Which source each global sample comes from, for integer weights: O(log S) per lookup."""

    def __init__(self, weights: list[int]):
        if not weights or any(w < 0 for w in weights) or sum(weights) == 0:
            raise ValueError(f"weights {weights} must be non-negative with a positive sum")
        self.weights = list(weights)
        self._root = self._build(0, len(weights))

    def _build(self, lo: int, hi: int):
        if hi - lo == 1:
            return lo
        mid = (lo + hi) // 2
        return (sum(self.weights[lo:mid]), sum(self.weights[lo:hi]), self._build(lo, mid), self._build(mid, hi))

    def locate(self, i: int) -> tuple[int, int]:
        """(source index, local index) of global sample ``i``."""
        node, j = self._root, i
        while not isinstance(node, int):
            a, t, left, right = node
            half = t // 2
            before = (j * a + half) // t  # samples of the left half among the node's first j
            if ((j + 1) * a + half) // t > before:
                node, j = left, before
            else:
                node, j = right, j - before
        return node, j

    def counts(self, i: int) -> list[int]:
        """How many of the first ``i`` global samples each source provides."""
        out = [0] * len(self.weights)
        stack = [(self._root, i)]
        while stack:
            node, c = stack.pop()
            if isinstance(node, int):
                out[node] = c
                continue
            a, t, left, right = node
            to_left = (c * a + t // 2) // t if t else 0
            stack += [(left, to_left), (right, c - to_left)]
        return out


@dataclass(frozen=True)
class Segment:
    """A stretch of the global order with one mixture: from global sample ``start`` on, sources
    ``names`` with integer ``weights``; ``offsets`` are their local counts consumed before it."""

    start: int
    names: tuple[str, ...]
    weights: tuple[int, ...]
    offsets: tuple[int, ...]

    def to_json(self) -> dict:
        return {"start": self.start, "names": list(self.names), "weights": list(self.weights),
                "offsets": list(self.offsets)}

    @classmethod
    def from_json(cls, obj: dict) -> Segment:
        return cls(int(obj["start"]), tuple(obj["names"]), tuple(obj["weights"]), tuple(obj["offsets"]))


class EpochShuffle:
    """Local index ``k`` → which of ``n`` samples it reads: epoch ``k // n`` is the seeded
    permutation of [0, n) keyed by ``key(epoch)``, the current one kept while its epoch lasts."""

    def __init__(self, n: int, key: Callable[[int], int]):
        self.n, self.key = n, key
        self._current: tuple[int, Permutation | None] = (-1, None)

    def __call__(self, k: int) -> int:
        epoch, j = divmod(k, self.n)
        if self._current[0] != epoch:
            self._current = (epoch, Permutation(self.n, self.key(epoch)))
        return self._current[1](j)


def _source_key(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest(), "big")


class GlobalOrder:
    """Global sample index → (source, window), over one or more mixture segments."""

    def __init__(self, windows: dict[str, int], segments: list[Segment], seed: int, shuffle: bool = True):
        if not segments or segments[0].start != 0:
            raise ValueError("the first segment must start at global sample 0")
        self.windows, self.segments = dict(windows), list(segments)
        self.seed, self.shuffle = seed, shuffle
        self._interleaves = [Interleave(list(s.weights)) for s in self.segments]
        self._keys = {name: _source_key(seed, name) for s in self.segments for name in s.names}
        self._shuffles: dict[str, EpochShuffle] = {}
        last = self.segments[-1]  # earlier segments may name sources that are gone now
        for name, w in zip(last.names, last.weights, strict=True):
            if w and self.windows.get(name, 0) < 1:
                raise DataError(
                    f"source '{name}' has fewer train tokens than one sample of seq_len + 1; add data, "
                    "lower data.seq_len, or give it no share."
                )

    @classmethod
    def single(cls, windows: dict[str, int], weights: dict[str, int], seed: int, shuffle: bool = True) -> GlobalOrder:
        names = tuple(weights)
        return cls(windows, [Segment(0, names, tuple(weights[n] for n in names), (0,) * len(names))], seed, shuffle)

    def _segment(self, g: int) -> int:
        for i in range(len(self.segments) - 1, -1, -1):
            if self.segments[i].start <= g:
                return i
        raise IndexError(g)

    def locate(self, g: int) -> tuple[str, int]:
        """(source name, local sample index) of global sample ``g``."""
        if g < 0:
            raise IndexError(f"global sample {g} < 0")
        i = self._segment(g)
        seg = self.segments[i]
        s, k = self._interleaves[i].locate(g - seg.start)
        return seg.names[s], seg.offsets[s] + k

    def window(self, g: int) -> tuple[str, int]:
        """(source name, window index into its train tokens) of global sample ``g``."""
        name, k = self.locate(g)
        if not self.shuffle:
            return name, k % self.windows[name]
        if name not in self._shuffles:
            key = self._keys[name]
            self._shuffles[name] = EpochShuffle(self.windows[name], lambda epoch: mix64(key + epoch))
        return name, self._shuffles[name](k)

    def consumed(self, g: int) -> dict[str, int]:
        """Each source's local count among the first ``g`` global samples."""
        out: dict[str, int] = {}
        for i, seg in enumerate(self.segments):
            if seg.start > g:
                break
            end = self.segments[i + 1].start if i + 1 < len(self.segments) else None
            n = (min(g, end) if end is not None else g) - seg.start
            for name, off, c in zip(seg.names, seg.offsets, self._interleaves[i].counts(n), strict=True):
                out[name] = off + c
        return out

    def epochs(self, g: int) -> dict[str, float]:
        """Passes over each source's windows among the first ``g`` global samples."""
        return {name: c / self.windows[name] for name, c in self.consumed(g).items() if self.windows.get(name)}

    def reweighted(self, g: int, weights: dict[str, int]) -> GlobalOrder:
        """This order up to global sample ``g``, the mixture ``weights`` after it."""
        done = self.consumed(g)
        names = tuple(weights)
        seg = Segment(g, names, tuple(weights[n] for n in names), tuple(done.get(n, 0) for n in names))
        kept = [s for s in self.segments if s.start < g]
        return GlobalOrder(self.windows, [*kept, seg], self.seed, self.shuffle)
