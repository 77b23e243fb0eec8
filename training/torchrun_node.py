"""torchrun for one node of a Slurm job: ``python -m training.torchrun_node [torchrun args]``.

Plain torchrun does not fit the time-limit path of the sbatch scripts in two ways: it dies on the
USR1 that the batch script forwards (torch < 2.8 has no ``--signals-to-handle``, and with it the
agent stops the workers after ``--shutdown-timeout``, too short for a 7B checkpoint), and it
exits 1 whatever its workers exited with, hiding the trainer's requeue code. This wrapper runs
the same launcher in-process, sends USR1 on to its own workers (the trainer saves and exits with
``EXIT_REQUEUE``), and exits with that code when every failed worker exited with it.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

EXIT_REQUEUE = 42  # training.trainer.EXIT_REQUEUE; not imported to keep this launcher light


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
    try:
        torchrun(argv)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        # A worker exits with EXIT_REQUEUE only after the collective save has completed on every
        # rank. The agent then stops the slower workers with SIGTERM, which can catch them in
        # interpreter shutdown (handlers already reset): a death by signal does not undo the save.
        if EXIT_REQUEUE in codes and all(c == EXIT_REQUEUE or c < 0 for c in codes):
            print(f"[torchrun_node] checkpoint saved; exiting with {EXIT_REQUEUE} for requeue", file=sys.stderr)
            return EXIT_REQUEUE
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
