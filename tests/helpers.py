"""Shared test helpers: an independent float64 reference for BN-input moments; a user's project on disk."""

import copy
import importlib
import sys
import textwrap
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _as_rows(x: torch.Tensor) -> np.ndarray:
    a = x.detach().double().numpy()  # exact for every float dtype (bfloat16 has no numpy type)
    return np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])


def moments_of(parts: list[np.ndarray]) -> tuple[int, np.ndarray, np.ndarray]:
    """numpy float64 two-pass: count, mean, population variance per channel."""
    allx = np.concatenate(parts)
    mean = allx.mean(axis=0)
    return len(allx), mean, ((allx - mean) ** 2).mean(axis=0)


@contextmanager
def capture_bn_inputs(model: nn.Module):
    """Record every BN input of ``model`` while the block runs: name -> list of (rows, C) arrays."""
    captured: dict[str, list[np.ndarray]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, _BatchNorm):
            hooks.append(mod.register_forward_pre_hook(
                lambda module, args, name=name: captured.setdefault(name, []).append(_as_rows(args[0]))))
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


def reference_moments(model: nn.Module, batches, bn_train: bool = True) -> dict[str, tuple]:
    """Run ``batches`` through a copy of the model with torch's own BN (train or eval mode) and return
    layer name -> (count, mean, population var) of every BN input, in numpy float64.
    """
    m = copy.deepcopy(model)
    m.eval()
    for mod in m.modules():
        if isinstance(mod, _BatchNorm):
            mod.train(bn_train)
    with capture_bn_inputs(m) as captured, torch.no_grad():
        for x in batches:
            m(x)
    return {name: moments_of(parts) for name, parts in captured.items()}


def state_of(model: nn.Module) -> tuple:
    """Everything that must survive an analysis: state dict values, flags, momenta."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    momenta = [getattr(m, "momentum", None) for m in model.modules()]
    return sd, flags, momenta


def assert_same_state(model: nn.Module, before: tuple) -> None:
    sd, flags, momenta = before
    now = model.state_dict()
    assert set(now) == set(sd)
    for k, v in sd.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), f"{k} changed"
    assert [m.training for m in model.modules()] == flags
    assert [getattr(m, "momentum", None) for m in model.modules()] == momenta


def write_user_project(tmp_path, module: str, sites) -> None:
    """A user's own package ``module`` with a model factory ``make``, a checkpoint ``w.pt`` and an image
    folder ``data/<site>/<neg|pos>/<i>.png`` (8x8 grayscale) for each ``(site, offset, images per class)``.

    ``module`` must be a name no other test imports (``sys.modules`` keeps the first)."""
    (tmp_path / f"{module}.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def make():
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    """))
    sys.path.insert(0, str(tmp_path))
    torch.save(importlib.import_module(module).make().state_dict(), tmp_path / "w.pt")
    rng = np.random.default_rng(0)
    for site, offset, n in sites:
        for cls in ("neg", "pos"):
            folder = tmp_path / "data" / site / cls
            folder.mkdir(parents=True)
            for i in range(n):
                arr = np.clip(rng.normal(offset, 20, size=(8, 8)), 0, 255).astype(np.uint8)
                Image.fromarray(arr, mode="L").save(folder / f"{i}.png")
