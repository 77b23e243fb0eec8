"""Data-pipeline benchmark (a script, not a test): measured side by side in one run on this machine.

(a) `prepare` throughput over raw HF `tokenizers` encoding of the same texts, 1 and 2 workers
    (target ≥ 0.9): the raw baseline has the texts in memory already and only tokenizes, in batches
    of 512 like prepare; with 2 workers it runs 2 threads. A third baseline gives raw encoding the
    larger BPE cache that prepare's tokenizer uses, so that row shows prepare's own overhead.
(b) `prepare` against a `datasets` pipeline on the same files: load_dataset("json") + map(batched=True)
    with the same tokenizer, once lean (raw tokenizers, ids only) and once as usually written (a
    transformers tokenizer called on the batch) (target ≥ 2×).
(c) global-order set-up time and peak RSS for the 260B-token plan of configs/normistral-7b-warm.yaml
    (~127M samples of 2048; target ≤ 10 s, ≤ 1 GiB), and the cost of one sample lookup.
(d) loader tokens/s per rank on real shards (target ≥ 1M).

Usage: python bench/data_pipeline.py [--mb 16] [--runs 3] [--out bench/results]
Needs ../shared/data/norwegian (real Bokmål/Nynorsk text), replicated to --mb megabytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "norwegian"
sys.path.insert(0, str(REPO))


def build_corpus(out: Path, megabytes: float) -> tuple[list[Path], int, int]:
    """Real documents, repeated with a copy number so that every document is distinct."""
    docs = [json.loads(line)["text"] for f in ("train.jsonl", "dev.jsonl") for line in open(SHARED / f, encoding="utf-8")]
    target = int(megabytes * 1e6)
    files, written, n_docs, copy = [], 0, 0, 0
    while written < target:
        path = out / f"part-{copy:03d}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for d in docs:
                line = json.dumps({"text": f"{d} ({copy})"}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode())
                n_docs += 1
        files.append(path)
        copy += 1
    return files, written, n_docs


def run_python(code: str, env: dict | None = None) -> dict:
    """Run code in a fresh interpreter (thread settings of tokenizers are per process); it prints JSON."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=3600)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Every contender reports wall seconds and CPU seconds (its own and its worker processes'): on a
# shared machine the CPU time measures the work done, the best wall time of N runs the speed.
_CLOCK = """
import json, resource, time
def cpu_seconds():
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))
"""


def raw_encode(tok_dir: Path, files: list[Path], threads: int, method: str, cache_words: int | None = None) -> dict:
    """Raw HF tokenizers on texts already in memory; ``cache_words``: prepare's larger BPE cache."""
    env = {"TOKENIZERS_PARALLELISM": "false"} if threads == 1 else {"TOKENIZERS_PARALLELISM": "true",
                                                                    "RAYON_RS_NUM_CPUS": str(threads)}
    return run_python(_CLOCK + f"""
from tokenizers import Tokenizer
tok = Tokenizer.from_file({str(tok_dir / "tokenizer.json")!r})
if {cache_words!r}:
    tok.model._resize_cache({cache_words!r})
texts = [json.loads(l)["text"] for f in {[str(f) for f in files]!r} for l in open(f, encoding="utf-8")]
encode = tok.{method}
t0, c0 = time.perf_counter(), cpu_seconds()
n = 0
for i in range(0, len(texts), 512):  # prepare's batch size (one call on all texts was slower)
    n += sum(len(e.ids) for e in encode(texts[i : i + 512], add_special_tokens=False))
print(json.dumps({{"seconds": time.perf_counter() - t0, "cpu_seconds": cpu_seconds() - c0, "tokens": n}}))
""", env)


def run_prepare(tok_dir: Path, files: list[Path], shards: Path, workers: int) -> dict:
    shutil.rmtree(shards, ignore_errors=True)
    return run_python(_CLOCK + f"""
from data_pipeline.prepare import PrepareOptions, prepare
from data_pipeline.config import SourceConfig
from data_pipeline.tokenizer import Tokenizer
tok = Tokenizer({str(tok_dir)!r})
spec = SourceConfig(name="nor", paths={[str(f) for f in files]!r})
opts = PrepareOptions(valid_fraction=0.01, progress=False, workers={workers}, unit_bytes=2**18)
t0, c0 = time.perf_counter(), cpu_seconds()
(m,) = prepare([spec], tok, {str(shards)!r}, opts)
tokens = sum(m["tokens"].values()) - sum(m["documents"].values())  # without the EOS prepare adds
print(json.dumps({{"seconds": time.perf_counter() - t0, "cpu_seconds": cpu_seconds() - c0, "tokens": tokens}}))
""", {"TOKENIZERS_PARALLELISM": "false"})


def datasets_map(tok_dir: Path, files: list[Path], cache: Path, num_proc: int, idiom: bool = False) -> dict:
    """load_dataset("json") + map(batched=True): lean (raw tokenizers, ids only), or the common idiom
    (``idiom``: a transformers tokenizer called on the batch: input_ids and attention_mask)."""
    shutil.rmtree(cache, ignore_errors=True)
    return run_python(_CLOCK + f"""
import datasets
from tokenizers import Tokenizer
from transformers import AutoTokenizer
datasets.disable_progress_bars()
if {idiom!r}:
    hf = AutoTokenizer.from_pretrained({str(tok_dir)!r})
    def encode(batch):
        return hf(batch["text"])
else:
    tok = Tokenizer.from_file({str(tok_dir / "tokenizer.json")!r})
    def encode(batch):
        return {{"input_ids": [e.ids for e in tok.encode_batch(batch["text"], add_special_tokens=False)]}}
t0, c0 = time.perf_counter(), cpu_seconds()
ds = datasets.load_dataset("json", data_files={[str(f) for f in files]!r}, split="train", cache_dir={str(cache)!r})
ds = ds.map(encode, batched=True, num_proc={num_proc if num_proc > 1 else None}, remove_columns=["text"])
seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0  # the count below is the harness's
n = sum(len(x) for x in ds.with_format("numpy")["input_ids"])
print(json.dumps({{"seconds": seconds, "cpu_seconds": cpu, "tokens": n}}))
""", {"TOKENIZERS_PARALLELISM": "false"})


def best_of(runs: int, contenders: dict) -> dict:
    """Run the contenders in turn, ``runs`` rounds; per contender the best wall and CPU time."""
    results: dict[str, list[dict]] = {name: [] for name in contenders}
    for _ in range(runs):
        for name, fn in contenders.items():
            results[name].append(fn())
    out = {}
    for name, rs in results.items():
        assert len({r["tokens"] for r in rs}) == 1, rs
        out[name] = {"tokens": rs[0]["tokens"], "seconds": min(r["seconds"] for r in rs),
                     "cpu_seconds": min(r["cpu_seconds"] for r in rs), "all_seconds": [r["seconds"] for r in rs]}
    tokens = {r["tokens"] for r in out.values()}
    assert len(tokens) == 1, f"the contenders tokenized different texts: {out}"
    return out


def global_order_setup() -> dict:
    return run_python("""
        import json, random, resource, time
        t0 = time.perf_counter()
        import training.model.build  # torch and transformers: what any norallm process imports first
        from data_pipeline.mixture import GlobalOrder
        from training.config import load_config
        from training.data.modes import Pretraining
        t_import = time.perf_counter() - t0
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t1 = time.perf_counter()
        cfg = load_config("configs/normistral-7b-warm.yaml")
        plan = Pretraining(cfg).plan()
        order = GlobalOrder.single({s.name: s.windows for s in plan.sources}, plan.weights(), seed=1234)
        first = order.window(0)
        setup = time.perf_counter() - t1
        n = plan.steps * plan.global_batch_size
        rng = random.Random(0)
        lookup_us = {}
        for where, lo, hi in (("start", 0, 10**6), ("end", n - 10**6, n)):
            idx = [rng.randrange(lo, hi) for _ in range(20_000)]
            t2 = time.perf_counter()
            for g in idx:
                order.window(g)
            lookup_us[where] = (time.perf_counter() - t2) / len(idx) * 1e6
        t3 = time.perf_counter()
        counts = order.consumed(n)
        t_counts = time.perf_counter() - t3
        assert counts == {s.name: s.samples for s in plan.sources}
        print(json.dumps({"samples": n, "total_tokens": plan.total_tokens, "setup_s": setup, "import_s": t_import,
                          "rss_before_mib": rss_before,
                          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          "lookup_us_start": lookup_us["start"], "lookup_us_end": lookup_us["end"],
                          "counts_at_end_ms": t_counts * 1e3}))
    """)


def loader_throughput(tok_dir: Path, shards: Path) -> dict:
    return run_python(f"""
        import json, time
        from data_pipeline.loader import Loader, MixtureWindows
        from data_pipeline.mixture import GlobalOrder, window_count
        from data_pipeline.shards import open_split
        from data_pipeline.tokenizer import Tokenizer
        tok = Tokenizer({str(tok_dir)!r})
        stream = open_split({str(shards)!r}, ["nor"], "train", tok.fingerprint)
        seq_len, world, global_batch, micro = 2048, 8, 256, 4
        # the one prepared source read as two sources (80/20), as a mixture is read
        windows = dict.fromkeys("ab", window_count(stream.total_tokens, seq_len))
        order = GlobalOrder.single(windows, {{"a": 4, "b": 1}}, seed=1)
        loader = Loader(MixtureWindows({{"a": stream, "b": stream}}, order, seq_len), global_batch, micro, rank=0,
                        world_size=world)
        loader.next_step()  # warm the page cache and the permutations
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 5:
            batches = loader.next_step()
            steps += 1
        dt = time.perf_counter() - t0
        per_rank = global_batch // world
        print(json.dumps({{"tokens_per_s": steps * per_rank * (seq_len + 1) / dt, "steps": steps,
                          "samples_per_s": steps * per_rank / dt, "epochs": loader.epoch,
                          "shape": list(batches[0].input_ids.shape)}}))
    """)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=16, help="corpus size in MB (the shared data, replicated)")
    ap.add_argument("--runs", type=int, default=3, help="alternating rounds per measurement (best is kept)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where to write the results")
    args = ap.parse_args()
    if not (SHARED / "train.jsonl").is_file():
        sys.exit(f"needs the shared Norwegian corpus at {SHARED}")
    from data_pipeline.tokenizer import BPE_CACHE_WORDS, train_bpe

    work = Path(tempfile.mkdtemp(prefix="norallm-bench-"))
    try:
        files, n_bytes, n_docs = build_corpus(work, args.mb)
        texts = [json.loads(line)["text"] for line in open(SHARED / "train.jsonl", encoding="utf-8")]
        tok_dir = work / "tok"
        train_bpe(texts, tok_dir, vocab_size=32768)
        results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                     "platform": platform.platform()},
                         "corpus": {"bytes": n_bytes, "documents": n_docs, "files": len(files)}}
        rows = []
        for workers in (1, 2):
            m = best_of(args.runs, {
                "raw_encode_batch": lambda w=workers: raw_encode(tok_dir, files, w, "encode_batch"),
                "raw_encode_batch_fast": lambda w=workers: raw_encode(tok_dir, files, w, "encode_batch_fast"),
                "raw_encode_batch_fast_cache": lambda w=workers: raw_encode(tok_dir, files, w, "encode_batch_fast",
                                                                            BPE_CACHE_WORDS),
                "prepare": lambda w=workers: run_prepare(tok_dir, files, work / "shards", w),
                "datasets_map": lambda w=workers: datasets_map(tok_dir, files, work / "hf-cache", w),
                "datasets_map_idiom": lambda w=workers: datasets_map(tok_dir, files, work / "hf-cache", w, True),
            })
            results[f"workers{workers}"] = m
            prep = m["prepare"]
            for base, label in (("raw_encode_batch", "encode_batch"), ("raw_encode_batch_fast", "encode_batch_fast"),
                                ("raw_encode_batch_fast_cache", "encode_batch_fast + prepare's BPE cache")):
                b = m[base]
                rows.append((f"(a) prepare, {workers} worker(s) vs raw {label}, {workers} thread(s)",
                             f"{prep['tokens'] / prep['seconds'] / 1e6:.2f}M vs {b['tokens'] / b['seconds'] / 1e6:.2f}M"
                             " tok/s", f"{b['seconds'] / prep['seconds']:.2f}",
                             f"{b['cpu_seconds'] / prep['cpu_seconds']:.2f}", "≥ 0.9"))
            for base, label in (("datasets_map", "raw tokenizers, ids only"),
                                ("datasets_map_idiom", "AutoTokenizer(batch), the usual idiom")):
                hf = m[base]
                rows.append((f"(b) prepare vs datasets load+map(batched, {label}), {workers} process(es)",
                             f"{prep['seconds']:.1f} s vs {hf['seconds']:.1f} s",
                             f"{hf['seconds'] / prep['seconds']:.2f}", f"{hf['cpu_seconds'] / prep['cpu_seconds']:.2f}",
                             "≥ 2"))
            shutil.copytree(work / "shards", work / f"shards{workers}", dirs_exist_ok=True)
        order = global_order_setup()
        results["c_global_order"] = order
        rows.append(("(c) global order for the 260B plan: set-up time",
                     f"{order['setup_s']:.3f} s ({order['samples']:,} samples)", "", "", "≤ 10 s"))
        rows.append(("    peak RSS of the process (torch & transformers imported)",
                     f"{order['peak_rss_mib']:.0f} MiB (after imports: {order['rss_before_mib']:.0f} MiB)", "", "",
                     "≤ 1 GiB"))
        rows.append(("    one sample lookup, near the start / near the end",
                     f"{order['lookup_us_start']:.1f} µs / {order['lookup_us_end']:.1f} µs", "", "", "O(1)"))
        loader = loader_throughput(tok_dir, work / "shards1")
        results["d_loader"] = loader
        rows.append(("(d) loader, rank 0 of 8, seq_len 2048, 80/20 mixture",
                     f"{loader['tokens_per_s'] / 1e6:.1f}M tokens/s ({loader['samples_per_s']:,.0f} samples/s)",
                     "", "", "≥ 1M"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    lines = [f"norallm data-pipeline benchmark — {results['machine']['cpus']} CPUs, Python "
             f"{results['machine']['python']}; corpus {n_bytes / 1e6:.1f} MB, {n_docs:,} documents "
             f"(../shared/data/norwegian replicated), byte-level BPE with 32,768 entries", ""]
    load = os.getloadavg()
    lines.insert(1, f"ratios: wall = best of {args.runs} alternating runs; cpu = the same work per CPU-second "
                    f"(robust on a shared machine). Load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    lines += [f"{'':{width}}  {'':44} {'wall':>6} {'cpu':>6}"]
    lines += [f"{a.ljust(width)}  {b:<44} {c:>6} {d:>6}  target {e}" for a, b, c, d, e in rows]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_pipeline.txt").write_text(text + "\n", encoding="utf-8")
    (args.out / "data_pipeline.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
