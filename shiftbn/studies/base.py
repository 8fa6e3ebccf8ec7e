"""One shape for every study: a training config, a grid axis, a cell function, a figure.

Why: a study is a grid of cells (one seed x one value of its axis); the runner runs cells one at a
time so that an interrupted run resumes exactly, and needs nothing but this shape. A new study is
one subclass of ``Study`` with a ``name`` (it registers itself), an ``axis``, a ``cell`` and a
``figure``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import pandas as pd
from tqdm.auto import tqdm

from shiftbn._log import bars_wanted
from shiftbn.data.tagged import SourceTaggedDataset

ModelSpec = str | dict | Callable[[int], Any]


@dataclass(frozen=True)
class TrainConfig:
    """How a study trains each model: ``model`` (a name, ``{"name": ..., **kwargs}`` or
    ``factory(seed)``), SGD ``steps``, ``batch_size``, learning rate ``lr``, and the per-source
    train / calibration / test ``fractions`` of every split."""

    model: ModelSpec = "SmallCNN"
    steps: int = 300
    batch_size: int = 32
    lr: float = 0.05
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))


@dataclass(frozen=True)
class FigureSpec:
    """How a study's table is drawn: bars or lines of ``value`` over ``x``, coloured by ``hue``,
    one panel per ``col``; ``where`` keeps rows whose column equals the value (``metric`` is
    always filtered to the first metric). ``{source}`` in ``title`` and ``xlabel`` becomes the
    data's word for a source (``"lab"``, ``"collection"``, ``"hospital"``)."""

    kind: Literal["bars", "lines"]
    x: str
    hue: str
    title: str
    col: str | None = None
    where: tuple[tuple[str, Any], ...] = ()
    xlabel: str | None = None
    log2_x: bool = False


STUDIES: dict[str, type[Study]] = {}


@dataclass(kw_only=True)
class Study:
    """Base of every study: ``train`` config and ``seeds``; subclasses add their own parameters.

    Why: one way to run a study. Build it with keyword arguments — how each model is trained as one
    ``TrainConfig`` (omitted: the study's ``default_train``), ``seeds``, and the study's own fields —
    then ``run(ds)`` for the tidy table, or ``run_study`` for a resumable run folder. Where the
    parameters arrive flat (a TOML spec, a dict), ``make_study(name, params)`` builds the same object
    and validates every value, naming the key.

    Class attributes: ``name`` (the protocol name in specs), ``axis`` (the parameter whose values
    are the grid's second dimension), ``figure`` (a ``FigureSpec``).

    Example:
        >>> import shiftbn as sb
        >>> from shiftbn.studies import HeldOutSources, TrainConfig, make_study
        >>> study = HeldOutSources(train=TrainConfig(model="MLP", steps=5), held_out=["lab_0"],
        ...                        strategies=["ema", "target"])
        >>> table = study.run(sb.load("blobs-labs", n=120), progress=False)
        >>> sorted(set(table["strategy"]))
        ['ema', 'target']
        >>> flat = make_study("held_out_sources", {"model": "MLP", "steps": 5, "held_out": ["lab_0"]})
        >>> flat.train == study.train
        True
    """

    name: ClassVar[str]
    axis: ClassVar[str]
    figure: ClassVar[FigureSpec]
    default_train: ClassVar[TrainConfig] = TrainConfig()

    train: TrainConfig = None  # type: ignore[assignment]  # None: the study's default_train
    seeds: Sequence[int] = (0,)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            STUDIES[cls.name] = cls

    def __post_init__(self) -> None:
        if self.train is None:
            self.train = self.default_train
        if isinstance(self.seeds, int):
            self.seeds = (self.seeds,)
        if not isinstance(self.train, TrainConfig):
            raise TypeError(f"train must be a TrainConfig, got {type(self.train).__name__}")
        if len(self.seeds) == 0:
            raise ValueError("seeds must hold at least one seed, e.g. seeds = [0]")

    def axis_values(self, ds: SourceTaggedDataset) -> list:
        """The values of the grid axis (the ``axis`` parameter as given)."""
        return list(getattr(self, self.axis))

    def cell(self, ds: SourceTaggedDataset, seed: int, value: Any) -> pd.DataFrame:
        """The tidy rows of one (seed, axis value) cell."""
        raise NotImplementedError

    def cells(self, ds: SourceTaggedDataset) -> Iterator[tuple[int, Any]]:
        """Every (seed, axis value) pair, seeds outermost."""
        values = self.axis_values(ds)
        return ((int(s), v) for s in self.seeds for v in values)

    def run(self, ds: SourceTaggedDataset, progress: bool = True) -> pd.DataFrame:
        """All cells, concatenated (what a resumed run folder ends with, too)."""
        cells = list(self.cells(ds))
        frames = [self.cell(ds, s, v) for s, v in tqdm(cells, desc=self.name, disable=not bars_wanted(progress))]
        return pd.concat(frames, ignore_index=True)

    def params(self) -> dict[str, Any]:
        """The study's parameters as a flat, JSON-friendly dict (train fields inlined)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "train"}
        out.update({k: getattr(self.train, k) for k in TRAIN_KEYS})
        return out


def make_study(name: str, params: Mapping[str, Any] | None = None, *, where: str = "params") -> Study:
    """Build study ``name`` from flat parameters (train fields inline, or ``train=TrainConfig``).

    Why: specs (TOML) and dicts give flat keys; this is the one place they become a
    validated ``Study``. Unknown keys and wrong types raise ``ValueError`` naming the key.
    """
    if name not in STUDIES:
        raise ValueError(f"study.protocol must be one of {sorted(STUDIES)}, got {name!r}")
    cls = STUDIES[name]
    params = dict(params or {})
    fields = {f.name for f in dataclasses.fields(cls)} - {"train"}
    accepted = fields | set(TRAIN_KEYS) | {"train"}
    unknown = set(params) - accepted
    if unknown:
        raise ValueError(f"[{where}] has unknown parameter(s) {sorted(unknown)} for {name}; "
                         f"accepted: {sorted(accepted)}")
    train = params.pop("train", None)
    flat_train = {k: params.pop(k) for k in TRAIN_KEYS if k in params and params[k] is not None}
    if train is None or isinstance(train, Mapping):
        train = {**{k: getattr(cls.default_train, k) for k in TRAIN_KEYS}, **dict(train or {}), **flat_train}
    elif flat_train:
        raise ValueError(f"give the training keys {sorted(flat_train)} inside train=, not beside it")
    return _validated(cls, {**params, "train": train}, where)


def _validated(cls: type[Study], data: dict[str, Any], where: str) -> Study:
    """Type-check ``data`` against the study's dataclass (pydantic) and build it."""
    import pydantic

    try:
        return pydantic.TypeAdapter(cls).validate_python(data)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"] if p != "train" or len(err["loc"]) == 1)
        if not key:  # a check in __post_init__: its message names the key
            raise ValueError(f"[{where}] {err['msg'].removeprefix('Value error, ')}") from None
        raise ValueError(f"[{where}] {key}: {err['msg']} (got {err.get('input')!r})") from None
