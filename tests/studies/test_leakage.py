import numpy as np
import pytest
import torch
from torch import nn

import shiftbn as sb
from shiftbn.data.arrays import ArrayDataset
from shiftbn.studies import make_study
from shiftbn.studies.bags import bag_ids, make_bags
from shiftbn.studies.leakage import BagLeakage
from shiftbn.studies.minibatch import exact_batches, outputs_of_batches
from shiftbn.studies.training import train


def test_bags_have_their_size_and_lean_to_their_theme():
    labels = np.repeat(np.arange(10), 400)
    for skew in (0.9, 0.5):
        bag = bag_ids(labels, 16, skew, np.random.default_rng(0))
        kept = bag >= 0
        assert (bag == -1).sum() < 2 * 16
        assert set(np.bincount(bag[kept])) == {16}
        half = labels[kept] >= 5
        share = np.array([half[bag[kept] == b].mean() for b in range(bag.max() + 1)])
        lean = np.maximum(share, 1 - share).mean()  # share of a bag's samples from its theme half
        expected = 0.9 if skew == 0.9 else 0.5 + 0.5 * np.sqrt(2 / (np.pi * 16))  # E|Bin(16,.5)/16-.5| + .5
        assert abs(lean - expected) < 0.03, (skew, lean)


def test_make_bags_adds_one_offset_per_bag():
    rng = np.random.default_rng(1)
    x = torch.as_tensor(rng.random((200, 1, 4, 4)), dtype=torch.float32)
    labels = rng.integers(0, 4, 200)
    b = make_bags(x, labels, bag_size=8, skew=0.9, nuisance=2.0, seed=3)
    keep = np.flatnonzero(bag_ids(labels, 8, 0.9, np.random.default_rng(3)) >= 0)
    shift = b.x.double().numpy() - x[torch.from_numpy(keep)].double().numpy()
    np.testing.assert_allclose(shift, np.broadcast_to(b.offsets[b.bag][:, None, None, None], shift.shape), atol=1e-6)
    assert np.array_equal(b.labels, labels[keep]) and np.array_equal(b.data.source_ids, b.bag)
    assert 0.5 < b.offsets.std() < 4.0
    for idx in b.bag_batches():
        assert len(idx) == 8 and len(set(b.bag[idx])) == 1


def test_exact_batches_have_the_size_cover_once_and_top_up_with_others():
    for n, size in ((10, 5), (11, 4), (7, 2), (5, 5)):
        batches = exact_batches(n, size, seed=0)
        assert all(len(b) == size and len(set(b)) == size for b in batches)
        first = np.concatenate(batches)
        assert set(first) == set(range(n)) and len(first) - n == (-n) % size
        assert all(np.array_equal(a, b) for a, b in zip(batches, exact_batches(n, size, seed=0), strict=True))
    for bad in (1, 12):
        with pytest.raises(ValueError, match="batch size must lie in"):
            exact_batches(11, bad, seed=0)


def test_outputs_of_batches_match_a_float64_reference():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    model = nn.Sequential(bn).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(11, 3) * 3 + 1
    batches = exact_batches(11, 4, seed=2)
    out = outputs_of_batches(model, x, batches).double().numpy()
    xd, ref, done = x.double().numpy(), np.zeros((11, 3)), set()
    for idx in batches:
        xb = xd[idx]
        z = (xb - xb.mean(0)) / np.sqrt(xb.var(0) + bn.eps) * bn.weight.detach().double().numpy() \
            + bn.bias.detach().double().numpy()
        for j, i in enumerate(idx):
            if i not in done:
                ref[i], _ = z[j], done.add(i)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert not model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="in no batch"):
        outputs_of_batches(model, x, batches[:1])


class _SourceRecorder(nn.Module):
    """Records, per forward call in training, how many samples of source 1 the batch holds (the input
    is the source id) and the batch size; BN makes the batch the normalization batch."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(1)
        self.out = nn.Linear(1, 2)
        self.seen = []

    def forward(self, x):
        if self.training:
            self.seen.append((len(x), int(x[:, 0].sum())))
        return self.out(self.bn(x))


def test_training_ghost_batches_and_evaluation_batches_are_built_alike():
    # 30% of samples from source 1: a ghost batch of 4 holds Hypergeometric-like counts; evaluation
    # batches of 4 must have the same size and the same distribution of source counts
    n, g = 2000, 4
    src = (np.random.default_rng(0).random(n) < 0.3).astype(np.int64)
    x = torch.as_tensor(src, dtype=torch.float32)[:, None]
    ds = sb.SourceTaggedDataset(ArrayDataset(x, src), src, src)
    model = _SourceRecorder()
    train(model, ds, steps=40, batch_size=64, ghost_batch=g, lr=0.01, progress=False)
    train_sizes = {s for s, _ in model.seen}
    train_counts = np.array([c for _, c in model.seen])
    eval_batches = exact_batches(n, g, seed=0)
    eval_counts = np.array([src[b].sum() for b in eval_batches])
    assert train_sizes == {g} and {len(b) for b in eval_batches} == {g}
    assert abs(train_counts.mean() - eval_counts.mean()) < 0.1
    assert abs(train_counts.var() - eval_counts.var()) < 0.15
    np.testing.assert_allclose(eval_counts.mean(), g * src.mean(), atol=0.02)


def test_study_validates_bags_and_arms():
    with pytest.raises(ValueError, match="multiple of bag_size"):
        make_study("bag_leakage", {"batch_size": 40, "bag_size": 16})
    with pytest.raises(ValueError, match="must divide the bags per SGD batch"):
        make_study("bag_leakage", {"batch_size": 64, "bag_size": 16, "arms": ["sync:3"]})
    with pytest.raises(ValueError, match="use one of"):
        make_study("bag_leakage", {"arms": ["sorted"]})
    with pytest.raises(ValueError, match="ghost_sizes \\[3\\]"):
        make_study("normalization_batch_size", {"ghost_sizes": [2, 3], "batch_size": 32})


@pytest.mark.slow  # a 14 s end-to-end training run; make test-slow
def test_grouped_bags_leak_and_shuffling_closes_the_gap():
    # MLP on tabular blobs with a per-bag offset three times the data's spread: normalizing each bag by
    # itself removes the offset (own batches good), population statistics do not; shuffled BN
    # batches force the model to cope with the offset, and its population accuracy is higher.
    ds = sb.load("blobs-labs", n=1600, n_classes=4, n_labs=1)
    study = BagLeakage(train=sb.studies.TrainConfig(model={"name": "MLP", "hidden": 32}, steps=150, batch_size=32,
                                            lr=0.05, fractions=(0.7, 0.0, 0.3)),
                       arms=["grouped", "shuffled"], bag_size=8, nuisance=30.0, skew=0.5, seeds=[0])
    df = study.run(ds, progress=False).set_index(["arm", "eval"])["value"]
    assert df["grouped", "bags"] > df["grouped", "population"] + 0.15
    assert df["shuffled", "population"] > df["grouped", "population"] + 0.1
