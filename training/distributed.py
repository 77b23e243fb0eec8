"""Ranks, devices and the few cross-rank reductions the training loop needs — decided and done here.

One decision, taken once from torch itself (never from ``nvidia-smi``/``rocm-smi`` on PATH):

- CUDA or ROCm (``torch.version.hip``) when torch sees a device: the rank's device is
  ``cuda:LOCAL_RANK % device_count``, set before the process group exists; the group gets a CPU
  backend beside the accelerator's (``cpu:gloo,cuda:nccl``; RCCL answers to "nccl" on ROCm), so
  host-side agreements (the stop flag, object gathers) never touch the GPU stream;
- otherwise the CPU with gloo.

DeepSpeed's accelerator is set from the same decision, so DeepSpeed can never pick the CPU on a
GPU node (or the reverse). Tests take the CPU path by hiding devices (``CUDA_VISIBLE_DEVICES=``),
exactly as a real CPU-only machine would.

No other module calls ``torch.distributed`` collectives; a test reads the sources to hold that.
A reduction runs where its operand lives: device values (losses) on the accelerator's backend,
host values (the stop flag, token counts, object gathers) on the CPU backend — NCCL alone would
refuse the latter, and moving them to the GPU would cost a device synchronisation per step.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    """Where this rank computes and how it talks to the others."""

    kind: str  # "cuda", "rocm" or "cpu"
    device: torch.device
    backend: str  # what init_process_group gets
    ds_accelerator: str  # DeepSpeed's accelerator name: "cuda" (also ROCm) or "cpu"

    @property
    def is_gpu(self) -> bool:
        return self.device.type == "cuda"


def decide(local_rank: int | None = None) -> Runtime:
    """The accelerator for this rank, from torch alone."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or 0)
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        kind = "rocm" if getattr(torch.version, "hip", None) else "cuda"
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        return Runtime(kind, device, "cpu:gloo,cuda:nccl", "cuda")
    return Runtime("cpu", torch.device("cpu"), "gloo", "cpu")


_RUNTIME: Runtime | None = None


def runtime() -> Runtime:
    """This process's decision (taken on first use)."""
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = decide()
    return _RUNTIME


def use_deepspeed_accelerator(rt: Runtime) -> None:
    """Point DeepSpeed at the decided accelerator, before anything in DeepSpeed asks for one."""
    previous = os.environ.get("DS_ACCELERATOR")
    if previous is not None and previous != rt.ds_accelerator:
        print(f"[distributed] DS_ACCELERATOR={previous} ignored: torch sees {rt.kind}, using "
              f"DeepSpeed's '{rt.ds_accelerator}' accelerator", file=sys.stderr)
    os.environ["DS_ACCELERATOR"] = rt.ds_accelerator
    from deepspeed.accelerator import real_accelerator

    current = real_accelerator.ds_accelerator
    if current is None or current._name != rt.ds_accelerator:
        if rt.ds_accelerator == "cpu":
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accelerator
        else:
            from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accelerator
        real_accelerator.set_accelerator(Accelerator())


def _launcher_env() -> None:
    """RANK/WORLD_SIZE/... from torchrun, srun, or a plain single process."""
    if "RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
        # A plain `python`/`norallm train` without a launcher: a world of one. Without these,
        # DeepSpeed falls back to MPI discovery and fails.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    elif "RANK" not in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")


def spans_nodes() -> bool:
    """Whether this launch has ranks on other nodes, from the launcher's variables (before the
    process group exists): torchrun's LOCAL_WORLD_SIZE, or srun's node count of the step."""
    world = int(os.environ.get("WORLD_SIZE") or 1)
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local is not None:
        return world > int(local)
    return int(os.environ.get("SLURM_STEP_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1) > 1


def check_gloo_address(backend: str) -> None:
    """Refuse a multi-node launch whose gloo would advertise a loopback address: gloo binds the
    address its host name resolves to (unless GLOO_SOCKET_IFNAME names an interface), and a name
    that resolves to 127.0.1.1 (a Debian default in /etc/hosts) makes the other nodes connect to
    themselves: every rank waited for the whole collective timeout, then one failed with
    "connectFullMesh failed ... Connection refused, remote=[127.0.1.1]" (seen on the private cluster)."""
    if "gloo" not in backend or os.environ.get("GLOO_SOCKET_IFNAME") or not spans_nodes():
        return
    import ipaddress

    from norallm.errors import NorallmError

    host = socket.gethostname()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError as e:
        raise NorallmError(f"this node's name {host!r} does not resolve ({e.strerror or e}), and gloo needs an "
                           "address the other nodes can reach: fix its DNS or /etc/hosts entry, or set "
                           "GLOO_SOCKET_IFNAME to the cluster network interface (slurm.env).") from None
    if all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise NorallmError(f"this node's name {host!r} resolves to {', '.join(sorted(addresses))} (loopback), which "
                           "gloo would give the other nodes to connect to: set GLOO_SOCKET_IFNAME to the cluster "
                           "network interface (slurm.env, e.g. hsn0 or ib0) or map the name to the node's address.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ninja_on_path() -> None:
    """DeepSpeed's JIT builds run ``ninja`` from PATH; pip installs it beside this interpreter,
    which a launcher's PATH (a bare `.venv/bin/norallm-torchrun`, a batch script) may not name."""
    import shutil

    here = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and os.path.exists(os.path.join(here, "ninja")):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")


def init(jit_ops: tuple[str, ...] = (), collective_timeout_s: float | None = None,
         heartbeat_timeout_s: float = 0) -> tuple[int, int]:
    """Join (or form) the process group and hand it to DeepSpeed; returns (rank, world_size).

    Order matters on a GPU node: the device is set before the group is created (so NCCL binds
    the right GPU), and DeepSpeed's JIT-compiled ops (``jit_ops``, plus the CPU comm op that
    DeepSpeed's CPU accelerator loads at start-up) are built by local rank 0 alone while the
    other ranks of the node wait at a barrier — two ranks never build the same op at once.

    ``collective_timeout_s`` bounds every collective, in the default group and in every group
    created later (DeepSpeed's data-parallel groups: torch gives those its own 30-minute default,
    not the default group's). With ``heartbeat_timeout_s``, a multi-node launch watches for lost
    ranks (training.liveness). Every rank's host is gathered once (``hosts()``).
    """
    global _JOINED, _HOSTS
    rt = runtime()
    _launcher_env()
    use_deepspeed_accelerator(rt)
    if rt.is_gpu:
        torch.cuda.set_device(rt.device)
    if not dist.is_initialized():
        check_gloo_address(rt.backend)
        timeout = None
        if collective_timeout_s is not None:
            timeout = timedelta(seconds=collective_timeout_s)
            from torch.distributed import distributed_c10d

            # what new_group() falls back to (read at call time): DeepSpeed creates its groups so
            distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout
        dist.init_process_group(backend=rt.backend, timeout=timeout)
    _JOINED = True
    _HOSTS = gather_objects(socket.gethostname())
    ops = tuple(jit_ops) + (("ShareMemCommBuilder",) if rt.ds_accelerator == "cpu" else ())
    _ninja_on_path()
    if ops:
        build_ops_once_per_node(ops, shared_by_hosts=len(set(_HOSTS)) > 1)
    import contextlib
    import io
    import warnings

    import deepspeed

    # DeepSpeed narrates its CPU comm op once per rank ("... built successfully") and calls torch
    # collectives by deprecated names (ZeRO-2's all-gather, ZeRO-3's reduce-scatter: the warning
    # repeats on every rank, several times a run); none of it tells a user anything.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated",
                            category=FutureWarning)
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend=rt.backend, auto_mpi_discovery=False)
    from training import liveness

    liveness.start(dist.get_rank(), _HOSTS, heartbeat_timeout_s, barrier)
    # Every rank leaves start-up together. Otherwise a rank that fails right after it (a user
    # error: one line, exit 2) makes torchrun SIGTERM the process group of a rank still loading
    # DeepSpeed's CPU comm op, whose `ninja --version` child dies of it, and that rank then
    # reports "Ninja is required" with a traceback and exit 1 (seen in CI).
    barrier()
    return dist.get_rank(), dist.get_world_size()


_HOSTS: list[str] = []


def hosts() -> list[str]:
    """The host name of every rank, by rank (gathered by ``init``)."""
    return list(_HOSTS) or [socket.gethostname()]


def _node_local_lock(path: Path) -> Path:
    """A lock file for ``path`` on this node alone (/dev/shm, else the temp dir): flock on a shared
    file system may be ignored, refused (Lustre without ``flock``: ENOSYS) or node-local."""
    import hashlib

    where = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None
    import tempfile

    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return (where or Path(tempfile.gettempdir())) / f"norallm-build-{os.getuid()}-{digest}.lock"


def build_ops_once_per_node(builder_names: tuple[str, ...], shared_by_hosts: bool = False) -> None:
    """Compile DeepSpeed ops on local rank 0; the node's other ranks load them after a barrier.

    torch's JIT loader takes a lock file (``<op dir>/lock``) even to load an op that is built; a
    process killed while holding it (kill -9 during start-up) left a lock that made every later
    launch wait forever. Local rank 0 loads under a node-local ``flock`` (``_node_local_lock``),
    which the kernel releases when its holder dies, so a ``lock`` file found while holding it is
    stale: removed. That holds only if no other node uses the op dir: when the launch spans
    several hosts (``shared_by_hosts``), each host builds under ``TORCH_EXTENSIONS_DIR/<host>``,
    so that a node never takes another node's live build lock for a stale one (the rendered
    sbatch scripts give each node a dir of its own anyway; a dir on a shared file system does not)."""
    local_rank = int(os.environ.get("LOCAL_RANK") or 0)
    if shared_by_hosts:
        from torch.utils.cpp_extension import get_default_build_root

        root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())  # as torch picks it
        if root.name != socket.gethostname():
            os.environ["TORCH_EXTENSIONS_DIR"] = str(root / socket.gethostname())
    if local_rank == 0:
        import fcntl

        from deepspeed.accelerator import get_accelerator
        from torch.utils.cpp_extension import _get_build_directory

        for name in builder_names:
            builder = get_accelerator().create_op_builder(name)
            if builder is not None and builder.is_compatible(verbose=False):
                t0 = time.perf_counter()
                op_dir = Path(_get_build_directory(builder.NAME, False))
                with open(_node_local_lock(op_dir), "w") as guard:
                    fcntl.flock(guard, fcntl.LOCK_EX)
                    if (op_dir / "lock").exists():
                        print(f"[distributed] removed a stale build lock {op_dir / 'lock'} (left by a killed run)",
                              file=sys.stderr, flush=True)
                        (op_dir / "lock").unlink(missing_ok=True)
                    builder.load(verbose=False)
                if time.perf_counter() - t0 > 1.0:  # it compiled (a cached op loads in milliseconds)
                    print(f"[distributed] built DeepSpeed op {builder.NAME} on {socket.gethostname()} "
                          f"in {time.perf_counter() - t0:.0f} s → {os.environ.get('TORCH_EXTENSIONS_DIR', '~/.cache')}",
                          flush=True)
    barrier()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Tear the group down after a barrier (every rank's work, checkpoints included, is done)."""
    if dist.is_initialized():
        dist.barrier()
        from training import liveness

        liveness.stop()  # ranks that are done no longer beat
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End a rank that joined a process group: flush, then ``os._exit``, skipping interpreter
    finalisation.

    Why: DeepSpeed's engine keeps its gloo process groups referenced after
    ``destroy_process_group`` (parameter hooks hold the optimizer, which holds the data-parallel
    group; ``deepspeed.utils.groups`` holds another), so their worker threads (``pt_gloo_runloop``,
    ``gloo_tcp_loop``) are still running when the interpreter tears objects down at exit. Rarely,
    that teardown destroyed a still-joinable thread: "terminate called without an active
    exception", SIGABRT, after a run whose checkpoint and metrics were already complete (seen
    about once in 150 two-rank launches on a loaded 2-core machine; bench/stress_multirank.py).
    Nothing is left to do at that point, so the rank leaves without the teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    import logging

    logging.shutdown()
    os._exit(code)


def joined() -> bool:
    """Whether this process ever initialised the process group (so exit_process applies)."""
    return _JOINED


_JOINED = False


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def to_device(x: torch.Tensor) -> torch.Tensor:
    """A host batch onto this rank's device: pinned and asynchronous on a GPU."""
    rt = runtime()
    if not rt.is_gpu:
        return x
    return x.pin_memory().to(rt.device, non_blocking=True)


def _reduce(x: torch.Tensor, op) -> torch.Tensor:
    out = x.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=op)
    return out


def sum_(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, as a new tensor where ``x`` lives: a value computed on the device is reduced
    on the device (NCCL/RCCL), a host value on the host (the group's CPU backend) — no transfer
    and no device synchronisation either way."""
    return _reduce(x, dist.ReduceOp.SUM)


def max_(x: torch.Tensor) -> torch.Tensor:
    """Maximum over ranks, where ``x`` lives (see ``sum_``)."""
    return _reduce(x, dist.ReduceOp.MAX)


def mean(x: torch.Tensor) -> float:
    """The mean over ranks of a scalar, as a Python float (one host sync for a device value:
    call it on logging steps only)."""
    return float(sum_(x.float()) / world_size())


def any_rank(flag: bool) -> bool:
    """True when the flag is set on any rank: a host-side agreement over the CPU backend, which
    needs no device synchronisation (cheap enough for every step)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    return bool(max_(torch.tensor([1 if flag else 0], dtype=torch.int32)).item())  # host: the CPU backend


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (host-side, CPU backend): how one rank's decision
    (the run-dir lock) becomes every rank's."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's ``obj``, on every rank (host-side, CPU backend)."""
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
