"""Studies: the paper's protocols, training, small models, run folders, the runner, the report and the demo.

The wing for a researcher reproducing or extending the paper. Each study is one shape (``Study``:
a training config, a grid axis, a cell function, a figure), a dataclass registered under its
``name``; ``run_spec`` runs one from a TOML spec and ``run_study`` into a resumable run folder.
"""

from shiftbn.studies.base import STUDIES, FigureSpec, Study, TrainConfig, make_study
from shiftbn.studies.composition import BatchComposition, batch_composition
from shiftbn.studies.domains import SharedDomains, shared_domains
from shiftbn.studies.drift import DriftDetection, drift_detection, drift_summary
from shiftbn.studies.heldout import HeldOutSources, held_out_sources
from shiftbn.studies.leakage import BagLeakage, LeakageProbe, bag_leakage, leakage_probe
from shiftbn.studies.population import EmaVsPrecise, NormalizationBatchSize, ema_vs_precise, normalization_batch_size
from shiftbn.studies.runner import run_study
from shiftbn.studies.runs import RunFolder
from shiftbn.studies.spec import PROTOCOLS, StudySpec, load_spec, parse_spec, run_spec
from shiftbn.studies.strategy_choice import StrategyChoice, choice_summary, strategy_choice
from shiftbn.studies.training import train

__all__ = [
    "PROTOCOLS",
    "RunFolder",
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
    "run_study",
    "shared_domains",
    "strategy_choice",
    "train",
]
