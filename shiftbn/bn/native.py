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
It is C compiled once per machine with the compiler inductor needs anyway (``cc``/``$CC``), cached
under ``$SHIFTBN_CACHE_DIR`` (default ``~/.cache/shiftbn``), loaded with ctypes (OpenMP shares the
runtime torch already loaded). Where no compiler works, or ``SHIFTBN_NATIVE=0``, ``available()`` is
False and callers keep their torch paths (a warning says why, once).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

_SOURCE = r"""
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
typedef float f8 __attribute__((vector_size(32)));
typedef double d8 __attribute__((vector_size(64)));

/* Sums of d = x - kb and d^2 over one channel's rows (N rows of L at stride C * L), float64, 16 lanes. */
static void channel_sums(const float* x, int64_t N, int64_t C, int64_t L, int64_t c, double kb,
                         double* out1, double* out2) {
  const d8 kv = {kb, kb, kb, kb, kb, kb, kb, kb};
  d8 s1a = {0}, s2a = {0}, s1b = {0}, s2b = {0};
  double s1 = 0.0, s2 = 0.0;
  const int64_t Lv = L - L % 16;
  for (int64_t n = 0; n < N; n++) {
    const float* p = x + (n * C + c) * L;
    for (int64_t l = 0; l < Lv; l += 16) {
      f8 u, v;
      memcpy(&u, p + l, sizeof u); memcpy(&v, p + l + 8, sizeof v);
      const d8 du = __builtin_convertvector(u, d8) - kv, dv = __builtin_convertvector(v, d8) - kv;
      s1a += du; s2a += du * du; s1b += dv; s2b += dv * dv;
    }
    for (int64_t l = Lv; l < L; l++) { const double d = (double)p[l] - kb; s1 += d; s2 += d * d; }
  }
  for (int j = 0; j < 8; j++) { s1 += s1a[j] + s1b[j]; s2 += s2a[j] + s2b[j]; }
  *out1 = s1; *out2 = s2;
}

/* Mean of the channel's first row (sample 0): the batch's own shift, so its variance never cancels. */
static double first_row_mean(const float* x, int64_t C, int64_t L, int64_t c) {
  const float* p = x + c * L;
  double s = 0.0;
  for (int64_t l = 0; l < L; l++) s += p[l];
  return s / (double)L;
}

/* The batch's sums about kb, folded into the totals about k (exact algebra in float64); alpha, beta
   from the batch's own mean and variance rounded to float32, as eval-mode BN computes them. */
static void finish(double kb, double s1, double s2, double cnt, double k, const float* w, const float* b,
                   int64_t c, double eps, double* tot1, double* tot2, float* alpha, float* beta) {
  const double dm = s1 / cnt;
  double var = s2 / cnt - dm * dm;
  if (var < 0) var = 0;
  const float mean = (float)(kb + dm), varf = (float)var;
  const float invstd = 1.0f / sqrtf(varf + (float)eps);
  *alpha = w ? invstd * w[c] : invstd;
  *beta = (b ? b[c] : 0.0f) - mean * *alpha;
  const double e = kb - k;
  tot1[c] += s1 + cnt * e;
  tot2[c] += s2 + 2.0 * e * s1 + cnt * e * e;
}

/* x, y: (N, C, L) contiguous float32. Adds per channel sum(x - k) and sum((x - k)^2), float64, into
   tot1/tot2; writes y = x * alpha + beta (batch statistics) unless y is NULL. Returns 0, or 1 when
   memory ran out (then nothing is added). */
int shiftbn_bn_batch(const float* restrict x, float* restrict y, int64_t N, int64_t C, int64_t L,
                     const double* restrict k, const float* restrict w, const float* restrict b, double eps,
                     double* restrict tot1, double* restrict tot2, int nthreads, int64_t cache_bytes) {
  const double cnt = (double)(N * L);
  float* ab = malloc(2 * C * sizeof(float) + 1);
  double* part = malloc(3 * C * sizeof(double) + 1);
  if (!ab || !part) { free(ab); free(part); return 1; }
  if (L >= 32) {
    const int in_cache = N * L * 4 <= cache_bytes;
    #pragma omp parallel num_threads(nthreads)
    {
      #pragma omp for schedule(static)
      for (int64_t c = 0; c < C; c++) {
        const double kb = first_row_mean(x, C, L, c);
        double s1, s2;
        channel_sums(x, N, C, L, c, kb, &s1, &s2);
        finish(kb, s1, s2, cnt, k[c], w, b, c, eps, tot1, tot2, &ab[c], &ab[C + c]);
        if (y && in_cache) for (int64_t n = 0; n < N; n++) {
          const float* p = x + (n * C + c) * L;
          float* q = y + (n * C + c) * L;
          for (int64_t l = 0; l < L; l++) q[l] = p[l] * ab[c] + ab[C + c];
        }
      }
      if (y && !in_cache) {
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < N * C; r++) {
          const float alpha = ab[r % C], beta = ab[C + r % C];
          const float* p = x + r * L;
          float* q = y + r * L;
          for (int64_t l = 0; l < L; l++) q[l] = p[l] * alpha + beta;
        }
      }
    }
  } else {
    /* short rows: each thread a block of channels, samples in memory order */
    double* kb = part;
    double* acc = part + C;  /* acc[c], acc[C + c] */
    for (int64_t c = 0; c < C; c++) { kb[c] = first_row_mean(x, C, L, c); acc[c] = 0.0; acc[C + c] = 0.0; }
    #pragma omp parallel num_threads(nthreads)
    {
      int t = 0, T = 1;
#ifdef _OPENMP
      t = omp_get_thread_num(); T = omp_get_num_threads();
#endif
      const int64_t c0 = C * t / T, c1 = C * (t + 1) / T;
      for (int64_t n = 0; n < N; n++) {
        const float* p = x + n * C * L;
        if (L == 1) {
          for (int64_t c = c0; c < c1; c++) {
            const double d = (double)p[c] - kb[c];
            acc[c] += d; acc[C + c] += d * d;
          }
        } else {
          for (int64_t c = c0; c < c1; c++) {
            double s = 0.0, q = 0.0;
            for (int64_t l = 0; l < L; l++) { const double d = (double)p[c * L + l] - kb[c]; s += d; q += d * d; }
            acc[c] += s; acc[C + c] += q;
          }
        }
      }
      for (int64_t c = c0; c < c1; c++)
        finish(kb[c], acc[c], acc[C + c], cnt, k[c], w, b, c, eps, tot1, tot2, &ab[c], &ab[C + c]);
      if (y) for (int64_t n = 0; n < N; n++) {
        const float* p = x + n * C * L;
        float* q = y + n * C * L;
        for (int64_t c = c0; c < c1; c++)
          for (int64_t l = 0; l < L; l++) q[c * L + l] = p[c * L + l] * ab[c] + ab[C + c];
      }
    }
  }
  free(ab); free(part);
  return 0;
}
"""

_FLAGS = ["-O3", "-shared", "-fPIC", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros",
          "-ffp-contract=fast"]  # x * a + b as one FMA, as torch's own BN kernel is built
_OPTIONAL = (["-march=native", "-fopenmp"], ["-fopenmp"], [])  # tried in this order
CACHE_BYTES = 512 * 1024
"""A channel's bytes (N x L x 4) up to which it is normalized while still in cache; larger channels take
a second sweep in memory order (set-associative caches evict long strided channels)."""

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    root = os.environ.get("SHIFTBN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "shiftbn")
    return Path(root) / "kernels"


def _machine_key(cc: str) -> str:
    """What the compiled file depends on: source, compiler, flags, CPU (``-march=native``)."""
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    cpu = ""
    try:
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        cpu = platform.processor()
    return hashlib.sha256("\0".join([_SOURCE, cc, version, " ".join(_FLAGS), platform.machine(), cpu]).encode()
                          ).hexdigest()[:20]


def _compile(cc: str, out: Path) -> None:
    """Compile into ``out`` atomically (a temporary file renamed over it); raises with the compiler's words."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "bnstats.c"
        src.write_text(_SOURCE)
        errors = []
        for extra in _OPTIONAL:
            obj = Path(tmp) / "bnstats.so"
            r = subprocess.run([cc, *_FLAGS, *extra, str(src), "-o", str(obj), "-lm"], capture_output=True,
                               text=True, timeout=300)
            if r.returncode == 0:
                os.replace(obj, out)
                return
            errors.append(r.stderr.strip().splitlines()[-1:] or ["?"])
        raise RuntimeError(f"{cc} failed: {errors[-1][0][:200]}")


def _load() -> ctypes.CDLL | None:
    if os.environ.get("SHIFTBN_NATIVE", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC)")
    path = _cache_dir() / f"bnstats-{_machine_key(cc)}.so"
    try:
        if not path.exists():
            _compile(cc, path)
    except OSError:  # a read-only cache: build for this process only
        path = Path(tempfile.mkdtemp(prefix="shiftbn-")) / path.name
        _compile(cc, path)
    lib = ctypes.CDLL(str(path))
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
                warnings.warn(f"shiftbn's BN statistics kernel is unavailable ({type(e).__name__}: {str(e)[:160]}); "
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
