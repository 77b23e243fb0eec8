"""The masked half of NORA 11B's hybrid objective (``train.objective: hybrid``).

A fraction of the training samples (``masked_fraction``, 10 % in NORA's recipe) become masked
samples (drawn sample by sample, or with ``batch_size`` global batch by global batch, so that a
step is all masked or all causal as NORA's masked-LM batches were): spans of 1–3 tokens covering
``mask_ratio`` (1/6) of the sample's tokens are corrupted — 80 % to ``<mask>``, 10 % to a random
token, 10 % left as they were — the row attends bidirectionally inside each of its documents, and
the loss is taken on the corrupted positions only. The other samples stay causal windows.

Labels keep the batch's one meaning (data_pipeline.batch: position t predicts the token after it):
a corrupted token at position p is predicted from position p − 1, which in a bidirectional row
sees the corrupted input at p and its context on both sides (masked next-token prediction, as in
GPT-BERT, which NORA's hybrid comes from). So the model's head and the loss need no second form.
A position whose predecessor ends a document (an EOS) is never chosen, nor is an EOS itself: the
document boundaries come from the uncorrupted tokens and every prediction stays inside its
document.

Every choice is a pure function of the run's seed, the global sample index and the sample's
tokens (a generator seeded from their hash), and a batch's draw of the seed and the global batch
index, so a resumed run corrupts the samples exactly as the run it continues did, whatever the
world size or micro-batching (the global batch size is fixed across a resume).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from data_pipeline.batch import IGNORE, Batch


@dataclass(frozen=True)
class SpanMasking:
    mask_id: int
    random_ids: tuple[int, int]  # [low, high): the ids a corrupted token may become at random
    eos_id: int | None
    seed: int
    masked_fraction: float = 0.1
    mask_ratio: float = 1 / 6
    span: tuple[int, int] = (1, 3)  # span lengths, inclusive
    to_mask: float = 0.8
    to_random: float = 0.1
    batch_size: int | None = None  # the global batch: masked or not as a whole (None: each sample alone)

    def rng(self, sample: int, window: np.ndarray) -> np.random.Generator:
        """The generator of sample ``sample`` with tokens ``window``: its choices and nothing else's."""
        digest = hashlib.blake2b(np.ascontiguousarray(window, dtype=np.int64).tobytes(), digest_size=8,
                                 key=b"norallm-hybrid").digest()
        return np.random.default_rng([self.seed, sample, int.from_bytes(digest, "little")])

    def masked(self, sample: int, rng: np.random.Generator) -> bool:
        """Whether global sample ``sample`` (whose generator is ``rng``) is a masked one: its own
        draw, or with ``batch_size`` its global batch's draw, the same for every row of it."""
        own = rng.random()  # drawn either way: a sample's corruption does not depend on the unit
        if self.batch_size is None:
            return own < self.masked_fraction
        step = np.random.default_rng([self.seed, sample // self.batch_size, 0x6D61736B])  # "mask"
        return step.random() < self.masked_fraction

    def positions(self, window: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Sorted input positions (1 … T − 1 of a (T + 1,) window) to corrupt: spans of ``span``
        lengths over the eligible ones until ``mask_ratio`` of them are covered."""
        inputs = window[:-1]
        eligible = np.zeros(len(inputs), dtype=bool)
        eligible[1:] = True
        if self.eos_id is not None:
            eligible &= inputs != self.eos_id
            eligible[1:] &= inputs[:-1] != self.eos_id
        want = int(round(self.mask_ratio * int(eligible.sum())))
        chosen = np.zeros_like(eligible)
        candidates = np.flatnonzero(eligible)
        lo, hi = self.span
        tries = 0
        while int(chosen.sum()) < want and tries < 8 * want + 8:
            tries += 1
            start = int(candidates[rng.integers(len(candidates))])
            length = int(rng.integers(lo, hi + 1))
            span = np.arange(start, min(start + length, len(inputs)))
            span = span[eligible[span]]
            room = want - int(chosen.sum())
            chosen[span[:room]] = True
        return np.flatnonzero(chosen)

    def corrupt(self, window: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels) of a masked sample: the corrupted inputs, and the original token of
        each corrupted position as the label of the position before it (IGNORE elsewhere)."""
        inputs = window[:-1].copy()
        labels = np.full(len(inputs), IGNORE, dtype=window.dtype)
        pos = self.positions(window, rng)
        labels[pos - 1] = window[pos]
        draw = rng.random(len(pos))
        masked, randomized = draw < self.to_mask, (draw >= self.to_mask) & (draw < self.to_mask + self.to_random)
        inputs[pos[masked]] = self.mask_id
        inputs[pos[randomized]] = rng.integers(*self.random_ids, size=int(randomized.sum()))
        return inputs, labels

    def apply(self, batch: Batch, samples, every_row: bool = False) -> Batch:
        """``batch`` of causal windows (global samples ``samples``, one per row) with the rows that
        draw a masked sample (every row with ``every_row``: the masked evaluation) corrupted."""
        windows = np.concatenate([batch.input_ids, batch.labels[:, -1:]], axis=1)  # (B, T + 1)
        inputs, labels = batch.input_ids.copy(), batch.labels.copy()
        bidirectional = np.zeros(len(batch), dtype=bool)
        for row, g in enumerate(samples):
            rng = self.rng(int(g), windows[row])
            if self.masked(int(g), rng) or every_row:
                inputs[row], labels[row] = self.corrupt(windows[row], rng)
                bidirectional[row] = True
        return Batch(inputs, labels, batch.doc_ids, bidirectional)


class HybridWindows:
    """A sample source (data_pipeline.loader.SampleSource) whose samples are those of ``inner``,
    a fraction of them masked by ``masking``. Masked samples train fewer targets than causal
    ones, so the loss counts them across ranks (``every_target_trained`` is False)."""

    every_target_trained = False

    def __init__(self, inner, masking: SpanMasking):
        self.inner, self.masking = inner, masking

    def batch(self, samples: range) -> Batch:
        return self.masking.apply(self.inner.batch(samples), samples)

    def epoch(self, samples_consumed: int) -> float:
        return self.inner.epoch(samples_consumed)

    def epochs(self, samples_consumed: int) -> dict[str, float]:
        return self.inner.epochs(samples_consumed)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def resume(self, state: dict, samples_consumed: int) -> str:
        return self.inner.resume(state, samples_consumed)

    def __getattr__(self, name):  # the mixture's other facts (order, streams) for whoever reads them
        return getattr(self.inner, name)
