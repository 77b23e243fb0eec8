"""bench/gpu_check.py's machinery, without a card: one deadline, the results file after every
check, failures named for what they are, what the kernel probe calls a flash/flex/liger kernel.
(The whole script at tiny shapes: tests/test_benchmarks.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "bench"))  # appended: bench/data_pipeline.py must not shadow the package

import gpu_check  # noqa: E402
import gpu_run  # noqa: E402
import kernel_probe  # noqa: E402


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_results_are_on_disk_after_every_check_and_a_failure_does_not_stop_the_rest(tmp_path):
    clock = Clock()
    results = gpu_run.Results(tmp_path / "r.json", gpu_run.Deadline(100, clock), {"cpu_mode": True})
    on_disk = []

    def second():
        on_disk.append(json.loads((tmp_path / "r.json").read_text()))
        raise gpu_run.CheckFailed("OOM: CUDA out of memory")

    def third():
        clock.now = 95  # the next check, needing 10 s, no longer fits
        return {"x": 1, "ok": False}

    results.run("first", lambda: {"value": 1})
    results.run("second", second)
    results.run("third", third)
    results.run("fourth", lambda: pytest.fail("started past the deadline"), min_seconds=10)
    assert [c["name"] for c in on_disk[0]["checks"]] == ["first"] and on_disk[0]["checks"][0]["status"] == "ok"
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [(c["name"], c["status"]) for c in saved["checks"]] == [
        ("first", "ok"), ("second", "failed"), ("third", "failed"), ("fourth", "skipped")]
    assert saved["checks"][1]["error"] == "OOM: CUDA out of memory"
    assert saved["checks"][3]["reason"].startswith("deadline: 5 s left")
    assert saved["all_ok"] is False and saved["finished"] is False
    results.rename(tmp_path / "card.json", card="H200")
    results.finish()
    assert not (tmp_path / "r.json").exists() and json.loads((tmp_path / "card.json").read_text())["finished"]


@pytest.mark.parametrize("output,code,named", [
    ("...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", 1, "OOM: torch.OutOfMemoryError"),
    ("RuntimeError: [enforce fail at inline_container.cc:626] . unexpected pos; No space left on device", 1,
     "disk full: "),
    ("Traceback ...\nModuleNotFoundError: No module named 'hjson'", 1, "missing module hjson"),
    ("[train] starting\nerror: data.seq_len: required but missing; add it.", 2, "norallm error: error: data.seq_len"),
    ("", -9, "killed by signal SIGKILL"),
    ("last words\n", 3, "exit 3: last words"),
])
def test_a_failed_child_is_named_for_what_it_is(output, code, named):
    assert gpu_run.name_failure(output, code).startswith(named)


def test_a_child_past_the_deadline_is_a_timeout_and_its_process_group_is_killed(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = (f"import subprocess, sys, time\np = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(p.pid))\ntime.sleep(120)\n")
    t0 = time.monotonic()
    with pytest.raises(gpu_run.CheckFailed, match=r"(?s)^timeout: .* still running after 3 s"):
        gpu_run.run([sys.executable, "-c", script], gpu_run.Deadline(4), reserve_s=1)
    assert time.monotonic() - t0 < 60
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # SIGKILL is delivered at once; the reaping may lag
        status = Path(f"/proc/{grandchild}/status")
        if not status.exists() or "\nState:\tZ" in status.read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the grandchild {grandchild} outlived the timeout")
    with pytest.raises(gpu_run.Skip, match="deadline"):
        gpu_run.run([sys.executable, "-c", "pass"], gpu_run.Deadline(3), reserve_s=5)


def test_a_deepspeed_that_does_not_import_is_named_not_taken_for_a_missing_gpu(tmp_path):
    """As on a bare device image: ``import deepspeed`` fails; the card says so, stops, exit 2."""
    fake = tmp_path / "site" / "deepspeed"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import hjson_that_is_not_installed\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu", "--out", str(tmp_path / "out")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "gpu_check_unknown.json").read_text())
    (decision,) = report["checks"]
    assert decision["status"] == "failed" and report["finished"] and not report["all_ok"]
    assert decision["error"].startswith("deepspeed import failed: ModuleNotFoundError: No module named "
                                        "'hjson_that_is_not_installed'"), decision
    assert "GPU" not in decision["error"]


def test_an_empty_validation_split_is_a_reason_not_a_crash():
    assert gpu_check.max_abs_diff({}, {}) == {
        "max_abs_diff": None, "reason": "nothing to compare: no rows (an empty validation split?)"}
    assert not gpu_check.within(gpu_check.max_abs_diff({}, {"a": 1.0}), 1.0)
    assert gpu_check.max_abs_diff({"a": 1.0, "b": 2.0}, {"a": 1.5}) == {"max_abs_diff": None, "reason": "missing ['b']"}
    assert gpu_check.max_abs_diff({"a": 1.0, "b": 2.0}, {"a": 1.5, "b": 2.0}) == {"max_abs_diff": 0.5}
    assert gpu_check.max_abs_diff({0: 1.0, 1: None}, {0: 1.0, 1: 2.0}) == {
        "max_abs_diff": None, "reason": "not finite (null) at ['1']"}


def test_kernel_classification_reads_what_ran():
    gpu = kernel_probe.classify(
        {"aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention", "aten::mm"},
        {"void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>", "_rms_norm_forward_kernel",
         "_swiglu_backward_kernel", "ampere_bf16_s16816gemm"}, on_gpu=True)
    assert gpu["kernels"] == {"flash": True, "mem_efficient": False, "cudnn": False, "math": False, "flex": False,
                              "eager": False, "liger": True}
    assert gpu["liger_kernels"] == ["_rms_norm_forward_kernel", "_swiglu_backward_kernel"]
    flex = kernel_probe.classify({"aten::baddbmm", "aten::_softmax", "aten::mm"}, {"triton_tem_fused_0", "sm90_gemm"},
                                 on_gpu=True)["kernels"]
    assert flex["flex"] and not flex["eager"] and not flex["flash"] and not flex["liger"]
    eager = kernel_probe.classify({"aten::baddbmm", "aten::_softmax"}, {"sm90_gemm"}, on_gpu=True)["kernels"]
    assert eager["eager"] and not any(eager[k] for k in ("flash", "mem_efficient", "cudnn", "math", "flex", "liger"))
    cpu = kernel_probe.classify({"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::mm"}, set(), on_gpu=False)
    assert cpu == {"kernels": {"cpu": "none"}, "attention_ops": ["aten::_scaled_dot_product_flash_attention_for_cpu"]}


def test_a_missing_required_kernel_fails_the_check_on_a_gpu_only():
    probe = {"profiled": True, "attn_implementation": "sdpa", "liger_modules": 0,
             "kernels": {"flash": True, "liger": False}}
    assert gpu_check.kernel_verdict(probe, (("flash", "cudnn"), "liger"), cpu=False)["missing_kernels"] == ["liger"]
    assert not gpu_check.kernel_verdict(probe, ("flash", "liger"), cpu=False)["ok"]
    cudnn = {**probe, "kernels": {"flash": False, "cudnn": True}}
    assert gpu_check.kernel_verdict(cudnn, (("flash", "cudnn"),), cpu=False)["ok"]
    assert gpu_check.kernel_verdict(cudnn, ("flash",), cpu=False)["missing_kernels"] == ["flash"]
    assert gpu_check.kernel_verdict({**probe, "kernels": {"cpu": "none"}}, ("flash", "liger"), cpu=True)["ok"]
    assert not gpu_check.kernel_verdict({"profiled": False}, (), cpu=True)["ok"]
