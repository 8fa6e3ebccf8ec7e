import threading

import numpy as np
import torch
from torch import nn

import shiftbn as sb
from shiftbn.bn import model_lock
from tests.helpers import assert_same_state, state_of


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))


def _batches(shift):
    g = torch.Generator().manual_seed(int(shift))
    return [torch.randn(8, 2, 10, 10, generator=g) + shift for _ in range(6)]


def _analyse(model, shift):
    stats = sb.collect_stats(model, _batches(shift), by_source=False, progress=False)["pooled"]
    with sb.use_stats(model, stats), torch.no_grad():
        out = model(_batches(shift)[0])
    return stats, out


def test_two_threads_analysing_one_model_leave_it_unchanged():
    model = _net()
    model.train()
    before = state_of(model)
    serial = {shift: _analyse(model, shift) for shift in (0.0, 5.0)}
    results: dict = {}
    errors: list = []

    def work(shift):
        try:
            results[shift] = [_analyse(model, shift) for _ in range(5)]
        except Exception as exc:  # reported below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in (0.0, 5.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    assert_same_state(model, before)
    for shift, runs in results.items():
        want_stats, want_out = serial[shift]
        for stats, out in runs:
            for name, m in want_stats.items():
                assert stats[name].count == m.count
                np.testing.assert_array_equal(stats[name].mean, m.mean)
                np.testing.assert_array_equal(stats[name].var, m.var)
            assert torch.equal(out, want_out)


def test_model_lock_is_reentrant_and_per_model():
    a, b = _net(), _net()
    with model_lock(a), model_lock(a), sb.use_stats(a, sb.bn.buffer_stats(a)):
        got = []
        t = threading.Thread(target=lambda: got.append(sb.load_stats(b, sb.bn.buffer_stats(b))))
        t.start()
        t.join(timeout=10)  # another model is not blocked
        assert not t.is_alive() and got == [None]
        blocked = threading.Event()

        def other():
            with model_lock(a):
                blocked.set()

        t = threading.Thread(target=other)
        t.start()
        assert not blocked.wait(0.2)  # the same model waits for the holder
    t.join(timeout=10)
    assert blocked.is_set()
