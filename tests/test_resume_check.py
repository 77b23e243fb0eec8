"""A resume into another model shape, ZeRO stage or precision is refused with one line (DeepSpeed
failed deep in its load with a traceback, exit 1); changed hyperparameters are accepted with a
note of what changed (they were accepted silently)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from training.checkpoint import resume_check
from training.checkpoint.resume_check import ResumeMismatchError
from training.config import parse_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def raw() -> dict:
    return yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())


def checkpoint_of(tmp_path: Path, raw: dict) -> Path:
    """A checkpoint dir whose config.yaml is ``raw`` resolved, as a save writes it."""
    ckpt = tmp_path / "checkpoints" / "step00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "config.yaml").write_text(parse_config(copy.deepcopy(raw)).to_yaml())
    return ckpt


@pytest.mark.parametrize("change,shown", [
    (lambda r: r["model"].setdefault("overrides", {}).update(num_hidden_layers=1), "model.overrides"),
    (lambda r: r["model"].update(flavor="tiny-bloom", overrides={}), "model.flavor 'tiny-mistral' → 'tiny-bloom'"),
    (lambda r: r["model"].update(vocab_size=4096), "model.vocab_size"),
    (lambda r: r.setdefault("zero", {}).update(stage=3), "zero.stage 2 → 3"),
    (lambda r: r["train"].update(precision="bf16"), "train.precision 'fp32' → 'bf16'"),
])
def test_another_shape_zero_stage_or_precision_is_refused_in_one_line(tmp_path, raw, change, shown):
    ckpt = checkpoint_of(tmp_path, raw)
    change(raw)
    with pytest.raises(ResumeMismatchError) as e:
        resume_check.check(parse_config(raw), ckpt, log=pytest.fail)
    msg = str(e.value)
    assert shown in msg and "\n" not in msg and str(ckpt) in msg and "new --run-dir" in msg, msg


def test_changed_hyperparameters_are_accepted_with_a_note(tmp_path, raw):
    ckpt = checkpoint_of(tmp_path, raw)
    raw["train"].update(lr=raw["train"]["lr"] / 10, global_batch_size=raw["train"]["global_batch_size"] * 2,
                        max_steps=raw["train"]["max_steps"] + 100, world_size=None)
    notes: list[str] = []
    resume_check.check(parse_config(raw), ckpt, log=notes.append)
    (note,) = notes
    assert note.startswith("[train] step00000004 was trained with other settings; continuing with this config's:")
    assert "train.lr " in note and "train.global_batch_size " in note and "train.max_steps " in note
    assert "world_size" not in note  # another number of ranks is a supported resume, said elsewhere


def test_the_same_config_and_a_checkpoint_without_one_pass_quietly(tmp_path, raw):
    ckpt = checkpoint_of(tmp_path, raw)
    resume_check.check(parse_config(copy.deepcopy(raw)), ckpt, log=pytest.fail)
    (ckpt / "config.yaml").unlink()
    raw["zero"] = {"stage": 3}
    resume_check.check(parse_config(raw), ckpt, log=pytest.fail)  # nothing to compare with
    resume_check.check(parse_config(raw), None, log=pytest.fail)  # a fresh run
