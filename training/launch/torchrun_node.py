"""torchrun with norallm's exit codes: ``norallm-torchrun [torchrun args]`` (or
``python -m training.launch.torchrun_node``), the launcher for one node of a Slurm job and for local runs.

Plain torchrun does not fit the time-limit path of the sbatch scripts in two ways: it dies on the
USR1 that the batch script forwards (torch < 2.8 has no ``--signals-to-handle``, and with it the
agent stops the workers after ``--shutdown-timeout``, too short for a 7B checkpoint), and it
exits 1 whatever its workers exited with, hiding the trainer's requeue code. This wrapper runs
the same launcher in-process, sends USR1 on to its own workers (the trainer saves and exits with
``EXIT_REQUEUE``), and exits with that code when every failed worker exited with it (likewise
``EXIT_NODE_LOST`` after a lost node, training.liveness).

A user error (a bad config, a missing tokenizer, a refused resume) makes the workers print one
``error:`` line and exit 2; plain torchrun then adds ~40 lines of ChildFailedError traceback and
exits 1. Here that becomes exit 2 with nothing added. Crashes keep torchrun's full report.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from norallm.exits import EXIT_NODE_LOST, EXIT_REQUEUE, EXIT_USER_ERROR


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (the workers torchrun started), read from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _forward_to_workers(signum, frame) -> None:
    for child in _children(os.getpid()):
        try:
            os.kill(child, signal.SIGUSR1)
        except ProcessLookupError:
            pass


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    # torchrun's agent handles TERM/INT/HUP/QUIT itself; USR1 it does not, so this stays ours.
    signal.signal(signal.SIGUSR1, _forward_to_workers)
    elastic_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    level = elastic_log.level
    elastic_log.setLevel(logging.CRITICAL)  # its "failed (exitcode: 2)" line; crashes are re-raised below
    try:
        torchrun(argv)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        if EXIT_USER_ERROR in codes and all(c == EXIT_USER_ERROR or c < 0 for c in codes):
            return EXIT_USER_ERROR  # the workers said what is wrong; the agent's traceback adds nothing
        elastic_log.setLevel(level)
        # A worker exits with EXIT_REQUEUE only after the collective save has completed on every
        # rank. The agent then stops the slower workers with SIGTERM, which can catch them in
        # interpreter shutdown (handlers already reset): a death by signal does not undo the save.
        if EXIT_REQUEUE in codes and all(c == EXIT_REQUEUE or c < 0 for c in codes):
            print(f"[torchrun_node] checkpoint saved; exiting with {EXIT_REQUEUE} for requeue", file=sys.stderr)
            return EXIT_REQUEUE
        if EXIT_NODE_LOST in codes and all(c in (EXIT_NODE_LOST, EXIT_USER_ERROR) or c < 0 for c in codes):
            return EXIT_NODE_LOST  # a worker named the lost node; the batch script requeues
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
