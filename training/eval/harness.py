"""Downstream evaluation through EleutherAI's lm-evaluation-harness: NorEval on an exported model,
or on every checkpoint of a run.

``norallm eval MODEL_DIR --tasks noreval-mc`` runs the tasks on the model (the GPU when there
is one), prints a table and writes ``MODEL_DIR/harness.json``. ``norallm eval RUN_DIR --tasks …
--checkpoints all`` consolidates each checkpoint into a temporary export, evaluates it and
appends ``{step, tokens, task, metric, value, stderr}`` rows to ``RUN_DIR/harness.jsonl``;
checkpoints already there (same tasks, shots and limit) are skipped, so the call resumes.

NorEval runs each task with several prompts (``norbelebele_p0`` … ``_p4``); besides the rows
per prompt there is one row per task and metric with the best prompt, as NorEval reports.

Task data comes from HF datasets. Compute nodes have no network: ``norallm eval-cache --tasks
…`` on a login node fills the datasets cache, and an offline run that misses a dataset stops
with one error naming the task and the dataset. lm-evaluation-harness is optional
(``pip install 'norallm[eval]'``).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from norallm.errors import NorallmError

# NorEval's multiple-choice core: loglikelihoods only, cheap, no extra packages.
NOREVAL_MC = (
    "norbelebele", "nrk_quiz_qa_nob", "nrk_quiz_qa_nno", "norcommonsenseqa_nob", "norcommonsenseqa_nno",
    "noropenbookqa_nob", "noropenbookqa_nno", "nortruthfulqa_mc_nob", "nortruthfulqa_mc_nno", "ncb",
    "norec_sentence", "norec_document",
)
# Generation tasks whose metrics run offline (BLEU/chrF, ROUGE, exact match). Left out: norsumm_*
# (BERTScore downloads a model), ask_gec (errant and a spaCy model), norquad (lm-eval 0.4.13's
# scorer imports transformers.data.metrics, which transformers 5 removed).
NOREVAL_GEN = (
    "tatoeba_eng_nob", "tatoeba_nob_eng", "tatoeba_eng_nno", "tatoeba_nno_eng",
    "nortruthfulqa_gen_nob", "nortruthfulqa_gen_nno", "noridiom_nob", "noridiom_nno",
)
SELECTIONS = {"noreval-mc": NOREVAL_MC, "noreval-gen": NOREVAL_GEN}
HARNESS_JSONL = "harness.jsonl"
_VARIANT = re.compile(r"^(?P<task>.+)_p\d+$")


def _require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise NorallmError("--tasks needs lm-evaluation-harness: pip install 'norallm[eval]' "
                           "(or pip install lm_eval).") from None
    return lm_eval


def expand(names: list[str]) -> list[str]:
    """Task names with the named selections (noreval-mc, noreval-gen) spelled out, in order, once."""
    out: list[str] = []
    for name in names:
        for task in SELECTIONS.get(name, (name,)):
            if task not in out:
                out.append(task)
    return out


def task_manager(include_path: str | None = None):
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise NorallmError(f"--include-path {include_path} is not a directory of task YAML files.")
    return TaskManager(include_path=include_path)


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _dataset_of(tm, name: str) -> str:
    """The dataset a task (or the first task of a tag) reads, for error messages."""
    entry = tm.task_index.get(name)
    cfg = dict(getattr(entry, "cfg", None) or {})
    if not cfg.get("dataset_path") and getattr(entry, "yaml_path", None):
        from lm_eval.utils import load_yaml_config

        cfg = load_yaml_config(str(entry.yaml_path))
    if not cfg.get("dataset_path"):
        members = [k for k, e in tm.task_index.items() if name in (getattr(e, "tags", None) or ())]
        return _dataset_of(tm, members[0]) if members and members[0] != name else "its dataset"
    path, sub = cfg["dataset_path"], cfg.get("dataset_name")
    return f"{path} ({sub})" if sub else str(path)


def load_tasks(tm, names: list[str]) -> dict[str, list]:
    """Each requested name's lm-eval Task objects (a tag gives several), datasets loaded. An
    unknown name or a dataset that cannot be loaded stops with one error naming it."""
    unknown = [n for n in names if n not in tm.task_index]
    if unknown:
        hints = [f"{n} (did you mean {', '.join(difflib.get_close_matches(n, tm.all_tasks, 3))}?)"
                 if difflib.get_close_matches(n, tm.all_tasks, 3) else n for n in unknown]
        raise NorallmError(f"unknown task(s): {'; '.join(hints)}. Selections: {', '.join(SELECTIONS)}; "
                           "own tasks: --include-path DIR.")
    loaded = {}
    for name in names:
        try:
            loaded[name] = list(tm.load([name])["tasks"].values())
        except ImportError as e:
            raise NorallmError(f"task {name} cannot be loaded: its code needs a module this environment lacks "
                               f"({e}); install it, or leave the task out.") from None
        except Exception as e:  # datasets/hub raise many types here; the message says what it was
            dataset = _dataset_of(tm, name)
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            if _offline():
                raise NorallmError(
                    f"task {name}: dataset {dataset} is not in the local HF datasets cache and this run is offline "
                    f"(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE). Fill the cache where there is network: "
                    f"`norallm eval-cache --tasks {name}` on a login node (same HF_HOME). [{type(e).__name__}: "
                    f"{reason[:200]}]") from None
            raise NorallmError(f"task {name} could not be loaded (dataset {dataset}): {type(e).__name__}: "
                               f"{reason[:300]}") from None
    return loaded


def _passage(task, doc) -> str:
    """A document's text as a training corpus could contain it: the task's decontamination query
    where its config names one (lm-eval's ``doc_to_decontamination_query``), else the prompt with
    the gold answer (the right choice of a multiple-choice task)."""
    if task.config.should_decontaminate and task.config.doc_to_decontamination_query:
        return str(task.doc_to_decontamination_query(doc))
    text, target = task.doc_to_text(doc), task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice":
        choices = task.doc_to_choice(doc)
        if isinstance(target, int) and 0 <= target < len(choices):
            target = choices[target]
    if isinstance(target, list):
        target = " ".join(str(t) for t in target)
    return f"{text} {target}".strip()


def passages(names: list[str], include_path: str | None = None) -> Iterator[tuple[str, str]]:
    """``(task name, passage)`` for every test and validation document of the tasks (selections
    and tags spelled out), for decontaminating training data. A dataset that is not in the HF cache
    on an offline node is one error naming `norallm eval-cache`."""
    for tasks in load_tasks(task_manager(include_path), expand(names)).values():
        for task in tasks:
            for has, docs in ((task.has_test_docs, task.test_docs), (task.has_validation_docs, task.validation_docs)):
                if has():
                    for doc in docs():
                        yield task.task_name, _passage(task, doc)


def fill_cache(names: list[str], include_path: str | None = None, log=print) -> None:
    """Download every task's dataset into the HF datasets cache (run with network)."""
    if _offline():
        raise NorallmError("eval-cache downloads datasets: run it where there is network, with HF_DATASETS_OFFLINE "
                           "and HF_HUB_OFFLINE unset (they are set now).")
    tm = task_manager(include_path)
    for name, tasks in load_tasks(tm, expand(names)).items():
        docs = sum(len(list(t.eval_docs)) for t in tasks)
        log(f"[eval-cache] {name}: {len(tasks)} task(s), {docs:,} documents, dataset {_dataset_of(tm, name)}")
    cache = os.environ.get("HF_DATASETS_CACHE") or str(Path(os.environ.get("HF_HOME", "~/.cache/huggingface"))
                                                          .expanduser() / "datasets")
    log(f"[eval-cache] cached under {cache}; compute nodes need the same HF_HOME (or HF_DATASETS_CACHE).")


def build_lm(model_dir: Path, batch_size: int, seq_len: int | None = None):
    """lm-eval's HF model on the exported dir: the GPU when there is one (the export's dtype), else
    fp32 on CPU. Text is tokenized as training did (no ``<s>`` added); a document is scored after
    the same prefix ``norallm eval --per-document`` uses."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from data_pipeline.tokenizer import Tokenizer
    from training import distributed
    from training.eval.perplexity import default_seq_len, document_prefix_id

    device = distributed.decide().device
    prefix = document_prefix_id(model_dir, Tokenizer(model_dir))
    return HFLM(pretrained=str(model_dir), backend="causal", device=str(device),
                dtype="auto" if device.type == "cuda" else torch.float32, batch_size=batch_size,
                max_length=seq_len or default_seq_len(model_dir), add_bos_token=False, prefix_token_id=prefix)


def run(model_dir: str | Path, names: list[str], num_fewshot: int | None = None, limit: float | None = None,
        include_path: str | None = None, batch_size: int = 8, log_samples: bool = False) -> tuple[dict, dict]:
    """(lm-eval's results, requested name → its leaf task names) for the model dir."""
    lm_eval = _require_lm_eval()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise NorallmError(f"{model_dir} is not an exported model dir (no config.json); run `norallm export` first.")
    tm = task_manager(include_path)
    loaded = load_tasks(tm, expand(names))  # before a model that takes minutes to load
    lm = build_lm(model_dir, batch_size)
    tasks = [t for ts in loaded.values() for t in ts]
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=tm, log_samples=log_samples, bootstrap_iters=1000)
    return results, {name: [t.task_name for t in ts] for name, ts in loaded.items()}


def result_rows(results: dict, leaves: dict[str, list[str]]) -> list[dict]:
    """``{task, metric, value, stderr, request}`` per leaf task and metric, then per task run with
    several prompts the best prompt's row (``variant`` names it)."""
    rows = []
    better = results.get("higher_is_better", {})
    for request, tasks in leaves.items():
        for task in tasks:
            for key, value in results["results"].get(task, {}).items():
                if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                    continue
                metric, filt = key.split(",", 1)
                stderr = results["results"][task].get(f"{metric}_stderr,{filt}")
                rows.append({"task": task, "metric": metric if filt == "none" else f"{metric},{filt}",
                             "value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float))
                             else None, "request": request,
                             "higher_is_better": better.get(task, {}).get(metric, True)})
    best: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        m = _VARIANT.match(row["task"])
        if m:
            best.setdefault((m["task"], row["metric"]), []).append(row)
    for (task, metric), group in best.items():
        if len(group) < 2:
            continue
        pick = (max if group[0]["higher_is_better"] else min)(group, key=lambda r: r["value"])
        rows.append({**pick, "task": task, "metric": metric, "variant": pick["task"],
                     "aggregate": f"best of {len(group)} prompts"})
    for row in rows:
        row.pop("higher_is_better")
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a fixed-width table (a step column for a run's rows): per checkpoint, the rows
    per prompt first, NorEval's best-prompt rows after them."""
    with_step = any("step" in r for r in rows)
    ordered = sorted(rows, key=lambda r: (r.get("step") or 0, "aggregate" in r))
    cells = [(("step",) if with_step else ()) + ("task", "metric", "value", "± stderr", "")]
    for r in ordered:
        cells.append(((str(r["step"]),) if with_step else ()) + (
            r["task"], r["metric"], f"{r['value']:.4f}", f"{r['stderr']:.4f}" if r["stderr"] is not None else "-",
            f"{r['aggregate']} ({r['variant']})" if "aggregate" in r else ""))
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def eval_model(model_dir: str | Path, names: list[str], num_fewshot: int | None, limit: float | None,
               include_path: str | None, batch_size: int) -> list[dict]:
    """Rows for an exported model, written to ``MODEL_DIR/harness.json`` (rows of tasks not run
    this time are kept)."""
    model_dir = Path(model_dir)
    started = time.time()
    results, leaves = run(model_dir, names, num_fewshot, limit, include_path, batch_size)
    rows = result_rows(results, leaves)
    out = model_dir / "harness.json"
    kept = []
    if out.is_file():
        kept = [r for r in json.loads(out.read_text(encoding="utf-8")).get("rows", []) if r.get("request") not in leaves]
    out.write_text(json.dumps({"model": str(model_dir), "num_fewshot": num_fewshot, "limit": limit,
                               "seconds": round(time.time() - started, 1), "versions": results.get("versions", {}),
                               "rows": kept + rows}, indent=1, default=str) + "\n", encoding="utf-8")
    return rows


def _done(run_dir: Path, requests: list[str], num_fewshot, limit) -> set[int]:
    """Steps whose rows in harness.jsonl already cover every request with these settings."""
    path = run_dir / HARNESS_JSONL
    if not path.is_file():
        return set()
    seen: dict[int, set[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            if r.get("num_fewshot") == num_fewshot and r.get("limit") == limit:
                seen.setdefault(r["step"], set()).add(r["request"])
    return {step for step, got in seen.items() if set(requests) <= got}


def select_checkpoints(run_dir: Path, which: str) -> list[Path]:
    """``all`` or a comma-separated list of steps, as complete checkpoint dirs of the run."""
    from training.checkpoint.store import step_dirs

    have = {int(json.loads((p / "meta.json").read_text())["step"]): p for p in step_dirs(run_dir)}
    if not have:
        raise NorallmError(f"run dir {run_dir} has no complete checkpoint to evaluate.")
    if which == "all":
        return [have[s] for s in sorted(have)]
    try:
        steps = [int(s) for s in which.split(",") if s.strip()]
    except ValueError:
        raise NorallmError(f"--checkpoints {which!r}: give 'all' or steps like 1000,2000.") from None
    missing = [s for s in steps if s not in have]
    if missing:
        raise NorallmError(f"--checkpoints: no checkpoint at step(s) {missing} in {run_dir} "
                           f"(there are: {sorted(have)}; keep_last prunes older ones).")
    return [have[s] for s in steps]


def eval_checkpoints(run_dir: str | Path, names: list[str], which: str, num_fewshot: int | None,
                     limit: float | None, include_path: str | None, batch_size: int,
                     keep_exports: bool = False, log=print) -> list[dict]:
    """Evaluate each chosen checkpoint of a run; rows appended to ``RUN_DIR/harness.jsonl`` as each
    checkpoint finishes. A consolidated model goes to a temporary dir in the run dir, or to
    ``RUN_DIR/exports/stepNNNNNNNN`` with ``keep_exports``."""
    from training import distributed
    from training.checkpoint.store import tokens_at
    from training.export import export

    run_dir = Path(run_dir)
    requests = expand(names)
    load_tasks(task_manager(include_path), requests)  # a missing dataset stops before any export
    for stale in run_dir.glob(".harness-*"):  # left by an evaluation that was killed
        shutil.rmtree(stale, ignore_errors=True)
    done = _done(run_dir, requests, num_fewshot, limit)
    dtype = "bf16" if distributed.decide().is_gpu else "fp32"
    all_rows = []
    for ckpt in select_checkpoints(run_dir, which):
        step = int(json.loads((ckpt / "meta.json").read_text())["step"])
        if step in done:
            log(f"[harness] step {step}: already in {HARNESS_JSONL}, skipped")
            continue
        started = time.time()
        with tempfile.TemporaryDirectory(prefix=f".harness-{ckpt.name}-", dir=run_dir) as tmp:
            model_dir = export(ckpt, run_dir / "exports" / ckpt.name if keep_exports else Path(tmp) / "model",
                               dtype=dtype)
            rows = result_rows(*run(model_dir, requests, num_fewshot, limit, include_path, batch_size))
        tokens = tokens_at(ckpt)
        rows = [{"step": step, "tokens": tokens, **r, "num_fewshot": num_fewshot, "limit": limit} for r in rows]
        with open(run_dir / HARNESS_JSONL, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        log(f"[harness] step {step} ({tokens:,} tokens): {len(rows)} rows in {time.time() - started:.0f} s"
            if tokens is not None else f"[harness] step {step}: {len(rows)} rows")
        all_rows += rows
    return all_rows
