"""Resume at another world size (ZeRO-1 and -2): a checkpoint written by 2 ranks continues on 1,
and one written by 1 rank on 2, through DeepSpeed's universal checkpoint (converted once). Step,
learning rate and data position continue exactly; the losses of the following steps equal the
straight run's within 1e-5 — the tolerance of data-parallel equivalence in fp32, since the
gradient reductions sum in another order — which they could not if Adam's moments were lost."""

from __future__ import annotations

import pytest
from test_training import read_jsonl, tiny_config, torchrun, write_config

from training.config import parse_config
from training.data import run_prepare

pytestmark = pytest.mark.slow
TRAIN = ["-m", "training.cli", "train"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cfg = parse_config(tiny_config(root))
    run_prepare(cfg.tokenizer, cfg.data, progress=False)
    return root


@pytest.mark.parametrize("stage,saved_on,resumed_on", [(2, 2, 1), (2, 1, 2), (1, 2, 1), (1, 1, 2)])
def test_resume_on_another_number_of_ranks_continues_the_straight_run(data_root, tmp_path, stage, saved_on,
                                                                      resumed_on):
    raw = tiny_config(data_root, max_steps=6, warmup_steps=1)
    raw["zero"]["stage"] = stage
    raw["checkpoint"] = {"every_steps": 3, "keep_last": 2}
    raw["eval"] = {"every_steps": 0, "max_samples": 2}
    config = str(write_config(tmp_path / "c.yaml", raw))
    straight, run = tmp_path / "straight", tmp_path / "run"
    torchrun(*TRAIN, config, "--run-dir", str(straight), nproc=saved_on)
    torchrun(*TRAIN, config, "--run-dir", str(run), "--stop-at", "3", nproc=saved_on)
    resumed = torchrun(*TRAIN, config, "--run-dir", str(run), nproc=resumed_on)
    assert f"written by {saved_on} ranks, this launch has {resumed_on}: converting" in resumed.stdout
    assert "resuming at step 3" in resumed.stdout
    assert (run / "checkpoints" / "step00000003.universal" / "norallm-universal-complete").is_file()
    a, b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    assert [m["lr"] for m in a] == [m["lr"] for m in b] and [m["tokens"] for m in a] == [m["tokens"] for m in b]
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b, strict=True)) <= 1e-5, ([x["loss"] for x in a],
                                                                                          [y["loss"] for y in b])
    # the run's own later checkpoints are ordinary ones, for the new number of ranks
    assert f'"world_size": {resumed_on}' in (run / "checkpoints" / "step00000006" / "meta.json").read_text()
