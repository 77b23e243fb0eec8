"""The global order of a mixture: interleaving by arithmetic, a new shuffle per source and epoch,
rank slices, exact resume on another world size, and mixture changes that neither repeat nor skip.

Source ``s`` is a ``range`` of tokens starting at ``BASE[s]``, so every row names its source and
window exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_loader import doc_lengths, windows_of

from data_pipeline.errors import DataError
from data_pipeline.loader import Loader, MixtureWindows, describe_changes, fingerprint
from data_pipeline.mixture import WEIGHT_DENOMINATOR, GlobalOrder, Interleave, integer_weights
from data_pipeline.shards import ShardWriter, open_split, token_dtype, write_manifest

SEQ = 8
WINDOWS = {"a": 40, "b": 13, "c": 7}
BASE = {"a": 0, "b": 10_000, "c": 20_000}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    out = {}
    for name, n in WINDOWS.items():
        dtype = token_dtype(30_000)
        writer = ShardWriter(root, name, "train", dtype, max_tokens=37)
        total = n * SEQ + 1  # documents of varied lengths over several shard files
        writer.add_batch(np.arange(BASE[name], BASE[name] + total, dtype=dtype), doc_lengths([3, 11, 29, 5], total))
        write_manifest(root, name, {"tokenizer_fingerprint": "t", "dtype": dtype.name}, writer.close())
        out[name] = open_split(root, [name], "train", "t")
    return out


def which(row: np.ndarray) -> tuple[str, int]:
    """(source, window) a row is, checking it is exactly that window."""
    name = max(n for n in BASE if row[0] >= BASE[n])
    j = (int(row[0]) - BASE[name]) // SEQ
    np.testing.assert_array_equal(row, BASE[name] + np.arange(j * SEQ, (j + 1) * SEQ + 1))
    return name, j


def parts(weights: dict[str, int], **changes) -> dict[str, str]:
    p = {"tokenizer": "t", "seed": "5", "seq_len": str(SEQ), "shuffle": "True"}
    p.update({f"shards:{n}": f"sha-{n}" for n in weights})
    p.update({f"weight:{n}": str(w) for n, w in weights.items()})
    p.update(changes)
    return p


def make(streams, weights=None, rank=0, world_size=1, allow=False, seed=5, global_batch=12, **changes):
    weights = weights or {"a": 5, "b": 3, "c": 2}
    order = GlobalOrder.single(WINDOWS, weights, seed)
    p = parts(weights, **changes)
    source = MixtureWindows({n: streams[n] for n in weights}, order, SEQ, None, fingerprint(**p), p, allow)
    return Loader(source, global_batch, 2, rank, world_size)


def steps(loader, k: int) -> list[np.ndarray]:
    return [windows_of(loader.next_step()) for _ in range(k)]


# ------------------------------------------------------------------------------------- interleaving


def test_integer_weights_add_up_and_keep_proportions():
    w = integer_weights([0.2, 0.5, 0.3])
    assert sum(w) == WEIGHT_DENOMINATOR
    assert [round(x / WEIGHT_DENOMINATOR, 6) for x in w] == [0.2, 0.5, 0.3]
    tiny = integer_weights([1e-9, 1.0])
    assert tiny[0] == 1 and sum(tiny) == WEIGHT_DENOMINATOR, "a positive share never rounds to zero"
    assert integer_weights([0.0, 2.0]) == [0, WEIGHT_DENOMINATOR]
    with pytest.raises(DataError):
        integer_weights([0.0, 0.0])


NORA_LIKE = integer_weights([0.1614, 0.3804, 0.0138, 0.2375, 0.0069, 0.2])


@pytest.mark.parametrize("weights", [[1, 1], [3, 1], [1, 2, 3], [5, 0, 3], NORA_LIKE], ids=str)
def test_every_prefix_holds_each_share_to_within_two_samples(weights):
    inter = Interleave(weights)
    total = sum(weights)
    prev = [0] * len(weights)
    for i in range(1, 6000):
        counts = inter.counts(i)
        assert sum(counts) == i
        assert all(0 <= c - p <= 1 for c, p in zip(counts, prev, strict=True)), "counts only ever grow by one"
        for c, w in zip(counts, weights, strict=True):
            assert abs(c - i * w / total) <= 2, (i, counts)
        s, k = inter.locate(i - 1)
        assert counts[s] == prev[s] + 1 and k == prev[s], "locate names the source that grew, and its index"
        prev = counts
    if 0 in weights:
        assert prev[weights.index(0)] == 0, "a zero weight is never chosen"


def test_sources_are_interleaved_evenly_not_one_after_another():
    inter = Interleave([1, 1, 1, 1])
    first = [inter.locate(i)[0] for i in range(400)]
    assert all(set(first[i : i + 4]) == {0, 1, 2, 3} for i in range(0, 400, 4)), "each source once per 4"
    code_share = Interleave(integer_weights([0.8, 0.2]))
    gaps = np.diff([i for i in range(2000) if code_share.locate(i)[0] == 1])
    assert set(gaps.tolist()) <= {4, 5, 6}, "a 20 % source comes every ~5th sample"


# ---------------------------------------------------------------------------- epochs and shuffles


def test_each_epoch_of_each_source_is_a_new_permutation():
    order = GlobalOrder.single(WINDOWS, {"a": 1, "b": 1, "c": 1}, seed=9)
    local: dict[str, list[int]] = {n: [] for n in WINDOWS}
    for g in range(3 * 3 * 40):
        name, j = order.window(g)
        local[name].append(j)
    for name, n in WINDOWS.items():
        epochs = [local[name][e * n : (e + 1) * n] for e in range(len(local[name]) // n)]
        assert len(epochs) >= 3
        for e in epochs:
            assert sorted(e) == list(range(n)), "each epoch reads every window once"
        assert len({tuple(e) for e in epochs}) == len(epochs), "and in a different order"
    other = GlobalOrder.single(WINDOWS, {"a": 1, "b": 1, "c": 1}, seed=10)
    assert [order.window(g) for g in range(60)] != [other.window(g) for g in range(60)]
    again = GlobalOrder.single(WINDOWS, {"a": 1, "b": 1, "c": 1}, seed=9)
    assert [order.window(g) for g in range(60)] == [again.window(g) for g in range(60)]
    plain = GlobalOrder.single(WINDOWS, {"a": 1}, seed=9, shuffle=False)
    assert [plain.window(g)[1] for g in range(45)] == list(range(40)) + list(range(5))


def test_epochs_per_source():
    order = GlobalOrder.single(WINDOWS, {"a": 1, "b": 1, "c": 2}, seed=1)
    ep = order.epochs(400)
    assert ep == pytest.approx({"a": 100 / 40, "b": 100 / 13, "c": 200 / 7})


def test_260b_plan_order_maps_any_sample_without_arrays():
    from training.config import load_config
    from training.data.modes import Pretraining

    cfg = load_config(REPO / "configs" / "normistral-7b-warm.yaml")
    plan = Pretraining(cfg).plan()
    n = plan.steps * plan.global_batch_size
    assert 126_000_000 < n < 128_000_000
    windows = {s.name: s.windows for s in plan.sources}
    order = GlobalOrder.single(windows, plan.weights(), seed=1234)
    assert order.consumed(n) == {s.name: s.samples for s in plan.sources}
    for g in (0, 1, n // 2, n - 2, n - 1, 3 * n):
        name, j = order.window(g)
        assert 0 <= j < windows[name]
    code = [order.locate(g)[0] for g in range(n - 1000, n)].count("code")
    assert 195 <= code <= 205, "20 % code even at the end"


# ------------------------------------------------------------------------------------------ loader


def test_rows_are_the_windows_the_order_names(streams):
    loader = make(streams)
    for t, rows in enumerate(steps(loader, 10)):
        for i, row in enumerate(rows):
            assert which(row) == loader.source.order.window(t * 12 + i)
    epochs = loader.source.epochs(loader.samples_consumed)
    assert epochs == pytest.approx({n: c / WINDOWS[n] for n, c in loader.source.order.consumed(120).items()})
    assert loader.epoch == max(epochs.values())


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_slices_are_disjoint_and_concatenate_to_one_rank(streams, world_size):
    single = steps(make(streams), 8)
    per_rank = [steps(make(streams, rank=r, world_size=world_size), 8) for r in range(world_size)]
    for t in range(8):
        np.testing.assert_array_equal(np.concatenate([per_rank[r][t] for r in range(world_size)]), single[t])


def test_resume_on_another_world_size_continues_exactly(streams):
    expected = steps(make(streams), 9)
    first = make(streams, world_size=1)
    steps(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints hold plain data
    assert state["samples_consumed"] == 48 and len(state["segments"]) == 1
    resumed = []
    for r in range(3):
        ld = make(streams, rank=r, world_size=3)
        ld.load_state_dict(state)
        resumed.append(steps(ld, 5))
    for t in range(5):
        np.testing.assert_array_equal(np.concatenate([resumed[r][t] for r in range(3)]), expected[4 + t])


@pytest.mark.parametrize("change,phrase", [
    ({"tokenizer": "t2"}, "tokenizer changed (t → t2)"),
    ({"seq_len": "16"}, "seq_len changed (8 → 16)"),
    ({"shards:b": "sha-b2"}, "the shards of source 'b' changed (re-prepared)"),
])
@pytest.mark.parametrize("allow", [False, True])
def test_a_changed_fingerprint_is_refused_naming_what_changed(streams, change, phrase, allow):
    old = make(streams)
    steps(old, 2)
    new = make(streams, allow=allow, **change)
    with pytest.raises(DataError) as e:
        new.load_state_dict(old.state_dict())
    assert phrase in str(e.value) and old.source.fingerprint in str(e.value) and new.source.fingerprint in str(e.value)
    assert new.samples_consumed == 0


def test_a_mixture_change_needs_the_switch(streams):
    old = make(streams, {"a": 5, "b": 3, "c": 2})
    steps(old, 2)
    new = make(streams, {"a": 1, "b": 1, "c": 8})
    with pytest.raises(DataError) as e:
        new.load_state_dict(old.state_dict())
    assert "the share of 'c' changed (2 → 8 per 2^20)" in str(e.value)
    assert "data.allow_mixture_change: true" in str(e.value)


def consumed_locals(order: GlobalOrder, n: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for g in range(n):
        name, k = order.locate(g)
        out.setdefault(name, []).append(k)
    return out


def test_reweighting_neither_repeats_nor_skips_and_applies_the_new_shares(streams):
    old = make(streams, {"a": 5, "b": 3, "c": 2})
    before = steps(old, 5)  # 60 samples
    new = make(streams, {"a": 1, "b": 1, "c": 8}, allow=True)
    change = new.load_state_dict(old.state_dict())
    assert new.samples_consumed == 60 and change.startswith("mixture changed at global sample 60: ")
    assert "the share of 'c' changed" in change
    after = steps(new, 10)  # 120 more
    seen = [which(r) for r in np.concatenate(before + after)]
    # per source, the local sample indices read are exactly 0, 1, 2, ... : nothing twice, nothing skipped
    for name, ks in consumed_locals(new.source.order, 180).items():
        assert sorted(ks) == list(range(len(ks))), name
    # the rows are those local samples' windows, and the new shares hold after the change
    assert seen == [new.source.order.window(g) for g in range(180)]
    tail = [name for name, _ in seen[60:]]
    assert abs(tail.count("c") - 120 * 0.8) <= 2 and abs(tail.count("a") - 12) <= 2

    # the changed run checkpoints and resumes like any other, on any world size
    saved = new.state_dict()
    assert [s["start"] for s in saved["segments"]] == [0, 60]
    expected = steps(new, 3)
    again = [make(streams, {"a": 1, "b": 1, "c": 8}, rank=r, world_size=2) for r in range(2)]
    for ld in again:
        ld.load_state_dict(saved)
    got = [steps(ld, 3) for ld in again]
    for t in range(3):
        np.testing.assert_array_equal(np.concatenate([got[0][t], got[1][t]]), expected[t])


def test_sources_added_and_removed_keep_their_counts(streams):
    first = make(streams, {"a": 1, "b": 1})
    steps(first, 3)  # 36 samples: 18 + 18
    second = make(streams, {"a": 1, "c": 1}, allow=True)  # b removed, c added
    change = second.load_state_dict(first.state_dict())
    assert "source 'b' removed" in change and "source 'c' added" in change
    steps(second, 3)
    third = make(streams, {"a": 1, "b": 1, "c": 1}, allow=True)  # b back
    third.load_state_dict(second.state_dict())
    steps(third, 3)
    for name, ks in consumed_locals(third.source.order, 108).items():
        assert sorted(ks) == list(range(len(ks))), name
    assert third.source.order.consumed(108)["b"] == 18 + 12


def test_describe_changes_without_parts():
    what, mixture_only = describe_changes(None, {"seed": "1"})
    assert "does not say" in what and not mixture_only


# ------------------------------------------------------------------- real shards through the config


def test_build_loader_mixes_sources_and_never_reads_validation(tmp_path):
    from data_pipeline.sources import is_validation
    from training.config import parse_config
    from training.data.modes import Pretraining
    from training.data.pretraining import build_loader, run_prepare

    def text(i: int) -> str:
        return f"Dokument nummer {i} handler om {'fjell' if i % 2 else 'fjord'} og {'skog' * (1 + i % 3)}."

    for name, rng in (("nob", range(0, 300)), ("nno", range(1000, 1100)), ("code", range(2000, 2060))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": text(i)}) + "\n" for i in rng))
    raw = {"seed": 3, "model": {"flavor": "tiny-mistral"},
           "tokenizer": {"path": str(tmp_path / "tok"), "train": True, "vocab_size": 300},
           "data": {"sources": [{"name": "nob", "language": "nob", "paths": [str(tmp_path / "nob.jsonl")]},
                                {"name": "nno", "language": "nno", "paths": [str(tmp_path / "nno.jsonl")]},
                                {"name": "code", "language": "code", "paths": [str(tmp_path / "code.jsonl")],
                                 "share": 0.25, "max_epochs": 30}],
                    "shards_dir": str(tmp_path / "shards"), "seq_len": 16, "valid_fraction": 0.2},
           "train": {"global_batch_size": 8, "micro_batch_size": 2, "max_steps": 300, "lr": 1e-3}}
    cfg = parse_config(raw)
    run_prepare(cfg.tokenizer, cfg.data, progress=False)
    from data_pipeline.tokenizer import Tokenizer

    tok = Tokenizer(cfg.tokenizer.path)

    def loader_of(cfg):
        plan = Pretraining(cfg).plan()
        return build_loader(cfg.data, tok, plan, cfg.seed, cfg.train.micro_batch_size, 0, 1)

    loader = loader_of(cfg)
    train = {n: open_split(cfg.data.shards_dir, [n], "train", tok.fingerprint) for n in ("nob", "nno", "code")}
    names = []
    for t in range(300):
        for i, row in enumerate(windows_of(loader.next_step())):
            name, j = loader.source.order.window(t * 8 + i)
            np.testing.assert_array_equal(row, train[name].tokens(j * 16, (j + 1) * 16 + 1))
            names.append(name)
    assert abs(names.count("code") / len(names) - 0.25) < 0.01
    epochs = loader.source.epochs(loader.samples_consumed)
    assert epochs["nob"] == pytest.approx(epochs["nno"], rel=0.05), "sources without a share repeat alike"
    assert min(epochs.values()) > 2, "several epochs were read"
    # the hold-out lives in other shards: no validation document is in any training split
    for name in train:
        valid = open_split(cfg.data.shards_dir, [name], "valid", tok.fingerprint)
        texts = tok.decode(train[name].tokens(0, train[name].total_tokens).tolist()).split(tok.decode([tok.eos_id]))
        held = tok.decode(valid.tokens(0, valid.total_tokens).tolist()).split(tok.decode([tok.eos_id]))
        held = [h for h in held if h]
        assert held and all(is_validation(h, 0.2) for h in held)
        assert not set(held) & set(texts)

    plan = Pretraining(cfg).plan()
    assert [s.basis for s in plan.sources] == ["manifest"] * 3
    cfg_over = parse_config({**raw, "data": {**raw["data"], "sources": [
        *raw["data"]["sources"][:2], {**raw["data"]["sources"][2], "max_epochs": 2}]}})
    with pytest.raises(DataError, match="source 'code' would be read .* more than its max_epochs 2"):
        loader_of(cfg_over)
