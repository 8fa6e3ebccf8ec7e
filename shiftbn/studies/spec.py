"""Study specs: a TOML file naming a dataset, a study and its parameters, with a ``quick`` setting."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from shiftbn.data.builtin import load
from shiftbn.data.tagged import SourceTaggedDataset
from shiftbn.studies.base import STUDIES, Study, make_study

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_STUDY_KEYS = {"protocol", "dataset", "sources", "name", "description"}


@dataclass
class StudySpec:
    """A parsed study: ``protocol`` name, ``dataset`` (name or table of builder arguments),
    optional ``sources`` subset, ``params`` for the study and ``quick`` overrides."""

    protocol: str
    dataset: str | dict
    params: dict = field(default_factory=dict)
    quick: dict = field(default_factory=dict)
    sources: list[str] | None = None
    name: str = "study"
    description: str = ""

    def resolved(self, quick: bool = False) -> dict[str, Any]:
        """The flat parameters the study receives (``quick`` overrides applied)."""
        return {**self.params, **(self.quick if quick else {})}

    def build(self, quick: bool = False) -> Study:
        """The validated ``Study`` object."""
        return make_study(self.protocol, self.resolved(quick), where="quick" if quick else "params")

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
    bad_keys = set(study) - _STUDY_KEYS
    if bad_keys:
        raise ValueError(f"[study] has unknown key(s) {sorted(bad_keys)}; accepted: {sorted(_STUDY_KEYS)}")
    protocol = study.get("protocol")
    if protocol not in STUDIES:
        raise ValueError(f"study.protocol must be one of {sorted(STUDIES)}, got {protocol!r}")
    if "dataset" not in study:
        raise ValueError("study.dataset is missing (e.g. dataset = \"digits-labs\")")
    dataset = study["dataset"]
    if not (isinstance(dataset, str) or (isinstance(dataset, Mapping) and isinstance(dataset.get("name"), str))):
        raise ValueError(f"study.dataset must be a name or a table with a name, got {dataset!r}")
    sources = study.get("sources")
    if sources is not None and (not isinstance(sources, list) or not sources
                                or not all(isinstance(s, str) for s in sources)):
        raise ValueError(f"study.sources must be a non-empty list of source names, got {sources!r}")
    for table in ("params", "quick"):
        if not isinstance(data.get(table, {}), Mapping):
            raise ValueError(f"[{table}] must be a table of parameters")
    spec = StudySpec(protocol=protocol, dataset=dataset if isinstance(dataset, str) else dict(dataset),
                     params=dict(data.get("params", {})), quick=dict(data.get("quick", {})), sources=sources,
                     name=str(study.get("name", name)), description=str(study.get("description", "")))
    spec.build(quick=False)
    spec.build(quick=True)
    return spec


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a TOML study spec."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"study spec not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None
    return parse_spec(data, name=path.stem)


def run_spec(spec: StudySpec | str | Path, quick: bool = False, progress: bool = True) -> pd.DataFrame:
    """Run a study and return its tidy results."""
    if not isinstance(spec, StudySpec):
        spec = load_spec(spec)
    return spec.build(quick).run(spec.load_dataset(), progress)
