"""The one batch every loader yields and the loss reads.

- ``input_ids`` (B, T): the model's inputs;
- ``labels`` (B, T): the token each position predicts (the next one), ``IGNORE`` (−100) where no
  loss is taken: an SFT prompt or padding, nothing else;
- ``doc_ids`` (B, T): which packed document or conversation of its row each position belongs to,
  so that attention stays inside it; None for plain causal attention;
- ``bidirectional`` (B,) bool: rows that attend both ways inside each document (the masked rows
  of ``train.objective: hybrid``, data_pipeline.masking); None: every row is causal.

Loaders build batches of numpy arrays; training moves them onto the device as tensors
(``Batch.map``), so data_pipeline never needs torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Label of a position the loss skips (cross-entropy's ignore_index).
IGNORE = -100


@dataclass(frozen=True)
class Batch:
    input_ids: np.ndarray
    labels: np.ndarray
    doc_ids: np.ndarray | None = None
    bidirectional: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, rows) -> Batch:
        """The rows ``rows`` (a slice or an index array) of every field."""
        return self.map(lambda a: a[rows])

    def map(self, fn) -> Batch:
        """The same batch with ``fn`` applied to each array (to tensors, onto a device)."""
        return Batch(fn(self.input_ids), fn(self.labels), None if self.doc_ids is None else fn(self.doc_ids),
                     None if self.bidirectional is None else fn(self.bidirectional))

    @property
    def trained_tokens(self) -> int:
        """How many targets the loss is taken on (read on the host, before the batch moves)."""
        return int((self.labels != IGNORE).sum())


def document_ids(inputs, eos_id: int):
    """(B, T) → (B, T): which document of its row each position belongs to (0, 1, ...); a new
    document starts right after every EOS. numpy arrays and torch tensors alike."""
    starts = inputs * 0
    starts[:, 1:] = inputs[:, :-1] == eos_id
    return starts.cumsum(-1)


def window_batch(windows: np.ndarray, eos_id: int | None = None) -> Batch:
    """(B, T+1) windows of packed text → their batch: every next token is a target; with
    ``eos_id`` (data.document_boundaries) each document, ended by EOS, attends only to itself."""
    inputs = windows[:, :-1]
    return Batch(inputs, windows[:, 1:], None if eos_id is None else document_ids(inputs, eos_id))

