"""`norallm submit`: resolve the job (training.launch.job), validate the config for the world size
it will start, check the data plan (shards, tokenizer, epochs), render the scripts
(training.launch.render) and submit them as one dependency chain."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from norallm.files import expand_path
from training.config import Config, is_secret_name
from training.launch.job import Job, SlurmError, check_job, resolve_job
from training.launch.render import render_eval, render_prepare, render_train

_NO_CONTROLLER = re.compile(r"Unable to contact slurm controller|Zero Bytes were transmitted|Could not establish|"
                            r"Connection refused|slurm_load_jobs error|cannot open slurm\.conf|Could not load", re.I)


def secret_env(job: Job) -> dict[str, str]:
    """The job's secret variables (training.config.is_secret_name) with their values: they reach
    the job through sbatch's environment (Slurm's default ``--export=ALL``), never through a file."""
    return {k: v for k, v in job.env.items() if is_secret_name(k)}


def sbatch(script: Path, dependency: str | None = None, secrets: dict[str, str] | None = None) -> str:
    """Submit ``script`` (with ``secrets`` in the job's environment); returns the job id."""
    cmd = ["sbatch", "--parsable", *([f"--dependency={dependency}"] if dependency else []), str(script)]
    env = {**os.environ, **secrets} if secrets else None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    except FileNotFoundError:
        raise SlurmError("sbatch not found: run `norallm submit` on a login node of the cluster, or add "
                         "--dry-run to print the script.") from None
    if proc.returncode != 0 and _NO_CONTROLLER.search(proc.stderr):
        raise SlurmError(f"no Slurm controller answers from this machine ({proc.stderr.strip()}): submit from a "
                         "login node of the cluster, or add --dry-run to print the script.")
    if proc.returncode != 0:
        raise SlurmError(f"sbatch rejected {script.name}: {proc.stderr.strip()}. Fix the slurm: settings "
                         "(account, partition, time) or the command line.")
    return proc.stdout.strip().split(";")[0]


def submit(job: Job, *, train: bool = True, prepare: bool = False, chain: int = 1, evaluation: str | None = None,
           after: str | None = None) -> list[tuple[str, str]]:
    """Write the scripts under RUN_DIR/slurm/ and submit them: the preparation array and its verify
    job (when ``prepare``), then ``chain`` training jobs, each after the previous one ended
    (afterany: a job that hit its time limit still hands over to the next), then the evaluation
    script ``evaluation`` after the last of them. ``after``: a job id the first job waits for
    (afterany). Returns (kind, id)."""
    out_dir = job.run_dir / "slurm"
    out_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create the --output directory
    stamp = time.strftime("%Y%m%d-%H%M%S")
    submitted: list[tuple[str, str]] = []
    dependency = f"afterany:{after}" if after else None
    secrets = secret_env(job)
    if prepare:
        script = out_dir / f"prepare-{stamp}.sbatch"
        script.write_text(render_prepare(job), encoding="utf-8")
        array_id = sbatch(script, secrets=secrets)
        submitted.append(("prepare", array_id))
        script = out_dir / f"verify-{stamp}.sbatch"
        script.write_text(render_prepare(job, verify=True), encoding="utf-8")
        verify_id = sbatch(script, f"afterok:{array_id}", secrets)
        submitted.append(("verify", verify_id))
        dependency = f"afterok:{verify_id}"
    if train:
        script = out_dir / f"train-{stamp}.sbatch"
        script.write_text(render_train(job), encoding="utf-8")
        for _ in range(chain):
            job_id = sbatch(script, dependency, secrets)
            submitted.append(("train", job_id))
            dependency = f"afterany:{job_id}"
    if evaluation is not None:
        script = out_dir / f"eval-{stamp}.sbatch"
        script.write_text(evaluation, encoding="utf-8")
        submitted.append(("eval", sbatch(script, dependency, secrets)))
    return submitted


def check_job_data(cfg: Config, job: Job, prepared_first: bool) -> list[str]:
    """Check that the job's data is ready and return the lines submit prints about it: the world the
    job starts, then the budget plan (training.data.modes) or the conversation files. Raises when
    the data is not there, was made with another tokenizer, or does not fit (e.g. a source's
    max_epochs). Not the budget plan itself: that is the mode's ``plan()``."""
    from data_pipeline.errors import DataError
    from data_pipeline.plan import format_plan
    from training.data.modes import mode_of
    from training.launch.preflight import check_conversations, check_data

    lines = [f"world {job.world_size} = {job.nodes} node(s) × {job.ranks_per_node} rank(s), "
             f"{cfg.train.accum_steps(job.world_size)} accumulation step(s)"]
    mode = mode_of(cfg)
    if not mode.reads_shards:
        if prepared_first:
            raise SlurmError("--prepare: an SFT config has nothing to prepare (the training job reads and packs "
                             "the conversations); submit without it.")
        problems, summary = check_conversations(cfg.data)
        if problems:
            raise SlurmError("the data is not ready for training: " + " ".join(problems))
        return [*lines, f"data: {summary}"]
    if prepared_first:
        try:
            cfg.tokenizer.load()
        except DataError as e:
            raise SlurmError(f"{e} Run `norallm tokenizer CONFIG` before submitting the preparation: its array "
                             "tasks must share one tokenizer.") from None
        return [*lines, f"data: prepared first by a {job.prepare_tasks}-task array job, then verified"]
    problems, _ = check_data(cfg.tokenizer, cfg.data)
    if problems:
        raise SlurmError("the data is not ready for training: " + " ".join(problems) + " (Or submit with "
                         "--prepare to prepare it first.)")
    plan = mode.plan()
    plan.check()
    return [*lines, *format_plan(plan).splitlines()]


def submit_command(config_path: str, sets: list[str], cluster: str, options: dict, *, dry_run: bool,
                   chain: int, prepare: bool, train: bool, eval_tasks: list[str] | None = None,
                   eval_target: str | None = None, eval_time: str = "4:00:00", eval_include_path: str | None = None,
                   after: str | None = None) -> str:
    """`norallm submit`: validate for the world the job starts, check the data, render, submit.
    ``options`` are the command line's slurm settings (None: not given); they win over the config.
    ``eval_tasks``: an evaluation job too (after the training jobs), on ``eval_target`` (default
    the run dir: every checkpoint)."""
    import json

    from training.config import ConfigError, load_config
    from training.launch.profiles import get_profile

    profile = get_profile(cluster)
    cli_sets = [f"slurm.{k}={json.dumps(v)}" for k, v in options.items() if v is not None]
    cfg = load_config(config_path, [*sets, *cli_sets])
    job = resolve_job(cfg, config_path, profile, sets)
    problems = check_job(job)
    if train and cfg.train.world_size not in (None, job.world_size):
        problems.append(("train.world_size", f"the config expects {cfg.train.world_size} ranks, the job starts "
                                             f"{job.nodes} node(s) × {job.ranks_per_node} = {job.world_size}; "
                                             "change --nodes / slurm.ranks_per_node or the config."))
    if chain < 1:
        problems.append(("--chain", f"{chain}: submit at least one training job."))
    if eval_target is not None and not eval_tasks:
        problems.append(("--eval-target", "say what to evaluate it on: --eval-tasks NAMES (e.g. noreval-mc)."))
    if not (train or prepare or eval_tasks):
        problems.append(("--eval-only", "nothing to submit: add --eval-tasks NAMES."))
    if profile.name != "local" and not job.container and not job.setup:
        bare = (f"neither slurm.container nor slurm.setup is set, so the job would run a bare "
                f"'{job.python}' on {profile.name}'s compute nodes, which has no PyTorch; give the image "
                "(--container) or the module/venv lines (slurm.setup).")
        if dry_run:
            print(f"# warning: {bare}", file=sys.stderr)
        else:
            problems.append(("slurm.setup", bare))
    if problems:
        raise ConfigError(problems, f"submit --cluster {cluster}")
    if train and cfg.train.world_size is None:  # the batch-size checks, for the world this job starts
        load_config(config_path, [*sets, *cli_sets, f"train.world_size={job.world_size}"])
    data_lines = check_job_data(cfg, job, prepare) if train or prepare else []
    scripts = ([("prepare", render_prepare(job)), ("verify", render_prepare(job, verify=True))] if prepare else [])
    scripts += [("train", render_train(job))] if train else []
    evaluation = None
    if eval_tasks:
        target = Path(expand_path(eval_target)).resolve() if eval_target else job.run_dir
        if eval_target and not train and not (target / "config.json").is_file() and not (target / "checkpoints").is_dir():
            raise SlurmError(f"--eval-target {eval_target}: neither an exported model dir (config.json) nor a run "
                             "dir (checkpoints/).")
        include = Path(eval_include_path).resolve() if eval_include_path else None
        if include is not None and not include.is_dir():
            raise SlurmError(f"--eval-include-path {eval_include_path} is not a directory of task YAML files.")
        evaluation = render_eval(job, target, eval_tasks, eval_time, include)
        scripts.append(("eval", evaluation))
    if dry_run:
        print("\n".join(f"# {line}" for line in data_lines), file=sys.stderr)
        if len(scripts) == 1:
            return scripts[0][1]
        return "\n".join(f"# ===== {kind} job =====\n{text}" for kind, text in scripts)
    submitted = submit(job, train=train, prepare=prepare, chain=chain, evaluation=evaluation, after=after)
    lines = [f"# {line}" for line in data_lines]
    lines += [f"submitted {kind} job {job_id}" for kind, job_id in submitted]
    lines.append(f"scripts and logs: {job.run_dir / 'slurm'}")
    return "\n".join(lines)
