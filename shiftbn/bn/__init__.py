"""The BN statistics engine: discovery, exact moments, collection, state swapping, PreciseBN, shift."""

from shiftbn.bn.collect import COLLECT_MODES, CollectMode, collect_stats
from shiftbn.bn.distributed import PeerLostError, all_merge, solo, world_and_rank
from shiftbn.bn.files import StatsHeader, merge_stats, read_stats, read_stats_header, save_stats
from shiftbn.bn.fingerprint import model_fingerprint
from shiftbn.bn.layers import BNLayer, bn_layers, device_of
from shiftbn.bn.lock import model_lock
from shiftbn.bn.moments import POOLED, BNStats, Moments, SourceStats, batch_moments
from shiftbn.bn.population import Population, PopulationStats, mix_stats
from shiftbn.bn.precise import precise_bn
from shiftbn.bn.routed import PerSiteModel, RoutedBN, per_site_model
from shiftbn.bn.shift import stats_shift
from shiftbn.bn.sites import site_key, split_site
from shiftbn.bn.state import FrozenBN, ModelSnapshot, buffer_stats, freeze_bn, load_stats, preserved, use_stats

__all__ = [
    "COLLECT_MODES",
    "POOLED",
    "BNLayer",
    "BNStats",
    "CollectMode",
    "FrozenBN",
    "ModelSnapshot",
    "Moments",
    "PeerLostError",
    "PerSiteModel",
    "Population",
    "PopulationStats",
    "RoutedBN",
    "SourceStats",
    "StatsHeader",
    "all_merge",
    "batch_moments",
    "bn_layers",
    "buffer_stats",
    "collect_stats",
    "device_of",
    "freeze_bn",
    "load_stats",
    "merge_stats",
    "mix_stats",
    "model_fingerprint",
    "model_lock",
    "per_site_model",
    "precise_bn",
    "preserved",
    "read_stats",
    "read_stats_header",
    "save_stats",
    "site_key",
    "solo",
    "split_site",
    "stats_shift",
    "use_stats",
    "world_and_rank",
]
