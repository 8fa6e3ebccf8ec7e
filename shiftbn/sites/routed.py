"""``per_site_model``: one deployable model that normalizes each sample with its own site's BN statistics.

Why: a model trained on several hospitals serves each with that hospital's statistics (per-site BN,
paper Section 5; pytorch#48929). How the site reaches BN layers inside a model whose ``forward``
takes only ``x``: ``PerSiteModel.forward(x, site)`` binds the batch's site ids (N,) in a per-thread
route shared with every ``RoutedBN`` of the copy, calls the inner model, and unbinds in ``finally``.
The route is plain Python state read while the forward runs, so eager calls from several threads
do not see each other's ids, and ``torch.export.export`` (non-strict, the default) records the
ids as a graph input feeding every BN layer's ``index_select`` (a dynamic batch dimension works).
TorchScript scripting and ``export(strict=True)`` are not supported (they do not run the Python
that binds the route). A BN subclass that overrides ``forward`` (timm's ``BatchNormAct2d``: BN, drop,
act) is kept with its forward (``RoutedForwardBN``): only its ``F.batch_norm`` call on its own running
statistics is routed; a forward without that call is refused by class name.
"""

from __future__ import annotations

import copy
import inspect
import numbers
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from shiftbn.bn.collect import collect_stats
from shiftbn.bn.layers import TORCH_BN_FORWARDS, bn_layers, check_materialized
from shiftbn.bn.lock import model_lock
from shiftbn.bn.moments import BNStats, brief_repr
from shiftbn.bn.population import PopulationStats
from shiftbn.bn.state import apply_writes, prepare_writes

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
        self.register_buffer("site_mean", site_mean)
        self.register_buffer("site_var", site_var)
        self._route = route
        self._keep(bn)

    def _keep(self, bn: _BatchNorm) -> None:
        """Keep what normalization needs of the original layer: its affine parameters."""
        self.weight = bn.weight
        self.bias = bn.bias

    @property
    def num_sites(self) -> int:
        return int(self.site_mean.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self._ids()
        return self._normalize(x, ids, self.weight, self.bias, self.eps)

    def _ids(self) -> torch.Tensor:
        ids = self._route.current()
        if ids is None:
            raise RuntimeError(f"RoutedBN {self.layer_name!r} was called without sites; call the PerSiteModel, "
                               "routed(x, site=ids), not its inner model")
        return ids

    def _normalize(self, x: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float) -> torch.Tensor:
        """``x`` (N, C, *) normalized per sample with rows ``ids`` (N,) of the site tables, then ``weight``/``bias``."""
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"RoutedBN {self.layer_name!r} expects input (N, {self.num_features}, *), "
                             f"got shape {tuple(x.shape)}")
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"RoutedBN {self.layer_name!r}: {ids.shape[0]} site ids for a batch of {x.shape[0]} "
                             "samples; the model changed the batch size before this layer, which routing cannot follow")
        shape = (x.shape[0], self.num_features) + (1,) * (x.dim() - 2)
        mean = self.site_mean.index_select(0, ids)
        scale = torch.rsqrt(self.site_var.index_select(0, ids) + eps)
        if weight is not None:
            scale = scale * weight
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias
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


class RoutedForwardBN(RoutedBN):
    """A routed BN subclass with its own ``forward`` (timm's ``BatchNormAct2d``: BN, then drop and act).

    The original module ``bn`` runs its own forward (its affine, activation, dropout, hooks); only its
    ``F.batch_norm`` call on its own running statistics is replaced by the per-sample routed
    normalization (with the weight, bias and eps that call passes). A forward that makes no such call
    cannot be routed: it is refused by class name.
    """

    def _keep(self, bn: _BatchNorm) -> None:
        self.bn = bn

    def extra_repr(self) -> str:
        return f"{self.num_features}, sites={self.num_sites}, own forward of {type(self.bn).__name__}"

    def forward(self, x: Any) -> Any:
        route = _RouteBatchNorm(self, self._ids())
        with route:
            out = self.bn(x)
        if not route.calls:
            raise TypeError(self.refusal())
        return out

    def refusal(self) -> str:
        cls = type(self.bn)
        return (f"BN layer {self.layer_name!r} ({cls.__module__}.{cls.__qualname__}) overrides forward without "
                "calling torch.nn.functional.batch_norm on its own running_mean/running_var, so per_site_model "
                "cannot give each sample its site's statistics there; normalize with F.batch_norm(x, "
                "self.running_mean, self.running_var, ...) in that forward, or evaluate one site at a time "
                "with use_stats(model, stats[site])")

    def check_routable(self) -> None:
        """Refuse now a forward that makes no routable ``F.batch_norm`` call on a probe input (all zeros).

        A probe the forward rejects (an input shape it does not take) decides nothing: the first routed
        forward checks again.
        """
        ref = self.site_mean
        x = None
        for shape in ((2, self.num_features, 2, 2), (2, self.num_features), (2, self.num_features, 2),
                      (2, self.num_features, 2, 2, 2)):
            try:
                self.bn._check_input_dim(torch.empty(shape, device="meta"))
            except (ValueError, RuntimeError):
                continue
            x = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
            break
        if x is None:
            return
        route = _RouteBatchNorm(self, torch.zeros(2, dtype=torch.long, device=ref.device))
        try:
            with torch.no_grad(), route:
                type(self.bn).forward(self.bn, x)
        except Exception:  # noqa: BLE001 - the probe does not suit this forward; routing checks every call
            return
        if not route.calls:
            raise TypeError(self.refusal())


_BATCH_NORM_ARGS = inspect.signature(F.batch_norm)


class _RouteBatchNorm(TorchFunctionMode):
    """While a ``RoutedForwardBN``'s module runs: its ``F.batch_norm`` calls on its own running statistics
    normalize per sample with the site rows ``ids`` (N,); every other call runs as it is.

    A torch function mode is per thread, and ``torch.export`` (non-strict) records what it computes.
    """

    def __init__(self, layer: RoutedForwardBN, ids: torch.Tensor) -> None:
        super().__init__()
        self.layer, self.ids, self.calls = layer, ids, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            call = _BATCH_NORM_ARGS.bind(*args, **kwargs)
            call.apply_defaults()
            a = call.arguments
            bn = self.layer.bn
            if a["running_mean"] is bn.running_mean and a["running_var"] is bn.running_var:
                self.calls += 1
                return self.layer._normalize(a["input"], self.ids, a["weight"], a["bias"], float(a["eps"]))
        return func(*args, **kwargs)


def _own_forward(bn: _BatchNorm) -> bool:
    """Whether ``bn``'s class overrides torch's BN forward (then it is kept and routed inside)."""
    return type(bn).forward not in TORCH_BN_FORWARDS


class _PlainBN(_BatchNorm):
    """A standard BN layer of any input rank (N, C, *), rebuilt from a ``RoutedBN`` for ``collect_stats``."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected input (N, C, *), got shape {tuple(x.shape)}")


class PerSiteModel(nn.Module):
    """A copy of a model whose BN layers normalize each sample with its own site's statistics.

    Build it with ``per_site_model``. Call ``routed(x, site=ids)``: ``ids`` a LongTensor (N,) of
    indices into ``routed.sites``, a list of N site names or indices, or one name/index for the whole
    batch. ``routed.model`` is the inner model (its BN layers are ``RoutedBN``; a BN subclass with its own
    ``forward`` is a ``RoutedForwardBN`` holding the original module as ``.bn``). The state dict holds
    every ``RoutedBN``'s ``site_mean``/``site_var`` (S, C) and the site table (``_extra_state``), so
    ``torch.save(routed.state_dict())`` and ``PerSiteModel.from_state_dict(base_model, sd)`` round-trip.
    """

    def __init__(self, model: nn.Module, sites: Sequence[str], route: _SiteRoute) -> None:
        super().__init__()
        self.model = model
        self._sites = list(sites)
        self._route = route
        self.register_load_state_dict_pre_hook(_check_saved_rows)
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
        """A deep copy of the inner model with standard BN layers in eval mode (a BN subclass with its
        own ``forward`` is the original module again, with that forward).

        ``site``: load that site's statistics into them (an ordinary single-site model, e.g. for export
        without a site input); ``None``: zero means and unit variances.
        """
        index = None if site is None else self._index(site)
        with model_lock(self):
            plain = copy.deepcopy(self.model)
        for routed in [m for m in plain.modules() if isinstance(m, RoutedBN)]:
            mean = routed.site_mean[index] if index is not None else torch.zeros_like(routed.site_mean[0])
            var = routed.site_var[index] if index is not None else torch.ones_like(routed.site_var[0])
            if isinstance(routed, RoutedForwardBN):  # the user's own module, with its forward
                apply_writes([(routed.bn, mean, var)])
                _replace(plain, routed, routed.bn)
                continue
            bn = _PlainBN(routed.num_features, eps=routed.eps, affine=routed.weight is not None)
            bn = bn.to(device=routed.site_mean.device, dtype=routed.site_mean.dtype)
            with torch.no_grad():
                if routed.weight is not None:
                    bn.weight, bn.bias = routed.weight, routed.bias
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
            _replace(plain, routed, bn)
        return plain.eval()

    def add_site(self, name: str, data: Any, **collect_kwargs: Any) -> BNStats:
        """Add site ``name`` with AdaBN statistics of its unlabeled ``data``; other sites are untouched.

        ``data``: anything ``collect_stats`` takes (all of it pooled into this one site);
        ``collect_kwargs``: its options (``batch_size``, ``num_samples``, ``mode="batch"`` or
        ``"sequential"``, ``seed``, ``forward=`` the user's ``forward(model, x)``...). Statistics come
        from a plain copy of this model (the same weights), so they equal
        ``collect_stats(base_model, data, by_source=False)["pooled"]``.
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
        _check_fits(routed, state_dict)
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
        if _own_forward(bn):
            routed = RoutedForwardBN(bn, mean, var, route, layer.name)
            routed.eval().check_routable()
        else:
            routed = RoutedBN(bn, mean, var, route, layer.name)
        _replace(inner, bn, routed)
    return PerSiteModel(inner, sites, route).eval()


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered under ``root`` (a shared module at every place)."""
    for parent in root.modules():
        for key, child in list(parent._modules.items()):
            if child is old and parent is not new:  # a RoutedForwardBN keeps the module it routes
                parent._modules[key] = new


def _check_fits(routed: PerSiteModel, state_dict: Mapping[str, Any]) -> None:
    """Refuse a state dict saved from another architecture, naming the keys and shapes that differ."""
    ours = routed.state_dict()
    missing = [k for k in ours if k not in state_dict]
    unexpected = [k for k in state_dict if k not in ours]
    shapes = []
    for key, want in ours.items():
        got = state_dict.get(key)
        if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor):
            continue
        tables = key.endswith((".site_mean", ".site_var")) and got.dim() == 2 and want.dim() == 2
        if (got.shape[1:] != want.shape[1:]) if tables else (got.shape != want.shape):
            shapes.append(f"{key}: saved {tuple(got.shape)}, model {tuple(want.shape)}")
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what}: {v[:5]}{' ...' if len(v) > 5 else ''}"
                 for what, v in (("missing key(s)", missing), ("unexpected key(s)", unexpected),
                                 ("shape mismatch(es)", shapes)) if v]
        raise ValueError(f"the state dict does not fit {type(routed.model).__name__} routed per site ("
                         + "; ".join(parts) + "); pass the base model the PerSiteModel was built from")


def _check_site_rows(module: PerSiteModel, incompatible) -> None:
    n = len(module._sites)
    for name, layer in module.routed_layers():
        if layer.num_sites != n:
            raise ValueError(f"layer {name!r} holds statistics of {layer.num_sites} sites but the site table names "
                             f"{n} ({list(module._sites)}); the state dict is inconsistent")


def _check_saved_rows(module: PerSiteModel, state_dict, prefix: str, *args) -> None:
    """Refuse, before anything is loaded, site tables holding NaN/Inf or a negative variance."""
    extra = state_dict.get(prefix + "_extra_state")
    sites = extra.get("sites") if isinstance(extra, Mapping) else None
    sites = list(sites) if isinstance(sites, (list, tuple)) else module._sites
    for name, _ in module.routed_layers():
        mean = state_dict.get(f"{prefix}model.{name}.site_mean")
        var = state_dict.get(f"{prefix}model.{name}.site_var")
        if not (isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor) and mean.dim() == var.dim() == 2
                and mean.shape == var.shape and not mean.is_meta and not var.is_meta):
            continue  # the loader reports missing keys and shapes
        bad = (~torch.isfinite(mean).all(1)) | (~torch.isfinite(var).all(1)) | (var < 0).any(1)
        if bool(bad.any()):
            rows = [sites[i] if i < len(sites) else f"row {i}" for i in torch.nonzero(bad).flatten().tolist()]
            raise ValueError(f"layer {name!r} holds NaN/Inf statistics or a negative variance for site(s) {rows}; "
                             "the state dict is corrupt: rebuild it from valid statistics (per_site_model)")


def _batch_size(x: Any) -> int | None:
    """The batch size of a tensor input (kept symbolic under ``torch.export``: ``int()`` would fix it)."""
    return x.shape[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else None


def _tracing() -> bool:
    """Whether a tracer runs the forward (data-dependent checks would break the trace)."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(torch.jit.is_tracing() or torch.compiler.is_compiling() or (exporting and exporting()))
