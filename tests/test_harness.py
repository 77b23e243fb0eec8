"""Downstream evaluation through lm-evaluation-harness (training.eval.harness), offline, on a tiny model
trained here: lm-eval's numbers against independent computations, per-checkpoint rows, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training.cli import main

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "harness_tasks"
SMOKE = REPO / "data_pipeline" / "smoke_corpus"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(run dir with checkpoints at steps 2, 4, 6; the step-6 export) of a 1-rank tiny Mistral."""
    from test_checkpoint_safety import prepared_run
    from test_training import torchrun

    root = tmp_path_factory.mktemp("harness")
    config, run = prepared_run(root, max_steps=6, keep_last=3)
    torchrun("-m", "training.cli", "train", config, "--run-dir", str(run), nproc=1)
    model = root / "model"
    assert main(["export", str(run), str(model), "--dtype", "fp32"]) == 0
    return run, model


def _continuation_logprob(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized as a whole and split after the context's tokens."""
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    assert whole[: len(ctx)] == ctx
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits[0].double(), dim=-1)
    targets = ids[0, len(ctx):]
    return float(logp[torch.arange(len(ctx) - 1, len(whole) - 1), targets].sum())


def test_multiple_choice_accuracy_equals_an_independent_argmax(trained):
    from transformers import AutoModelForCausalLM

    from data_pipeline.tokenizer import Tokenizer
    from training.eval import harness

    _, model_dir = trained
    results, leaves = harness.run(model_dir, ["normc"], include_path=str(TASKS), batch_size=3, log_samples=True)
    assert leaves == {"normc": ["normc_p0", "normc_p1"]}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = Tokenizer(model_dir)
    docs = [json.loads(line) for line in (TASKS / "normc.jsonl").read_text(encoding="utf-8").splitlines()]
    prompts = {"normc_p0": "Spørsmål: {}\nSvar:", "normc_p1": "{}"}
    for task, prompt in prompts.items():
        samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        assert len(samples) == len(docs)
        lls = np.array([[_continuation_logprob(model, tok, prompt.format(d["question"]), " " + c)
                         for c in d["choices"]] for d in docs])
        theirs = np.array([[r[0] for r in s["filtered_resps"]] for s in samples])
        np.testing.assert_allclose(theirs, lls, rtol=1e-4, atol=1e-3)
        gold = np.array([d["answer"] for d in docs])
        acc = float(np.mean(lls.argmax(axis=1) == gold))
        lengths = [np.array([len(c) for c in d["choices"]], dtype=float) for d in docs]
        acc_norm = float(np.mean([np.argmax(ll / n) == g for ll, n, g in zip(lls, lengths, gold, strict=True)]))
        assert results["results"][task]["acc,none"] == pytest.approx(acc)
        assert results["results"][task]["acc_norm,none"] == pytest.approx(acc_norm)
    rows = harness.result_rows(results, leaves)
    best = [r for r in rows if r.get("aggregate")]
    assert {(r["task"], r["metric"]) for r in best} == {("normc", "acc"), ("normc", "acc_norm")}
    for r in best:
        assert r["value"] == max(results["results"][t][f"{r['metric']},none"] for t in prompts)
        assert r["aggregate"] == "best of 2 prompts" and r["variant"] in prompts


def test_rolling_perplexity_agrees_with_norallm_eval_per_document(trained, capsys):
    """Same text, same tokens, same model: lm-eval's word/byte perplexity and bits per byte equal
    `norallm eval --data --per-document` (documents of ~290 tokens, seq_len 64: several windows)."""
    _, model_dir = trained
    assert main(["eval", str(model_dir), "--tasks", "norppl", "--include-path", str(TASKS)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["task", "metric", "value", "±", "stderr"] and len(table) == 4
    theirs = {r["metric"]: r["value"] for r in json.loads((model_dir / "harness.json").read_text())["rows"]}
    assert main(["eval", str(model_dir), "--data", str(SMOKE / "nno.jsonl"), "--per-document"]) == 0
    (ours,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert ours["documents"] == 40 and ours["seq_len"] == 64 and ours["tokens"] > 40 * 64
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert theirs[metric] == pytest.approx(ours[metric], rel=1e-5), metric


def test_document_windows_score_every_token_once_with_the_longest_context():
    from training.eval.perplexity import document_windows

    for max_len in (1, 2, 3, 8):
        for n in range(1, 30):
            scored = []
            for start, stop, k in document_windows(n, max_len):
                assert 0 <= start < stop <= n and stop - start <= max_len and 1 <= k <= stop - start
                assert stop - start == min(max_len, stop)  # as much context as the model takes
                scored += range(stop + 1 - k, stop + 1)
            assert scored == list(range(1, n + 1)), (n, max_len)


def test_every_checkpoint_once_into_harness_jsonl_and_the_report(trained, capsys):
    run, _ = trained
    args = ["eval", str(run), "--tasks", "normc", "norppl", "--include-path", str(TASKS), "--checkpoints", "all"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (run / "harness.jsonl").read_text().splitlines()]
    assert sorted({(r["step"], r["request"]) for r in rows}) == [(s, t) for s in (2, 4, 6) for t in ("normc", "norppl")]
    per_step = {s: sum(r["step"] == s for r in rows) for s in (2, 4, 6)}
    assert per_step == {2: 9, 4: 9, 6: 9}  # normc: 2 prompts × 2 metrics + 2 best; norppl: 3 metrics
    assert all(r["tokens"] == r["step"] * 8 * 64 for r in rows)  # global batch 8, seq_len 64
    assert {"step", "tokens", "task", "metric", "value", "stderr"} <= set(rows[0])
    assert not list(run.glob(".harness-*")) and not (run / "exports").exists()  # nothing left behind
    assert main(args) == 0
    assert "skipped" in capsys.readouterr().err
    assert len((run / "harness.jsonl").read_text().splitlines()) == len(rows)  # a second call adds none
    assert main(["report", str(run)]) == 0
    assert (run / "plots" / "harness.png").stat().st_size > 0
    from training.eval.report import harness_curves

    curves = harness_curves(rows)
    assert set(curves) == {"normc", "norppl"}  # the best prompt stands for normc_p0 / _p1
    assert [t for t, _, _ in curves["normc"]["acc"]] == [2 * 512, 4 * 512, 6 * 512]


def test_a_missing_dataset_offline_is_one_clear_error(trained, capsys):
    _, model_dir = trained
    code = main(["eval", str(model_dir), "--tasks", "normissing", "--include-path", str(TASKS)])
    err = capsys.readouterr().err
    assert code == 2
    line = [e for e in err.splitlines() if e.startswith("error:")]
    assert len(line) == 1 and "task normissing" in line[0] and "norallm-tests/no-such-dataset" in line[0]
    assert "norallm eval-cache --tasks normissing" in line[0] and "Traceback" not in err


def test_unknown_tasks_and_wrong_targets_are_refused_with_the_fix(trained, capsys):
    run, model_dir = trained
    assert main(["eval", str(model_dir), "--tasks", "normc_p3", "--include-path", str(TASKS)]) == 2
    err = capsys.readouterr().err
    assert "unknown task(s): normc_p3 (did you mean normc_p" in err and "Loading weights" not in err
    assert main(["eval", str(run), "--tasks", "normc", "--include-path", str(TASKS)]) == 2
    assert "add --checkpoints all" in capsys.readouterr().err
    assert main(["eval", str(run), "--tasks", "normc", "--include-path", str(TASKS), "--checkpoints", "5"]) == 2
    assert "no checkpoint at step(s) [5]" in capsys.readouterr().err
    assert main(["eval", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "--tasks" in err
    assert main(["eval-cache", "--tasks", "normc", "--include-path", str(TASKS)]) == 2  # tests are offline
    assert "network" in capsys.readouterr().err


def test_the_noreval_selections_name_tasks_that_lm_eval_ships_and_can_load():
    """Every task of a selection exists, and the Python its YAML points at imports here (lm-eval
    0.4.13's norquad does not under transformers 5, so it is not in noreval-gen). The datasets
    themselves need the network: not tested here."""
    import importlib.util

    from training.eval import harness

    tm = harness.task_manager()
    for selection in harness.SELECTIONS:
        tasks = harness.expand([selection])
        assert tasks and all(t in tm.task_index for t in tasks), [t for t in tasks if t not in tm.task_index]
        for task in tasks:
            entry = tm.task_index[task]
            yamls = [entry.yaml_path] if entry.yaml_path else [
                e.yaml_path for e in tm.task_index.values() if task in (e.tags or ()) and e.yaml_path]
            assert yamls, task
            for folder in {Path(y).parent for y in yamls}:
                for py in [*folder.glob("*.py"), *folder.parent.glob("*.py")]:
                    spec = importlib.util.spec_from_file_location(f"noreval_{py.parent.name}_{py.stem}", py)
                    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert harness.expand(["noreval-mc", "norbelebele"]) == list(harness.NOREVAL_MC)
