"""A C kernel for batch-mode BN on CPU: exact float64 channel sums and the normalized output in one call.

Why: batch-mode statistics need each BN input's float64 moments *and* BN's output with them. The
eager path reads the input twice more than an eval-mode forward (reduction, then BN), and a
``torch.compile``d kernel cannot keep a channel in cache between its reduction and its normalization
(inductor emits two loop nests) and pays a guard check per call. This kernel walks channel by
channel: sums of d = x - k_b and d^2 in float64 (16 lanes, ~1e-15 relative; k_b the channel's mean in
the batch's first sample, so a batch far from earlier ones loses nothing), folded into running totals
about the caller's fixed shift K, then y = x * a + b with the batch mean and variance rounded to
float32 exactly as eval-mode BN computes a and b from its buffers, while the channel is still in cache
(large channels: a second sweep in memory order).
It is C (``bn/_native/kernel.c``) compiled once per machine with the compiler inductor needs anyway
(``cc``/``$CC``), cached under ``$SHIFTBN_CACHE_DIR`` (default ``~/.cache/shiftbn``) with its digest
checked before each load, the build bounded by ``SHIFTBN_KERNEL_BUILD_TIMEOUT`` seconds (default 60)
and done by one process at a time (``bn._native``), loaded with ctypes (OpenMP shares the runtime torch
already loaded). Where no compiler works in time, or ``SHIFTBN_NATIVE=0``, ``available()`` is False and
callers keep their torch paths (a warning says why, once).
"""

from __future__ import annotations

import ctypes
import threading
import warnings

import torch

from shiftbn.bn import _native

CACHE_BYTES = 512 * 1024
"""A channel's bytes (N x L x 4) up to which it is normalized while still in cache; larger channels take
a second sweep in memory order (set-associative caches evict long strided channels)."""

_lock = threading.Lock()
_state: dict[str, object] = {}


def _load() -> ctypes.CDLL | None:
    lib = _native.load()
    if lib is None:
        return None
    fn = lib.shiftbn_bn_batch
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, p, i64, i64, i64, p, p, p, ctypes.c_double, p, p, ctypes.c_int, i64]
    fn.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether the kernel is built and loaded in this process (built on first call; cached per machine)."""
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"] = _load()
            except Exception as e:  # noqa: BLE001 - no compiler, no OpenMP, a sandbox: keep the torch paths
                _state["lib"] = None
                warnings.warn(f"shiftbn's BN statistics kernel is unavailable ({type(e).__name__}: {str(e)[:300]}); "
                              "using the torch reductions (same results, slower)", RuntimeWarning, stacklevel=3)
        return _state["lib"] is not None


def _param_ok(t: torch.Tensor | None, channels: int) -> bool:
    return t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                         and t.numel() == channels)


def accepts(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Whether the kernel can take this BN input (N, C, *): CPU, float32, contiguous, non-empty, with
    float32 CPU affine parameters (or none)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() >= 2 and x.numel() > 0
            and x.is_contiguous() and _param_ok(weight, x.shape[1]) and _param_ok(bias, x.shape[1]))


def batch_norm_sums(x: torch.Tensor, shift: torch.Tensor, tot1: torch.Tensor, tot2: torch.Tensor,
                    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5,
                    normalize: bool = True) -> torch.Tensor | None:
    """Add this batch's per-channel sums of (x - shift) and its square (float64) into ``tot1``, ``tot2``
    (C,) and return BN's output with the batch's own statistics (``None`` when not ``normalize``).

    ``x``: (N, C, *) as ``accepts`` requires; ``shift``, ``tot1``, ``tot2``: float64 contiguous CPU (C,).
    Call ``available()`` first."""
    lib = _state.get("lib")
    if lib is None or not accepts(x, weight, bias):
        raise ValueError("the native BN kernel does not take this input; check available() and accepts() first")
    c = x.shape[1]
    for t in (shift, tot1, tot2):
        if t.dtype != torch.float64 or not t.is_contiguous() or t.numel() != c or t.device.type != "cpu":
            raise ValueError(f"shift and totals must be float64 contiguous CPU tensors of {c} channels")
    y = torch.empty_like(x) if normalize else None
    status = lib.shiftbn_bn_batch(x.data_ptr(), y.data_ptr() if y is not None else None, x.shape[0], c,
                                  x.numel() // (x.shape[0] * c), shift.data_ptr(),
                                  weight.data_ptr() if weight is not None else None,
                                  bias.data_ptr() if bias is not None else None, float(eps), tot1.data_ptr(),
                                  tot2.data_ptr(), torch.get_num_threads(), CACHE_BYTES)
    if status:
        raise MemoryError(f"the native BN kernel could not allocate {3 * c * 8 + 2 * c * 4} bytes of scratch")
    return y
