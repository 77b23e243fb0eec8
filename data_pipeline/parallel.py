"""Running prepare's work units: in this process (one worker) or in a pool of worker processes,
with one progress display (documents, tokens, input MB/s, ETA) for all of them.

Workers are forked where the platform has fork (they start at once and inherit the loaded
tokenizer; HF tokenizers and torch both support fork, as torch's DataLoader workers rely on) and
spawned elsewhere. Each tokenizes single-threaded, so ``--workers`` is the number of busy cores.
"""

from __future__ import annotations

import os
import queue
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from data_pipeline.tokenizer import Tokenizer

LOG_EVERY_S = 30.0  # progress lines in logs (no terminal): one per this many seconds


class Progress:
    """Totals over all units of this run; a tqdm bar on a terminal, else a log line now and then."""

    def __init__(self, total_bytes: int, units: int, enabled: bool, label: str = "prepare"):
        self.total_bytes, self.units, self.label = total_bytes, units, label
        self.documents = self.tokens = self.input_bytes = self.units_done = 0
        self.t0 = self._last_log = time.monotonic()
        self.bar = None
        self.log = enabled and not sys.stderr.isatty()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            tqdm.monitor_interval = 0  # no monitor thread: workers may be forked while the bar runs
            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=label, dynamic_ncols=True)

    def update(self, documents: int, tokens: int, input_bytes: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.input_bytes += input_bytes
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.documents:,} docs, {self.tokens:,} tokens, "
                                     f"{self.units_done}/{self.units} units", refresh=False)
            self.bar.update(input_bytes)
        elif self.log and time.monotonic() - self._last_log >= LOG_EVERY_S:
            self._last_log = time.monotonic()
            print(f"[{self.label}] {self.line()}", file=sys.stderr, flush=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = self.input_bytes / elapsed
        left = max(self.total_bytes - self.input_bytes, 0)
        eta = time.strftime("%H:%M:%S", time.gmtime(left / rate)) if rate > 0 else "?"
        return (f"{self.units_done}/{self.units} units, {self.documents:,} documents, {self.tokens:,} tokens, "
                f"{rate / 1e6:.1f} MB/s, ETA {eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


_worker_tokenizer: Tokenizer | None = None
_worker_queue = None


def _init_worker(path: str | None, kind: str, fingerprint: str, progress_queue) -> None:
    global _worker_tokenizer, _worker_queue
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _worker_tokenizer is None and path is not None:  # spawned: load it; forked: inherited from the parent
        _worker_tokenizer = Tokenizer(path, kind=kind)
        if _worker_tokenizer.fingerprint != fingerprint:
            raise RuntimeError(f"tokenizer {path} changed while preparing; re-run prepare")
    if _worker_tokenizer is not None:
        _worker_tokenizer.threads = 1
    _worker_queue = progress_queue


def _run_in_worker(process: Callable, job) -> dict:
    def report(documents: int, tokens: int, input_bytes: int) -> None:
        _worker_queue.put((documents, tokens, input_bytes))

    return process(job, _worker_tokenizer, report)


def run_jobs(process: Callable, jobs: list, tokenizer: Tokenizer | None, opts, on_done: Callable[[dict], None],
             label: str = "prepare") -> None:
    """``process(job, tokenizer, report)`` for every job (data_pipeline.prepare's units, or
    data_pipeline.dedup's without a tokenizer; passed in, a module-level function, so that this
    module imports neither); ``on_done(record)`` runs in this process as each unit finishes. The
    first error (a DataError from a worker included) stops the pool and is raised here."""
    progress = Progress(sum(j.unit.nbytes for j in jobs), len(jobs), opts.progress, label)
    try:
        if opts.workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                record = process(job, tokenizer, progress.update)
                progress.units_done += 1
                on_done(record)
        else:
            _run_pool(process, jobs, tokenizer, opts.workers, progress, on_done)
    finally:
        progress.close()
    if jobs and opts.progress:
        print(f"[{label}] {progress.line()}", flush=True)


def _run_pool(process, jobs, tokenizer, workers, progress, on_done) -> None:
    import multiprocessing

    global _worker_tokenizer
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    updates = ctx.Queue()
    _worker_tokenizer = tokenizer if ctx.get_start_method() == "fork" else None

    def drain() -> None:
        while True:
            try:
                progress.update(*updates.get_nowait())
            except queue.Empty:
                return

    args = (None, "", "", updates) if tokenizer is None else (str(tokenizer.path), tokenizer.kind,
                                                              tokenizer.fingerprint, updates)
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
                             initargs=args) as pool:
        pending = {pool.submit(_run_in_worker, process, job) for job in jobs}
        try:
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                drain()
                for future in done:
                    record = future.result()  # re-raises a worker's error here
                    progress.units_done += 1
                    on_done(record)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        finally:
            _worker_tokenizer = None
    drain()
