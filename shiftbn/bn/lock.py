"""The per-model lock (defined in the bottom layer, ``shiftbn._lock``, so every layer can take it)."""

from shiftbn._lock import model_lock

__all__ = ["model_lock"]
