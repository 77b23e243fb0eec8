"""The loader over one token stream, and Permutation, on a ``range(n)`` token stream: every window
is known exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_pipeline.batch import IGNORE, Batch
from data_pipeline.errors import DataError
from data_pipeline.loader import Loader, MixtureWindows, eval_samples
from data_pipeline.mixture import GlobalOrder, window_count
from data_pipeline.permutation import Permutation
from data_pipeline.shards import ShardWriter, open_split, read_manifest, token_dtype, write_manifest

SEQ = 8
N_SAMPLES = 96
N_TOKENS = N_SAMPLES * SEQ + 1  # exactly N_SAMPLES windows of SEQ + 1 tokens
FP = "tok-fp"


def doc_lengths(pattern: list[int], n_tokens: int) -> np.ndarray:
    """Document lengths cycling through ``pattern`` that add up to exactly ``n_tokens``."""
    lengths, total = [], 0
    while total < n_tokens:
        lengths.append(min(pattern[len(lengths) % len(pattern)], n_tokens - total))
        total += lengths[-1]
    return np.array(lengths)


def build_range_stream(root: Path, n_tokens: int, max_tokens: int = 50):
    """Documents of varied lengths whose concatenation is ``arange(n_tokens)``, over several shards."""
    dtype = token_dtype(n_tokens)
    writer = ShardWriter(root, "src", "train", dtype, max_tokens)
    writer.add_batch(np.arange(n_tokens, dtype=dtype), doc_lengths([5, 17, 1, 30, 3, 64, 2, 11], n_tokens))
    write_manifest(root, "src", {"tokenizer_fingerprint": FP, "dtype": dtype.name}, writer.close())
    return open_split(root, ["src"], "train", FP)


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    root = tmp_path_factory.mktemp("range")
    s = build_range_stream(root, N_TOKENS)
    assert len(read_manifest(root, "src")["shards"]) > 3, "the fixture must span several shard files"
    return s


def window(j: int, seq_len: int = SEQ) -> np.ndarray:
    return np.arange(j * seq_len, (j + 1) * seq_len + 1)


def window_index(row: np.ndarray, seq_len: int = SEQ) -> int:
    """Which window a row is (and check that it is exactly that window)."""
    j = int(row[0]) // seq_len
    np.testing.assert_array_equal(row, window(j, seq_len))
    return j


def make(stream, seq_len=SEQ, global_batch=8, micro_batch=2, rank=0, world_size=1, seed=7, shuffle=True,
         fingerprint="fp-A", eos_id=None) -> Loader:
    """The loader over one stream: a mixture of a single source."""
    order = GlobalOrder.single({"all": window_count(stream.total_tokens, seq_len)}, {"all": 1}, seed, shuffle)
    source = MixtureWindows({"all": stream}, order, seq_len, eos_id, fingerprint)
    return Loader(source, global_batch, micro_batch, rank, world_size)


def sample_index(loader: Loader, g: int) -> int:
    """Which window of the stream global sample ``g`` is."""
    return loader.source.order.window(g)[1]


def windows_of(batches: list[Batch]) -> np.ndarray:
    """Window batches back as their (n, T + 1) windows, checking inputs and labels agree."""
    for b in batches:
        np.testing.assert_array_equal(b.input_ids[:, 1:], b.labels[:, :-1])
    return np.concatenate([np.concatenate([b.input_ids[:, :1], b.labels], axis=1) for b in batches])


def steps(loader: Loader, k: int) -> list[np.ndarray]:
    """k steps of this rank's rows, micro-batches joined: one (per_rank, SEQ + 1) array per step."""
    return [windows_of(loader.next_step()) for _ in range(k)]


# ---------------------------------------------------------------------------------------- Permutation


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1000, 4097])
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_permutation_is_a_bijection(n, seed):
    perm = Permutation(n, seed)
    values = [perm(i) for i in range(n)]
    assert sorted(values) == list(range(n))


@pytest.mark.parametrize("n", [100, 1000, 4097])
def test_permutation_depends_on_seed_and_shuffles(n):
    orders = [[Permutation(n, seed)(i) for i in range(n)] for seed in range(4)]
    assert len({tuple(o) for o in orders}) == 4, "different seeds must give different orders"
    for o in orders:
        assert o != list(range(n)), "the order should not be the identity"
        assert sum(a == b for a, b in zip(o, range(n), strict=True)) < n // 10
    # same seed, same order
    assert [Permutation(n, 2)(i) for i in range(n)] == orders[2]


def test_permutation_rejects_bad_input():
    with pytest.raises(ValueError):
        Permutation(0, 1)
    perm = Permutation(10, 1)
    for bad in (-1, 10, 11):
        with pytest.raises(IndexError):
            perm(bad)


# --------------------------------------------------------------------------------------------- windows


def test_samples_are_exact_windows_without_shuffle(stream):
    loader = make(stream, shuffle=False)
    assert window_count(stream.total_tokens, SEQ) == N_SAMPLES
    for j in range(N_SAMPLES):
        np.testing.assert_array_equal(loader.source.sample(j), window(j))
    # the last window ends exactly at the last token
    assert loader.source.sample(N_SAMPLES - 1)[-1] == N_TOKENS - 1
    # unshuffled steps read windows in order: micro-batches of (micro, SEQ) inputs and next tokens
    micro = loader.next_step()
    assert len(micro) == 4
    assert all(m.input_ids.shape == m.labels.shape == (2, SEQ) and m.doc_ids is None for m in micro)
    assert all(m.trained_tokens == 2 * SEQ for m in micro), "every next token of a window is a target"
    assert [window_index(r) for r in windows_of(micro)] == list(range(8))


def test_document_ids_restart_after_each_eos(stream):
    eos = 20  # window 2 holds tokens 16..24: a document ends at 20, the next starts at 21
    batch = make(stream, shuffle=False, global_batch=4, micro_batch=4, eos_id=eos).next_step()[0]
    assert batch.doc_ids[2].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert not batch.doc_ids[[0, 1, 3]].any()
    assert not (batch.labels == IGNORE).any(), "document boundaries mask attention, not the loss"


def test_samples_are_exact_windows_with_shuffle(stream):
    loader = make(stream, shuffle=True)
    for g in range(2 * N_SAMPLES):
        row = loader.source.sample(g)
        assert row.shape == (SEQ + 1,)
        assert window_index(row) == sample_index(loader, g)


def test_odd_stream_length_drops_only_the_tail(tmp_path):
    s = build_range_stream(tmp_path, 100)
    loader = make(s, global_batch=1, micro_batch=1, shuffle=False)
    n = window_count(100, SEQ)
    assert n == (100 - 1) // SEQ
    np.testing.assert_array_equal(loader.source.sample(n - 1), window(n - 1))
    assert [sample_index(loader, g) for g in range(n, n + 3)] == [0, 1, 2], "the next epoch starts over"


def test_loader_rejects_a_stream_without_one_window(tmp_path):
    tiny = build_range_stream(tmp_path, SEQ, max_tokens=2)
    with pytest.raises(DataError, match="fewer train tokens than one sample"):
        make(tiny)


# ---------------------------------------------------------------------------------------- determinism


def test_same_seed_same_batches_different_seed_different(stream):
    a = steps(make(stream, seed=3), 6)
    b = steps(make(stream, seed=3), 6)
    c = steps(make(stream, seed=4), 6)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(a, c, strict=True))


def test_epochs_use_different_orders(stream):
    loader = make(stream)
    first = [sample_index(loader, g) for g in range(N_SAMPLES)]
    second = [sample_index(loader, g) for g in range(N_SAMPLES, 2 * N_SAMPLES)]
    assert sorted(first) == sorted(second) == list(range(N_SAMPLES))
    assert first != second


@pytest.mark.parametrize("shuffle", [True, False])
def test_one_epoch_covers_every_window_once(stream, shuffle):
    loader = make(stream, shuffle=shuffle, global_batch=16, micro_batch=4)
    assert N_SAMPLES % 16 == 0
    seen = [window_index(r) for batch in steps(loader, N_SAMPLES // 16) for r in batch]
    assert sorted(seen) == list(range(N_SAMPLES))
    assert loader.epoch == pytest.approx(1.0)
    # the next epoch covers everything again
    seen2 = [window_index(r) for batch in steps(loader, N_SAMPLES // 16) for r in batch]
    assert sorted(seen2) == list(range(N_SAMPLES))


def test_every_token_covered_in_an_epoch(stream):
    loader = make(stream, global_batch=16, micro_batch=4)
    covered = np.zeros(N_TOKENS, dtype=bool)
    for batch in steps(loader, N_SAMPLES // 16):
        covered[batch.reshape(-1)] = True
    assert covered.all()


# ------------------------------------------------------------------------------------------ ranks


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_read_disjoint_samples(stream, world_size):
    n_steps = 10  # crosses an epoch border (10 * 16 > 96)
    loaders = [
        make(stream, global_batch=16, micro_batch=2, rank=r, world_size=world_size) for r in range(world_size)
    ]
    per_rank_steps = [steps(ld, n_steps) for ld in loaders]
    reader_of: dict[int, int] = {}
    for t in range(n_steps):
        step_windows: list[int] = []
        for r, ld in enumerate(loaders):
            idx = ld.rank_indices(t * 16)
            assert len(idx) == 16 // world_size
            for g in idx:
                assert g not in reader_of, f"global sample {g} read by ranks {reader_of[g]} and {r}"
                reader_of[g] = r
            rows = per_rank_steps[r][t]
            assert rows.shape == (16 // world_size, SEQ + 1)
            got = [window_index(row) for row in rows]
            assert got == [sample_index(ld, g) for g in idx]
            step_windows += got
        assert len(set(step_windows)) == 16, "within a step no window is shared between ranks"
    assert sorted(reader_of) == list(range(n_steps * 16)), "every global sample read exactly once"


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_slices_concatenate_to_single_rank_order(stream, world_size):
    single = steps(make(stream, global_batch=16, micro_batch=2), 8)
    per_rank = [
        steps(make(stream, global_batch=16, micro_batch=2, rank=r, world_size=world_size), 8)
        for r in range(world_size)
    ]
    for t in range(8):
        np.testing.assert_array_equal(np.concatenate([per_rank[r][t] for r in range(world_size)]), single[t])


# ------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("k", [0, 1, 5, 13])
def test_exact_resume(stream, k):
    uninterrupted = make(stream)
    expected = steps(uninterrupted, k + 6)

    first = make(stream)
    before = steps(first, k)
    state = first.state_dict()
    assert state == {"samples_consumed": k * 8, "fingerprint": "fp-A"}

    fresh = make(stream)
    fresh.load_state_dict(state)
    after = steps(fresh, 6)
    for got, want in zip(before + after, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_resume_on_another_world_size(stream):
    expected = steps(make(stream, global_batch=16, micro_batch=2), 9)
    first = make(stream, global_batch=16, micro_batch=2)
    steps(first, 4)
    state = first.state_dict()
    resumed = []
    for r in range(4):
        ld = make(stream, global_batch=16, micro_batch=2, rank=r, world_size=4)
        ld.load_state_dict(state)
        resumed.append(steps(ld, 5))
    for t in range(5):
        np.testing.assert_array_equal(np.concatenate([resumed[r][t] for r in range(4)]), expected[4 + t])


def test_resume_fingerprint_mismatch_raises(stream):
    ld = make(stream, fingerprint="fp-A")
    steps(ld, 2)
    other = make(stream, fingerprint="fp-B")
    with pytest.raises(DataError) as e:
        other.load_state_dict(ld.state_dict())
    assert "fp-A" in str(e.value) and "fp-B" in str(e.value)
    assert other.samples_consumed == 0
    with pytest.raises(DataError):
        other.load_state_dict({"samples_consumed": 3})


# -------------------------------------------------------------------------------------------- eval


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_samples_are_the_first_windows_strided(stream, world_size):
    per_rank = [eval_samples(stream, SEQ, 10, r, world_size) for r in range(world_size)]
    n = 10 - 10 % world_size
    assert {len(x) for x in per_rank} == {n // world_size}
    got = sorted(window_index(row) for x in per_rank for row in windows_of([x]))
    assert got == list(range(n))
