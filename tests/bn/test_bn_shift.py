import numpy as np
import pytest

import shiftbn as sb
from shiftbn.bn.moments import BNStats, Moments, SourceStats


def _gauss(mean, var, n=1000):
    return Moments(n, np.asarray(mean, float), np.asarray(var, float) * n)


def _stats():
    return SourceStats({
        "a": BNStats({"l1": _gauss([0, 0], [1, 1]), "l2": _gauss([1], [4])}),
        "b": BNStats({"l1": _gauss([3, 0], [4, 1]), "l2": _gauss([1], [4])}),
    })


def test_w2_kl_smd_against_closed_forms():
    df = sb.stats_shift(_stats(), reference="a", metric="all")
    assert list(df.columns) == ["layer", "depth", "source", "reference", "metric", "value"]
    row = df.set_index(["source", "layer", "metric"])["value"]
    eps = 1e-5
    # channel 0: N(0,1) vs N(3,4); channel 1 identical
    w2_c0 = np.sqrt(9 + (np.sqrt(4 + eps) - np.sqrt(1 + eps)) ** 2)
    assert row[("b", "l1", "w2")] == pytest.approx(w2_c0 / 2, rel=1e-12)
    kl_c0 = 0.5 * ((4 + eps + 9) / (1 + eps) + (1 + eps + 9) / (4 + eps)) - 1
    assert row[("b", "l1", "kl")] == pytest.approx(kl_c0 / 2, rel=1e-12)
    smd_c0 = 3 / np.sqrt((4 + 1 + 2 * eps) / 2)
    assert row[("b", "l1", "smd")] == pytest.approx(smd_c0 / 2, rel=1e-12)
    assert row[("a", "l1", "w2")] == 0 and row[("b", "l2", "kl")] == pytest.approx(0, abs=1e-12)
    assert set(df["depth"]) == {0, 1}


def test_pooled_and_pairwise_references():
    pooled = sb.stats_shift(_stats())
    assert set(pooled["reference"]) == {"pooled"} and set(pooled["metric"]) == {"w2"}
    a_l1 = pooled.query("source == 'a' and layer == 'l1'")["value"].item()
    b_l1 = pooled.query("source == 'b' and layer == 'l1'")["value"].item()
    assert a_l1 > 0 and b_l1 > 0
    pair = sb.stats_shift(_stats(), reference="pairwise", metric="smd")
    assert set(zip(pair["source"], pair["reference"], strict=True)) == {("a", "b"), ("b", "a")}
    ab = pair.query("source == 'a' and reference == 'b' and layer == 'l1'")["value"].item()
    ba = pair.query("source == 'b' and reference == 'a' and layer == 'l1'")["value"].item()
    assert ab == pytest.approx(ba)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown metric"):
        sb.stats_shift(_stats(), metric="l2")
    with pytest.raises(ValueError, match="unknown reference"):
        sb.stats_shift(_stats(), reference="c")
