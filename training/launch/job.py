"""A job for `norallm submit`: the cluster profile (training.launch.profiles), the experiment's
``slurm:`` section and the command line resolved into one ``Job`` (last wins), and the checks that
refuse one which could not run or would break out of its script."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from norallm.errors import NorallmError
from norallm.files import default_run_dir, expand_path
from training.config import Config, is_secret_name
from training.launch.profiles import OFFLINE_ENV, ClusterProfile, time_minutes


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
    run_dir = Path(expand_path(s.run_dir or default_run_dir(cfg.name, root)))
    return Job(
        profile=profile,
        config_path=Path(config_path).resolve(),
        overrides=tuple(o for o in overrides if not o.startswith("slurm.")),
        # the job name and log file names; control characters are kept, for check_job to refuse
        name=re.sub(r"[^A-Za-z0-9._\x00-\x1f\x7f-]+", "-", cfg.name),
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
_SPACE = re.compile(r"\s")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _unsafe_values(job: Job) -> list[tuple[str, str]]:
    """Values that would break out of their line of the script: a newline in --account used to put
    commands at the top of the job script (and end the #SBATCH block early)."""
    fields = {"name": job.name, "slurm.account": job.account, "slurm.partition": job.partition, "slurm.qos": job.qos,
              "slurm.prepare_partition": job.prepare_partition, "slurm.time": job.time,
              "slurm.container": job.container, "slurm.run_dir": str(job.run_dir), "working directory": str(job.workdir),
              "slurm.python": job.python,
              **{f"slurm.binds.{i}": b for i, b in enumerate(job.binds)},
              **{f"slurm.extra_sbatch.{i}": o for i, o in enumerate(job.extra_sbatch)},
              **{f"slurm.env.{k}": v for k, v in job.env.items()}}
    problems = [(where, f"{value!r} holds a newline or control character; remove it.")
                for where, value in fields.items() if value is not None and _CONTROL.search(value)]
    # each of these is one word of its #SBATCH line: a space would start another option there
    one_word = {"slurm.account": job.account, "slurm.partition": job.partition, "slurm.qos": job.qos,
                "slurm.prepare_partition": job.prepare_partition, "slurm.time": job.time}
    problems += [(where, f"{value!r} holds a space, which would put another option on its #SBATCH line; give "
                  "the one name.") for where, value in one_word.items()
                 if value is not None and not _CONTROL.search(value) and _SPACE.search(value)]
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
    secrets = sorted(k for k in job.env if is_secret_name(k))
    for option in (*p.sbatch, *job.extra_sbatch):
        scope = option.partition("=")[2].split(",")[0] if option.startswith("--export=") else "ALL"
        if secrets and scope != "ALL":
            problems.append(("slurm.extra_sbatch", f"{option} keeps the environment `norallm submit` passes from "
                                                   f"the job, and the job's secrets ({', '.join(secrets)}) come in "
                                                   "it; use --export=ALL (or ALL,...) or drop the option."))
    if job.container and not p.container_runtime:
        problems.append(("slurm.container", f"the {p.name} profile runs no container runtime; unset it."))
    if p.gpus_per_node and job.ranks_per_node > p.gpus_per_node:
        problems.append(("slurm.ranks_per_node", f"{job.ranks_per_node} ranks per node but {p.name} has "
                                                 f"{p.gpus_per_node} GPUs per node."))
    return problems
