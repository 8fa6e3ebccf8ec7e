import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

import shiftbn as sb
from shiftbn.data import ArrayDataset

sizes_st = st.lists(st.integers(1, 60), min_size=1, max_size=6)


def _ids(sizes, seed=0):
    ids = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.default_rng(seed).permutation(ids)


def _batches(s):
    return [np.asarray(b) for b in s]


@settings(max_examples=60, deadline=None)
@given(sizes=sizes_st, bs=st.integers(1, 40), mode=st.sampled_from(["random", "single"]), seed=st.integers(0, 9))
def test_every_index_once_and_single_batches_pure(sizes, bs, mode, seed):
    ids = _ids(sizes, seed)
    batches = _batches(sb.SourceBatchSampler(ids, bs, mode, seed=seed))
    flat = np.concatenate(batches)
    assert np.array_equal(np.sort(flat), np.arange(len(ids)))
    assert all(1 <= len(b) <= bs for b in batches)
    if mode == "single":
        assert all(len(np.unique(ids[b])) == 1 for b in batches)
        # one partial batch at most per source
        assert sum(len(b) < bs for b in batches) <= len(sizes)


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(20, 80), min_size=2, max_size=5), bs=st.integers(8, 24), seed=st.integers(0, 9))
def test_mixed_every_batch_holds_every_source_in_proportion(sizes, bs, seed):
    ids = _ids(sizes, seed)
    n_batches = -(-len(ids) // bs)
    if min(sizes) < n_batches:
        with pytest.raises(ValueError, match="every source in every batch"):
            sb.SourceBatchSampler(ids, bs, "mixed", seed=seed)
        return
    try:
        batches = _batches(sb.SourceBatchSampler(ids, bs, "mixed", seed=seed))
    except ValueError as e:  # borderline sizes may still be infeasible; the error must say so
        assert "every source in every batch" in str(e)
        return
    flat = np.concatenate(batches)
    assert np.array_equal(np.sort(flat), np.arange(len(ids)))
    sizes_arr = np.array(sizes)
    for b in batches:
        counts = np.bincount(ids[b], minlength=len(sizes))
        assert (counts >= 1).all()
        expected = len(b) * sizes_arr / len(ids)
        assert np.all(np.abs(counts - expected) <= 2.0)


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(4, 50), min_size=2, max_size=6), k=st.integers(1, 3), c=st.integers(1, 6),
       seed=st.integers(0, 9), balance=st.sampled_from(["proportional", "equal"]))
def test_k_sources_per_batch(sizes, k, c, seed, balance):
    k = min(k, len(sizes))
    ids = _ids(sizes, seed)
    try:
        s = sb.SourceBatchSampler(ids, k * c, "mixed", sources_per_batch=k, balance=balance, seed=seed,
                                  drop_last=True)
    except ValueError as e:
        assert "sources_per_batch" in str(e)
        return
    for b in _batches(s):
        counts = np.bincount(ids[b], minlength=len(sizes))
        assert (counts > 0).sum() == k
        assert set(counts[counts > 0].tolist()) == {c}
    if balance == "proportional":
        # Keeping partial chunks can make a large source need one chunk more than there are batches
        # (hypothesis: sizes 28, 30, 30, 45 with k=3, c=2): then the documented error, else coverage.
        try:
            s2 = sb.SourceBatchSampler(ids, k * c, "mixed", sources_per_batch=k, seed=seed)
        except ValueError as e:
            assert "batches of" in str(e) and "distinct sources" in str(e)
            return
        flat = np.concatenate(_batches(s2))
        assert np.array_equal(np.sort(flat), np.arange(len(ids)))


@settings(max_examples=40, deadline=None)
@given(sizes=sizes_st, mode=st.sampled_from(["random", "single"]), seed=st.integers(0, 9))
def test_equal_balance_gives_each_source_the_same_share(sizes, mode, seed):
    ids = _ids(sizes, seed)
    flat = np.concatenate(_batches(sb.SourceBatchSampler(ids, 7, mode, balance="equal", seed=seed)))
    share = -(-len(ids) // len(sizes))
    assert np.bincount(ids[flat]).tolist() == [share] * len(sizes)


@settings(max_examples=40, deadline=None)
@given(sizes=sizes_st, bs=st.integers(1, 20), mode=st.sampled_from(["random", "single"]),
       seed=st.integers(0, 9), epoch=st.integers(0, 5))
def test_determinism_and_set_epoch(sizes, bs, mode, seed, epoch):
    ids = _ids(sizes)
    a, b = sb.SourceBatchSampler(ids, bs, mode, seed=seed), sb.SourceBatchSampler(ids, bs, mode, seed=seed)
    a.set_epoch(epoch)
    b.set_epoch(epoch)
    assert [x.tolist() for x in _batches(a)] == [x.tolist() for x in _batches(b)]


def test_epochs_differ():
    ids = _ids([50, 50])
    s = sb.SourceBatchSampler(ids, 10, "single", seed=0)
    first = [b.tolist() for b in _batches(s)]
    s.set_epoch(1)
    assert first != [b.tolist() for b in _batches(s)]


@settings(max_examples=60, deadline=None)
@given(sizes=sizes_st, bs=st.integers(1, 16), replicas=st.integers(2, 5),
       mode=st.sampled_from(["random", "single"]), drop_last=st.booleans())
def test_shards_are_whole_disjoint_batches_of_equal_count(sizes, bs, replicas, mode, drop_last):
    ids = _ids(sizes)
    if drop_last and mode == "single" and min(sizes) < bs:
        return
    full = [b.tolist() for b in _batches(sb.SourceBatchSampler(ids, bs, mode, seed=3, drop_last=drop_last))]
    ranks = [sb.SourceBatchSampler(ids, bs, mode, seed=3, drop_last=drop_last, num_replicas=replicas, rank=r)
             for r in range(replicas)]
    assert len({len(r) for r in ranks}) == 1
    real = []
    for r in ranks:
        eb = r.epoch_batches()
        real += [eb.batch(i).tolist() for i in range(len(eb)) if not eb.padding[i]]
        if drop_last:
            assert not eb.padding.any()
    if drop_last:
        assert len(real) == (len(full) // replicas) * replicas
        assert all(b in full for b in real)
    else:
        assert sorted(real) == sorted(full)  # every batch exactly once, as a whole
    flat = np.concatenate([np.asarray(b, dtype=np.int64) for b in real]) if real else np.array([])
    assert len(np.unique(flat)) == len(flat)


def test_works_as_dataloader_batch_sampler():
    ids = _ids([6, 4])
    ds = sb.SourceTaggedDataset(ArrayDataset(np.arange(10)[:, None], np.zeros(10)), ids)
    loader = DataLoader(ds, batch_sampler=sb.SourceBatchSampler(ds.source_ids, 3, "single"))
    for x, _, s in loader:
        assert len(torch.unique(s)) == 1 and x.shape[1] == 1


@pytest.mark.parametrize("kwargs, msg", [
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=4, mode="blend"), "unknown mode"),
    (dict(batch_size=4, mode="mixed", sources_per_batch=3), "sources_per_batch=3"),
    (dict(batch_size=5, mode="mixed", sources_per_batch=2), "multiple of sources_per_batch"),
    (dict(batch_size=4, mode="single", sources_per_batch=2), "mode='mixed' only"),
    (dict(batch_size=4, balance="fair"), "unknown balance"),
    (dict(batch_size=4, num_replicas=2, rank=2), "rank"),
    (dict(batch_size=40, mode="single", drop_last=True), "never be seen"),
    (dict(batch_size=2, mode="mixed"), "every source in every batch"),
])
def test_bad_arguments_say_what_to_change(kwargs, msg):
    ids = _ids([30, 10])
    with pytest.raises(ValueError, match=msg):
        sb.SourceBatchSampler(ids, **kwargs)


def test_sparse_huge_source_ids_are_compacted_not_allocated():
    ids = np.array([10**12, 0, 10**12, 5, 0, 10**12])
    s = sb.SourceBatchSampler(ids, 2, "single", seed=0)
    batches = _batches(s)
    assert sorted(np.concatenate(batches).tolist()) == list(range(6))
    assert all(len(np.unique(ids[b])) == 1 for b in batches)
    with pytest.raises(ValueError, match=r"source id 5 has 1 samples for 3 batches"):
        sb.SourceBatchSampler(ids, 2, "mixed")


def test_numpy_integer_sizes_are_accepted_and_stored_as_int():
    ids = _ids([12, 12])
    s = sb.SourceBatchSampler(ids, np.int64(4), "mixed", sources_per_batch=np.int64(2), num_replicas=np.int32(2),
                              rank=np.int64(1), drop_last=True)
    assert type(s.batch_size) is int and type(s.sources_per_batch) is int and s.num_replicas == 2
    assert all(len(b) == 4 for b in s)
    for bad in (4.0, True, "4"):
        with pytest.raises(TypeError, match=r"batch_size must be an integer >= 1, got"):
            sb.SourceBatchSampler(ids, bad)
    with pytest.raises(TypeError, match="sources_per_batch must be an integer"):
        sb.SourceBatchSampler(ids, 4, "mixed", sources_per_batch=2.0)
