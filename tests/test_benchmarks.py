"""The benchmark scripts keep running (tiny shapes, CPU); their figures come from the real runs
recorded under bench/results/, not from here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_throughput_runs_at_tiny_shapes_and_checks_correctness(tmp_path):
    out = tmp_path / "tp.json"
    rows = ("hf_eager", "hf_ds_zero2", "norallm")
    proc = subprocess.run([sys.executable, "bench/train_throughput.py", "--tiny", "--steps", "1", "--warmup", "1",
                           "--arch", "mistral,bloom", "--rows", ",".join(rows), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {(r["arch"], r["row"]) for r in report["rows"] if "tokens_per_s" in r} == {
        (a, r) for a in ("mistral", "bloom") for r in rows}
    assert all(c["ok"] for c in report["checks"].values())
    assert "vs HF eager" in proc.stdout and "vs HF+DS ZeRO-2" in proc.stdout
    mistral = {r["row"]: r for r in report["rows"] if r["arch"] == "mistral"}
    # the fair baseline: the unbound window dropped, so SDPA is causal with no mask (flash), and
    # activation checkpointing on; the out-of-the-box loop keeps the window and its dense mask
    fair = mistral["hf_ds_zero2"]
    assert fair["sdpa"]["calls"] > 0 and fair["sdpa"]["with_mask"] == 0, fair
    assert fair["sdpa"]["causal_without_mask"] == fair["sdpa"]["calls"] and fair["activation_checkpointing"]
    assert mistral["hf_eager"]["sdpa"]["with_mask"] == mistral["hf_eager"]["sdpa"]["calls"] > 0
    assert not mistral["hf_eager"]["activation_checkpointing"]
    assert mistral["norallm"]["sdpa"]["with_mask"] == 0 and mistral["norallm"]["activation_checkpointing"]
    assert mistral["norallm"]["ratio_to_hf_ds_zero2"] > 0


@pytest.mark.slow
def test_gpu_check_cpu_mode_runs_every_step(tmp_path):
    """bench/gpu_check.py --cpu: the first GPU run's script, at tiny shapes, so it keeps working."""
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu", "--out", str(tmp_path / "out"),
                           "--work", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check_cpu.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == ["decision", "disk", "train_straight", "throughput", "export_reload", "resume",
                            "documents", "bloom", "zero3_warm"]
    assert report["all_ok"] and report["cpu_mode"] and report["finished"]
    assert all(c["status"] == "ok" for c in checks.values())
    resume = checks["resume"]
    assert resume["straight_losses"] == resume["resumed_losses"] and len(resume["straight_losses"]) == 6
    # the trainer's MFU uses --peak-tflops (without it a CPU has no peak, and MFU is null)
    throughput = checks["throughput"]
    assert throughput["peak_tflops"] == 989.0 and throughput["norallm_train_mfu"] > 0
    assert throughput["hf_ds_zero2_sdpa"]["with_mask"] == 0 and throughput["ratio_norallm_to_hf_ds_zero2"] > 0
    # what really ran, recorded per run: on a CPU no device kernel, and SDPA's CPU kernel for Mistral
    for name in ("train_straight", "documents", "bloom", "zero3_warm"):
        assert checks[name]["profiled"] and checks[name]["kernels"] == {"cpu": "none"}, checks[name]
    assert any("scaled_dot_product" in op for op in checks["train_straight"]["attention_ops"])
    assert checks["zero3_warm"]["max_abs_diff"] <= 2e-2 and set(checks["zero3_warm"]["step0_eval"]) == set(
        checks["export_reload"]["export_eval"])
    assert not (tmp_path / "work" / "straight" / "checkpoints").exists()  # deleted once the export was made
    assert (tmp_path / "out" / "gpu_check_cpu.txt").read_text().startswith("gpu_check on cpu (cpu mode): 9 of 9")


@pytest.mark.slow
def test_warm_vs_scratch_runs_at_tiny_shapes(tmp_path, shared_data):
    """bench/warm_vs_scratch.py --tiny: base, Norwegian BPE, a scratch and a warm + frozen-body run,
    exports and `norallm eval` at two token counts, table and plot."""
    proc = subprocess.run([sys.executable, "bench/warm_vs_scratch.py", "--tiny", "--work", str(tmp_path),
                           "--runs", "scratch,warm_frozen"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "warm_vs_scratch_tiny.json").read_text())
    assert set(report["runs"]) == {"scratch", "warm_frozen"}
    for run in report["runs"].values():
        assert [d["tokens"] for d in run["dev"]] == [1024, 2048] and all(d["coverage"] > 0.99 for d in run["dev"])
        assert run["heldout"][0]["step"] == 0
    assert report["runs"]["scratch"]["transplant"] is None
    assert report["runs"]["warm_frozen"]["transplant"]["copied"] > 0
    assert report["runs"]["warm_frozen"]["config"]["train"]["frozen_body_steps"] == 2
    assert "tokens to scratch's final dev loss" in report["table_md"]
    assert (tmp_path / "warm_vs_scratch_tiny.png").stat().st_size > 0


@pytest.mark.slow
def test_tokenizer_strategies_bench_runs_keep_replace_and_extend(tmp_path, shared_data):
    """bench/tokenizer_strategies.py --tiny: one base, three warm starts that differ only in the
    tokenizer strategy, each exported and scored per document in bits per byte."""
    proc = subprocess.run([sys.executable, "bench/tokenizer_strategies.py", "--tiny", "--work", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "tokenizer_strategies_tiny.json").read_text())
    runs = report["runs"]
    assert list(runs) == ["keep", "replace", "extend"]
    base_vocab = report["sizes"]["vocab_size"]
    assert runs["keep"]["vocab_size"] == runs["replace"]["vocab_size"] == base_vocab
    assert runs["extend"]["vocab_size"] == base_vocab + report["sizes"]["extend_tokens"]
    assert runs["keep"]["transplant"] is None  # keep touches no row
    ext = runs["extend"]["transplant"]
    # every base row copied (specials map to themselves), every new merge averaged over its pieces
    assert (ext["copied"] + ext["special"], ext["averaged"]) == (base_vocab, report["sizes"]["extend_tokens"])
    # the corpus's own merges make its text fewer tokens; bytes seen per step differ accordingly
    assert runs["extend"]["train_bytes_per_token"] > runs["keep"]["train_bytes_per_token"]
    for run in runs.values():
        assert [d["tokens"] for d in run["dev"]] == [1024, 2048]
        assert all(0 < d["bits_per_byte"] < 16 and d["dev_bytes"] > 0 for d in run["dev"])
    assert report["table_md"].count("\n") == 4 and (tmp_path / "tokenizer_strategies_tiny.png").stat().st_size > 0


def test_dedup_benchmark_runs_and_finds_what_it_plants(tmp_path, shared_data):
    """bench/dedup.py with a small clustering-memory run: it keeps working, and the planted exact
    copies and test passages are found (its committed figures: bench/results/dedup.md)."""
    proc = subprocess.run([sys.executable, "bench/dedup.py", "--out", str(tmp_path), "--cluster-docs", "160000"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "dedup.json").read_text())
    scores = report["quality"][0]["scores"]
    for kind in ("exact_within", "exact_across", "near_1%_across", "contaminated_20"):
        assert scores[kind]["recall"] == 1.0, (kind, scores[kind])
    assert report["cluster_memory"]["documents"] == 160000  # too few to rise above the heap: no memory figure here
    assert (tmp_path / "dedup.md").read_text().count("| recall:") == len(scores) - 3


@pytest.mark.slow
def test_bloom_attention_rows_run_at_tiny_shapes(tmp_path):
    """bench/train_throughput.py --bloom-attention: eager vs fused BLOOM attention, with the fp32
    parity check first; the CPU figures are not the GPU goal."""
    out = tmp_path / "ba.json"
    proc = subprocess.run([sys.executable, "bench/train_throughput.py", "--bloom-attention", "--tiny", "--steps", "1",
                           "--warmup", "1", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["attention"] for r in report["rows"]] == ["eager", "sdpa"] and report["ok"]
    assert report["parity_fp32"]["sdpa"]["max_abs_logit_diff"] <= 1e-5
    assert "vs eager" in proc.stdout


@pytest.mark.parametrize("script", ["kill_resume.py", "run_dir_drills.py"])
def test_the_drills_help_is_whole_and_their_default_output_is_outside_version_control(script):
    proc = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = " ".join(proc.stdout.split())
    assert "identical to an uninterrupted run" in text or "one trajectory" in text  # past the first line
    assert "(default runs/bench/" in text
    ignored = subprocess.run(["git", "check-ignore", "-q", f"runs/bench/{script.replace('.py', '.json')}"], cwd=REPO)
    assert ignored.returncode == 0


@pytest.mark.slow
def test_hybrid_objective_bench_runs_both_objectives_and_reports_the_masked_half(tmp_path):
    out = tmp_path / "hybrid.json"
    proc = subprocess.run([sys.executable, "bench/hybrid_objective.py", "--tiny", "--steps", "4", "--eval-every", "2",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"causal", "hybrid"} and report["ratios"]["tokens_per_s"] > 0
    causal, hybrid = report["runs"]["causal"], report["runs"]["hybrid"]
    assert causal["tokens"] == hybrid["tokens"] and sorted(causal["causal_dev_loss"]) == ["0", "2", "4"]
    assert causal["causal_dev_loss"]["0"] == hybrid["causal_dev_loss"]["0"]  # one init, one data order
    assert all(loss is None for loss, _ in causal["masked_dev"].values())
    assert all(0 <= acc <= 1 for _, acc in hybrid["masked_dev"].values())
    assert "hybrid / causal: tokens/s" in proc.stdout
