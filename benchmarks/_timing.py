"""Interleaved timings shared by the benchmark scripts: wall and CPU time of each function per round.

Why: on a shared 2-core machine other processes slow a function down at random; alternating the
functions within each round makes the slowdowns hit them alike, and the process's CPU time (with one
torch thread) is far less sensitive to other processes than the wall time, so both are kept.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, list[float]]]:
    """``{name: {"wall": [...], "cpu": [...], "faults": [...]}}``: seconds (and minor page faults) over
    ``repeats`` rounds, the functions called in turn within each round."""
    times = {k: {"wall": [], "cpu": [], "faults": []} for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            f0 = _minor_faults()
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times[k]["wall"].append(time.perf_counter() - t0)
            times[k]["cpu"].append(time.process_time() - c0)
            times[k]["faults"].append(_minor_faults() - f0)
    return times


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` does not exist)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


PICKS = (("min", min), ("median", statistics.median))


def pick(times: dict[str, dict[str, list[float]]], clock: str, stat: str) -> dict[str, float]:
    """One number per function: the fastest (``"min"``) or median round of ``clock`` ("wall"/"cpu")."""
    f = dict(PICKS)[stat]
    return {k: f(v[clock]) for k, v in times.items()}


def eval_floors(model, xs: list) -> tuple[Callable[[], None], Callable[[], None]]:
    """The two eval-mode ``no_grad`` forward floors over the batches ``xs``: with the model's BN buffers as they
    are, and with a copy whose buffers hold the data's population statistics (PreciseBN over ``xs``), since
    max-pooling's time depends on the activations it sees and initial buffers (mean 0, var 1) give activations
    no normalized network sees."""
    import copy

    import torch

    import shiftbn as sb

    trained = copy.deepcopy(model)
    sb.precise_bn(trained, xs, num_samples=None, progress=False)

    def run(m) -> None:
        m.eval()
        with torch.no_grad():
            for x in xs:
                m(x)

    return (lambda: run(model)), (lambda: run(trained))
