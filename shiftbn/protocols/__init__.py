"""The studies: each protocol returns a tidy DataFrame; ``run_spec`` runs one from a TOML spec."""

from shiftbn.protocols.composition import batch_composition
from shiftbn.protocols.domains import shared_domains
from shiftbn.protocols.heldout import held_out_sources
from shiftbn.protocols.leakage import leakage_probe
from shiftbn.protocols.population import ema_vs_precise, normalization_batch_size
from shiftbn.protocols.runner import SPLIT_KEYS, run_study
from shiftbn.protocols.spec import PROTOCOLS, StudySpec, load_spec, parse_spec, run_spec

__all__ = [
    "PROTOCOLS",
    "SPLIT_KEYS",
    "StudySpec",
    "batch_composition",
    "ema_vs_precise",
    "held_out_sources",
    "leakage_probe",
    "load_spec",
    "normalization_batch_size",
    "parse_spec",
    "run_spec",
    "run_study",
    "shared_domains",
]
