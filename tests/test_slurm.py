"""Slurm: the rendered scripts per cluster, preflight, and real jobs on a private Slurm.

The job tests start Debian's slurm-wlm + munge as root in a temporary directory
(tests/slurm_fixture.py) and submit through `norallm submit --cluster local`, the same template
the clusters use. They skip only where Slurm is not installed and CI is unset; under CI they must
run. The test itself (never the product scripts) shortens the ~2 min BeginTime of a requeued job
with `scontrol update StartTime=now`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from slurm_fixture import LocalSlurm, missing_programs

from training.cli import main
from training.config import parse_config
from training.data.pretraining import ensure_tokenizer, run_prepare

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "data_pipeline" / "smoke_corpus"
IN_CI = bool(os.environ.get("CI"))
HOST = socket.gethostname()


def needs(program: str) -> None:
    if shutil.which(program) is None:
        if IN_CI:
            pytest.fail(f"{program} is required under CI (.ci/run installs it)")
        pytest.skip(f"{program} not installed")


def tiny_config(root: Path, **train) -> dict:
    """A tiny Mistral on the embedded corpus, 2 ranks, constant lr: a run of N steps is exactly
    the first N steps of any longer run, whatever max_steps says."""
    return {
        "name": "slurm-test",
        "seed": 7,
        "model": {"flavor": "tiny-mistral"},
        "tokenizer": {"path": str(root / "tokenizer"), "train": True, "vocab_size": 512},
        "data": {
            "sources": [
                {"name": "nob", "language": "nob", "paths": [str(EMBEDDED / "nob.jsonl")]},
                {"name": "nno", "language": "nno", "paths": [str(EMBEDDED / "nno.jsonl")]},
            ],
            "shards_dir": str(root / "shards"),
            "seq_len": 32,
            "valid_fraction": 0.1,
            "prepare_unit_bytes": 8192,  # several work units per source, so an array can split them
        },
        "train": {"global_batch_size": 4, "micro_batch_size": 2, "world_size": 2, "max_steps": 300,
                  "lr": 1e-3, "schedule": "constant", "precision": "fp32", **train},
        "zero": {"stage": 2},
        "checkpoint": {"every_steps": 100_000, "keep_last": 2},  # only signal-triggered and final saves
        "eval": {"every_steps": 0, "max_samples": 4},
    }


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trajectory(rows: list[dict]) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"], r["tokens"]) for r in rows]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slurm-data")
    cfg = parse_config(tiny_config(root))
    run_prepare(cfg.tokenizer, cfg.data, progress=False)
    return root


# ---------------------------------------------------------------------------------------------
# Rendered scripts, one test per cluster profile

LUMI_MASKS = ("0x00fe000000000000,0xfe00000000000000,0x0000000000fe0000,0x00000000fe000000,"
              "0x00000000000000fe,0x000000000000fe00,0x000000fe00000000,0x0000fe0000000000")

PROFILE_CASES = {
    "lumi": (
        ["--account", "project_465000123", "--nodes", "4", "--container", "/appl/images/pytorch.sif"],
        {"--account": "project_465000123", "--partition": "standard-g", "--nodes": "4", "--gpus-per-node": "8",
         "--ntasks-per-node": "8", "--cpus-per-task": "7", "--mem": "0", "--exclusive": None,
         "--hint": "nomultithread", "--time": "2-00:00:00"},
        [f"--cpu-bind=mask_cpu:{LUMI_MASKS}", 'export NCCL_SOCKET_IFNAME="hsn0,hsn1,hsn2,hsn3"',
         'export NCCL_NET_GDR_LEVEL="3"', 'export FI_CXI_DEFAULT_CQ_SIZE="262144"', "export MIOPEN_USER_DB_PATH=",
         'export OMP_NUM_THREADS="1"', "/dev/shm",
         "singularity exec --bind /var/spool/slurmd,/opt/cray,/usr/lib64/libcxi.so.1,/project/project_465000123,"
         "/scratch/project_465000123,/flash/project_465000123 /appl/images/pytorch.sif python3 -m training.cli train"],
    ),
    "olivia": (
        ["--account", "nn1234k", "--nodes", "2", "--time", "12:00:00", "--container", "/cluster/img/ngc.sif"],
        {"--account": "nn1234k", "--partition": "accel", "--nodes": "2", "--gpus-per-node": "4",
         "--ntasks-per-node": "1", "--cpus-per-task": "288", "--time": "12:00:00", "--mem-per-gpu": "110G"},
        ["-m training.launch.torchrun_node --nnodes=\"$SLURM_JOB_NUM_NODES\" --nproc-per-node=4 --rdzv-backend=c10d "
         "--rdzv-endpoint=\"$MASTER_ADDR:$MASTER_PORT\" --rdzv-id=\"$SLURM_JOB_ID\" -m training.cli train",
         'export FI_PROVIDER="cxi"', 'export FI_CXI_RX_MATCH_MODE="hybrid"',
         'export NCCL_SOCKET_IFNAME="hsn0,hsn1,hsn2,hsn3"', 'export NCCL_NET_GDR_LEVEL="PHB"',
         'export NCCL_CROSS_NIC="1"', 'export NCCL_PROTO="^LL128"',
         "apptainer exec --bind /cluster/work/projects/nn1234k,/cluster/projects/nn1234k --nv /cluster/img/ngc.sif"],
    ),
    "betzy": (
        ["--account", "nn1234k", "--qos", "devel", "--time", "1:00:00"],
        {"--account": "nn1234k", "--partition": "accel", "--qos": "devel", "--nodes": "1", "--gpus-per-node": "4",
         "--ntasks-per-node": "4", "--cpus-per-task": "16", "--time": "1:00:00", "--mem-per-cpu": "7G"},
        ['srun --ntasks-per-node=4 --cpus-per-task="$SLURM_CPUS_PER_TASK" python3 -m training.cli train'],
    ),
    "saga": (
        ["--account", "nn1234k", "--nodes", "2", "--time", "3-00:00:00"],
        {"--account": "nn1234k", "--partition": "a100", "--nodes": "2", "--gpus-per-node": "4",  # 32 CPUs a node
         "--ntasks-per-node": "4", "--cpus-per-task": "8", "--time": "3-00:00:00", "--mem-per-cpu": "8G"},
        ['srun --ntasks-per-node=4 --cpus-per-task="$SLURM_CPUS_PER_TASK" python3 -m training.cli train'],
    ),
    "local": (
        ["--time", "30", "--set", "slurm.ranks_per_node=2"],
        {"--nodes": "1", "--ntasks-per-node": "2", "--cpus-per-task": "1", "--time": "30"},
        [f'srun --ntasks-per-node=2 --cpus-per-task="$SLURM_CPUS_PER_TASK" {sys.executable} -m training.cli train'],
    ),
}


def directives(script: str) -> dict[str, str | None]:
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].partition("=")
            out[key] = value or None
    return out


def check_shell(script: str, path: Path) -> None:
    path.write_text(script, encoding="utf-8")
    syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    lint = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


@pytest.mark.parametrize("cluster", sorted(PROFILE_CASES))
def test_dry_run_renders_a_valid_script_with_the_cluster_settings(cluster, data_root, tmp_path, capsys):
    needs("shellcheck")
    args, expected, fragments = PROFILE_CASES[cluster]
    config = write_config(tmp_path / "c.yaml", tiny_config(data_root, world_size=None, global_batch_size=64))
    run_dir = tmp_path / "run"
    assert main(["submit", str(config), "--cluster", cluster, "--run-dir", str(run_dir), *args, "--dry-run"]) == 0
    captured = capsys.readouterr()
    script = captured.out
    check_shell(script, tmp_path / f"{cluster}.sbatch")
    assert "total tokens" in captured.err and "world " in captured.err  # the plan was checked and shown

    found = directives(script)
    for key, value in expected.items():
        assert key in found and found[key] == value, (key, found.get(key))
    assert "--gpus-per-task" not in found  # over-billed on Sigma2; GPUs are requested per node
    if cluster == "local":
        assert "--partition" not in found and "--account" not in found and "--gpus-per-node" not in found
    # Time limit → USR1 to the batch shell → forwarded → trainer saves → requeue; logs survive it.
    assert found["--signal"] == "B:USR1@300" and "--requeue" in found and found["--open-mode"] == "append"
    assert found["--output"] == f"{run_dir}/slurm/%x-%j.out"
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and "trap 'on_signal USR1' USR1" in script
    assert f"-m training.cli preflight {config} --run-dir {run_dir}" in script
    # JIT and Triton caches on node-local disk, per job, on every cluster (a shared home's
    # ~/.triton/cache is written by every rank of every node at once)
    assert 'export TORCH_EXTENSIONS_DIR="${TMPDIR:-/tmp}/${USER}-torch-extensions-${SLURM_JOB_ID}"' in script
    assert 'export TRITON_CACHE_DIR="${TMPDIR:-/tmp}/${USER}-triton-cache-${SLURM_JOB_ID}"' in script
    # a lost node (training.liveness): the rank on this node sends USR2, the step ends, the job requeues
    assert "trap 'on_signal USR2' USR2" in script and "(( rc == 43 ))" in script
    for fragment in fragments:
        assert fragment in script, fragment
    assert not re.search(r"@[A-Z_]+@", script), "unfilled template placeholder"


def test_dry_run_of_the_preparation_array_and_its_verify_job(data_root, tmp_path, capsys):
    needs("shellcheck")
    config = write_config(tmp_path / "c.yaml", tiny_config(data_root))
    assert main(["submit", str(config), "--cluster", "lumi", "--account", "project_465000123", "--prepare-only",
                 "--prepare-tasks", "16", "--dry-run"]) == 0
    prepare, verify = ["#!/bin/bash" + s for s in capsys.readouterr().out.split("#!/bin/bash")[1:]]
    check_shell(prepare, tmp_path / "prepare.sbatch")
    check_shell(verify, tmp_path / "verify.sbatch")
    assert directives(prepare)["--array"] == "0-15" and directives(prepare)["--partition"] == "small"
    assert "--gpus-per-node" not in directives(prepare)
    assert ('-m training.cli prepare ' + str(config) + ' --task-index "$SLURM_ARRAY_TASK_ID" --num-tasks 16 '
            '--workers "$SLURM_CPUS_PER_TASK"') in prepare
    assert f"-m training.cli prepare {config} --verify" in verify and "--array" not in directives(verify)


@pytest.mark.parametrize("cluster, gpu_job, prepare_job", [
    ("saga", "--mem-per-cpu=8G", "--mem-per-cpu=4G"), ("betzy", "--mem-per-cpu=7G", "--mem-per-cpu=4G"),
    ("olivia", "--mem-per-gpu=110G", "--mem-per-cpu=3G")])
def test_sigma2_jobs_request_memory_and_a_users_request_replaces_it(cluster, gpu_job, prepare_job, data_root,
                                                                     tmp_path, capsys):
    """Sigma2's shared-node partitions require a memory request (a job without one is refused or gets
    the default per CPU); every job of the chain carries one, per CPU or GPU so that a one-GPU
    evaluation asks for its share, and a --mem* of the user's own replaces it (Slurm refuses two)."""
    config = write_config(tmp_path / "c.yaml", tiny_config(data_root, world_size=None, global_batch_size=64))
    base = ["submit", str(config), "--cluster", cluster, "--account", "nn1234k", "--container", "/x.sif",
            "--run-dir", str(tmp_path / "run"), "--dry-run"]
    assert main([*base, "--prepare", "--eval-tasks", "noreval-mc"]) == 0
    scripts = ["#!/bin/bash" + s for s in capsys.readouterr().out.split("#!/bin/bash")[1:]]
    options = [[f"{k}={v}" for k, v in directives(s).items() if k.startswith("--mem")] for s in scripts]
    assert options == [[prepare_job], [prepare_job], [gpu_job], [gpu_job]]  # prepare, verify, train, eval
    assert main([*base, "--set", 'slurm.extra_sbatch=["--mem=200G"]']) == 0
    found = directives(capsys.readouterr().out)
    assert [k for k in found if k.startswith("--mem")] == ["--mem"] and found["--mem"] == "200G"
    assert main([*base, "--set", 'slurm.extra_sbatch=["--mem-bind=local"]']) == 0  # binding, not a request
    found = directives(capsys.readouterr().out)
    assert f"{gpu_job.split('=')[0]}" in found and found["--mem-bind"] == "local"


def test_a_users_memory_request_replaces_lumis_whole_node_one(data_root, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_config(data_root, world_size=None, global_batch_size=64))
    base = ["submit", str(config), "--cluster", "lumi", "--account", "project_465000123", "--container", "/x.sif",
            "--run-dir", str(tmp_path / "run"), "--dry-run"]
    assert main([*base, "--set", 'slurm.extra_sbatch=["--mem-per-gpu=60G"]']) == 0
    found = directives(capsys.readouterr().out)
    assert "--mem" not in found and found["--mem-per-gpu"] == "60G" and "--exclusive" in found


def test_dry_run_of_an_evaluation_job_on_one_gpu(data_root, tmp_path, capsys):
    """--eval-only: one GPU on LUMI's shared partition (not a whole standard-g node), offline, every
    checkpoint of the run dir; on a model dir no --checkpoints."""
    needs("shellcheck")
    config = write_config(tmp_path / "c.yaml", tiny_config(data_root))
    run_dir = tmp_path / "run"
    base = ["submit", str(config), "--cluster", "lumi", "--account", "project_465000123", "--container", "/x.sif",
            "--run-dir", str(run_dir), "--eval-tasks", "noreval-mc", "--eval-only", "--dry-run"]
    assert main(base) == 0
    script = capsys.readouterr().out
    check_shell(script, tmp_path / "eval.sbatch")
    found = directives(script)
    assert (found["--partition"], found["--gpus-per-node"], found["--nodes"]) == ("small-g", "1", "1")
    assert "--exclusive" not in found and "--mem" not in found and "--signal" not in found
    assert found["--output"] == f"{run_dir}/slurm/%x-eval-%j.out" and found["--time"] == "4:00:00"
    assert 'export HF_DATASETS_OFFLINE="1"' in script and 'export HF_HUB_OFFLINE="1"' in script
    assert f"/x.sif python3 -m training.cli eval {run_dir} --tasks noreval-mc --checkpoints all" in script
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert main([*base, "--eval-target", str(model), "--eval-time", "1:00:00"]) == 0
    script = capsys.readouterr().out
    assert f"eval {model} --tasks noreval-mc\n" in script and directives(script)["--time"] == "1:00:00"
    assert main([*base, "--eval-target", str(tmp_path)]) == 2
    assert "neither an exported model dir" in capsys.readouterr().err
    assert main([*base[:-4], "--eval-only", "--dry-run"]) == 2
    assert "--eval-tasks" in capsys.readouterr().err


def test_submit_refuses_jobs_that_cannot_run(data_root, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_config(data_root))

    def error(*args: str) -> str:
        assert main(["submit", str(config), *args, "--dry-run"]) == 2
        return capsys.readouterr().err

    err = error("--cluster", "lumi", "--nodes", "2000", "--time", "3-00:00:00")
    assert "slurm.account: lumi requires an account" in err and "project_" in err
    assert "2000 nodes exceed lumi's standard-g limit of 1024" in err
    assert "3-00:00:00 exceeds lumi's standard-g limit of 2-00:00:00" in err
    assert "train.world_size: the config expects 2 ranks, the job starts 2000 node(s) × 8" in err
    assert "4:00:00 exceeds lumi's dev-g limit of 3:00:00" in error(
        "--cluster", "lumi", "--account", "project_465000123", "--partition", "dev-g", "--time", "4:00:00")
    err = error("--cluster", "saga", "--account", "project_1", "--qos", "devel", "--time", "3:00:00")
    assert "does not look like a saga account" in err and "exceeds saga's QOS devel limit of 2:00:00" in err
    assert "is not a Slurm time" in error("--cluster", "local", "--time", "2 hours")
    assert "unknown cluster 'puhti'" in error("--cluster", "puhti")
    no_shards = write_config(tmp_path / "d.yaml", tiny_config(data_root, world_size=None) | {
        "data": {**tiny_config(data_root)["data"], "shards_dir": str(tmp_path / "none")}})
    assert main(["submit", str(no_shards), "--cluster", "local", "--dry-run"]) == 2
    assert "the data is not ready for training: no shards for source 'nob'" in capsys.readouterr().err
    err = error("--cluster", "local", "--set", "data.sources.0.max_epochs=0.5", "--set", "train.max_steps=100000")
    assert "the data plan does not fit" in err and "source 'nob' would be read" in err


def test_submit_refuses_values_that_would_break_out_of_the_script(data_root, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_config(data_root))
    for flag, value in (("--account", "nn1234k\nrm -rf ~"), ("--partition", "normal\recho hi"),
                        ("--qos", "devel\n#SBATCH --time=99"), ("--run-dir", str(tmp_path / "r\nid"))):
        assert main(["submit", str(config), "--cluster", "local", flag, value, "--dry-run"]) == 2, flag
        assert "holds a newline or control character" in capsys.readouterr().err, flag
    # a space would start another option on the value's #SBATCH line
    for flag, value, field in (("--partition", "normal --exclusive", "slurm.partition"),
                               ("--qos", "devel --time=99", "slurm.qos"), ("--account", "nn1 x", "slurm.account")):
        assert main(["submit", str(config), "--cluster", "local", flag, value, "--dry-run"]) == 2, flag
        err = capsys.readouterr().err
        assert f"{field}: {value!r} holds a space" in err and len(err.strip().splitlines()) == 2, err
    # the job name: a newline is refused like the other fields, not rewritten; other characters map to '-'
    named = write_config(tmp_path / "named.yaml", {**tiny_config(data_root), "name": "run\nid"})
    assert main(["submit", str(named), "--cluster", "local", "--dry-run"]) == 2
    assert "name: 'run\\nid' holds a newline or control character" in capsys.readouterr().err
    spaced = write_config(tmp_path / "spaced.yaml", {**tiny_config(data_root), "name": "my run/2"})
    assert main(["submit", str(spaced), "--cluster", "local", "--dry-run"]) == 0
    assert "#SBATCH --job-name=my-run-2\n" in capsys.readouterr().out


def test_env_values_are_literal_unless_asked_and_paths_with_spaces_are_quoted(data_root, tmp_path, capsys):
    needs("shellcheck")
    raw = tiny_config(data_root)
    raw["slurm"] = {"env": {"MY_NOTE": "$(touch /tmp/pwned) `id` $HOME", "MY_SCRATCH": "$HOME/x"},
                    "env_expand": ["MY_SCRATCH"]}
    config = write_config(tmp_path / "c.yaml", raw)
    run_dir = tmp_path / "run dir with spaces"
    assert main(["submit", str(config), "--cluster", "local", "--run-dir", str(run_dir), "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "export MY_NOTE='$(touch /tmp/pwned) `id` $HOME'" in script  # single-quoted: nothing runs
    assert 'export MY_SCRATCH="$HOME/x"' in script  # asked for: expands in the job
    assert 'export TORCH_EXTENSIONS_DIR="${TMPDIR:-/tmp}' in script  # norallm's own keep expanding
    assert f'#SBATCH --output="{run_dir}/slurm/%x-%j.out"' in script
    check_shell(script, tmp_path / "job.sh")


SECRETS = {"GITHUBTOKEN": "ghp-s3cr3t-one", "MY_APIKEY": "s3cr3t-two"}


def test_secrets_reach_the_job_through_its_environment_and_no_file(data_root, tmp_path, capsys, monkeypatch):
    """A secret's value is not in the dry run, nor in the script `norallm submit` writes: sbatch gets
    it in its environment (Slurm exports that to the job), and the script checks it arrived."""
    needs("shellcheck")
    raw = tiny_config(data_root)
    raw["slurm"] = {"env": {**SECRETS, "OMP_NUM_THREADS": "2"}}
    config = write_config(tmp_path / "c.yaml", raw)
    run_dir = tmp_path / "run"
    assert main(["submit", str(config), "--cluster", "local", "--run-dir", str(run_dir), "--eval-tasks", "x",
                 "--prepare", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert not any(v in out + err for v in SECRETS.values())
    train = out.split("# ===== train job =====")[1].split("# =====")[0]
    assert ': "${GITHUBTOKEN:?a secret that norallm submit passes' in train and "export MY_APIKEY\n" in train
    assert "export OMP_NUM_THREADS=2" in train
    check_shell(train.lstrip("\n"), tmp_path / "job.sh")

    fake = tmp_path / "bin"  # an sbatch that records what it was given
    fake.mkdir()
    (fake / "sbatch").write_text('#!/bin/sh\necho "$GITHUBTOKEN $MY_APIKEY" >> "$(dirname "$0")/env"\necho 17\n')
    (fake / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.delenv("GITHUBTOKEN", raising=False)
    assert main(["submit", str(config), "--cluster", "local", "--run-dir", str(run_dir), "--chain", "2"]) == 0
    assert (fake / "env").read_text() == "ghp-s3cr3t-one s3cr3t-two\n" * 2
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert files and not any(v.encode() in p.read_bytes() for p in files for v in SECRETS.values())

    raw["slurm"]["extra_sbatch"] = ["--export=NONE"]  # would keep them from the job
    write_config(tmp_path / "c.yaml", raw)
    assert main(["submit", str(config), "--cluster", "local", "--run-dir", str(run_dir), "--dry-run"]) == 2
    assert "--export=NONE keeps the environment" in capsys.readouterr().err


def test_the_wrapper_passes_on_the_trainers_requeue_code():
    from norallm.exits import EXIT_REQUEUE
    from training.launch.torchrun_node import EXIT_REQUEUE as LAUNCHER_EXIT_REQUEUE

    assert EXIT_REQUEUE == LAUNCHER_EXIT_REQUEUE == 42


# ---------------------------------------------------------------------------------------------
# Preflight (without Slurm: a missing rank, and a rank that cannot train)


def norallm(*args: str, env: dict | None = None, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout_s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_preflight_names_the_rank_and_host_that_cannot_reach_the_others(data_root, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(data_root))
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}  # rank 1 is never started
    t0 = time.monotonic()
    proc = norallm("preflight", str(config), "--run-dir", str(tmp_path / "run"), "--timeout-s", "5", env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"rank 0 on {HOST} could not all-reduce with the other ranks (world size 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 120


def test_preflight_reports_every_problem_with_rank_and_host(data_root, tmp_path):
    raw = tiny_config(data_root, world_size=None)
    other = tmp_path / "other-tokenizer"  # a different tokenizer than the one the shards were made with
    raw["tokenizer"] = {**raw["tokenizer"], "path": str(other), "vocab_size": 300}
    cfg = parse_config(raw)
    ensure_tokenizer(cfg.tokenizer, cfg.data)
    config = write_config(tmp_path / "c.yaml", raw)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run dir should be")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    proc = norallm("preflight", str(config), "--run-dir", str(blocker / "run"), env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert err.startswith("error: preflight failed on 1 of 1 rank(s):"), err
    assert f"rank 0 on {HOST}: run dir {blocker / 'run'} is not writable" in err
    assert f"rank 0 on {HOST}: shards of source 'nob' were tokenized with tokenizer" in err
    assert "Traceback" not in err

    ok = norallm("preflight", str(write_config(tmp_path / "ok.yaml", tiny_config(data_root, world_size=None))),
                 "--run-dir", str(tmp_path / "run"), env=env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "[preflight] 1 rank(s) on 1 host(s): all-reduce ok, run dir writable, tokenizer" in ok.stdout


# ---------------------------------------------------------------------------------------------
# Real jobs on a private Slurm


@pytest.fixture(scope="module")
def slurm():
    missing = missing_programs()
    if missing or os.geteuid() != 0:
        why = f"missing {missing}" if missing else "not running as root"
        if IN_CI:
            pytest.fail(f"the Slurm tests must run under CI, but Slurm cannot start: {why}")
        pytest.skip(f"no private Slurm: {why} (apt-get install slurm-wlm munge; run as root)")
    state = Path(tempfile.mkdtemp(prefix="norallm-slurm-"))
    cluster = LocalSlurm(state)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(state, ignore_errors=True)


def submit(cluster: LocalSlurm, config: Path, *args: str, env: dict | None = None) -> list[str]:
    """`norallm submit --cluster local`; ``env``: more variables for the job (sbatch passes them on)."""
    proc = subprocess.run([sys.executable, "-m", "training.cli", "submit", str(config), "--cluster", "local", *args],
                          capture_output=True, text=True, cwd=REPO, env={**cluster.env(), **(env or {})}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return re.findall(r"submitted \w+ job (\d+)", proc.stdout)


def wait_for(what: str, ready, cluster: LocalSlurm, logs: Path | None, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            job_logs = "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted(logs.glob("*.out"))) \
                if logs else ""
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{job_logs}\n"
                        f"{cluster.run('squeue', check=False).stdout}\n{cluster.logs(2000)}")
        time.sleep(0.2)


def job_ended(cluster: LocalSlurm, job_id: str) -> bool:
    lines = cluster.run("scontrol", "show", "job", job_id, "-o", check=False).stdout.splitlines()
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    return bool(lines) and all(re.search(r"JobState=(\w+)", line).group(1) in ended for line in lines)


def requeued(cluster: LocalSlurm, job_id: str, times: int) -> bool:
    f = cluster.job_fields(job_id)
    return f.get("Restarts") == str(times) and f.get("JobState") == "PENDING"


def start_requeued_now(cluster: LocalSlurm, job_id: str, *extra: str) -> None:
    """Skip the BeginTime delay Slurm gives a requeued job. Slurm's delay also covers a race: slurmd
    refuses a launch whose credential is not newer (1 s resolution) than the kill of the previous
    run, so wait until the node is idle again and a little longer."""
    wait_for("the nodes to be idle", cluster.idle, cluster, None, timeout_s=60)
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", *extra)


def signal_requeue_and_finish(cluster: LocalSlurm, job: str, run_dir: Path, after_steps: int) -> int:
    """USR1 to the batch shell (what --signal=B:USR1 sends before the time limit) once the job has
    logged ``after_steps`` steps; wait for the requeue, start it at once and wait for the end.
    Returns the step the signal saved."""
    wait_for(f"{after_steps} logged steps", lambda: len(read_jsonl(run_dir / "metrics.jsonl")) >= after_steps,
             cluster, run_dir / "slurm")
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    wait_for("the requeue", lambda: requeued(cluster, job, 1), cluster, run_dir / "slurm", timeout_s=120)
    saved = latest_step(run_dir)
    start_requeued_now(cluster, job)
    wait_for(f"job {job} to finish", lambda: job_ended(cluster, job), cluster, run_dir / "slurm")
    return saved


def job_log(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "slurm").glob("*.out")))


def latest_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step"))


@pytest.fixture(scope="module")
def srun_run(slurm, data_root, tmp_path_factory) -> Path:
    """A 2-rank training job in srun mode (one task per rank), run to completion."""
    root = tmp_path_factory.mktemp("srun-job")
    raw = tiny_config(data_root)
    raw["slurm"] = {"env": dict(SECRETS)}  # the script stops at once unless they reach the job
    config = write_config(root / "c.yaml", raw)
    run_dir = root / "run"
    (job,) = submit(slurm, config, "--run-dir", str(run_dir))
    wait_for(f"job {job} to finish", lambda: job_ended(slurm, job), slurm, run_dir / "slurm")
    fields = slurm.job_fields(job)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), job_log(run_dir)
    return run_dir


def test_training_job_in_srun_mode_runs_to_completion(srun_run):
    log = job_log(srun_run)
    assert "srun mode, 2 rank(s) per node" in log
    assert "[preflight] 2 rank(s) on 1 host(s): all-reduce ok" in log
    assert "[train] starting; 2 rank(s)" in log and "[slurm] training step finished" in log
    assert [m["step"] for m in read_jsonl(srun_run / "metrics.jsonl")] == list(range(1, 301))
    assert latest_step(srun_run) == 300
    written = [p for p in srun_run.rglob("*") if p.is_file()]  # config.yaml, checkpoints, script, logs
    assert not [str(p) for p in written for v in SECRETS.values() if v.encode() in p.read_bytes()]


def test_evaluation_job_scores_the_finished_run_offline(slurm, srun_run):
    """--eval-only on a run dir, through Slurm: the job runs `norallm eval RUN --checkpoints all`
    with the datasets offline and appends the checkpoint's rows to harness.jsonl."""
    tasks = REPO / "tests" / "harness_tasks"
    (job,) = submit(slurm, srun_run.parent / "c.yaml", "--run-dir", str(srun_run), "--eval-only",
                    "--eval-tasks", "normc", "--eval-include-path", str(tasks))
    wait_for(f"evaluation job {job} to finish", lambda: job_ended(slurm, job), slurm, srun_run / "slurm")
    fields = slurm.job_fields(job)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), job_log(srun_run)
    rows = read_jsonl(srun_run / "harness.jsonl")
    assert {(r["step"], r["request"]) for r in rows} == {(300, "normc")} and len(rows) == 6
    assert all(r["tokens"] == 300 * 4 * 32 for r in rows)


def test_torchrun_mode_job_is_signalled_requeued_and_resumes_exactly(slurm, data_root, srun_run, tmp_path):
    """One torchrun per node, c10d rendezvous; USR1 to the batch shell (what --signal=B:USR1 does)
    mid-run: checkpoint, requeue, resume, and the same trajectory as the uninterrupted srun job."""
    config = write_config(tmp_path / "c.yaml", tiny_config(data_root))
    run_dir = tmp_path / "run"
    (job,) = submit(slurm, config, "--run-dir", str(run_dir), "--launcher", "torchrun")
    saved = signal_requeue_and_finish(slurm, job, run_dir, after_steps=30)

    log = job_log(run_dir)
    fields = slurm.job_fields(job)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "torchrun mode, 2 rank(s) per node" in log and "[preflight] 2 rank(s)" in log
    assert f"[train] signal received: saved step {saved}, exiting with 42" in log
    assert f"(step exit 42): requeueing job {job}" in log
    assert f"job {job} (restart 1)" in log and f"[train] resuming at step {saved}" in log
    assert 30 <= saved < 300
    assert trajectory(read_jsonl(run_dir / "metrics.jsonl")) == trajectory(read_jsonl(srun_run / "metrics.jsonl"))


def test_time_limit_signal_checkpoints_requeues_and_resumes_exactly(slurm, data_root, tmp_path):
    """--time=2 with --signal=B:USR1@40: Slurm warns 50–80 s into the job (its limit check runs every
    30 s), after start-up and while it still trains;
    the job saves, requeues itself and resumes; then a scancel ends it (saved, not requeued)."""
    config = write_config(tmp_path / "c.yaml", tiny_config(data_root, max_steps=1_000_000))
    run_dir = tmp_path / "run"
    (job,) = submit(slurm, config, "--run-dir", str(run_dir), "--time", "2", "--set", "slurm.signal_margin_s=40")
    wait_for("the time-limit signal and the requeue", lambda: requeued(slurm, job, 1), slurm, run_dir / "slurm",
             timeout_s=150)
    log = job_log(run_dir)
    if (run_dir / "checkpoints" / "latest").exists():
        first = latest_step(run_dir)
        assert f"[train] signal received: saved step {first}, exiting with 42" in log
        assert f"(step exit 42): requeueing job {job}" in log
    else:  # on a loaded machine the warning (up to 60 s early) can come during the preflight step:
        first = 0  # nothing trained yet, so nothing to save; the script still requeues
        assert f"requeueing job {job}" in log and "[train] signal received" not in log

    # Resume now, with room to run: the test, not the script, skips BeginTime and lifts the limit.
    start_requeued_now(slurm, job, "TimeLimit=10")
    wait_for("20 steps past the checkpoint", lambda: len(read_jsonl(run_dir / "metrics.jsonl")) >= first + 20,
             slurm, run_dir / "slurm", timeout_s=180)
    # A user's scancel (TERM to every process): the ranks still save, but the job is not requeued.
    slurm.run("scancel", job)
    wait_for(f"job {job} to end", lambda: job_ended(slurm, job), slurm, run_dir / "slurm", timeout_s=60)
    fields = slurm.job_fields(job)
    assert (fields["JobState"], fields["Restarts"]) == ("CANCELLED", "1")
    last = latest_step(run_dir)
    log = job_log(run_dir)
    assert f"job {job} (restart 1)" in log
    assert f"[train] resuming at step {first}" in log if first else "[train] starting" in log
    assert f"[train] signal received: saved step {last}, exiting with 42" in log
    assert "cancelled or preempted (step exit 42): not requeueing" in log and last >= first + 20
    resumed = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in resumed] == list(range(1, last + 1))

    reference = tmp_path / "reference"  # the same config, uninterrupted, to the same step
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "training.cli", "train", str(config), "--run-dir", str(reference),
                           "--stop-at", str(last)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert trajectory(resumed) == trajectory(read_jsonl(reference / "metrics.jsonl"))


def test_preparation_array_job_yields_the_same_shards_as_one_prepare(slurm, data_root, tmp_path):
    raw = tiny_config(data_root)
    config = write_config(tmp_path / "c.yaml", raw)
    array_dir = tmp_path / "array-shards"
    run_dir = tmp_path / "run"
    jobs = submit(slurm, config, "--prepare-only", "--prepare-tasks", "2", "--run-dir", str(run_dir),
                  "--set", f"data.shards_dir={array_dir}")
    assert len(jobs) == 2  # the array, then the verify job after it
    for job in jobs:
        wait_for(f"job {job} to finish", lambda j=job: job_ended(slurm, j), slurm, run_dir / "slurm")
    states = slurm.run("scontrol", "show", "job", jobs[0], "-o").stdout.splitlines()
    assert len(states) == 2 and all("JobState=COMPLETED" in s and "ExitCode=0:0" in s for s in states), states
    verify = slurm.job_fields(jobs[1])
    assert (verify["JobState"], verify["ExitCode"]) == ("COMPLETED", "0:0"), job_log(run_dir)
    log = job_log(run_dir)
    assert "task 0 of 2" in log and "task 1 of 2" in log

    single = parse_config({**raw, "data": {**raw["data"], "shards_dir": str(tmp_path / "single-shards")}})
    run_prepare(single.tokenizer, single.data, progress=False)

    def shards(root: Path, source: str) -> list[tuple]:
        manifest = json.loads((root / source / "manifest.json").read_text())
        return [(s["file"], s["split"], s["documents"], s["tokens"], s["sha256"]) for s in manifest["shards"]]

    for source in ("nob", "nno"):
        assert shards(array_dir, source) == shards(tmp_path / "single-shards", source)
        assert len(shards(array_dir, source)) >= 4  # the split had units to share
        for shard in shards(array_dir, source):
            for suffix in (".bin", ".idx"):
                a, b = array_dir / (shard[0] + suffix), tmp_path / "single-shards" / (shard[0] + suffix)
                assert a.read_bytes() == b.read_bytes()


def test_submit_chains_preparation_verify_and_training_jobs(slurm, data_root, tmp_path):
    """--prepare --chain 2 --eval-tasks: array → verify (afterok) → train (afterok) → train (afterany)
    → evaluation (afterany)."""
    config = write_config(tmp_path / "c.yaml", tiny_config(data_root))
    node = slurm.node
    slurm.run("scontrol", "update", f"NodeName={node}", "State=DRAIN", "Reason=dependency-test")
    try:  # a drained node starts nothing, so every dependency is still visible
        array, verify, first, second, evaluation = submit(
            slurm, config, "--prepare", "--prepare-tasks", "2", "--chain", "2", "--run-dir", str(tmp_path / "run"),
            "--set", f"data.shards_dir={tmp_path / 'shards'}", "--eval-tasks", "noreval-mc")
        assert re.match(rf"afterok:{array}(_\*)?\(unfulfilled\)", slurm.job_fields(verify)["Dependency"])
        assert slurm.job_fields(first)["Dependency"] == f"afterok:{verify}(unfulfilled)"
        assert slurm.job_fields(second)["Dependency"] == f"afterany:{first}(unfulfilled)"
        assert slurm.job_fields(evaluation)["Dependency"] == f"afterany:{second}(unfulfilled)"
        assert Path(slurm.job_fields(evaluation)["Command"]).name.startswith("eval-")
        assert slurm.job_fields(array)["ArrayTaskId"] == "0-1"
        script = Path(slurm.job_fields(first)["Command"])
        assert script.parent == tmp_path / "run" / "slurm" and script.name.startswith("train-")
        assert slurm.job_fields(second)["Command"] == str(script)  # one script, K jobs
    finally:
        slurm.cancel_all()
        slurm.run("scontrol", "update", f"NodeName={node}", "State=RESUME")


def test_cluster_jobs_default_to_scratch_and_do_not_start_bare(data_root, tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path / "c.yaml", tiny_config(data_root, world_size=None, global_batch_size=64))
    user = "kari"
    monkeypatch.setenv("USER", user)
    assert main(["submit", str(config), "--cluster", "lumi", "--account", "project_465000123", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert f"#SBATCH --output=/scratch/project_465000123/{user}/norallm/slurm-test/slurm/%x-%j.out" in out
    assert "warning: neither slurm.container nor slurm.setup is set" in err
    assert main(["submit", str(config), "--cluster", "saga", "--account", "nn1234k"]) == 2  # not submitted bare
    assert "slurm.setup: neither slurm.container nor slurm.setup is set" in capsys.readouterr().err


def test_submit_without_a_reachable_controller_says_so(data_root, tmp_path, capsys, monkeypatch):
    """An sbatch that cannot reach slurmctld (a laptop with slurm-client, a compute node): not
    "fix the slurm: settings", which sends the user after their config."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Unable to contact "
                                 "slurm controller (connect failure)' >&2\nexit 1\n")
    (fake / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    config = write_config(tmp_path / "c.yaml", tiny_config(data_root))
    assert main(["submit", str(config), "--cluster", "local", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "no Slurm controller answers from this machine" in err and "slurm: settings" not in err
