"""Bottom-layer inference helpers every module may import: device, batched forwards, input stacking, datasets
whose length is checked as they are read.

Why: evaluation, strategies, protocols and training all run a model over a tensor in batches; one
copy of that loop keeps them consistent. Imports torch, numpy, tqdm and the bottom-layer
``_forward``/``_log`` only.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from shiftbn._forward import PLAIN, Runner
from shiftbn._log import bars_wanted


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither.

    Why: analysis never moves a user's model; inputs follow the model to its device.

    Args:
        model: any ``torch.nn.Module``.

    Returns:
        A ``torch.device``.

    Raises:
        ValueError: a model with a tensor on the ``meta`` device (it holds no values to run).

    Example:
        >>> device_of(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))
        device(type='cpu')
    """
    named = [*model.named_parameters(), *model.named_buffers()]
    meta = next((name for name, t in named if t is not None and t.is_meta), None)
    if meta is not None:
        raise ValueError(f"the model is on the meta device ({meta!r} holds no values, e.g. a model built under "
                         "torch.device('meta') or init_empty_weights); materialize it first: "
                         "model.to_empty(device='cpu') then model.load_state_dict(weights)")
    return named[0][1].device if named else torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (or buffer); None for a model with neither."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return None


def dtype_mismatch(model: nn.Module, x: Any) -> str | None:
    """Why inputs ``x`` do not suit ``model``'s dtype (complex, or another floating dtype), with the fix; else None."""
    if not isinstance(x, torch.Tensor):
        return None
    want = model_dtype(model)
    if x.is_complex():
        return (f"the inputs are complex ({x.dtype}), but BN statistics and the model are real-valued; pass real "
                "inputs (x.real, x.abs() or torch.view_as_real(x))")
    if want is not None and x.is_floating_point() and x.dtype != want:
        return (f"the model's parameters are {want} but the inputs are {x.dtype}; convert the inputs to the "
                f"model's dtype (x.to({want}), e.g. in the dataset's transform) or the model to theirs "
                f"(model.to({x.dtype}))")
    return None


@contextmanager
def explained_errors(model: nn.Module, x: Any) -> Iterator[None]:
    """Turn the raw error of a forward on inputs of another dtype than the model's into a clear ``TypeError``."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as e:
        why = dtype_mismatch(model, x)
        if why is None:
            raise
        raise TypeError(f"{why} (torch: {str(e).splitlines()[0] if str(e) else type(e).__name__})") from e


def check_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """The device inputs go to: the model's own; ``device`` must name it (a clear error otherwise).

    Why: analysis never moves a user's model; inputs follow the model.
    """
    have = device_of(model)
    if device is None:
        return have
    try:
        want = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1', 'mps')") from None
    if want.type != have.type or (want.index is not None and (have.index or 0) != want.index):
        raise ValueError(f"the model is on {have} but device={str(want)!r}; move the model first "
                         f"(model.to({str(want)!r})) or leave device unset to use the model's device")
    return have


def autocast(device: torch.device, amp: bool):
    """Mixed precision for inference when ``amp`` (float16 on CUDA, bfloat16 elsewhere), else nothing."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def dataset_length(data: object, what: str) -> int:
    """``len(data)`` as a non-negative int, or an error naming the dataset and its ``__len__``."""
    try:
        n = len(data)
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"{what} ({describe(data)}) has no valid length: len() raised {type(e).__name__}: {e}; its "
                        "__len__ must return the number of items as a non-negative int") from None
    return n


def describe(data: object) -> str:
    """The type of a dataset, and the ones it wraps (``Subset of MyData``), for messages."""
    parts = [type(data).__name__]
    while isinstance(data, torch.utils.data.Subset):
        data = data.dataset
        parts.append(type(data).__name__)
    return " of ".join(parts)


class DatasetLengthError(IndexError):
    """A dataset's ``__getitem__`` raised IndexError at an index below its ``len()``."""


def len_mismatch(data: object, i: int, n: int, e: IndexError) -> IndexError:
    """The error for item ``i`` of a dataset of length ``n`` that raised IndexError although ``i < n``.

    Why: a ``__len__`` that promises more items than ``__getitem__`` serves failed deep inside a
    DataLoader with the bare index; the dataset, the index and the fix must be named. Views
    (``Subset``, ``ConcatDataset``) are followed to the user's dataset and its own index.
    """
    if isinstance(e, DatasetLengthError):  # already named by a wrapper further in
        return e
    data, i, n = _innermost(data, i, n)
    return DatasetLengthError(f"{type(data).__name__}[{i}] raised IndexError ({e}) although its len() is {n}: its "
                              "__len__ and __getitem__ disagree; make __len__ return the number of items "
                              "__getitem__ serves (indices 0..len-1)")


def _innermost(data: object, i: int, n: int) -> tuple[object, int, int]:
    """The dataset under ``Subset``/``ConcatDataset`` views that holds item ``i``, its index there and its length."""
    while isinstance(data, (torch.utils.data.Subset, torch.utils.data.ConcatDataset)):
        try:
            if isinstance(data, torch.utils.data.Subset):
                inner, j = data.dataset, int(data.indices[i])
            else:
                part = bisect.bisect_right(data.cumulative_sizes, i)
                inner, j = data.datasets[part], i - (data.cumulative_sizes[part - 1] if part else 0)
            m = len(inner)
        except (IndexError, TypeError, ValueError):  # a view that is itself inconsistent: name it
            break
        data, i, n = inner, j, m
    return data, i, n


class LenChecked(Dataset):
    """A map-style dataset read through a DataLoader, whose IndexErrors inside its length name it.

    Why: see ``len_mismatch``. Items, ``__getitems__`` batches and length are the dataset's own.
    """

    def __init__(self, data: Dataset, what: str = "dataset") -> None:
        self.data = data
        self.n = dataset_length(data, what)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> object:
        try:
            return self.data[i]
        except IndexError as e:
            if 0 <= i < self.n and not isinstance(e, DatasetLengthError):
                raise len_mismatch(self.data, i, self.n, e) from e
            raise

    def __getitems__(self, indices: list[int]) -> list:
        fetch = getattr(self.data, "__getitems__", None)
        if not callable(fetch):
            return [self[i] for i in indices]
        try:
            return list(fetch(indices))
        except DatasetLengthError:
            raise
        except IndexError:
            return [self[i] for i in indices]  # finds the index at fault (or raises the same error)


Inputs = torch.Tensor | Dataset
"""Model inputs: a tensor (N, ...) or a map-style dataset whose items are ``x`` or ``(x, ...)``."""


def _targets_of(batch: Any, label_key: str = "label") -> Any:
    """The targets of a batch: the second element of a tuple, ``batch[label_key]`` of a dict, else None."""
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return batch[1]
    if isinstance(batch, Mapping):
        return batch.get(label_key)
    return None


def _input_of(batch: Any, input_key: str = "image") -> torch.Tensor:
    """The inputs of a batch: a tensor ``x``, the first element of a tuple, or ``batch[input_key]`` of a dict.

    Why: MONAI and Hugging Face pipelines collate dict items into dict batches (``{"image": x, ...}``).
    """
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) > 0:
        return batch[0]
    if isinstance(batch, Mapping):
        if input_key in batch:
            return batch[input_key]
        raise ValueError(f"a dict batch has keys {sorted(map(str, batch))} but no input key {input_key!r}; "
                         "wrap the dataset in SourceTaggedDataset(base, sources, keys=ItemKeys(input=...)) "
                         "naming the key of the inputs")
    if isinstance(batch, (tuple, list)):
        raise ValueError(f"an empty {type(batch).__name__} batch holds no inputs; items must be x, (x, ...) "
                         f"or a dict with key {input_key!r}")
    raise TypeError(f"a batch must be a tensor x, a tuple (x, ...) or a dict with key {input_key!r}; "
                    f"got {type(batch).__name__}")


def iter_inputs(
    data: Inputs, batches: Sequence[Sequence[int] | torch.Tensor], num_workers: int = 0
) -> Iterator[torch.Tensor]:
    """The inputs of each index batch of ``data``, one batch in memory at a time.

    A tensor is indexed directly; a dataset is read through a ``DataLoader`` with the batches as
    its batch sampler and ``num_workers`` worker processes (only the inputs of each item are kept:
    the first element of a tuple, ``"image"`` of a dict).
    """
    for x, _ in iter_batches(data, batches, num_workers):
        yield x


def iter_batches(
    data: Inputs, batches: Sequence[Sequence[int] | torch.Tensor], num_workers: int = 0
) -> Iterator[tuple[Any, Any]]:
    """``(inputs, targets)`` of each index batch of ``data``, one batch in memory at a time (targets: the
    items' second element, ``None`` for a tensor or items without one)."""
    if isinstance(data, torch.Tensor):
        for idx in batches:
            yield data[torch.as_tensor(idx, dtype=torch.long)], None
        return
    plan = [[int(i) for i in idx] for idx in batches]
    for batch in DataLoader(LenChecked(data), batch_sampler=plan, num_workers=num_workers):
        yield _input_of(batch), _targets_of(batch)


def take_inputs(data: Inputs, idx: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """The inputs at positions ``idx`` of ``data`` as one batch."""
    return next(iter_inputs(data, [idx]))


def concat_inputs(parts: Sequence[Inputs]) -> Inputs:
    """Several inputs end to end: tensors concatenated, datasets chained (nothing is read)."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(list(parts))
    return ConcatDataset([TensorDataset(p) if isinstance(p, torch.Tensor) else p for p in parts])


def _chunks(n: int, batch_size: int) -> list[range]:
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@torch.no_grad()
def forward_batches(model: nn.Module, data: Inputs, batch_size: int, *, amp: bool = False,
                    progress: bool = False, desc: str = "forward", runner: Runner = PLAIN) -> torch.Tensor:
    """Outputs of ``model`` on ``data`` in order, batches of ``batch_size``, as the model is; float32 (N, K) on CPU.

    Only the outputs are kept: inputs are read one batch at a time, moved to the model's device.
    ``amp``: run the forward under autocast. ``progress``: a bar with samples/s and ETA (on a terminal).
    ``runner``: the user's forward and the per-batch reduction (``runner.keep``: (N, R) rows instead).
    """
    if len(data) == 0:
        raise ValueError("no inputs to evaluate: the data is empty")
    device = device_of(model)
    outs = []
    with autocast(device, amp), progress_bar(len(data), desc, progress) as bar:
        chunks = _chunks(len(data), batch_size)
        for idx, (x, t) in zip(chunks, iter_batches(data, chunks), strict=True):
            with explained_errors(model, x):
                outs.append(runner.keep(runner.outputs(model, x, device), t))
            bar.update(len(idx))
    return torch.cat(outs)


def progress_bar(total: int, desc: str, progress: bool) -> tqdm:
    """One progress line for a pass over ``total`` samples (rate and ETA), drawn only on a terminal."""
    return tqdm(total=total, desc=desc, unit="sample", unit_scale=True, mininterval=1.0,
                disable=not bars_wanted(progress))


def batch_chunks(n: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """The prediction-time batches of ``batch_stats_logits``: positions 0..n-1 shuffled with ``seed``
    into near-equal batches of at most ``batch_size`` (never one sample alone when avoidable)."""
    order = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    return list(torch.tensor_split(order, max(1, -(-n // batch_size))))


def outputs_in_order(data: Inputs, chunks: list[torch.Tensor], forward: Callable[[Any], torch.Tensor],
                     runner: Runner = PLAIN) -> torch.Tensor:
    """``forward`` on the inputs of each chunk of positions (``batch_chunks``), outputs (N, ...) float32
    put back in the original order of ``data``; ``runner.keep`` reduces each chunk's outputs."""
    out: torch.Tensor | None = None
    for idx, (x, t) in zip(chunks, iter_batches(data, chunks), strict=True):
        part = runner.keep(forward(x), t).float()
        if out is None:
            out = torch.empty((len(data), *part.shape[1:]))
        out[idx] = part
    return out


def stack_inputs(ds: Dataset, batch_size: int = 512) -> torch.Tensor:
    """All inputs (first item element) of a map-style dataset stacked into one tensor (N, ...), in order.

    O(dataset) memory: for small data and tests; analysis verbs stream with ``iter_inputs``.
    """
    if len(ds) == 0:
        raise ValueError("dataset is empty")
    return torch.cat(list(iter_inputs(ds, _chunks(len(ds), batch_size))))
