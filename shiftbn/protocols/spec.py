"""Study specs: a TOML file naming a dataset, a protocol and its parameters, with a ``quick`` setting."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from shiftbn.data.builtin import load
from shiftbn.data.tagged import SourceTaggedDataset
from shiftbn.protocols.composition import batch_composition
from shiftbn.protocols.domains import shared_domains
from shiftbn.protocols.heldout import held_out_sources
from shiftbn.protocols.leakage import leakage_probe
from shiftbn.protocols.population import ema_vs_precise, normalization_batch_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROTOCOLS = {
    "held_out_sources": held_out_sources,
    "batch_composition": batch_composition,
    "ema_vs_precise": ema_vs_precise,
    "normalization_batch_size": normalization_batch_size,
    "shared_domains": shared_domains,
    "leakage_probe": leakage_probe,
}


@dataclass
class StudySpec:
    """A parsed study: ``protocol`` name, ``dataset`` (name or table of builder arguments),
    optional ``sources`` subset, ``params`` for the protocol and ``quick`` overrides."""

    protocol: str
    dataset: str | dict
    params: dict = field(default_factory=dict)
    quick: dict = field(default_factory=dict)
    sources: list[str] | None = None
    name: str = "study"
    description: str = ""

    def resolved(self, quick: bool = False) -> dict[str, Any]:
        """The parameters the protocol will receive (``quick`` overrides applied)."""
        return {**self.params, **(self.quick if quick else {})}

    def load_dataset(self) -> SourceTaggedDataset:
        spec = {"name": self.dataset} if isinstance(self.dataset, str) else dict(self.dataset)
        ds = load(spec.pop("name"), **spec)
        return ds.subset(self.sources) if self.sources else ds


def parse_spec(data: Mapping[str, Any], name: str = "study") -> StudySpec:
    """Validate a spec mapping (the TOML's content); errors name the key to change."""
    study = data.get("study")
    if not isinstance(study, Mapping):
        raise ValueError("a study spec needs a [study] table with protocol and dataset")
    unknown = set(data) - {"study", "params", "quick"}
    if unknown:
        raise ValueError(f"unknown table(s) {sorted(unknown)} in the spec; use [study], [params], [quick]")
    protocol = study.get("protocol")
    if protocol not in PROTOCOLS:
        raise ValueError(f"study.protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
    if "dataset" not in study:
        raise ValueError("study.dataset is missing (e.g. dataset = \"digits-labs\")")
    accepted = set(inspect.signature(PROTOCOLS[protocol]).parameters) - {"ds", "progress"}
    for table in ("params", "quick"):
        bad = set(data.get(table, {})) - accepted
        if bad:
            raise ValueError(f"[{table}] has unknown parameter(s) {sorted(bad)} for {protocol}; "
                             f"accepted: {sorted(accepted)}")
    return StudySpec(protocol=protocol, dataset=study["dataset"], params=dict(data.get("params", {})),
                     quick=dict(data.get("quick", {})), sources=study.get("sources"),
                     name=study.get("name", name), description=study.get("description", ""))


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a TOML study spec."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"study spec not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None
    return parse_spec(data, name=path.stem)


def run_spec(spec: StudySpec | str | Path, quick: bool = False, progress: bool = True) -> pd.DataFrame:
    """Run a study and return its tidy results (each protocol's DataFrame)."""
    if not isinstance(spec, StudySpec):
        spec = load_spec(spec)
    return PROTOCOLS[spec.protocol](spec.load_dataset(), progress=progress, **spec.resolved(quick))
