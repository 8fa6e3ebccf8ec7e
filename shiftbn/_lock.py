"""One re-entrant lock per model, so that verbs swapping BN state never interleave across threads."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


def _lock_of(model: nn.Module) -> threading.RLock:
    with _GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextmanager
def model_lock(model: nn.Module) -> Iterator[nn.Module]:
    """Hold ``model``'s re-entrant lock for the block (verbs nest freely in one thread).

    Why: ``collect_stats``, ``use_stats``, ``preserved``, ``precise_bn``, ``load_stats``,
    ``freeze_bn``, prediction-time BN forwards and Tent's model copy install hooks, swap buffers or
    flags, or read them; two threads doing so on one model would record each
    other's forwards and restore each other's state. Each verb takes this lock, so they run one at a
    time per model. Forwards run outside any verb are not covered.

    Args:
        model: the model to lock.

    Returns:
        A context manager yielding ``model``; the lock is released on exit, also on exceptions.

    Raises:
        TypeError: ``model`` is not a module.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        >>> with model_lock(model):
        ...     with model_lock(model):  # re-entrant: verbs nest in one thread
        ...         stats = buffer_stats(model)
        >>> list(stats)
        ['1']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    with _lock_of(model):
        yield model
