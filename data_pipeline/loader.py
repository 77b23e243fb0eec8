"""Packed, rank-sharded, deterministically shuffled samples over a token stream.

Sample ``j`` of a stream is the window ``tokens[j·seq_len : (j+1)·seq_len + 1]`` (inputs and
shifted targets); documents are separated by EOS inside it. Global sample ``g`` is sample
``π_e(g mod n)`` of epoch ``e = g // n``, with ``π_e`` a seeded bijection evaluated on the fly,
so nothing is indexed up front and any sample is O(1) to find.

Global batch ``t`` holds global samples ``[t·B, (t+1)·B)``; rank ``r`` of ``W`` takes the
consecutive slice ``[t·B + r·B/W, t·B + (r+1)·B/W)``. The whole loader state is the number of
global samples consumed (plus a fingerprint of what the samples are made of), so a resume, even
on another number of ranks, continues exactly.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.shards import TokenStream

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-distributed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class Permutation:
    """A seeded bijection on ``[0, n)``: a 4-round Feistel network on the smallest even-bit
    domain ≥ n, with cycle walking back into range. O(1) memory, ~µs per lookup."""

    ROUNDS = 4

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("a permutation needs n >= 1")
        self.n = n
        self.half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = (1 << self.half_bits) - 1
        self.keys = [_mix64(seed * 1_000_003 + r) for r in range(self.ROUNDS)]

    def _encrypt(self, x: int) -> int:
        left, right = x >> self.half_bits, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.mask)
        return (left << self.half_bits) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"{i} outside [0, {self.n})")
        x = self._encrypt(i)
        while x >= self.n:  # domain < 4n, so a few steps on average
            x = self._encrypt(x)
        return x


def fingerprint(**parts) -> str:
    """A short stable hash of what defines the sample order (sources, manifests, tokenizer, seed, ...)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class PackedLoader:
    """Yields, per optimizer step, this rank's micro-batches of shape (micro_batch, seq_len + 1)."""

    def __init__(
        self,
        stream: TokenStream,
        seq_len: int,
        global_batch: int,
        micro_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        fingerprint: str = "",
    ):
        if global_batch % (micro_batch * world_size):
            raise DataError(
                f"global batch {global_batch} is not divisible by micro-batch {micro_batch} × "
                f"{world_size} ranks; change train.global_batch_size or train.micro_batch_size."
            )
        self.stream, self.seq_len = stream, seq_len
        self.n_samples = (stream.total_tokens - 1) // seq_len
        if self.n_samples < 1:
            raise DataError(
                f"the training split has {stream.total_tokens} tokens, fewer than one sample of "
                f"seq_len + 1 = {seq_len + 1}; add data or lower data.seq_len."
            )
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.world_size = rank, world_size
        self.per_rank = global_batch // world_size
        self.seed, self.shuffle = seed, shuffle
        self.fingerprint = fingerprint
        self.samples_consumed = 0
        self._perms: dict[int, Permutation] = {}

    def sample_index(self, g: int) -> int:
        """Which window of the stream global sample ``g`` is."""
        epoch, k = divmod(g, self.n_samples)
        if not self.shuffle:
            return k
        perm = self._perms.get(epoch)
        if perm is None:
            self._perms = {epoch: Permutation(self.n_samples, _mix64(self.seed) ^ epoch)}
            perm = self._perms[epoch]
        return perm(k)

    def sample(self, g: int) -> np.ndarray:
        j = self.sample_index(g)
        return self.stream.tokens(j * self.seq_len, (j + 1) * self.seq_len + 1)

    def rank_indices(self, step_start: int) -> range:
        """The global sample indices this rank reads for the batch starting at ``step_start``."""
        first = step_start + self.rank * self.per_rank
        return range(first, first + self.per_rank)

    def next_step(self) -> list[np.ndarray]:
        """This rank's micro-batches for the next optimizer step; advances the state."""
        rows = np.stack([self.sample(g) for g in self.rank_indices(self.samples_consumed)])  # (per_rank, T+1)
        self.samples_consumed += self.global_batch
        return [rows[i : i + self.micro_batch] for i in range(0, self.per_rank, self.micro_batch)]

    @property
    def epoch(self) -> float:
        return self.samples_consumed / self.n_samples

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise DataError(
                f"the checkpoint's data fingerprint {state.get('fingerprint')} differs from the current "
                f"one {self.fingerprint}: the sources, shards, tokenizer, seed or seq_len changed since it "
                "was saved. Restore them, or start a new run directory."
            )
        self.samples_consumed = int(state["samples_consumed"])


def eval_samples(stream: TokenStream, seq_len: int, max_samples: int, rank: int, world_size: int) -> np.ndarray:
    """A fixed set of validation windows (the first ``max_samples``, in order), strided over ranks.

    Every rank gets the same number of windows (ZeRO-3 forwards are collective)."""
    n = min(max_samples, (stream.total_tokens - 1) // seq_len)
    n -= n % world_size
    mine = list(range(rank, n, world_size))
    if not mine:
        return np.empty((0, seq_len + 1), dtype=np.int64)
    return np.stack([stream.tokens(j * seq_len, (j + 1) * seq_len + 1) for j in mine])
