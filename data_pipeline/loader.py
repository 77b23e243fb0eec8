"""One loader for every kind of training sample: rank-sharded, deterministic, exactly resumable.

A *sample source* says what global sample ``g`` is and gathers samples into a
:class:`~data_pipeline.batch.Batch`: :class:`MixtureWindows` here (windows of ``seq_len + 1``
tokens over a mixture of token streams, in the arithmetic order of a
:class:`~data_pipeline.mixture.GlobalOrder`, so any sample is O(1) to find), or the packed
conversations of training.data.sft. The :class:`Loader` does the rest, the same for both.

Global batch ``t`` holds global samples ``[t·B, (t+1)·B)``; rank ``r`` of ``W`` takes the
consecutive slice ``[t·B + r·B/W, t·B + (r+1)·B/W)``. The whole loader state is the number of
global samples consumed plus what the source says its samples are (a fingerprint and, after a
mixture change, the segments of the order), so a resume, even on another number of ranks,
continues exactly.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from data_pipeline.batch import Batch, window_batch
from data_pipeline.errors import DataError
from data_pipeline.mixture import GlobalOrder, Segment, window_count
from data_pipeline.shards import TokenStream
from norallm.files import json_hash

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


class SampleSource(Protocol):
    """What the loader reads: global samples by index, and what they are made of."""

    #: every position of every sample is a target (windows of text), so each micro-batch trains
    #: the same number of tokens and the loss needs no count across ranks (training.model.loss)
    every_target_trained: bool

    def batch(self, samples: range) -> Batch:
        """Global samples ``samples``, in order, as one batch."""

    def epoch(self, samples_consumed: int) -> float:
        """Passes over the data (its most-repeated part) after ``samples_consumed`` global samples."""

    def state_dict(self) -> dict:
        """What defines the samples and their order, for the checkpoint: a ``fingerprint`` at least."""

    def resume(self, state: dict, samples_consumed: int) -> str:
        """Take a checkpoint's state, refusing (DataError) one whose samples were other than these;
        returns what changed since, in words, or ``""``."""


class Loader:
    """Per optimizer step, this rank's micro-batches of a sample source."""

    def __init__(self, source: SampleSource, global_batch: int, micro_batch: int, rank: int = 0,
                 world_size: int = 1):
        # the launch is checked against the config before any data is built (trainer.check_world)
        assert global_batch % (micro_batch * world_size) == 0, (global_batch, micro_batch, world_size)
        self.source = source
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.per_rank = rank, global_batch // world_size
        self.samples_consumed = 0
        self.last_samples = range(0)  # the global samples of the last next_step on this rank

    def rank_indices(self, step_start: int) -> range:
        """The global sample indices this rank reads for the batch starting at ``step_start``."""
        first = step_start + self.rank * self.per_rank
        return range(first, first + self.per_rank)

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches for the next optimizer step; advances the state."""
        self.last_samples = self.rank_indices(self.samples_consumed)
        batch = self.source.batch(self.last_samples)  # (per_rank, T) per field
        self.samples_consumed += self.global_batch
        return [batch[i : i + self.micro_batch] for i in range(0, self.per_rank, self.micro_batch)]

    @property
    def epoch(self) -> float:
        return self.source.epoch(self.samples_consumed)

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed, **self.source.state_dict()}

    def load_state_dict(self, state: dict) -> str:
        """Continue where a checkpoint's loader stopped; returns what changed in the data since
        (a mixture change the config allows), or ``""``."""
        consumed = int(state.get("samples_consumed", 0))
        change = self.source.resume(state, consumed)
        self.samples_consumed = consumed
        return change


def read_window(stream: TokenStream, j: int, seq_len: int) -> np.ndarray:
    """Window ``j`` of a stream: (seq_len + 1,) int64 tokens."""
    return stream.tokens(j * seq_len, (j + 1) * seq_len + 1)


class MixtureWindows:
    """Global sample ``g`` of a mixture: window ``order.window(g)`` of its source's train tokens.
    With ``eos_id`` (data.document_boundaries) the documents inside a window attend only to
    themselves."""

    every_target_trained = True

    def __init__(
        self,
        streams: dict[str, TokenStream],
        order: GlobalOrder,
        seq_len: int,
        eos_id: int | None = None,
        fingerprint: str = "",
        fingerprint_parts: dict[str, str] | None = None,
        allow_mixture_change: bool = False,
    ):
        self.streams, self.order, self.seq_len, self.eos_id = streams, order, seq_len, eos_id
        self.fingerprint, self.parts = fingerprint, fingerprint_parts
        self.allow_mixture_change = allow_mixture_change

    def sample(self, g: int) -> np.ndarray:
        """Global sample ``g``: (seq_len + 1,) int64 tokens."""
        name, j = self.order.window(g)
        return read_window(self.streams[name], j, self.seq_len)

    def batch(self, samples: range) -> Batch:
        return window_batch(np.stack([self.sample(g) for g in samples]), self.eos_id)  # from (n, T+1)

    def epochs(self, samples_consumed: int) -> dict[str, float]:
        """Passes over each source's windows after ``samples_consumed`` global samples."""
        return self.order.epochs(samples_consumed)

    def epoch(self, samples_consumed: int) -> float:
        """The most-repeated source's passes (what ``max_epochs`` limits)."""
        return max(self.epochs(samples_consumed).values(), default=0.0)

    def state_dict(self) -> dict:
        state = {"fingerprint": self.fingerprint}
        if self.parts is not None:
            state["fingerprint_parts"] = dict(self.parts)
            state["segments"] = [s.to_json() for s in self.order.segments]
        return state

    def resume(self, state: dict, samples_consumed: int) -> str:
        segments = [Segment.from_json(s) for s in state.get("segments", [])]
        if state.get("fingerprint") == self.fingerprint:
            if segments:  # earlier mixtures live only in the checkpoint
                self.order = GlobalOrder(self.order.windows, segments, self.order.seed, self.order.shuffle)
            return ""
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
        self.order = old.reweighted(samples_consumed, dict(zip(last.names, last.weights, strict=True)))
        return f"mixture changed at global sample {samples_consumed:,}: {what}"


def eval_rows(n: int, max_samples: int, rank: int, world_size: int) -> range:
    """This rank's share of the first ``max_samples`` of ``n`` validation rows, strided over ranks.
    Every rank gets the same number (ZeRO-3 forwards are collective)."""
    n = min(max_samples, n)
    return range(rank, n - n % world_size, world_size)


def eval_samples(stream: TokenStream, seq_len: int, max_samples: int, rank: int, world_size: int,
                 eos_id: int | None = None) -> Batch:
    """A fixed set of validation windows (the first ``max_samples``, in order), strided over ranks."""
    mine = eval_rows(window_count(stream.total_tokens, seq_len), max_samples, rank, world_size)
    windows = [read_window(stream, j, seq_len) for j in mine]
    return window_batch(np.asarray(windows, dtype=np.int64).reshape(len(windows), seq_len + 1), eos_id)
