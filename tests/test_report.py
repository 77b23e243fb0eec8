"""`norallm report`: tokens on x (steps on top), a moving average over the raw loss, resume marks,
one summary image; a single source is not drawn twice."""

from __future__ import annotations

import json
import math

from training.cli import main
from training.eval.report import ema


def test_ema():
    assert ema([1.0, 3.0], alpha=0.5) == [1.0, 2.0]


def test_report_draws_a_summary_with_resumes(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 5 + math.sin(s) * 0.3 - s * 0.01, "lr": 1e-3, "tokens": 512 * s,
             "tokens_per_s": 1000.0 + s, "grad_norm": 1.0} for s in range(1, 101)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn": ')
    evals = [{"step": s, "source": src, "language": "nob", "loss": 5.0 - s / 100, "split": "valid"}
             for s in (0, 50, 100) for src in ("nob", "all")]
    (run / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    (run / "resumes.jsonl").write_text(json.dumps({"step": 40, "world_size": 2}) + "\n")
    assert main(["report", str(run)]) == 0
    names = sorted(p.name for p in (run / "plots").glob("*.png"))
    assert names == ["eval_loss.png", "grad_norm.png", "loss.png", "lr.png", "summary.png", "throughput.png"]
    assert (run / "plots" / "summary.png").stat().st_size > 20_000


def test_a_branch_draws_its_parent_run_up_to_the_branch(tmp_path):
    parent, branch = tmp_path / "main", tmp_path / "cooldown"
    for run, steps in ((parent, range(1, 101)), (branch, range(61, 81))):
        run.mkdir()
        rows = [{"step": s, "loss": 5 - s / 100, "lr": 1e-3, "tokens": 512 * s, "tokens_per_s": 1e3} for s in steps]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    origin = parent / "checkpoints" / "step00000060"
    (branch / "resumes.jsonl").write_text(json.dumps({"step": 60, "world_size": 2, "from": str(origin)}) + "\n")
    assert main(["report", str(branch)]) == 0
    from training.eval.report import _parent, _rows

    name, rows, at = _parent(_rows(branch / "resumes.jsonl"))
    assert (name, len(rows), rows[-1]["step"], at) == ("main", 60, 60, 60)
    assert (branch / "plots" / "loss.png").stat().st_size > 0


def test_the_console_is_a_bar_on_a_terminal_and_lines_in_a_log(capsys):
    import io

    from training.loop.metrics import Console

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    console = Console(total=10, initial=2, enabled=True, stream=term)
    for step in range(3, 6):
        console.step(step)
    console.line("[train] step 5/10: loss 3.2145, lr 2.99e-04")
    console.close()
    assert "5/10" in term.getvalue() and "loss 3.2145" in term.getvalue()
    assert capsys.readouterr().out == ""  # the line went into the bar, not beside it
    log = Console(total=10, initial=0, enabled=True, stream=io.StringIO())  # a Slurm .out: no bar
    log.step(5)
    log.line("[train] step 5/10: loss 3.2145")
    assert capsys.readouterr().out == "[train] step 5/10: loss 3.2145\n"
    Console(total=10, initial=0, enabled=False, stream=term).line("[train] rank 1")  # not rank 0: never a bar
    assert capsys.readouterr().out == "[train] rank 1\n"
