"""The studies, one shape each (``Study``: a training config, a grid axis, a cell function, a figure).

Each study is a dataclass registered under its ``name``; the function forms (``held_out_sources``
...) take flat parameters; ``run_spec`` runs one from a TOML spec.
"""

from shiftbn.protocols.base import STUDIES, FigureSpec, Study, TrainConfig, make_study
from shiftbn.protocols.composition import BatchComposition, batch_composition
from shiftbn.protocols.domains import SharedDomains, shared_domains
from shiftbn.protocols.drift import DriftDetection, drift_detection, drift_summary
from shiftbn.protocols.heldout import HeldOutSources, held_out_sources
from shiftbn.protocols.leakage import BagLeakage, LeakageProbe, bag_leakage, leakage_probe
from shiftbn.protocols.population import EmaVsPrecise, NormalizationBatchSize, ema_vs_precise, normalization_batch_size
from shiftbn.protocols.spec import PROTOCOLS, StudySpec, load_spec, parse_spec, run_spec
from shiftbn.protocols.strategy_choice import StrategyChoice, choice_summary, strategy_choice

__all__ = [
    "PROTOCOLS",
    "STUDIES",
    "BagLeakage",
    "BatchComposition",
    "DriftDetection",
    "EmaVsPrecise",
    "FigureSpec",
    "HeldOutSources",
    "LeakageProbe",
    "NormalizationBatchSize",
    "SharedDomains",
    "StrategyChoice",
    "Study",
    "StudySpec",
    "TrainConfig",
    "bag_leakage",
    "batch_composition",
    "choice_summary",
    "drift_detection",
    "drift_summary",
    "ema_vs_precise",
    "held_out_sources",
    "leakage_probe",
    "load_spec",
    "make_study",
    "normalization_batch_size",
    "parse_spec",
    "run_spec",
    "shared_domains",
    "strategy_choice",
]
