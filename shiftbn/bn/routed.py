"""``per_site_model``: one deployable model that normalizes each sample with its own site's BN statistics.

Why: a model trained on several hospitals serves each with that hospital's statistics (per-site BN,
paper Section 5; pytorch#48929). How the site reaches BN layers inside a model whose ``forward``
takes only ``x``: ``PerSiteModel.forward(x, site)`` binds the batch's site ids (N,) in a per-thread
route shared with every ``RoutedBN`` of the copy, calls the inner model, and unbinds in ``finally``.
The route is plain Python state read while the forward runs, so eager calls from several threads
do not see each other's ids, and ``torch.export.export`` (non-strict, the default) records the
ids as a graph input feeding every BN layer's ``index_select`` (a dynamic batch dimension works).
TorchScript scripting and ``export(strict=True)`` are not supported (they do not run the Python
that binds the route).
"""

from __future__ import annotations

import copy
import numbers
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from shiftbn.bn.collect import collect_stats
from shiftbn.bn.layers import bn_layers, check_materialized
from shiftbn.bn.lock import model_lock
from shiftbn.bn.moments import BNStats, brief_repr
from shiftbn.bn.population import PopulationStats
from shiftbn.bn.state import prepare_writes

SiteArg = torch.Tensor | np.ndarray | str | int | Sequence[str] | Sequence[int]


class _SiteRoute:
    """The site ids (N,) of the forward running on this thread; shared by a model and its layers.

    A deep copy or unpickling makes a fresh, empty route (``copy.deepcopy``'s memo keeps it shared
    by the copied model and its copied layers).
    """

    def __init__(self) -> None:
        self._local = threading.local()

    @contextmanager
    def bound(self, ids: torch.Tensor) -> Iterator[None]:
        previous = getattr(self._local, "ids", None)
        self._local.ids = ids
        try:
            yield
        finally:
            self._local.ids = previous

    def current(self) -> torch.Tensor | None:
        return getattr(self._local, "ids", None)

    def __deepcopy__(self, memo: dict) -> _SiteRoute:
        return _SiteRoute()

    def __reduce__(self):
        return (_SiteRoute, ())


class RoutedBN(nn.Module):
    """A BN layer in eval mode whose statistics are chosen per sample: row ``site[i]`` of
    ``site_mean`` / ``site_var`` (S, C) normalizes sample i.

    ``weight``/``bias`` (C,) are the original layer's affine parameters (absent when it had none);
    ``site_var`` holds population variances, as ``use_stats`` writes them. Only ``PerSiteModel``
    calls it (it binds the sites); alone it raises ``RuntimeError``.
    """

    def __init__(self, bn: _BatchNorm, site_mean: torch.Tensor, site_var: torch.Tensor, route: _SiteRoute,
                 name: str = "") -> None:
        super().__init__()
        self.num_features = int(bn.num_features)
        self.eps = float(bn.eps)
        self.layer_name = name
        self.weight = bn.weight
        self.bias = bn.bias
        self.register_buffer("site_mean", site_mean)
        self.register_buffer("site_var", site_var)
        self._route = route

    @property
    def num_sites(self) -> int:
        return int(self.site_mean.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self._route.current()
        if ids is None:
            raise RuntimeError(f"RoutedBN {self.layer_name!r} was called without sites; call the PerSiteModel, "
                               "routed(x, site=ids), not its inner model")
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"RoutedBN {self.layer_name!r} expects input (N, {self.num_features}, *), "
                             f"got shape {tuple(x.shape)}")
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"RoutedBN {self.layer_name!r}: {ids.shape[0]} site ids for a batch of {x.shape[0]} "
                             "samples; the model changed the batch size before this layer, which routing cannot follow")
        shape = (x.shape[0], self.num_features) + (1,) * (x.dim() - 2)
        mean = self.site_mean.index_select(0, ids)
        scale = torch.rsqrt(self.site_var.index_select(0, ids) + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        return x * scale.reshape(shape).to(x.dtype) + shift.reshape(shape).to(x.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A saved model may hold another number of sites: take the saved row count (channels are checked
        # by the default loader, which reports a mismatch).
        for key in ("site_mean", "site_var"):
            saved = state_dict.get(prefix + key)
            ours = self._buffers[key]
            if isinstance(saved, torch.Tensor) and saved.dim() == 2 and saved.shape[1] == ours.shape[1]:
                self._buffers[key] = ours.new_empty(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, sites={self.num_sites}, eps={self.eps}, affine={self.weight is not None}"


class _PlainBN(_BatchNorm):
    """A standard BN layer of any input rank (N, C, *), rebuilt from a ``RoutedBN`` for ``collect_stats``."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected input (N, C, *), got shape {tuple(x.shape)}")


class PerSiteModel(nn.Module):
    """A copy of a model whose BN layers normalize each sample with its own site's statistics.

    Build it with ``per_site_model``. Call ``routed(x, site=ids)``: ``ids`` a LongTensor (N,) of
    indices into ``routed.sites``, a list of N site names or indices, or one name/index for the whole
    batch. ``routed.model`` is the inner model (its BN layers are ``RoutedBN``). The state dict holds
    every ``RoutedBN``'s ``site_mean``/``site_var`` (S, C) and the site table (``_extra_state``), so
    ``torch.save(routed.state_dict())`` and ``PerSiteModel.from_state_dict(base_model, sd)`` round-trip.
    """

    def __init__(self, model: nn.Module, sites: Sequence[str], route: _SiteRoute) -> None:
        super().__init__()
        self.model = model
        self._sites = list(sites)
        self._route = route
        self.register_load_state_dict_post_hook(_check_site_rows)

    @property
    def sites(self) -> tuple[str, ...]:
        """Site names; ``sites[i]`` is the site of id ``i``."""
        return tuple(self._sites)

    def routed_layers(self) -> list[tuple[str, RoutedBN]]:
        """``(name, layer)`` of every ``RoutedBN`` in the inner model, in registration order."""
        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, RoutedBN)]

    def forward(self, x: Any, site: SiteArg) -> Any:
        """The inner model's output on ``x`` (N, ...), sample i normalized with site ``site[i]``."""
        ids = self.site_ids(site, _batch_size(x))
        with self._route.bound(ids):
            return self.model(x)

    def site_ids(self, site: SiteArg, n: int | None = None) -> torch.Tensor:
        """``site`` (ids as a LongTensor or integer array, names, or one of either) as a LongTensor (N,) of
        indices into ``sites`` on the model's device, validated.

        Names are mapped here, outside the traced computation; ``n``: the batch size to match.
        """
        if isinstance(site, np.ndarray) and site.dtype.kind in "iu":
            site = torch.as_tensor(site.astype(np.int64))
        if isinstance(site, torch.Tensor):
            ids = self._checked_tensor(site, n)
        elif isinstance(site, (str, numbers.Integral)) and not isinstance(site, bool):
            if n is None:
                raise ValueError("one site for the whole batch needs the batch size; pass one id per sample")
            ids = torch.full((n,), self._index(site), dtype=torch.long)
        elif isinstance(site, Sequence):
            ids = torch.tensor([self._index(s) for s in site], dtype=torch.long)
            if n is not None and len(ids) != n:
                raise ValueError(f"{len(ids)} sites for a batch of {n} samples; give one site per sample "
                                 "(or one site for the whole batch)")
        else:
            raise TypeError(f"site must be a LongTensor of site ids, a site name, or a list of them; "
                            f"got {type(site).__name__}")
        return ids.to(self._device())

    def _checked_tensor(self, site: torch.Tensor, n: int | None) -> torch.Tensor:
        if site.dtype != torch.long:
            raise TypeError(f"site ids must be a LongTensor (torch.int64), got dtype {site.dtype}; "
                            "use ids.long() or pass site names")
        if site.dim() != 1:
            raise ValueError(f"site ids must be 1-D (one per sample), got shape {tuple(site.shape)}")
        if n is not None and site.shape[0] != n:
            raise ValueError(f"{site.shape[0]} site ids for a batch of {n} samples; give one id per sample")
        if not _tracing() and site.numel():
            lo, hi = int(site.min()), int(site.max())
            if lo < 0 or hi >= len(self._sites):
                bad = lo if lo < 0 else hi
                raise ValueError(f"site id {bad} is out of range: this model has {len(self._sites)} sites "
                                 f"(ids 0..{len(self._sites) - 1}: {list(self._sites)})")
        return site

    def _index(self, site: str | int) -> int:
        if isinstance(site, str):
            if site not in self._sites:
                raise ValueError(f"unknown site {site!r}; this model's sites are {list(self._sites)} "
                                 "(add a new one with add_site(name, unlabeled_data))")
            return self._sites.index(site)
        if isinstance(site, bool) or not isinstance(site, numbers.Integral):
            raise TypeError(f"a site is a name (str) or an id (int), got {brief_repr(site)}")
        site = int(site)
        if not 0 <= site < len(self._sites):
            raise ValueError(f"site id {site} is out of range: this model has {len(self._sites)} sites "
                             f"(ids 0..{len(self._sites) - 1}: {list(self._sites)})")
        return site

    def _device(self) -> torch.device:
        layers = self.routed_layers()
        return layers[0][1].site_mean.device if layers else torch.device("cpu")

    def plain_model(self, site: str | int | None = None) -> nn.Module:
        """A deep copy of the inner model with standard BN layers in eval mode.

        ``site``: load that site's statistics into them (an ordinary single-site model, e.g. for export
        without a site input); ``None``: zero means and unit variances.
        """
        index = None if site is None else self._index(site)
        with model_lock(self):
            plain = copy.deepcopy(self.model)
        for routed in [m for m in plain.modules() if isinstance(m, RoutedBN)]:
            bn = _PlainBN(routed.num_features, eps=routed.eps, affine=routed.weight is not None)
            bn = bn.to(device=routed.site_mean.device, dtype=routed.site_mean.dtype)
            with torch.no_grad():
                if routed.weight is not None:
                    bn.weight, bn.bias = routed.weight, routed.bias
                if index is not None:
                    bn.running_mean.copy_(routed.site_mean[index])
                    bn.running_var.copy_(routed.site_var[index])
            _replace(plain, routed, bn)
        return plain.eval()

    def add_site(self, name: str, data: Any, **collect_kwargs: Any) -> BNStats:
        """Add site ``name`` with AdaBN statistics of its unlabeled ``data``; other sites are untouched.

        ``data``: anything ``collect_stats`` takes (all of it pooled into this one site);
        ``collect_kwargs``: its options (``batch_size``, ``num_samples``, ``mode="batch"`` or
        ``"sequential"``, ``seed``...). Statistics come from a plain copy of this model (the same
        weights), so they equal ``collect_stats(base_model, data, by_source=False)["pooled"]``.
        Returns those statistics.
        """
        self._check_new_name(name)
        if "by_source" in collect_kwargs:
            raise TypeError("add_site pools all of data into one site; drop by_source")
        if collect_kwargs.get("mode") == "eval":
            raise ValueError("mode='eval' measures a model with stored statistics, but a new site has none; "
                             "use mode='batch' (AdaBN, default) or 'sequential'")
        stats = collect_stats(self.plain_model(), data, by_source=False, **collect_kwargs)
        bn = next(iter(stats.values()))
        self.add_site_stats(name, bn)
        return bn

    def add_site_stats(self, name: str, stats: BNStats | PopulationStats) -> None:
        """Add site ``name`` with given statistics (every BN layer of the model needs an entry)."""
        self._check_new_name(name)
        rows = _site_rows(self.plain_model(), name, stats)
        with model_lock(self), torch.no_grad():
            for layer_name, layer in self.routed_layers():
                mean, var = rows[layer_name]
                layer.site_mean = torch.cat([layer.site_mean, mean[None]])
                layer.site_var = torch.cat([layer.site_var, var[None]])
            self._sites.append(name)

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"a site name must be a non-empty str, got {brief_repr(name)}")
        if name in self._sites:
            raise ValueError(f"site {name!r} already exists (sites: {list(self._sites)}); pick a new name")

    def get_extra_state(self) -> dict[str, list[str]]:
        return {"sites": list(self._sites)}

    def set_extra_state(self, state: Any) -> None:
        sites = state.get("sites") if isinstance(state, Mapping) else None
        if not isinstance(sites, (list, tuple)) or not all(isinstance(s, str) for s in sites) or not sites:
            raise ValueError(f"the state dict's site table must be {{'sites': [names]}}, got {brief_repr(state)}")
        self._sites = list(sites)

    @classmethod
    def from_state_dict(cls, model: nn.Module, state_dict: Mapping[str, Any]) -> PerSiteModel:
        """Rebuild a saved ``PerSiteModel`` from its base ``model`` (same architecture; not modified)
        and ``state_dict`` (``routed.state_dict()``, e.g. after ``torch.save``/``torch.load``)."""
        extra = state_dict.get("_extra_state") if isinstance(state_dict, Mapping) else None
        if not isinstance(extra, Mapping) or "sites" not in extra:
            raise ValueError("the state dict has no site table ('_extra_state'); save routed.state_dict() of a "
                             "PerSiteModel, not of its inner model")
        routed = _build(model, list(extra["sites"]), None)
        routed.load_state_dict(state_dict)
        return routed.eval()


def per_site_model(model: nn.Module, site_stats: Mapping[str, BNStats | PopulationStats], *,
                   unused: str = "refuse") -> PerSiteModel:
    """A copy of ``model`` whose every BN layer normalizes each sample with its own site's statistics.

    Why: one model serves several sites (hospitals, scanners), each with its statistics (DSBN-style
    per-site BN, paper Section 5), and a mixed-site batch is routed sample by sample.
    ``site_stats``: site name -> statistics of every BN layer (``collect_stats(model, ds)`` gives a
    ``SourceStats``; ``BNStats`` or ``PopulationStats`` per site). ``model`` is never modified (deep
    copy). Returns a ``PerSiteModel`` in eval mode: ``routed(x, site=ids)`` equals evaluating
    each sample under ``use_stats(model, site_stats[its site])``.
    ``unused``: what to do with BN layers the statistics lack because no forward calls them (timm's
    SplitBN ``aux_bn``, a branch only used in training): ``"refuse"`` (default, ValueError naming them)
    or ``"keep"`` (every site gets those layers' own running statistics).
    """
    if unused not in ("refuse", "keep"):
        raise ValueError(f"unused must be 'refuse' or 'keep' (keep the running statistics of BN layers the "
                         f"statistics lack), got {unused!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(site_stats, Mapping) or not site_stats:
        raise ValueError(f"site_stats must be a non-empty mapping site name -> BNStats (e.g. collect_stats(model, "
                         f"ds)), got {brief_repr(site_stats)}")
    names = [str(k) for k in site_stats]
    if len(set(names)) != len(names):
        raise ValueError(f"site names collide once written as strings: {names}")
    with model_lock(model):
        layers = bn_layers(model)
        check_materialized(layers)
        per_site = [_site_rows(model, name, site_stats[key], unused)
                    for name, key in zip(names, site_stats, strict=True)]
    tables = {layer.name: (torch.stack([rows[layer.name][0] for rows in per_site]),
                           torch.stack([rows[layer.name][1] for rows in per_site])) for layer in layers}
    return _build(model, names, tables)


def _site_rows(model: nn.Module, site: str, stats: Any,
               unused: str = "refuse") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Validated (mean, var) tensors per BN layer of ``model`` for one site (buffer dtype and device);
    layers the statistics lack keep their running statistics when ``unused == "keep"``."""
    if not isinstance(stats, (BNStats, PopulationStats)):
        raise TypeError(f"site {site!r}: statistics must be BNStats or PopulationStats, got {type(stats).__name__}")
    layers = bn_layers(model)
    lacking = [layer.name for layer in layers if layer.name not in stats.layers]
    if lacking and len(lacking) < len(layers) and unused == "refuse":
        raise ValueError(f"site {site!r}: statistics lack BN layer(s) {lacking}. If they were collected on this "
                         "model, no forward called these layers (e.g. timm's SplitBN aux_bn, used only in "
                         "training); pass unused='keep' to give every site their running statistics")
    no_buffers = [layer.name for layer in layers
                  if layer.name in lacking and layer.module.running_mean is None and len(lacking) < len(layers)]
    if no_buffers:
        raise ValueError(f"site {site!r}: statistics lack BN layer(s) {no_buffers}, which keep no running "
                         "statistics (track_running_stats=False) to fall back on; collect statistics that hold them")
    try:
        plan = prepare_writes(layers, stats, strict=False)
    except ValueError as e:
        raise ValueError(f"site {site!r}: {e}") from None
    by_module = {id(m): (mean, var) for m, mean, var in plan}
    for layer in layers:
        if id(layer.module) not in by_module:
            m = layer.module
            by_module[id(m)] = (m.running_mean.detach().clone(), m.running_var.detach().clone())
    return {layer.name: by_module[id(layer.module)] for layer in layers}


def _build(model: nn.Module, sites: list[str], tables: dict | None) -> PerSiteModel:
    """Deep-copy ``model`` and swap each BN layer for a ``RoutedBN`` (zero tables when ``tables`` is None)."""
    if not sites or len(set(sites)) != len(sites) or not all(isinstance(s, str) and s for s in sites):
        raise ValueError(f"sites must be distinct non-empty names, got {sites!r}")
    with model_lock(model):
        inner = copy.deepcopy(model)
    route = _SiteRoute()
    for layer in bn_layers(inner):
        bn = layer.module
        ref = bn.running_mean if bn.running_mean is not None else bn.weight
        dtype = ref.dtype if ref is not None else torch.float32
        device = ref.device if ref is not None else torch.device("cpu")
        if tables is None:
            mean = torch.zeros(len(sites), bn.num_features, dtype=dtype, device=device)
            var = torch.ones(len(sites), bn.num_features, dtype=dtype, device=device)
        else:
            mean, var = tables[layer.name]
        _replace(inner, bn, RoutedBN(bn, mean, var, route, layer.name))
    return PerSiteModel(inner, sites, route).eval()


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered under ``root`` (a shared module at every place)."""
    for parent in root.modules():
        for key, child in list(parent._modules.items()):
            if child is old:
                parent._modules[key] = new


def _check_site_rows(module: PerSiteModel, incompatible) -> None:
    n = len(module._sites)
    for name, layer in module.routed_layers():
        if layer.num_sites != n:
            raise ValueError(f"layer {name!r} holds statistics of {layer.num_sites} sites but the site table names "
                             f"{n} ({list(module._sites)}); the state dict is inconsistent")


def _batch_size(x: Any) -> int | None:
    """The batch size of a tensor input (kept symbolic under ``torch.export``: ``int()`` would fix it)."""
    return x.shape[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else None


def _tracing() -> bool:
    """Whether a tracer runs the forward (data-dependent checks would break the trace)."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(torch.jit.is_tracing() or torch.compiler.is_compiling() or (exporting and exporting()))
