"""Packed, rank-sharded, deterministically shuffled samples over one or more token streams.

A sample is a window of ``seq_len + 1`` tokens (inputs and shifted targets); documents are
separated by EOS inside it. Which source and window global sample ``g`` is comes from a
:class:`~data_pipeline.mixture.GlobalOrder` (arithmetic, nothing indexed up front), so any sample
is O(1) to find.

Global batch ``t`` holds global samples ``[t·B, (t+1)·B)``; rank ``r`` of ``W`` takes the
consecutive slice ``[t·B + r·B/W, t·B + (r+1)·B/W)``. The whole loader state is the number of
global samples consumed plus a fingerprint of what the samples are made of (and, after a mixture
change, the segments of the order), so a resume, even on another number of ranks, continues
exactly.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.mixture import GlobalOrder, Segment
from data_pipeline.permutation import Permutation, mix64
from data_pipeline.shards import TokenStream
from norallm.files import json_hash

__all__ = ["MixtureLoader", "PackedLoader", "Permutation", "eval_samples", "fingerprint", "mix64"]

# Fingerprint parts a mixture change may alter (data.allow_mixture_change); anything else changes
# what a consumed sample *is*, so a resume across it is always refused.
WEIGHT_PREFIX = "weight:"
SOURCE_PREFIX = "shards:"


def fingerprint(**parts) -> str:
    """A short stable hash of what defines the sample order (sources, manifests, tokenizer, seed, ...)."""
    return json_hash(parts)


def describe_changes(old: dict[str, str] | None, new: dict[str, str]) -> tuple[str, bool]:
    """What differs between two fingerprint-part dicts, in words, and whether only the mixture
    (weights, sources added or removed) changed."""
    if not old:
        return "the checkpoint does not say what its data was made of", False
    notes, mixture_only = [], True
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key.startswith(SOURCE_PREFIX):
            name = key[len(SOURCE_PREFIX):]
            if a is None or b is None:
                notes.append(f"source '{name}' {'added' if a is None else 'removed'}")
            else:
                notes.append(f"the shards of source '{name}' changed (re-prepared)")
                mixture_only = False
        elif key.startswith(WEIGHT_PREFIX):
            if a is not None and b is not None:
                notes.append(f"the share of '{key[len(WEIGHT_PREFIX):]}' changed ({a} → {b} per 2^20)")
        else:
            notes.append(f"{key} changed ({a} → {b})")
            mixture_only = False
    return "; ".join(notes), mixture_only


class MixtureLoader:
    """Yields, per optimizer step, this rank's micro-batches of shape (micro_batch, seq_len + 1)."""

    def __init__(
        self,
        streams: dict[str, TokenStream],
        order,
        seq_len: int,
        global_batch: int,
        micro_batch: int,
        rank: int = 0,
        world_size: int = 1,
        fingerprint: str = "",
        fingerprint_parts: dict[str, str] | None = None,
        allow_mixture_change: bool = False,
    ):
        if global_batch % (micro_batch * world_size):
            raise DataError(
                f"global batch {global_batch} is not divisible by micro-batch {micro_batch} × "
                f"{world_size} ranks; change train.global_batch_size or train.micro_batch_size."
            )
        self.streams, self.order, self.seq_len = streams, order, seq_len
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.world_size = rank, world_size
        self.per_rank = global_batch // world_size
        self.fingerprint, self.parts = fingerprint, fingerprint_parts
        self.allow_mixture_change = allow_mixture_change
        self.samples_consumed = 0
        self.last_change = ""  # after a resume across a mixture change: what changed

    def sample(self, g: int) -> np.ndarray:
        """Global sample ``g``: (seq_len + 1,) int64 tokens."""
        name, j = self.order.window(g)
        return self.streams[name].tokens(j * self.seq_len, (j + 1) * self.seq_len + 1)

    def rank_indices(self, step_start: int) -> range:
        """The global sample indices this rank reads for the batch starting at ``step_start``."""
        first = step_start + self.rank * self.per_rank
        return range(first, first + self.per_rank)

    def next_step(self) -> list[np.ndarray]:
        """This rank's micro-batches for the next optimizer step; advances the state."""
        rows = np.stack([self.sample(g) for g in self.rank_indices(self.samples_consumed)])  # (per_rank, T+1)
        self.samples_consumed += self.global_batch
        return [rows[i : i + self.micro_batch] for i in range(0, self.per_rank, self.micro_batch)]

    def epochs(self) -> dict[str, float]:
        """Passes over each source's windows so far."""
        return self.order.epochs(self.samples_consumed)

    @property
    def epoch(self) -> float:
        """The most-repeated source's passes so far (what ``max_epochs`` limits)."""
        return max(self.epochs().values(), default=0.0)

    def state_dict(self) -> dict:
        state = {"samples_consumed": self.samples_consumed, "fingerprint": self.fingerprint}
        if self.parts is not None:
            state["fingerprint_parts"] = dict(self.parts)
            state["segments"] = [s.to_json() for s in self.order.segments]
        return state

    def load_state_dict(self, state: dict) -> None:
        consumed = int(state.get("samples_consumed", 0))
        segments = [Segment.from_json(s) for s in state.get("segments", [])]
        if state.get("fingerprint") == self.fingerprint:
            if segments:  # earlier mixtures live only in the checkpoint
                self.order = GlobalOrder(self.order.windows, segments, self.order.seed, self.order.shuffle)
            self.samples_consumed = consumed
            return
        what, mixture_only = describe_changes(state.get("fingerprint_parts"), self.parts or {})
        if not (self.allow_mixture_change and mixture_only and segments):
            hint = (" Only shares and sources may change on resume, with data.allow_mixture_change: true."
                    if mixture_only and segments else "")
            raise DataError(
                f"the checkpoint's data fingerprint {state.get('fingerprint')} differs from the current one "
                f"{self.fingerprint}: {what}. Restore the data as it was, or start a new run directory.{hint}"
            )
        old = GlobalOrder(self.order.windows, segments, self.order.seed, self.order.shuffle)
        last = self.order.segments[-1]
        self.order = old.reweighted(consumed, dict(zip(last.names, last.weights, strict=True)))
        self.samples_consumed = consumed
        self.last_change = f"mixture changed at global sample {consumed:,}: {what}"


class PackedLoader(MixtureLoader):
    """One token stream: a mixture of a single source, with the window index as the sample index."""

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
        self.n_samples = (stream.total_tokens - 1) // seq_len
        if self.n_samples < 1:
            raise DataError(
                f"the training split has {stream.total_tokens} tokens, fewer than one sample of "
                f"seq_len + 1 = {seq_len + 1}; add data or lower data.seq_len."
            )
        order = GlobalOrder.single({"all": self.n_samples}, {"all": 1}, seed, shuffle)
        super().__init__({"all": stream}, order, seq_len, global_batch, micro_batch, rank, world_size, fingerprint)

    def sample_index(self, g: int) -> int:
        """Which window of the stream global sample ``g`` is."""
        return self.order.window(g)[1]


def eval_samples(stream: TokenStream, seq_len: int, max_samples: int, rank: int, world_size: int) -> np.ndarray:
    """A fixed set of validation windows (the first ``max_samples``, in order), strided over ranks.

    Every rank gets the same number of windows (ZeRO-3 forwards are collective)."""
    n = min(max_samples, (stream.total_tokens - 1) // seq_len)
    n -= n % world_size
    mine = list(range(rank, n, world_size))
    if not mine:
        return np.empty((0, seq_len + 1), dtype=np.int64)
    return np.stack([stream.tokens(j * seq_len, (j + 1) * seq_len + 1) for j in mine])
