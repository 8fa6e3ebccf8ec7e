"""The BN statistics engine: discovery, exact moments, collection, state swapping, PreciseBN, shift."""

from shiftbn.bn.collect import COLLECT_MODES, CollectMode, CollectOptions, collect_stats
from shiftbn.bn.distributed import PeerLostError, all_merge, solo, world_and_rank
from shiftbn.bn.hooks import BNInputHooks, observe_bn_inputs
from shiftbn.bn.layers import BNLayer, bn_layers, device_of
from shiftbn.bn.lock import model_lock
from shiftbn.bn.moments import POOLED, BNStats, Moments, SourceStats, batch_moments
from shiftbn.bn.population import Population, PopulationStats, mix_stats
from shiftbn.bn.precise import precise_bn
from shiftbn.bn.shift import stats_shift
from shiftbn.bn.sites import site_key, split_site
from shiftbn.bn.state import FrozenBN, ModelSnapshot, buffer_stats, freeze_bn, load_stats, preserved, use_stats

__all__ = [
    "COLLECT_MODES",
    "POOLED",
    "BNInputHooks",
    "BNLayer",
    "BNStats",
    "CollectMode",
    "CollectOptions",
    "FrozenBN",
    "ModelSnapshot",
    "Moments",
    "PeerLostError",
    "Population",
    "PopulationStats",
    "SourceStats",
    "all_merge",
    "batch_moments",
    "bn_layers",
    "buffer_stats",
    "collect_stats",
    "device_of",
    "freeze_bn",
    "load_stats",
    "mix_stats",
    "model_lock",
    "observe_bn_inputs",
    "precise_bn",
    "preserved",
    "site_key",
    "solo",
    "split_site",
    "stats_shift",
    "use_stats",
    "world_and_rank",
]
