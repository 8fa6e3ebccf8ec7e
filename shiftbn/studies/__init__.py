"""Studies: the paper's protocols, training, small models, run folders, the runner, the report and the demo.

The wing for a researcher reproducing or extending the paper. Each study is one shape (``Study``:
a training config, a grid axis, a cell function, a figure), a dataclass registered under its
``name``. One way to run one: build it (``HeldOutSources(train=TrainConfig(...), held_out=[...])``,
or ``make_study(name, flat_params)``) and call ``.run(ds)``; ``run_spec`` does that from a TOML
spec and ``run_study`` into a resumable run folder.
"""

from shiftbn.studies.base import STUDIES, FigureSpec, Study, TrainConfig, make_study
from shiftbn.studies.composition import BatchComposition
from shiftbn.studies.domains import SharedDomains
from shiftbn.studies.drift import DriftDetection, drift_summary
from shiftbn.studies.heldout import HeldOutSources
from shiftbn.studies.leakage import BagLeakage, LeakageProbe
from shiftbn.studies.population import EmaVsPrecise, NormalizationBatchSize
from shiftbn.studies.runner import run_study
from shiftbn.studies.runs import RunFolder
from shiftbn.studies.segheldout import SegHeldOutSites
from shiftbn.studies.spec import StudySpec, load_spec, parse_spec, run_spec
from shiftbn.studies.strategy_choice import StrategyChoice, choice_picks, choice_summary
from shiftbn.studies.training import train

__all__ = [
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
    "SegHeldOutSites",
    "SharedDomains",
    "StrategyChoice",
    "Study",
    "StudySpec",
    "TrainConfig",
    "choice_picks",
    "choice_summary",
    "drift_summary",
    "load_spec",
    "make_study",
    "parse_spec",
    "run_spec",
    "run_study",
    "train",
]
