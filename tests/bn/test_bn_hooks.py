import copy
import inspect
import io
import pathlib
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import shiftbn as sb
from shiftbn.bn import COLLECT_MODES, CollectOptions, bn_layers, observe_bn_inputs
from shiftbn.studies.models import SharedHeadNet


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2), nn.BatchNorm1d(2))


def _no_hooks(model):
    return all(not m._forward_pre_hooks for m in model.modules())


def test_every_call_site_is_reported_with_its_index_per_forward():
    model = SharedHeadNet(width=2).eval()
    seen = []
    with observe_bn_inputs(model, bn_layers(model), lambda layer, k, x: seen.append((layer.name, k, x.shape))) as h:
        for _ in range(2):
            h.run(torch.randn(3, 1, 8, 8))
            assert h.calls == {"stem.1": 1, "stem.4": 1, "head_bn": 2}  # reset by each forward
    assert [(n, k) for n, k, _ in seen] == [("stem.1", 0), ("stem.4", 0), ("head_bn", 0), ("head_bn", 1)] * 2
    assert seen[2][2] == (3, 2, 8, 8) and seen[3][2] == (3, 2, 4, 4)
    assert h.order == ["stem.1", "stem.4", "head_bn"]
    assert _no_hooks(model)


def test_stop_after_ends_the_forward_there_and_only_run_catches_it():
    model = _net().eval()
    seen = []
    with observe_bn_inputs(model, bn_layers(model), lambda layer, k, x: seen.append(layer.name),
                           stop_after="1") as h:
        assert h.run(torch.randn(5, 3)) is None
        assert seen == ["1"]
        h.stop_after = None
        assert h.run(torch.randn(5, 3)).shape == (5, 2)
        assert seen == ["1", "1", "4"]


def test_hooks_are_removed_when_on_input_raises():
    model = _net().eval()

    def boom(layer, k, x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), observe_bn_inputs(model, bn_layers(model), boom) as h:
        h.run(torch.randn(4, 3))
    assert _no_hooks(model)


def test_release_leaves_the_other_layers_observed():
    model = _net().eval()
    seen = []
    with observe_bn_inputs(model, bn_layers(model), lambda layer, k, x: seen.append(layer.name)) as h:
        h.release("1")
        assert h.observed == ["4"]
        h.run(torch.randn(4, 3))
    assert seen == ["4"]


def test_only_bn_hooks_registers_forward_pre_hooks_on_bn_modules():
    """One module owns BN input hooks; ``FrozenBN``'s mode-forcing hook is the one other (it must
    survive ``torch.save(model)`` and ``copy.deepcopy`` while the model trains)."""
    root = pathlib.Path(sb.__file__).parent
    users = sorted(str(p.relative_to(root)) for p in root.rglob("*.py") if "register_forward_pre_hook" in p.read_text())
    assert users == ["bn/hooks.py", "bn/state.py"], users


def test_a_frozen_model_can_be_copied_and_saved():
    model = _net()
    with sb.freeze_bn(model):
        clone = copy.deepcopy(model)
        torch.save(model, io.BytesIO())
    clone.train()
    clone(torch.randn(4, 3))
    assert not clone[1].training  # the copy's own hook keeps its BN frozen


def test_collect_stats_has_at_most_eleven_parameters_and_options_hold_the_rest():
    # what is measured and how the model runs (forward=, shared by every verb) are arguments; loading is options
    params = [p for p in inspect.signature(sb.collect_stats).parameters.values() if p.kind != p.VAR_KEYWORD]
    assert len(params) <= 11, [p.name for p in params]
    assert sb.CollectOptions is CollectOptions


def _data():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(6, 3, generator=g) for _ in range(3)]


def test_old_keywords_still_work_with_a_deprecation_warning_naming_the_new_spelling():
    model, data = _net(), _data()
    new = sb.collect_stats(model, data, progress=False, options=CollectOptions(fused=False, cache_bytes=0))
    with pytest.warns(DeprecationWarning, match=r"options=CollectOptions\(fused=\.\.\., cache_bytes=\.\.\.\)"):
        old = sb.collect_stats(model, data, progress=False, fused=False, cache_bytes=0)
    for name in new["pooled"].layers:
        assert (new["pooled"][name].mean == old["pooled"][name].mean).all()
        assert (new["pooled"][name].var == old["pooled"][name].var).all()


def test_unknown_keywords_and_wrong_options_are_refused():
    model, data = _net(), _data()
    with pytest.raises(TypeError, match="unexpected keyword argument 'batchsize'"):
        sb.collect_stats(model, data, progress=False, batchsize=4)
    with pytest.raises(TypeError, match="options must be a CollectOptions, got dict"):
        sb.collect_stats(model, data, progress=False, options={"fused": False})


def test_the_package_itself_emits_no_deprecation_warning():
    model, data = _net(), _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        sb.collect_stats(model, data, progress=False, mode="sequential")
        sb.precise_bn(model, data, progress=False)


def test_a_bn_called_by_keyword_is_observed():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(input=self.lin(x))

    torch.manual_seed(0)
    model = Keyword()
    x = torch.randn(10, 3)
    h = model.lin(x).detach().double()
    for mode in COLLECT_MODES:
        stats = sb.collect_stats(model, [x], by_source=False, mode=mode, progress=False)["pooled"]["bn"]
        np.testing.assert_allclose(stats.mean, h.mean(0).numpy(), rtol=1e-6)
        np.testing.assert_allclose(stats.var, h.var(0, unbiased=False).numpy(), rtol=1e-6)
