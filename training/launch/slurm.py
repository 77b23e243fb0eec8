"""`norallm submit`: render the sbatch scripts in ``slurm/`` for a cluster profile and submit them.

The templates are thin shells; everything that varies (directives, environment, container, launch
command) is decided here from the cluster profile (training.launch.profiles), the experiment's
``slurm:`` section and the command line, in that order of precedence (last wins). Before anything
is submitted the config is validated for the world size the job will start, and the data plan
(shards, tokenizer, epochs) is checked.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from norallm.errors import NorallmError
from norallm.files import expand_path
from training.config import Config
from training.launch.profiles import OFFLINE_ENV, ClusterProfile, time_minutes
from training.launch.torchrun_node import EXIT_REQUEUE  # the trainer's, from a module without torch

TEMPLATES = Path(__file__).resolve().parents[2] / "slurm"
_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")


class SlurmError(NorallmError):
    """A job that cannot be rendered or submitted as asked."""


@dataclass(frozen=True)
class Job:
    """Everything a rendered script depends on: profile + config + command line, resolved."""

    profile: ClusterProfile
    config_path: Path  # absolute; the job reads the experiment from here
    overrides: tuple[str, ...]  # the user's --set KEY=VALUE, passed on to every norallm command
    name: str
    run_dir: Path
    workdir: Path  # relative paths in the config resolve from here, as at submit time
    account: str | None
    partition: str | None
    prepare_partition: str | None
    qos: str | None
    nodes: int
    time: str
    launcher: str
    ranks_per_node: int
    cpus_per_rank: int
    container: str | None
    binds: tuple[str, ...]
    python: str
    setup: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    signal_margin_s: int = 300
    requeue: bool = True
    preflight: bool = True
    prepare_tasks: int = 1
    extra_sbatch: tuple[str, ...] = ()
    expand_env: frozenset[str] = frozenset()  # env names whose values keep $VAR expansion

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


def resolve_job(cfg: Config, config_path: str | Path, profile: ClusterProfile, overrides: list[str]) -> Job:
    """Combine profile and config (the command line has already been folded into ``cfg.slurm``)."""
    s = cfg.slurm
    ranks = s.ranks_per_node or profile.gpus_per_node or max(1, (cfg.train.world_size or s.nodes) // s.nodes)
    cwd = Path.cwd()
    root = profile.resolved_run_root(s.account)
    default = f"{root}/{cfg.name}" if root else f"runs/{cfg.name}"
    run_dir = Path(expand_path(s.run_dir or default))
    return Job(
        profile=profile,
        config_path=Path(config_path).resolve(),
        overrides=tuple(o for o in overrides if not o.startswith("slurm.")),
        name=re.sub(r"[^A-Za-z0-9._-]+", "-", cfg.name),  # the job name and log file names
        run_dir=run_dir if run_dir.is_absolute() else cwd / run_dir,
        workdir=cwd,
        account=s.account,
        partition=s.partition or profile.partition,
        prepare_partition=s.prepare_partition or profile.prepare_partition,
        qos=s.qos,
        nodes=s.nodes,
        time=s.time or profile.default_time,
        launcher=s.launcher or profile.launcher,
        ranks_per_node=ranks,
        cpus_per_rank=s.cpus_per_rank or profile.cpus_per_rank,
        container=s.container,
        binds=tuple(profile.resolved_binds(s.account) + s.binds),
        python=s.python or (sys.executable if profile.name == "local" else "python3"),
        setup=tuple(s.setup),
        env={**OFFLINE_ENV, **profile.resolved_env(s.account), **s.env},
        # norallm's and the profile's values expand; the experiment's own only when it asks
        expand_env=frozenset((set(OFFLINE_ENV) | set(profile.resolved_env(s.account))) - set(s.env)
                             | set(s.env_expand)),
        signal_margin_s=s.signal_margin_s,
        requeue=s.requeue,
        preflight=s.preflight,
        prepare_tasks=s.prepare_tasks,
        extra_sbatch=tuple(s.extra_sbatch),
    )


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _unsafe_values(job: Job) -> list[tuple[str, str]]:
    """Values that would break out of their line of the script: a newline in --account used to put
    commands at the top of the job script (and end the #SBATCH block early)."""
    fields = {"slurm.account": job.account, "slurm.partition": job.partition, "slurm.qos": job.qos,
              "slurm.prepare_partition": job.prepare_partition, "slurm.time": job.time,
              "slurm.container": job.container, "slurm.run_dir": str(job.run_dir), "working directory": str(job.workdir),
              "slurm.python": job.python,
              **{f"slurm.binds.{i}": b for i, b in enumerate(job.binds)},
              **{f"slurm.extra_sbatch.{i}": o for i, o in enumerate(job.extra_sbatch)},
              **{f"slurm.env.{k}": v for k, v in job.env.items()}}
    problems = [(where, f"{value!r} holds a newline or control character; remove it.")
                for where, value in fields.items() if value is not None and _CONTROL.search(value)]
    problems += [(f"slurm.env.{k}", f"'{k}' is not a shell variable name (letters, digits, _).")
                 for k in job.env if not _ENV_NAME.match(k)]
    for where, value in (("slurm.run_dir", str(job.run_dir)), ("working directory", str(job.workdir))):
        if '"' in value:
            problems.append((where, f"{value!r} holds a double quote, which an #SBATCH path cannot carry."))
    return problems


def check_job(job: Job) -> list[tuple[str, str]]:
    """Problems with the job for this cluster, as (what, how to fix) pairs."""
    p, problems = job.profile, _unsafe_values(job)
    if p.account_required and not job.account:
        problems.append(("slurm.account", f"{p.name} requires an account; set slurm.account or pass "
                                          f"--account (e.g. {p.account_example})."))
    elif job.account and p.account_pattern and not re.match(p.account_pattern, job.account):
        problems.append(("slurm.account", f"'{job.account}' does not look like a {p.name} account "
                                          f"(e.g. {p.account_example})."))
    minutes = time_minutes(job.time)
    for key in (job.partition, f"qos:{job.qos}" if job.qos else None):
        max_nodes, max_time = p.limits.get(key or "", (None, None))
        where = f"{p.name}'s {key.replace('qos:', 'QOS ')}" if key else p.name
        if max_nodes and job.nodes > max_nodes:
            problems.append(("slurm.nodes", f"{job.nodes} nodes exceed {where} limit of {max_nodes}."))
        if max_time and minutes > time_minutes(max_time):
            problems.append(("slurm.time", f"{job.time} exceeds {where} limit of {max_time}."))
    if job.signal_margin_s >= minutes * 60:
        problems.append(("slurm.signal_margin_s", f"{job.signal_margin_s} s is not shorter than the time limit "
                                                  f"{job.time}; lower it or raise --time."))
    if job.container and not p.container_runtime:
        problems.append(("slurm.container", f"the {p.name} profile runs no container runtime; unset it."))
    if p.gpus_per_node and job.ranks_per_node > p.gpus_per_node:
        problems.append(("slurm.ranks_per_node", f"{job.ranks_per_node} ranks per node but {p.name} has "
                                                 f"{p.gpus_per_node} GPUs per node."))
    return problems


# ---------------------------------------------------------------------------------------------
# Rendering


def _fill(template: str, values: dict[str, str]) -> str:
    try:
        text = (TEMPLATES / template).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SlurmError(f"no template {TEMPLATES / template}: install norallm from a checkout "
                         "(`pip install -e .`), which carries slurm/.") from None
    missing = sorted(set(_PLACEHOLDER.findall(text)) - set(values))
    if missing:
        raise SlurmError(f"slurm/{template} uses placeholders {missing} that norallm does not fill; "
                         "restore the template from the repository.")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def _dq(value: str) -> str:
    """Double-quote for bash, keeping ``$VAR`` expansion (profiles use $USER, $SLURM_JOB_ID)."""
    return '"' + re.sub(r'(["\\`])', r"\\\1", value) + '"'


def _env_block(job: Job) -> str:
    """``export`` lines: norallm's and the profile's values expand ($USER, $SLURM_JOB_ID); the
    experiment's own ``slurm.env`` values are literal — ``$(…)``, backticks and ``$VAR`` stay as
    written — unless named in ``slurm.env_expand``."""
    lines = []
    for k, v in job.env.items():
        if k in job.expand_env:
            lines.append(f"export {k}={_dq(v)}")
        else:
            if re.search(r"[$`]", v):  # literal on purpose
                lines.append("# shellcheck disable=SC2016")
            lines.append(f"export {k}={shlex.quote(v)}")
    return "\n".join(lines)


def _setup_block(job: Job) -> str:
    return "\n".join(job.setup) if job.setup else "# (no setup lines: slurm.setup)"


def _directives(job: Job, *, ntasks_per_node: int, cpus_per_task: int, partition: str | None,
                gpus: bool, output: str, extra: list[str]) -> str:
    def path(value: str) -> str:  # sbatch reads a directive's value as one word unless quoted
        return f'"{value}"' if re.search(r"\s", value) else value

    output = path(output)
    opts = [f"--job-name={job.name}"]
    opts += [f"--account={job.account}"] if job.account else []
    opts += [f"--partition={partition}"] if partition else []
    opts += [f"--qos={job.qos}"] if job.qos else []
    opts += [f"--ntasks-per-node={ntasks_per_node}", f"--cpus-per-task={cpus_per_task}"]
    # --gpus-per-node, never --gpus-per-task (Sigma2's over-billing; LUMI binds by CPU mask instead).
    opts += [f"--gpus-per-node={job.profile.gpus_per_node}"] if gpus and job.profile.gpus_per_node else []
    opts += [f"--time={job.time}", f"--chdir={path(str(job.workdir))}", f"--output={output}", "--open-mode=append"]
    opts += extra
    return "\n".join(f"#SBATCH {o}" for o in opts)


_MEMORY_REQUEST = re.compile(r"--mem(-per-cpu|-per-gpu)?(=|$)")  # not --mem-bind


def _user_sets_memory(job: Job) -> bool:
    return any(_MEMORY_REQUEST.match(o) for o in job.extra_sbatch)


def _memory(job: Job, option: str | None) -> list[str]:
    """The profile's memory request, unless slurm.extra_sbatch makes its own (Slurm refuses two)."""
    return [] if option is None or _user_sets_memory(job) else [option]


def _profile_sbatch(job: Job, drop: tuple[str, ...] = ()) -> list[str]:
    """The profile's own #SBATCH options less ``drop``, and less its memory request (LUMI's
    --mem=0) when the user makes one."""
    return [o for o in job.profile.sbatch if o not in drop and not (_MEMORY_REQUEST.match(o) and _user_sets_memory(job))]


def _container_prefix(job: Job) -> list[str]:
    if not job.container:
        return []
    p = job.profile
    binds = ["--bind", ",".join(job.binds)] if job.binds else []
    return [p.container_runtime or "singularity", "exec", *binds, *p.container_flags, job.container]


def _python(job: Job) -> list[str]:
    return [*_container_prefix(job), job.python]


def _entry(job: Job, command: str, *args: str) -> list[str]:
    """``-m training.cli COMMAND CONFIG ARGS --set ...``: what every rank (or task) runs."""
    sets = [a for o in job.overrides for a in ("--set", o)]
    return ["-m", "training.cli", command, str(job.config_path), *args, *sets]


def launch_command(job: Job, command: str, *args: str) -> str:
    """The srun line that runs ``norallm COMMAND`` on every rank, in the job's launch mode.

    srun mode: one task per rank; the trainer reads its rank from SLURM_PROCID/LOCALID/NTASKS.
    torchrun mode: one task per node running torchrun (through training.launch.torchrun_node, which
    passes USR1 on to the workers), c10d rendezvous at MASTER_ADDR:MASTER_PORT.
    """
    entry = shlex.join(_entry(job, command, *args))
    if job.launcher == "srun":
        bind = [f"--cpu-bind={job.profile.cpu_bind}"] if job.profile.cpu_bind else []
        return (f'srun --ntasks-per-node={job.ranks_per_node} --cpus-per-task="$SLURM_CPUS_PER_TASK" '
                + shlex.join([*bind, *_python(job)]) + " " + entry)
    return ('srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 '
            '--cpus-per-task="$SLURM_CPUS_PER_TASK" '
            + shlex.join([*_python(job), "-m", "training.launch.torchrun_node"])
            + f' --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node={job.ranks_per_node} --rdzv-backend=c10d'
            + ' --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" ' + entry)


def render_train(job: Job) -> str:
    """The training script: optional per-node setup, preflight on every rank, train, requeue."""
    p = job.profile
    torchrun = job.launcher == "torchrun"
    extra = [f"--signal=B:USR1@{job.signal_margin_s}", *(["--requeue"] if job.requeue else []),
             *_profile_sbatch(job), *_memory(job, p.gpu_memory), *job.extra_sbatch]
    directives = _directives(
        job, ntasks_per_node=1 if torchrun else job.ranks_per_node,
        cpus_per_task=job.cpus_per_rank * (job.ranks_per_node if torchrun else 1),
        partition=job.partition, gpus=True, output=str(job.run_dir / "slurm" / "%x-%j.out"),
        extra=[f"--nodes={job.nodes}", *extra])
    if p.node_setup:
        node_setup = ("# Once per node before the first step.\n# shellcheck disable=SC2016\n"
                      'run_step srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" '
                      '--ntasks-per-node=1 --cpus-per-task=1 bash -c '
                      + shlex.quote("; ".join(p.node_setup)) + ' || echo "[slurm] per-node setup failed"')
    else:
        node_setup = "# (no per-node setup on this cluster)"
    preflight_args = ["--run-dir", str(job.run_dir), *(["--require-gpu"] if p.gpus_per_node else [])]
    return _fill("train.sbatch", {
        "CLUSTER": p.name,
        "DESCRIPTION": p.description,
        "SBATCH": directives,
        "SETUP": _setup_block(job),
        "ENV": _env_block(job),
        "LAUNCH_MODE": f"{job.launcher} mode, {job.ranks_per_node} rank(s) per node",
        "MARGIN_S": str(job.signal_margin_s),
        "EXIT_REQUEUE": str(EXIT_REQUEUE),
        "NODE_SETUP": node_setup,
        "PREFLIGHT": launch_command(job, "preflight", *preflight_args) if job.preflight else "true",
        "TRAIN": launch_command(job, "train", "--run-dir", str(job.run_dir)),
        "REQUEUE": "yes" if job.requeue else "no",
    })


def render_prepare(job: Job, verify: bool = False) -> str:
    """The preparation array job (``verify=False``) or the job that checks the union of its output."""
    p, n = job.profile, job.prepare_tasks
    if verify:
        what, cmd = "verify the union of the manifests", [*_python(job), *_entry(job, "prepare", "--verify")]
        extra = []
        output = str(job.run_dir / "slurm" / "%x-verify-%j.out")
    else:
        what = f"prepare share $SLURM_ARRAY_TASK_ID of {n}"
        cmd = [*_python(job), *_entry(job, "prepare", "--task-index", "@TASK@", "--num-tasks", str(n),
                                      "--workers", "@CPUS@", "--no-progress")]
        extra = [f"--array=0-{n - 1}"]
        output = str(job.run_dir / "slurm" / "%x-prepare-%A_%a.out")
    command = shlex.join(cmd).replace("@TASK@", '"$SLURM_ARRAY_TASK_ID"').replace("@CPUS@", '"$SLURM_CPUS_PER_TASK"')
    directives = _directives(job, ntasks_per_node=1, cpus_per_task=p.prepare_cpus,
                             partition=job.prepare_partition, gpus=False, output=output,
                             extra=["--nodes=1", *extra, *_memory(job, p.prepare_memory), *job.extra_sbatch])
    return _fill("prepare.sbatch", {
        "CLUSTER": p.name, "DESCRIPTION": p.description, "SBATCH": directives, "SETUP": _setup_block(job),
        "ENV": _env_block(job), "WHAT": what, "COMMAND": command,
    })


_WHOLE_NODE = ("--exclusive", "--mem=0")  # training's; a one-GPU job shares its node


def render_eval(job: Job, target: Path, tasks: list[str], time_limit: str, include_path: Path | None = None) -> str:
    """The evaluation job: ``norallm eval TARGET --tasks …`` on one GPU; a run dir's every checkpoint."""
    import dataclasses

    p = job.profile
    run_dir = target == job.run_dir or (target / "checkpoints").is_dir()
    args = ["--tasks", *tasks, *(["--checkpoints", "all"] if run_dir else []),
            *(["--include-path", str(include_path)] if include_path else [])]
    cmd = [*_python(job), "-m", "training.cli", "eval", str(target), *args]
    directives = _directives(dataclasses.replace(job, time=time_limit), ntasks_per_node=1,
                             cpus_per_task=job.cpus_per_rank, partition=p.eval_partition or job.partition,
                             gpus=False, output=str(job.run_dir / "slurm" / "%x-eval-%j.out"),
                             extra=["--nodes=1", *(["--gpus-per-node=1"] if p.gpus_per_node else []),
                                    *_profile_sbatch(job, drop=_WHOLE_NODE), *_memory(job, p.gpu_memory),
                                    *job.extra_sbatch])
    return _fill("eval.sbatch", {
        "CLUSTER": p.name, "DESCRIPTION": p.description, "SBATCH": directives, "SETUP": _setup_block(job),
        "ENV": _env_block(job), "WHAT": f"evaluate {target} on {' '.join(tasks)}", "COMMAND": shlex.join(cmd),
    })


# ---------------------------------------------------------------------------------------------
# Submitting


_NO_CONTROLLER = re.compile(r"Unable to contact slurm controller|Zero Bytes were transmitted|Could not establish|"
                            r"Connection refused|slurm_load_jobs error|cannot open slurm\.conf|Could not load", re.I)


def sbatch(script: Path, dependency: str | None = None) -> str:
    """Submit ``script``; returns the job id."""
    cmd = ["sbatch", "--parsable", *([f"--dependency={dependency}"] if dependency else []), str(script)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
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
    if prepare:
        script = out_dir / f"prepare-{stamp}.sbatch"
        script.write_text(render_prepare(job), encoding="utf-8")
        array_id = sbatch(script)
        submitted.append(("prepare", array_id))
        script = out_dir / f"verify-{stamp}.sbatch"
        script.write_text(render_prepare(job, verify=True), encoding="utf-8")
        verify_id = sbatch(script, f"afterok:{array_id}")
        submitted.append(("verify", verify_id))
        dependency = f"afterok:{verify_id}"
    if train:
        script = out_dir / f"train-{stamp}.sbatch"
        script.write_text(render_train(job), encoding="utf-8")
        for _ in range(chain):
            job_id = sbatch(script, dependency)
            submitted.append(("train", job_id))
            dependency = f"afterany:{job_id}"
    if evaluation is not None:
        script = out_dir / f"eval-{stamp}.sbatch"
        script.write_text(evaluation, encoding="utf-8")
        submitted.append(("eval", sbatch(script, dependency)))
    return submitted


def data_plan(cfg: Config, job: Job, prepared_first: bool) -> list[str]:
    """The world the job starts and the budget plan (training.modes); raises when the data
    is not there, was made with another tokenizer, or does not fit (e.g. a source's max_epochs)."""
    from data_pipeline.errors import DataError
    from data_pipeline.plan import format_plan
    from training.launch.preflight import check_conversations, check_data
    from training.modes import mode_of

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
    plan = data_plan(cfg, job, prepare) if train or prepare else []
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
        print("\n".join(f"# {line}" for line in plan), file=sys.stderr)
        if len(scripts) == 1:
            return scripts[0][1]
        return "\n".join(f"# ===== {kind} job =====\n{text}" for kind, text in scripts)
    submitted = submit(job, train=train, prepare=prepare, chain=chain, evaluation=evaluation, after=after)
    lines = [f"# {line}" for line in plan]
    lines += [f"submitted {kind} job {job_id}" for kind, job_id in submitted]
    lines.append(f"scripts and logs: {job.run_dir / 'slurm'}")
    return "\n".join(lines)
