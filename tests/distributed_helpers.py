"""Two gloo processes on 127.0.0.1 with a deadline: what the distributed tests share."""

import os
import pickle
import socket
import time
from datetime import timedelta

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

import shiftbn as sb


def hang_limit(seconds: float = 60.0) -> float:
    """A deadline that tells a hang from a slow machine: ``seconds`` on an idle one, scaled by the load per
    CPU (at most 5x), so a run slowed by other work (a load of 10 on 2 cores) is not reported as hung."""
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except (AttributeError, OSError):  # no load average on this system (Windows has no os.getloadavg)
        load = 1.0
    return seconds * min(5.0, max(1.0, load))



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(classes: int = 3) -> nn.Module:
    """Conv-BN-ReLU, Conv-BN, pool, linear in float64 (1 and 2 processes agree far below 1e-10)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))
    return net.double().eval()


def tiny_data(sizes=(37, 20, 9), seed: int = 0) -> sb.SourceTaggedDataset:
    """Three labeled sources of uneven sizes, shifted apart (float64 images 2 x 6 x 6)."""
    g = torch.Generator().manual_seed(seed)
    xs, ys, ss = [], [], []
    for k, n in enumerate(sizes):
        xs.append(torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64) * (1 + 0.5 * k) + 2.0 * k)
        ys.append(torch.randint(0, 3, (n,), generator=g))
        ss += [f"lab_{'abc'[k]}"] * n
    x, y = torch.cat(xs), torch.cat(ys)
    return sb.SourceTaggedDataset(TensorDataset(x, y), ss, y.numpy())


def _entry(rank, world, port, out_dir, fn_name, module, env):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    os.environ.update(env)
    os.environ["TQDM_DISABLE"] = "1"
    torch.set_num_threads(1)
    import importlib

    fn = getattr(importlib.import_module(module), fn_name)
    if env.get("NO_INIT") != "1":
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=float(env["PG_TIMEOUT"])))
    try:
        result = fn(rank, world, out_dir)
        with open(os.path.join(out_dir, f"{fn_name}.rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, tmp_path, world: int = 2, env: dict | None = None, allow_death: bool = False) -> list:
    """Run ``fn(rank, world, out_dir) -> picklable`` on ``world`` gloo ranks; each rank's result (None
    for a rank that wrote none when ``allow_death``). Fails, instead of hanging, past ``hang_limit()``."""
    limit = hang_limit()  # the load now, not at collection; the ranks' process group times out with it
    env = {"PG_TIMEOUT": str(limit), **(env or {})}
    ctx = mp.start_processes(_entry, args=(world, free_port(), str(tmp_path), fn.__name__, fn.__module__, env),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + limit
    if allow_death:  # wait on each process: ctx.join() would SIGTERM the others as soon as one dies
        for p in ctx.processes:
            p.join(max(0.0, deadline - time.monotonic()))
    else:
        while not ctx.join(timeout=1) and time.monotonic() <= deadline:
            pass
    if any(p.is_alive() for p in ctx.processes):
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        raise AssertionError(f"{fn.__name__} did not finish within {limit:.0f} s on {world} ranks (a rank hung)")
    out = []
    for r in range(world):
        path = tmp_path / f"{fn.__name__}.rank{r}.pkl"
        if not path.exists():
            assert allow_death, f"rank {r} wrote no result for {fn.__name__} (it died)"
            out.append(None)
            continue
        out.append(pickle.loads(path.read_bytes()))
    return out


def outcome(fn):
    """``{"ok": True, "value": fn()}`` or the error's type and message (to compare across ranks)."""
    try:
        return {"ok": True, "value": fn()}
    except Exception as exc:
        return {"ok": False, "type": type(exc).__name__, "message": str(exc)}


def assert_stats_close(got, want, rtol=1e-10):
    assert list(got) == list(want)
    for src in want:
        assert got[src].num_samples == want[src].num_samples
        for layer, m in want[src].items():
            assert got[src][layer].count == m.count
            np.testing.assert_allclose(got[src][layer].mean, m.mean, rtol=rtol, atol=1e-12)
            np.testing.assert_allclose(got[src][layer].var, m.var, rtol=rtol)


def assert_same_table(got: pd.DataFrame, want: pd.DataFrame):
    """Equal tables: the same rows and columns, metric values identical."""
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True), check_exact=True)
