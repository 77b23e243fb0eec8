"""A stop request that arrives before the trainer is ready is not lost.

Slurm's time-limit warning (SIGUSR1) or a ``scancel`` (SIGTERM) can come while a rank is still
importing torch and DeepSpeed or loading a 7B base, long before the training loop installs its
handlers; by default either signal would kill the rank without a checkpoint. ``remember()``,
called first thing by ``norallm train``, notes them instead; the trainer's stop flag starts set
when one came, so the rank trains one step, saves and exits for requeue like any other stop.
Ctrl-C keeps its default during start-up: there is nothing to save yet, and a hung start-up must
stay abortable.
"""

from __future__ import annotations

import os
import signal
import sys

_seen: list[int] = []


def _note(signum, frame) -> None:
    _seen.append(signum)


def remember() -> None:
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _note)


def arrived_early() -> bool:
    """Whether SIGUSR1 or SIGTERM came since ``remember()``."""
    return bool(_seen)


class StopFlag:
    """Set by SIGUSR1/SIGTERM and a first Ctrl-C (SIGINT); the loop finishes the current step, saves
    and exits. A second Ctrl-C aborts at once (KeyboardInterrupt), as users expect."""

    def __init__(self):
        self.requested = arrived_early()  # during start-up
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt
            if os.environ.get("RANK", "0") == "0":
                print("[train] Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again aborts without saving)",
                      file=sys.stderr, flush=True)
        self.requested = True

    def agreed(self) -> bool:
        """Every rank's view, agreed on the host once per step (no device sync)."""
        from training import distributed  # (here: ``remember`` runs before torch is imported)

        return distributed.any_rank(self.requested)
