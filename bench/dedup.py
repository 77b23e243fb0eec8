"""Deduplication and decontamination benchmark (a script, not a test): recall and precision on
the shared Norwegian corpus with planted duplicates and planted test passages, signature
throughput per core, and the clustering pass's peak memory per document.

Corpus (built in a temp dir, never in the repo): ../shared/data/norwegian/train.jsonl split into
two sources, web_a (the first half) and web_b (the rest), then planted:

- exact: copies of web_a documents with case, spacing and punctuation changed, within web_a and
  in web_b (across);
- near: copies of web_a documents with 1, 2, 5 or 10 % of their words edited (substituted,
  deleted or inserted, words drawn from the corpus), within web_a and in web_b;
- contaminated: web_b documents with a window of 13, 20 or 50 words of a dev.jsonl document
  spliced in (a window whose words are all words after normalisation: "–" alone is none);
  dev.jsonl is the evaluation set decontamination checks against.

Every copy comes after its original in the global order, so the copy is the one to drop. A
dropped document that was not planted counts against precision unless it really is a near
duplicate of an earlier document (5-gram Jaccard ≥ 0.5, checked by brute force) — the base corpus
has a few of those.

Memory: signature files for ``--cluster-docs`` synthetic documents (random band values, 10 %
exact and 10 % near duplicates) are clustered in a fresh process; its peak RSS minus that of the
same process before clustering, per document, is compared with the formula in
data_pipeline/clusters.py.

Usage: python bench/dedup.py [--out bench/results] [--cluster-docs 4000000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "norwegian"
sys.path.insert(0, str(REPO))

from data_pipeline.clusters import REASONS, read_state  # noqa: E402
from data_pipeline.config import SourceConfig  # noqa: E402
from data_pipeline.contamination import file_passages  # noqa: E402
from data_pipeline.dedup import DedupOptions, dedup  # noqa: E402
from data_pipeline.normalize import words  # noqa: E402
from data_pipeline.sources import BadRecords  # noqa: E402

RATES = (0.01, 0.02, 0.05, 0.10)
WINDOWS = (13, 20, 50)
PER_KIND = 40  # planted documents per kind (and per rate / window)


def cpu_seconds() -> float:
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def restyle(text: str, rng: random.Random) -> str:
    """The same normalised words: case, spacing and punctuation changed."""
    t = text.upper() if rng.random() < 0.5 else text.lower()
    return re.sub(r" ", "  ", t, count=5) + " !!"


def edit(text: str, rate: float, vocab: list[str], rng: random.Random) -> str:
    w = text.split()
    for _ in range(max(1, round(rate * len(w)))):
        op, k = rng.choice("sdi"), rng.randrange(len(w))
        if op == "s":
            w[k] = rng.choice(vocab)
        elif op == "d" and len(w) > 1:
            del w[k]
        else:
            w.insert(k, rng.choice(vocab))
    return " ".join(w)


def build(out: Path, seed: int = 0) -> tuple[dict, dict]:
    """The two sources' files and, per source, ordinal → planted kind."""
    rng = random.Random(seed)
    train = [json.loads(x)["text"] for x in (SHARED / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    dev = [json.loads(x)["text"] for x in (SHARED / "dev.jsonl").read_text(encoding="utf-8").splitlines()]
    vocab = sorted({w for t in train[:500] for w in t.split()})
    half = len(train) // 2
    a, b = list(train[:half]), list(train[half:])
    planted = {"web_a": {}, "web_b": {}}
    long_a = [i for i, t in enumerate(a) if len(t.split()) >= 60]

    def plant(target: str, text: str, kind: str, at: int | None = None) -> None:
        docs = a if target == "web_a" else b
        if at is None:
            at = len(docs)
            docs.append(text)
        docs[at] = text
        planted[target][at] = kind

    originals = rng.sample(long_a, 2 * PER_KIND * (1 + len(RATES)))
    for k, where in enumerate(("web_a", "web_b")):
        picks = originals[k * PER_KIND * (1 + len(RATES)):(k + 1) * PER_KIND * (1 + len(RATES))]
        for i in picks[:PER_KIND]:
            plant(where, restyle(a[i], rng), f"exact_{'within' if where == 'web_a' else 'across'}")
        for r, rate in enumerate(RATES):
            for i in picks[PER_KIND * (1 + r):PER_KIND * (2 + r)]:
                plant(where, edit(a[i], rate, vocab, rng), f"near_{rate:.0%}_{'within' if where == 'web_a' else 'across'}")
    long_dev = [t for t in dev if len(t.split()) >= 60]
    hosts = rng.sample(range(half // 2), PER_KIND * len(WINDOWS))  # web_b's own documents, changed in place
    for n, window in enumerate(WINDOWS):
        for h in hosts[n * PER_KIND:(n + 1) * PER_KIND]:
            while True:  # a window of `window` words that normalises to as many (no lone dash or quote)
                w = rng.choice(long_dev).split()
                start = rng.randrange(len(w) - window)
                if len(words(" ".join(w[start:start + window]))) >= window:
                    break
            host = b[h].split()
            cut = rng.randrange(len(host))
            plant("web_b", " ".join(host[:cut] + w[start:start + window] + host[cut:]), f"contaminated_{window}", h)
    for name, docs in (("a", a), ("b", b)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs)
    return {"web_a": a, "web_b": b}, planted


def drops(root: Path) -> dict[str, dict[int, tuple[str, str]]]:
    import numpy as np

    state = read_state(root)
    out = {}
    for name, entry in state["sources"].items():
        got, base = {}, 0
        for u in entry["units"]:
            for o, r, k in np.load(root / name / f"drop-{u['index']:05d}.npy").tolist():
                got[base + o] = (REASONS[r], state["order"][k])
            base += u["documents"]
        out[name] = got
    return out


def shingle_set(text: str, n: int = 5) -> set:
    w = words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


_SHINGLES: dict = {}


def genuine_exact(texts: dict, source: str, ordinal: int) -> bool:
    """Whether an earlier document has the same normalised words."""
    mine = words(texts[source][ordinal])
    return any(words(texts[name][i]) == mine for name in ("web_a", "web_b") for i in range(len(texts[name]))
               if (name, i) < (source, ordinal))


def genuine_near(texts: dict, source: str, ordinal: int) -> float:
    """The largest 5-gram Jaccard between the document and any earlier one (global order: web_a
    before web_b, then by ordinal)."""
    def sets(s: str, i: int) -> set:
        if (s, i) not in _SHINGLES:
            _SHINGLES[(s, i)] = shingle_set(texts[s][i])
        return _SHINGLES[(s, i)]

    mine, best = sets(source, ordinal), 0.0
    earlier = [(name, i) for name in ("web_a", "web_b") for i in range(len(texts[name])) if (name, i) < (source, ordinal)]
    for name, i in earlier:
        other = sets(name, i)
        if mine and other:
            best = max(best, len(mine & other) / len(mine | other))
    return best


def score(texts: dict, planted: dict, got: dict) -> dict:
    kinds = sorted({k for p in planted.values() for k in p.values()})
    rows = {}
    for kind in kinds:
        want = "exact" if kind.startswith("exact") else "near" if kind.startswith("near") else "contaminated"
        cases = [(s, o) for s, p in planted.items() for o, k in p.items() if k == kind]
        found = [(s, o) for s, o in cases if o in got[s] and (got[s][o][0] == want or
                                                              (want == "near" and got[s][o][0] == "exact"))]
        rows[kind] = {"planted": len(cases), "found": len(found), "recall": len(found) / len(cases)}
    for reason in ("exact", "near", "contaminated"):
        flagged = [(s, o) for s in got for o, (r, _) in got[s].items() if r == reason]
        planted_hit = [(s, o) for s, o in flagged if o in planted[s]]
        unplanted = [(s, o) for s, o in flagged if o not in planted[s]]
        genuine = [(s, o) for s, o in unplanted if reason == "contaminated" or (
            genuine_exact(texts, s, o) if reason == "exact" else genuine_near(texts, s, o) >= 0.5)]
        rows[f"precision_{reason}"] = {
            "flagged": len(flagged), "planted": len(planted_hit), "unplanted_genuine": len(genuine),
            "unplanted_false": len(unplanted) - len(genuine),
            "precision": (len(planted_hit) + len(genuine)) / len(flagged) if flagged else None,
            "precision_planted_only": len(planted_hit) / len(flagged) if flagged else None}
    return rows


def run_quality(settings: dict, tmp: Path, texts: dict, planted: dict) -> dict:
    sources = [SourceConfig(name="web_a", paths=[str(tmp / "a.jsonl")]),
               SourceConfig(name="web_b", paths=[str(tmp / "b.jsonl")])]
    opts = DedupOptions(**settings, ngram_words=13, contamination="drop", reference_key="bench", progress=False,
                        unit_bytes=1 << 20)
    root = tmp / f"d-{len(list(tmp.glob('d-*')))}"
    bad = BadRecords()
    c0, t0 = cpu_seconds(), time.perf_counter()
    dedup(sources, root, opts, lambda: file_passages([str(SHARED / "dev.jsonl")], "text", bad), log=lambda *_: None)
    cpu, wall = cpu_seconds() - c0, time.perf_counter() - t0
    n_docs = sum(len(t) for t in texts.values())
    return {"settings": settings, "documents": n_docs, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
            "documents_per_s_per_core": round(n_docs / cpu), "scores": score(texts, planted, drops(root))}


MAKE_SIGNATURES = """
import sys
import numpy as np
n, units, bands, root = {n}, 16, 14, {root!r}
rng = np.random.default_rng(0)
for u in range(units):
    m = n // units
    sig = rng.integers(0, 2**63, size=(1 + bands, m), dtype=np.uint64)
    k = m // 10
    sig[:, m - k:] = sig[:, :k]  # 10 % exact copies
    sig[1:8, m - 2 * k:m - k] = sig[1:8, k:2 * k]  # 10 % sharing half the bands with another document
    np.save(f"{{root}}/sig-{{u}}.npy", sig)
"""

# A fresh process that has imported everything before it measures, so the difference is the pass.
CLUSTER = """
import json, resource, sys, time
import numpy as np
sys.path.insert(0, {repo!r})
from data_pipeline.clusters import UnitSignatures, cluster
n, units, bands, root = {n}, 16, 14, {root!r}
sigs = [UnitSignatures("s", u, n // units, f"{{root}}/sig-{{u}}.npy", ()) for u in range(units)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.process_time()
drops = cluster(["s"], sigs, True, True, bands, None)
cpu = time.process_time() - t0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"documents": n, "dropped": int(sum(len(d) for d in drops.values())), "rss_before_kib": before,
                  "rss_peak_kib": after, "cpu_s": round(cpu, 1)}}))
"""


def cluster_memory(n: int, tmp: Path) -> dict:
    n -= n % 16
    (tmp / "mem").mkdir()
    fmt = {"repo": str(REPO), "n": n, "root": str(tmp / "mem")}
    subprocess.run([sys.executable, "-c", textwrap.dedent(MAKE_SIGNATURES.format(**fmt))], check=True)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CLUSTER.format(**fmt))], capture_output=True,
                          text=True, check=True)
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["bytes_per_document"] = round((row["rss_peak_kib"] - row["rss_before_kib"]) * 1024 / n, 1)
    row["gib_per_billion_documents"] = round(row["bytes_per_document"] * 1e9 / 2**30, 1)
    return row


def minhash_libraries(texts: dict) -> dict:
    """MinHash alone, same shingle hashes, same 112 permutations: rensa (chosen) against datasketch
    (pure Python + numpy), in documents per CPU-second; datasketch is optional (not a dependency)."""
    import numpy as np
    import rensa

    from data_pipeline.normalize import shingles

    docs = [t for ts in texts.values() for t in ts]
    flat = [shingles(t, words(t), 5) for t in docs]
    t0 = time.process_time()
    offsets = np.zeros(len(flat) + 1, dtype=np.uint64)
    np.cumsum([len(f) for f in flat], out=offsets[1:])
    rensa.RMinHash.digest_matrix_from_flat_token_hashes(np.concatenate(flat), offsets, 112, 1).to_rows()
    out = {"rensa": round(len(docs) / (time.process_time() - t0))}
    try:
        import datasketch
    except ImportError:
        out["datasketch"] = "not installed"
        return out
    as_bytes = [[x.tobytes() for x in f.view("V8")] for f in flat]
    t0 = time.process_time()
    datasketch.MinHash.bulk(as_bytes, num_perm=112, seed=1, hashfunc=lambda b: int.from_bytes(b[:4], "little"))
    out["datasketch"] = round(len(docs) / (time.process_time() - t0))
    return out


def table(results: dict) -> str:
    runs = results["quality"]
    head = "| kind | planted | " + " | ".join(r["label"] for r in runs) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(runs)]
    kinds = [k for k in runs[0]["scores"] if not k.startswith("precision")]
    for k in kinds:
        cells = [f"{r['scores'][k]['recall']:.0%}" for r in runs]
        lines.append(f"| recall: {k.replace('_', ' ')} | {runs[0]['scores'][k]['planted']} | " + " | ".join(cells) + " |")
    for reason in ("exact", "near", "contaminated"):
        cells = []
        for r in runs:
            p = r["scores"][f"precision_{reason}"]
            cells.append("-" if p["precision"] is None else
                         f"{p['precision']:.1%} ({p['flagged']} flagged, {p['unplanted_genuine']} real unplanted, "
                         f"{p['unplanted_false']} false)")
        lines.append(f"| precision: {reason} | | " + " | ".join(cells) + " |")
    lines.append("| documents / s per core (signatures + clustering) | | "
                 + " | ".join(f"{r['documents_per_s_per_core']:,}" for r in runs) + " |")
    m = results["cluster_memory"]
    lines += ["", f"Clustering {m['documents']:,} documents (14 bands, 20 % duplicates): peak RSS "
              f"{m['bytes_per_document']} bytes per document above the process before it, "
              f"{m['gib_per_billion_documents']} GiB per billion documents ({m['cpu_s']} CPU s).", "",
              "MinHash alone (same shingle hashes, 112 permutations), documents per CPU-second: "
              + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                          for k, v in results["minhash_documents_per_cpu_s"].items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--cluster-docs", type=int, default=4_000_000)
    args = p.parse_args()
    if not (SHARED / "train.jsonl").is_file():
        sys.exit(f"needs the shared corpus at {SHARED}")
    results = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                           "processor": platform.processor() or platform.machine()}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts, planted = build(tmp)
        settings = [("FineWeb defaults: 5-word shingles, 14 × 8", {}),
                    ("3-word shingles, 20 × 5 (threshold ≈ 0.55)", {"shingle_words": 3, "bands": 20, "rows_per_band": 5})]
        results["quality"] = [{"label": label, **run_quality(s, tmp, texts, planted)} for label, s in settings]
        results["cluster_memory"] = cluster_memory(args.cluster_docs, tmp)
        results["minhash_documents_per_cpu_s"] = minhash_libraries(texts)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dedup.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    md = table(results)
    (args.out / "dedup.md").write_text("# bench/dedup.py\n\n" + md, encoding="utf-8")
    print(md)


if __name__ == "__main__":
    main()
