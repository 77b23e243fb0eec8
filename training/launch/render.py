"""The sbatch scripts of a ``Job`` (training.launch.job): the templates in ``slurm/`` are thin
shells, and everything that varies — directives, environment, container, launch command — is
decided here."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from norallm.exits import EXIT_NODE_LOST, EXIT_REQUEUE
from training.config import is_secret_name
from training.launch.job import Job, SlurmError

TEMPLATES = Path(__file__).resolve().parents[2] / "slurm"
_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")


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
    written — unless named in ``slurm.env_expand``. A secret's value is never written into the
    script: the job gets it in its environment from `norallm submit` (training.launch.slurm), and
    the script only checks that it is there."""
    lines = []
    for k, v in job.env.items():
        if is_secret_name(k):
            lines.append(f': "${{{k}:?a secret that norallm submit passes in the job environment, never in this '
                         'script: submit with norallm submit, or export it before sbatch}"')
            lines.append(f"export {k}")
        elif k in job.expand_env:
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
        "EXIT_NODE_LOST": str(EXIT_NODE_LOST),
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
