"""The `norallm` command line. User errors print one message (no traceback) and exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from norallm.errors import NorallmError
from norallm.exits import EXIT_REQUEUE, EXIT_USER_ERROR
from norallm.files import default_run_dir


def _cmd_validate(args) -> int:
    from training.config import load_config
    from training.loop.engine import deepspeed_config
    from training.model.build import SpecialIds, count_parameters, hf_config

    cfg = load_config(args.config, args.set)
    print(cfg.to_yaml(), end="")
    ids = SpecialIds(1, 2, 0)  # ids do not change the parameter count
    n = count_parameters(hf_config(cfg.model.flavor, cfg.model.overrides, cfg.model_vocab_size, ids))
    print(f"# parameters: {n:,} ({cfg.model.flavor}, vocab {cfg.model_vocab_size:,})")
    if args.deepspeed:
        world = cfg.train.world_size or 1
        print(f"# DeepSpeed config for {world} rank(s):")
        print(json.dumps(deepspeed_config(cfg.train, cfg.zero, world), indent=2))
    return 0


def _cmd_tokenizer(args) -> int:
    from training.config import load_config
    from training.data.modes import mode_of

    tok = mode_of(load_config(args.config, args.set)).ensure_tokenizer()
    print(f"tokenizer {tok.path}: {tok.vocab_size} entries, bos={tok.bos_id} eos={tok.eos_id} pad={tok.pad_id}, "
          f"fingerprint {tok.fingerprint}")
    return 0


def _cmd_prepare(args) -> int:
    from training.config import load_config
    from training.data.modes import mode_of

    cfg = load_config(args.config, args.set)
    _check_task_flags(args)
    for line in mode_of(cfg).prepare(verify=args.verify, progress=not args.no_progress, workers=args.workers,
                                     task_index=args.task_index or 0, num_tasks=args.num_tasks or 1):
        print(line)
    return 0


def _cmd_dedup(args) -> int:
    from training.config import load_config
    from training.data.dedup import run_dedup
    from training.data.modes import mode_of

    cfg = load_config(args.config, args.set)
    if not mode_of(cfg).reads_shards:
        raise NorallmError("norallm dedup removes duplicates before `norallm prepare` writes pretraining shards; "
                           "an SFT config reads its conversations at train time.")
    _check_task_flags(args)
    run_dedup(cfg.data, progress=not args.no_progress, workers=args.workers, task_index=args.task_index or 0,
              num_tasks=args.num_tasks or 1)
    return 0


def _check_task_flags(args) -> None:
    if args.workers < 1:
        raise NorallmError(f"--workers {args.workers}: give at least 1 worker process.")
    if (args.task_index is None) != (args.num_tasks is None):
        raise NorallmError("--task-index and --num-tasks go together (task I of N of a Slurm array); give both.")
    if args.num_tasks is not None and not 0 <= args.task_index < args.num_tasks:
        raise NorallmError(f"--task-index {args.task_index} must be in [0, --num-tasks {args.num_tasks}).")


def _cmd_plan(args) -> int:
    from data_pipeline.plan import format_plan
    from training.config import load_config
    from training.data.fertility import tokenizer_fertility
    from training.data.modes import mode_of

    cfg = load_config(args.config, args.set)
    plan = mode_of(cfg).plan()
    fertility = tokenizer_fertility(cfg)  # a warm start: the base's tokenizer against the new one
    if args.json:
        print(json.dumps({**plan.to_json(), **({"fertility": fertility} if fertility else {})}, indent=2))
    else:
        print(format_plan(plan))
        if fertility:
            print(f"tokens per word on {fertility['documents']} training documents: base tokenizer "
                  f"{fertility['base']}, new tokenizer {fertility['new']}")
    plan.check()
    return 0


def _cmd_train(args) -> int:
    from training.loop import signals

    signals.remember()  # before the heavy imports: a time-limit warning now must still save
    from training.config import load_config
    from training.loop.trainer import train

    cfg = load_config(args.config, args.set)
    run_dir = Path(args.run_dir or default_run_dir(cfg.name))
    from training import distributed, liveness

    try:
        result = train(cfg, run_dir, stop_at=args.stop_at, init_from=args.from_checkpoint)
    except RuntimeError as e:  # torch.distributed's errors derive from it
        failure = liveness.peer_failure(e, distributed.rank(), distributed.hosts(), cfg.train.collective_timeout_s)
        if failure is None:
            raise
        if failure.report:  # one rank says it, not a traceback on every rank
            print(f"error: {failure.message}", file=sys.stderr, flush=True)
        return failure.exit_code

    distributed.shutdown()
    return EXIT_REQUEUE if result.stopped_by_signal else 0


def _cmd_export(args) -> int:
    from training.export import export

    out = export(args.checkpoint, args.out, dtype=args.dtype)
    print(f"exported {out}")
    return 0


def _cmd_generate(args) -> int:
    from training.export import chat_reply, generate, load_for_generation

    if not args.chat:
        if args.prompt is None:
            raise NorallmError("give --prompt TEXT (or --chat for a conversation).")
        print(generate(args.model_dir, args.prompt, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature if args.temperature is not None else 0.8, seed=args.seed))
        return 0
    model, tok = load_for_generation(args.model_dir)
    temperature = args.temperature if args.temperature is not None else 0.3
    messages: list[dict] = []
    turns = [args.prompt] if args.prompt is not None else None  # one-shot, else read stdin
    while True:
        if turns is not None:
            if not turns:
                return 0
            text = turns.pop(0)
        else:
            try:
                text = input("du> ").strip()
            except EOFError:
                return 0
            if not text:
                return 0
        messages.append({"role": "user", "content": text})
        reply = chat_reply(model, tok, messages, max_new_tokens=args.max_new_tokens, temperature=temperature,
                           seed=args.seed)
        messages.append({"role": "assistant", "content": reply})
        print(reply if turns is not None else f"assistent> {reply}", flush=True)


def _cmd_eval(args) -> int:
    target = Path(args.path)
    if args.tasks:
        return _eval_tasks(args, target)
    if not args.data:
        raise NorallmError("say what to evaluate: --data [NAME=]PATH ... (perplexity) or --tasks NAMES "
                           "(lm-evaluation-harness, e.g. noreval-mc).")
    from training.eval.perplexity import eval_model_dir

    rows = eval_model_dir(target, args.data, args.seq_len, args.max_samples, args.batch_size, args.text_field,
                          per_document=args.per_document)
    for row in rows:
        print(json.dumps(row))
    return 0


def _eval_tasks(args, target: Path) -> int:
    from training.eval import harness

    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    if (target / "checkpoints").is_dir():
        if args.checkpoints is None:
            raise NorallmError(f"{target} is a run dir: add --checkpoints all (or steps like 1000,2000), "
                               "or give an exported model dir.")
        rows = harness.eval_checkpoints(target, args.tasks, args.checkpoints, args.num_fewshot, limit,
                                        args.include_path, args.batch_size, keep_exports=args.keep_exports,
                                        log=lambda m: print(m, file=sys.stderr, flush=True))
        print(harness.table(rows) if rows else "nothing new to evaluate")
        print(f"[harness] rows in {target / harness.HARNESS_JSONL}", file=sys.stderr)
        return 0
    if args.checkpoints is not None:
        raise NorallmError(f"--checkpoints needs a run dir (with checkpoints/); {target} is not one.")
    rows = harness.eval_model(target, args.tasks, args.num_fewshot, limit, args.include_path, args.batch_size)
    print(harness.table(rows))
    print(f"[harness] results in {target / 'harness.json'}", file=sys.stderr)
    return 0


def _cmd_eval_cache(args) -> int:
    from training.eval import harness

    harness.fill_cache(args.tasks, args.include_path)
    return 0


def _cmd_report(args) -> int:
    from training.eval.report import report

    for path in report(args.run_dir, args.out):
        print(path)
    return 0


def _cmd_preflight(args) -> int:
    from training.config import load_config
    from training.launch.preflight import preflight

    cfg = load_config(args.config, args.set)
    summary = preflight(cfg, Path(args.run_dir or default_run_dir(cfg.name)), args.require_gpu, args.timeout_s)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[preflight] {summary}")
    return 0


def _cmd_submit(args) -> int:
    from training.launch.slurm import submit_command

    options = {"nodes": args.nodes, "time": args.time, "account": args.account, "partition": args.partition,
               "qos": args.qos, "launcher": args.launcher, "run_dir": args.run_dir, "container": args.container,
               "prepare_tasks": args.prepare_tasks}
    print(submit_command(args.config, args.set, args.cluster, options, dry_run=args.dry_run, chain=args.chain,
                         prepare=args.prepare or args.prepare_only, train=not (args.prepare_only or args.eval_only),
                         eval_tasks=args.eval_tasks, eval_target=args.eval_target, eval_time=args.eval_time,
                         eval_include_path=args.eval_include_path, after=args.after))
    return 0


def _cmd_smoke(args) -> int:
    from training.smoke import smoke

    return smoke(data_dir=args.data, run_dir=args.run_dir, max_steps=args.steps, nproc=args.nproc,
                 overwrite=args.overwrite)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="norallm", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("config", help="experiment YAML")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted path (repeatable)")
        return sp

    sp = with_config("validate", "validate a config; print it resolved and the parameter count")
    sp.add_argument("--deepspeed", action="store_true", help="also print the generated DeepSpeed JSON")
    sp.set_defaults(fn=_cmd_validate)
    with_config("tokenizer", "train the configured tokenizer (or check the given one)").set_defaults(fn=_cmd_tokenizer)
    def with_tasks(sp: argparse.ArgumentParser, doing: str) -> argparse.ArgumentParser:
        sp.add_argument("--no-progress", action="store_true")
        sp.add_argument("--workers", type=int, default=1, metavar="W", help=f"{doing} processes (default 1)")
        sp.add_argument("--task-index", type=int, metavar="I", help="this task's index, 0 ≤ I < N (Slurm array)")
        sp.add_argument("--num-tasks", type=int, metavar="N", help="tasks splitting the work units between them")
        return sp

    sp = with_tasks(with_config("dedup", "find exact and near duplicates and evaluation text in the sources "
                                "(data.dedup), before prepare; restartable, parallel, array tasks"), "signing")
    sp.set_defaults(fn=_cmd_dedup)
    sp = with_tasks(with_config("prepare", "tokenize the sources into shards (restartable, parallel, array tasks)"),
                    "tokenizing")
    sp.add_argument("--verify", action="store_true",
                    help="check that every unit and manifest is complete and every checksum matches; exit 2 if not")
    sp.set_defaults(fn=_cmd_prepare)
    sp = with_config("plan", "the budget plan: tokens, share and epochs per source, steps, disk, GPU-hours")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(fn=_cmd_plan)
    sp = with_config("train", "train; resumes from RUN_DIR/checkpoints/latest")
    sp.add_argument("--run-dir", help=f"default: {default_run_dir('<name>')}")
    sp.add_argument("--stop-at", type=int, metavar="STEP", help="checkpoint and stop after this step")
    sp.add_argument("--from-checkpoint", metavar="DIR",
                    help="start a new run dir from another run's checkpoint (e.g. a WSD cooldown branch)")
    sp.set_defaults(fn=_cmd_train)

    sp = sub.add_parser("export", help="write an HF model dir from a checkpoint or run dir")
    sp.add_argument("checkpoint", help="a checkpoint dir, or a run dir (uses its latest checkpoint)")
    sp.add_argument("out")
    sp.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    sp.set_defaults(fn=_cmd_export)

    sp = sub.add_parser("generate", help="sample a continuation from an exported model")
    sp.add_argument("model_dir")
    sp.add_argument("--prompt", help="text to continue; with --chat, a one-shot user message")
    sp.add_argument("--chat", action="store_true", help="chat through the model's chat template (interactive "
                    "on stdin without --prompt)")
    sp.add_argument("--max-new-tokens", type=int, default=60)
    sp.add_argument("--temperature", type=float, help="default 0.8 (0.3 with --chat)")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=_cmd_generate)

    sp = sub.add_parser("eval", help="perplexity on JSONL files (--data), or lm-evaluation-harness tasks such as "
                        "NorEval (--tasks) on an exported model or on every checkpoint of a run")
    sp.add_argument("path", metavar="MODEL_DIR|RUN_DIR", help="an exported model dir; with --tasks also a run dir")
    sp.add_argument("--data", action="extend", nargs="+", metavar="[NAME=]PATH",
                    help="JSONL files or globs, one source each (--data A B, or repeat the flag)")
    sp.add_argument("--seq-len", type=int, help="default: the length the model was trained at")
    sp.add_argument("--max-samples", type=int, help="windows per source (default: the whole file); "
                    "documents with --per-document")
    sp.add_argument("--per-document", action="store_true", help="score each document alone (as lm-eval's "
                    "perplexity tasks do); adds word and byte perplexity and bits per byte")
    sp.add_argument("--batch-size", type=int, default=4)
    sp.add_argument("--text-field", default="text")
    sp.add_argument("--tasks", action="extend", nargs="+", metavar="NAME",
                    help="lm-eval tasks, tags or selections: noreval-mc (NorEval's multiple-choice core), "
                    "noreval-gen (its generation tasks that score offline)")
    sp.add_argument("--num-fewshot", type=int, metavar="K", help="few-shot examples (default: each task's own)")
    sp.add_argument("--limit", type=float, metavar="N", help="documents per task (below 1: a fraction); for a "
                    "quick look, not for reporting")
    sp.add_argument("--include-path", metavar="DIR", help="a dir of your own task YAML files")
    sp.add_argument("--checkpoints", metavar="all|STEPS", help="RUN_DIR: evaluate these checkpoints "
                    "(all, or steps like 1000,2000); rows go to RUN_DIR/harness.jsonl, done ones are skipped")
    sp.add_argument("--keep-exports", action="store_true",
                    help="keep each consolidated checkpoint under RUN_DIR/exports/ (default: a temporary dir)")
    sp.set_defaults(fn=_cmd_eval)

    sp = sub.add_parser("eval-cache", help="download the datasets of lm-eval tasks into the HF cache (login "
                        "node), so an offline compute node finds them")
    sp.add_argument("--tasks", action="extend", nargs="+", required=True, metavar="NAME")
    sp.add_argument("--include-path", metavar="DIR", help="a dir of your own task YAML files")
    sp.set_defaults(fn=_cmd_eval_cache)

    sp = sub.add_parser("report", help="PNG plots (loss, eval loss, lr, throughput, grad norm) of a run")
    sp.add_argument("run_dir")
    sp.add_argument("--out", help="default: RUN_DIR/plots")
    sp.set_defaults(fn=_cmd_report)

    sp = with_config("preflight", "on every rank: all-reduce, run dir writable, tokenizer matches the shards")
    sp.add_argument("--run-dir", help=f"default: {default_run_dir('<name>')}")
    sp.add_argument("--require-gpu", action="store_true", help="fail on a rank that sees no GPU")
    sp.add_argument("--timeout-s", type=float, default=300, help="give up joining the other ranks after this")
    sp.set_defaults(fn=_cmd_preflight)

    sp = with_config("submit", "render the sbatch script for a cluster and submit it (see slurm/README.md)")
    sp.add_argument("--cluster", required=True, help="lumi, olivia, betzy, saga or local")
    sp.add_argument("--nodes", type=int, help="nodes per job (slurm.nodes)")
    sp.add_argument("--time", help="time limit per job, e.g. 2-00:00:00 (slurm.time)")
    sp.add_argument("--account", help="slurm.account")
    sp.add_argument("--partition", help="slurm.partition")
    sp.add_argument("--qos", help="slurm.qos")
    sp.add_argument("--launcher", choices=["srun", "torchrun"], help="slurm.launcher")
    sp.add_argument("--run-dir", help=f"slurm.run_dir (default {default_run_dir('<name>')})")
    sp.add_argument("--container", metavar="IMAGE", help="slurm.container")
    sp.add_argument("--chain", type=int, default=1, metavar="K", help="submit K training jobs, each afterany the last")
    sp.add_argument("--prepare", action="store_true", help="first submit the preparation array and its verify job")
    sp.add_argument("--prepare-only", action="store_true", help="submit only the preparation array and verify job")
    sp.add_argument("--prepare-tasks", type=int, metavar="N", help="array tasks (slurm.prepare_tasks)")
    sp.add_argument("--eval-tasks", action="extend", nargs="+", metavar="NAME",
                    help="also submit a one-GPU evaluation job (norallm eval --tasks) after the training jobs")
    sp.add_argument("--eval-target", metavar="DIR", help="what it evaluates: an exported model dir or a run dir "
                    "(default: this run's every checkpoint)")
    sp.add_argument("--eval-include-path", metavar="DIR", help="a dir of your own task YAML files")
    sp.add_argument("--eval-only", action="store_true", help="submit only the evaluation job")
    sp.add_argument("--eval-time", default="4:00:00", help="time limit of the evaluation job (default 4:00:00)")
    sp.add_argument("--after", metavar="JOBID", help="the first submitted job waits for this one to end")
    sp.add_argument("--dry-run", action="store_true", help="print the script(s) instead of submitting")
    sp.set_defaults(fn=_cmd_submit)

    sp = sub.add_parser("smoke", help="the whole spine on a tiny model, 2 CPU ranks")
    sp.add_argument("--data", type=Path, help="dir of JSONL files to use instead of the embedded corpus")
    sp.add_argument("--run-dir", type=Path, default=Path(default_run_dir("smoke")))
    sp.add_argument("--steps", type=int, help="override train.max_steps")
    sp.add_argument("--nproc", type=int, default=2, help="ranks (torchrun --nproc_per_node)")
    sp.add_argument("--overwrite", action="store_true", help="replace a smoke run dir made on other data")
    sp.set_defaults(fn=_cmd_smoke)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        code = args.fn(args)
    except NorallmError as e:
        if _first_to_report():
            print(f"error: {e}", file=sys.stderr, flush=True)
        code = EXIT_USER_ERROR
    distributed = sys.modules.get("training.distributed")
    if argv is None and distributed is not None and distributed.joined():
        distributed.exit_process(code)  # a rank of a finished job: no interpreter teardown (see there)
    return code


def _first_to_report() -> bool:
    """Whether this process prints a user error: in a launch of several ranks, the first rank on
    this node to reach it (every rank usually hits the same config or data error); alone, always."""
    import tempfile

    launch = os.environ.get("TORCHELASTIC_RUN_ID") or (
        f"{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '')}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"
        if "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ else None)
    if launch is None or int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1) == 1:
        return True
    # the launcher (torchrun's agent, slurmstepd) is every local rank's parent: one marker per launch
    marker = Path(tempfile.gettempdir()) / f"norallm-error-{os.getuid()}-{launch}-{os.getppid()}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return True
    except FileExistsError:
        return False


if __name__ == "__main__":
    sys.exit(main())
