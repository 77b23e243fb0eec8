"""The `norallm` command line. User errors print one message (no traceback) and exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from data_pipeline.errors import NorallmError


def _cmd_validate(args) -> int:
    from training.config import load_config
    from training.engine import deepspeed_config
    from training.models import SpecialIds, count_parameters, hf_config

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
    from training.data import ensure_tokenizer

    cfg = load_config(args.config, args.set)
    tok = ensure_tokenizer(cfg.tokenizer, cfg.data)
    print(f"tokenizer {tok.path}: {tok.vocab_size} entries, bos={tok.bos_id} eos={tok.eos_id} pad={tok.pad_id}, "
          f"fingerprint {tok.fingerprint}")
    return 0


def _cmd_prepare(args) -> int:
    from training.config import load_config
    from training.data import run_prepare

    cfg = load_config(args.config, args.set)
    manifests = run_prepare(cfg, progress=not args.no_progress)
    for m in manifests:
        print(f"{m['source']}: {m['documents']['train']:,} train / {m['documents']['valid']:,} valid documents, "
              f"{m['tokens']['train']:,} / {m['tokens']['valid']:,} tokens")
    return 0


def _cmd_train(args) -> int:
    from training.config import load_config
    from training.trainer import EXIT_REQUEUE, train

    cfg = load_config(args.config, args.set)
    run_dir = Path(args.run_dir or Path("runs") / cfg.name)
    result = train(cfg, run_dir, stop_at=args.stop_at)
    return EXIT_REQUEUE if result.stopped_by_signal else 0


def _cmd_export(args) -> int:
    from training.export import export

    out = export(args.checkpoint, args.out, dtype=args.dtype)
    print(f"exported {out}")
    return 0


def _cmd_generate(args) -> int:
    from training.export import generate

    print(generate(args.model_dir, args.prompt, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, seed=args.seed))
    return 0


def _cmd_smoke(args) -> int:
    from training.smoke import smoke

    return smoke(data_dir=args.data, run_dir=args.run_dir, max_steps=args.steps, nproc=args.nproc)


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
    sp = with_config("prepare", "tokenize the sources into shards (restartable)")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(fn=_cmd_prepare)
    sp = with_config("train", "train; resumes from RUN_DIR/checkpoints/latest")
    sp.add_argument("--run-dir", help="default: runs/<name>")
    sp.add_argument("--stop-at", type=int, metavar="STEP", help="checkpoint and stop after this step")
    sp.set_defaults(fn=_cmd_train)

    sp = sub.add_parser("export", help="write an HF model dir from a checkpoint or run dir")
    sp.add_argument("checkpoint", help="a checkpoint dir, or a run dir (uses its latest checkpoint)")
    sp.add_argument("out")
    sp.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    sp.set_defaults(fn=_cmd_export)

    sp = sub.add_parser("generate", help="sample a continuation from an exported model")
    sp.add_argument("model_dir")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--max-new-tokens", type=int, default=60)
    sp.add_argument("--temperature", type=float, default=0.8)
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=_cmd_generate)

    sp = sub.add_parser("smoke", help="the whole spine on a tiny model, 2 CPU ranks")
    sp.add_argument("--data", type=Path, help="dir of JSONL files to use instead of the embedded corpus")
    sp.add_argument("--run-dir", type=Path, default=Path("runs/smoke"))
    sp.add_argument("--steps", type=int, help="override train.max_steps")
    sp.add_argument("--nproc", type=int, default=2, help="ranks (torchrun --nproc_per_node)")
    sp.set_defaults(fn=_cmd_smoke)
    return p


def main(argv: list[str] | None = None) -> int:
    if not _has_gpu():  # DeepSpeed otherwise warns, then guesses
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except NorallmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _has_gpu() -> bool:
    import shutil

    return shutil.which("nvidia-smi") is not None or shutil.which("rocm-smi") is not None


if __name__ == "__main__":
    sys.exit(main())
