"""Per-cluster settings for the sbatch scripts `norallm submit` renders.

A profile holds what is true of a machine (GPUs per node, the partition, CPU binding, network and
cache variables, container runtime and the paths it must bind); an experiment's config
(``slurm:`` section) and the command line choose account, nodes, time and image. Sources: the
systems' documentation and the scripts NORA.LLM used on LUMI (see ../shared/HPC.md). Every value
that is not from those sources is listed in the profile's ``guesses``; confirm those on the
machine before a long run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# One mask per GCD, in local-rank order: rank i runs on the 7 cores of the CCD wired to GCD i
# (LUMI user guide, "GPU binding"; the first core of each CCD is reserved for the OS).
LUMI_CPU_MASKS = ("0x00fe000000000000", "0xfe00000000000000", "0x0000000000fe0000", "0x00000000fe000000",
                  "0x00000000000000fe", "0x000000000000fe00", "0x000000fe00000000", "0x0000fe0000000000")

# Compute nodes have no network: everything loads from local paths, wandb logs offline.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
    # DeepSpeed's JIT-compiled ops (CPU Adam with offload, the CPU comm op) build node-locally, per
    # job: a build killed with its job cannot leave a lock on a shared file system that hangs the
    # next job, and nodes never race each other on one cache (training.distributed builds on one
    # rank per node). torch's fused AdamW, the default, needs no build at all.
    "TORCH_EXTENSIONS_DIR": "${TMPDIR:-/tmp}/${USER}-torch-extensions-${SLURM_JOB_ID}",
    # Triton's kernel cache (liger-kernel, torch.compile, FlexAttention) beside it for the same
    # reasons: its default is ~/.triton/cache on the shared home, written by every rank at once.
    "TRITON_CACHE_DIR": "${TMPDIR:-/tmp}/${USER}-triton-cache-${SLURM_JOB_ID}",
}


@dataclass(frozen=True)
class ClusterProfile:
    """What `norallm submit --cluster NAME` knows about a machine."""

    name: str
    description: str
    partition: str | None  # None: the cluster's default partition
    gpus_per_node: int  # 0: CPU only (ranks_per_node then comes from the config)
    cpus_per_rank: int
    launcher: str  # "srun" (one task per GPU) or "torchrun" (one task per node)
    account_required: bool = True
    account_pattern: str | None = None  # a regex the account must match, to catch swapped values
    account_example: str = ""
    # Known limits, per partition and per QOS ("qos:NAME"): (max nodes per job, max time).
    limits: dict[str, tuple[int | None, str | None]] = field(default_factory=dict)
    default_time: str = "1:00:00"
    sbatch: tuple[str, ...] = ()  # extra #SBATCH options
    cpu_bind: str | None = None  # srun --cpu-bind in srun mode (one task per GPU)
    env: dict[str, str] = field(default_factory=dict)
    container_runtime: str | None = None  # "singularity" / "apptainer" when slurm.container is set
    container_flags: tuple[str, ...] = ()
    binds: tuple[str, ...] = ()  # "{account}" is replaced by slurm.account
    node_setup: tuple[str, ...] = ()  # shell lines run once per node before the first step
    prepare_partition: str | None = None  # CPU partition for the preparation array
    prepare_cpus: int = 1  # CPUs per preparation task
    eval_partition: str | None = None  # for a one-GPU evaluation job; None: the training partition
    # The memory request of a GPU job (training, evaluation) and of a preparation task, where the
    # cluster requires one (Sigma2's shared-node partitions refuse or kill jobs without it); a
    # per-CPU or per-GPU request, so that a one-GPU evaluation job asks for its share. None: none
    # (LUMI's whole nodes: --mem=0 in ``sbatch``). A user's --mem/--mem-per-cpu/--mem-per-gpu in
    # slurm.extra_sbatch replaces it (and LUMI's --mem=0).
    gpu_memory: str | None = None
    prepare_memory: str | None = None
    guesses: tuple[str, ...] = ()
    # Where run dirs go by default: the work/scratch area (7B checkpoints do not fit a home or
    # project quota); "{account}" is replaced by slurm.account. None: runs/<name> under the cwd.
    run_root: str | None = None

    def resolved_run_root(self, account: str | None) -> str | None:
        if self.run_root is None or (not account and "{account}" in self.run_root):
            return None
        return _with_account(self.run_root, account)

    def resolved_binds(self, account: str | None) -> list[str]:
        return [_with_account(b, account) for b in self.binds if account or "{account}" not in b]

    def resolved_env(self, account: str | None) -> dict[str, str]:
        return {k: _with_account(v, account) for k, v in self.env.items() if account or "{account}" not in v}


def _with_account(text: str, account: str | None) -> str:
    return text.replace("{account}", account or "")

# Sigma2's machines (Betzy, Saga, Olivia): nn####k accounts, Apptainer with --nv, the project
# areas bound, the Hugging Face cache on project work storage.
_SIGMA2_ENV = {"OMP_NUM_THREADS": "8", "HF_HOME": "${HF_HOME:-/cluster/work/projects/{account}/$USER/hf-home}"}
_SIGMA2_HF_HOME_GUESS = "HF_HOME under /cluster/work/projects/<account>/$USER/hf-home (unless already set)"
_SIGMA2 = dict(
    account_pattern=r"^nn\d{4}k$",
    account_example="nn1234k",
    default_time="1-00:00:00",
    container_runtime="apptainer",
    container_flags=("--nv",),
    binds=("/cluster/work/projects/{account}", "/cluster/projects/{account}"),
)
# Betzy and Saga (A100, InfiniBand): one task per GPU, InfiniBand's NCCL defaults.
_SIGMA2_A100 = dict(_SIGMA2, launcher="srun", env=_SIGMA2_ENV)


PROFILES: dict[str, ClusterProfile] = {
    "lumi": ClusterProfile(
        name="lumi",
        run_root="/scratch/{account}/$USER/norallm",
        prepare_partition="small",
        prepare_cpus=16,
        description="LUMI-G: 8 MI250X GCDs per node, Slingshot; NORA.LLM's machine",
        partition="standard-g",  # dev-g for tests (3 h, ≤ 32 nodes): --partition dev-g
        eval_partition="small-g",  # shared nodes: standard-g would bill a whole node for one GPU
        gpus_per_node=8,
        cpus_per_rank=7,
        launcher="srun",
        account_pattern=r"^project_\d+$",
        account_example="project_465000123",
        limits={"standard-g": (1024, "2-00:00:00"), "small-g": (4, "3-00:00:00"), "dev-g": (32, "3:00:00")},
        default_time="2-00:00:00",
        sbatch=("--mem=0", "--exclusive", "--hint=nomultithread"),
        cpu_bind="mask_cpu:" + ",".join(LUMI_CPU_MASKS),
        env={
            # RCCL over the four Slingshot NICs through the aws-ofi-rccl plugin of the containers.
            "NCCL_SOCKET_IFNAME": "hsn0,hsn1,hsn2,hsn3",
            # the process group's CPU side (gloo: stop flag, object gathers) on the same network
            "GLOO_SOCKET_IFNAME": "hsn0",
            "NCCL_NET_GDR_LEVEL": "3",
            # NORA's value: the default 131072 overflowed the completion queue at scale.
            "FI_CXI_DEFAULT_CQ_SIZE": "262144",
            # MIOpen's kernel database off the shared home file system (node-local /tmp).
            "MIOPEN_USER_DB_PATH": "/tmp/${USER}-miopen-${SLURM_JOB_ID}",
            "MIOPEN_CUSTOM_CACHE_DIR": "/tmp/${USER}-miopen-${SLURM_JOB_ID}",
            "OMP_NUM_THREADS": "1",
            "HF_HOME": "${HF_HOME:-/scratch/{account}/$USER/hf-home}",
        },
        container_runtime="singularity",
        binds=("/var/spool/slurmd", "/opt/cray", "/usr/lib64/libcxi.so.1",
               "/project/{account}", "/scratch/{account}", "/flash/{account}"),
        node_setup=(
            'mkdir -p "$MIOPEN_USER_DB_PATH"',
            # Shared-memory segments left by an earlier job on the node break RCCL's intra-node transport.
            "find /dev/shm -maxdepth 1 -user \"$USER\" -mindepth 1 -exec rm -rf {} + 2>/dev/null || true",
        ),
        guesses=(
            "preparation on LUMI-C `small` (shared CPU nodes), 16 cores per array task",
            "HF_HOME under /scratch/<account>/$USER/hf-home (unless already set)",
            "MIOPEN_* under /tmp/$USER-miopen-$SLURM_JOB_ID rather than ...-$SLURM_NODEID: /tmp is node-local",
            "NCCL_NET_GDR_LEVEL=3 (RCCL may want PHB in newer releases)",
            "/project/<account> as the project dir bind (scratch and flash are documented)",
        ),
    ),
    "olivia": ClusterProfile(
        name="olivia",
        run_root="/cluster/work/projects/{account}/$USER/norallm",
        prepare_partition="normal",
        prepare_cpus=16,
        description="Olivia (NAIC/Sigma2): 4 GH200 (ARM64) per node, Slingshot",
        partition="accel",
        gpus_per_node=4,
        cpus_per_rank=72,
        # Sigma2 docs: accel jobs are specified like `small` jobs, which must request memory; the
        # GPU sample job script asks --mem-per-gpu=110G (a GH200 has 120 GB of LPDDR5X).
        gpu_memory="--mem-per-gpu=110G",
        prepare_memory="--mem-per-cpu=3G",  # the CPU nodes' 3 GiB per core
        launcher="torchrun",  # the documented multi-node pattern: torchrun per node, c10d rendezvous
        **_SIGMA2,
        limits={"accel": (8, "7-00:00:00"), "qos:devel": (4, "2:00:00")},
        env={
            "FI_PROVIDER": "cxi",
            "FI_CXI_RX_MATCH_MODE": "hybrid",
            "NCCL_SOCKET_IFNAME": "hsn0,hsn1,hsn2,hsn3",
            "GLOO_SOCKET_IFNAME": "hsn0",
            "NCCL_NET_GDR_LEVEL": "PHB",
            "NCCL_CROSS_NIC": "1",
            # LL128 with GPUDirect corrupted data on Olivia in 2026.
            "NCCL_PROTO": "^LL128",
            **_SIGMA2_ENV,
        },
        guesses=(
            "preparation on a CPU partition named `normal`, 16 cores per array task",
            "the preparation partition is x86-64 while the GH200 image is ARM64: give the array job an "
            "x86-64 python (slurm.python/setup) or set slurm.prepare_partition: accel",
            _SIGMA2_HF_HOME_GUESS,
            "cpus_per_rank=72 (one Grace CPU of 72 cores per GH200): confirm the accel partition's CPU limits",
            "OMP_NUM_THREADS=8",
        ),
    ),
    "betzy": ClusterProfile(
        name="betzy",
        run_root="/cluster/work/users/$USER/norallm",
        prepare_partition="preproc",
        prepare_cpus=16,
        description="Betzy (Sigma2): 4 A100 40 GB per node on the accel partition",
        partition="accel",
        gpus_per_node=4,
        cpus_per_rank=16,
        # Sigma2 docs: accel jobs must give the memory per CPU or GPU; a node has 64 cores, 512 GiB.
        gpu_memory="--mem-per-cpu=7G",
        prepare_memory="--mem-per-cpu=4G",
        **_SIGMA2_A100,
        limits={"accel": (3, "7-00:00:00"), "qos:devel": (3, "1:00:00")},  # 3 nodes per user
        guesses=(
            "preparation on the `preproc` partition, 16 cores per array task",
            _SIGMA2_HF_HOME_GUESS,
            "cpus_per_rank=16 (a quarter of a 64-core accel node)",
            "--mem-per-cpu=7G: 448 of an accel node's 512 GiB when all 4 GPUs are used; 4G per preproc core",
            "OMP_NUM_THREADS=8; no NCCL variables (InfiniBand defaults)",
        ),
    ),
    "saga": ClusterProfile(
        name="saga",
        run_root="/cluster/work/users/$USER/norallm",
        prepare_partition="normal",
        prepare_cpus=16,
        description="Saga (Sigma2): 4 A100 80 GB per node on the a100 partition",
        partition="a100",
        gpus_per_node=4,
        # Sigma2 docs: an a100 node has 32 CPUs, 1,000 GiB and 4 A100 (max 7 nodes per user), and
        # every Saga job must say how much memory it needs (the a100 example: --mem-per-cpu=8G).
        cpus_per_rank=8,
        gpu_memory="--mem-per-cpu=8G",
        prepare_memory="--mem-per-cpu=4G",  # normal nodes: 40 CPUs, 186 GiB
        **_SIGMA2_A100,
        limits={"a100": (7, "14-00:00:00"), "qos:devel": (7, "2:00:00")},
        guesses=(
            "preparation on the `normal` partition, 16 cores per array task",
            _SIGMA2_HF_HOME_GUESS,
            "--mem-per-cpu=8G (the docs' a100 example): 64 GiB per rank, a quarter of what a node has",
            "OMP_NUM_THREADS=8; no NCCL variables (InfiniBand defaults)",
        ),
    ),
    "local": ClusterProfile(
        name="local",
        description="any Slurm, CPU ranks (tests, single machines): the cluster's default partition",
        partition=None,
        gpus_per_node=0,
        cpus_per_rank=1,
        launcher="srun",
        account_required=False,
        default_time="1:00:00",
    ),
}


def get_profile(name: str) -> ClusterProfile:
    from norallm.errors import NorallmError

    if name not in PROFILES:
        raise NorallmError(f"unknown cluster '{name}'; use one of {sorted(PROFILES)} (--cluster NAME).")
    return PROFILES[name]


def time_minutes(value: str) -> float:
    """Minutes of a Slurm time string (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)."""
    days = 0
    if "-" in value:
        day_part, value = value.split("-", 1)
        days = int(day_part)
        hours, minutes, seconds = ([int(p) for p in value.split(":")] + [0, 0])[:3]
    else:
        parts = [int(p) for p in value.split(":")]
        hours, minutes, seconds = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return days * 1440 + hours * 60 + minutes + seconds / 60
