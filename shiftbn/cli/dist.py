"""The command line under ``torchrun``: a process group from torchrun's environment, one writer.

Why: ``torchrun --nproc-per-node N -m shiftbn stats|matrix|recalibrate|run ...`` must run the same
commands unchanged: every rank computes its share (the verbs shard and merge exactly), rank 0 alone
prints and writes files. Imports only the standard library at module level (``--help`` stays fast).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from datetime import timedelta

import shiftbn._log as _log
from shiftbn.cli.types import seconds

ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
COMMANDS = ("stats", "matrix", "recalibrate", "run")
_state = {"rank": 0, "world": 1}


def add_args(ap: argparse.ArgumentParser) -> None:
    """``--distributed`` and ``--dist-timeout`` on the top-level parser (``shiftbn --distributed stats ...``)."""
    ap.add_argument("--distributed", action="store_true",
                    help="join a torch.distributed process group from torchrun's environment (RANK, WORLD_SIZE, "
                         "MASTER_ADDR, MASTER_PORT; gloo on CPU, NCCL with --device cuda, one GPU per local rank); "
                         "automatic when WORLD_SIZE > 1. Data are sharded by whole batches, statistics merged "
                         "exactly; rank 0 alone prints and writes")
    ap.add_argument("--dist-timeout", type=seconds, default=1800.0, metavar="SECONDS",
                    help="how long a rank waits for the others before it stops with an error (a rank that died "
                         "or hangs)")


def wanted(args: argparse.Namespace) -> bool:
    """Whether this command joins a process group: ``--distributed``, or launched by torchrun with WORLD_SIZE > 1."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    return bool(getattr(args, "distributed", False)) or world > 1


def writer() -> bool:
    """Whether this process writes files and prints results (rank 0, or no process group)."""
    return _state["rank"] == 0


def rank() -> int:
    return _state["rank"]


@contextlib.contextmanager
def session(args: argparse.Namespace) -> Iterator[None]:
    """Run the command in a process group when ``wanted``: joined here, left on exit; other ranks are quiet.

    Refuses commands that run in one process only, and a missing torchrun environment, naming the fix.
    """
    if not wanted(args):
        yield
        return
    try:
        _check(args)
    except Exception as e:  # the same on every rank, before any group exists: rank 0 prints it
        e.shiftbn_rank, e.shared_by_ranks = _env_rank(), True
        raise
    import torch
    import torch.distributed as dist

    device = str(getattr(args, "device", "cpu") or "cpu")
    backend = "gloo"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda":  # one GPU per local rank, as torchrun expects
            args.device = device = f"cuda:{local % torch.cuda.device_count()}"
        torch.cuda.set_device(torch.device(device))
        backend = "nccl"
    dist.init_process_group(backend, timeout=timedelta(seconds=args.dist_timeout))
    _state["rank"], _state["world"] = dist.get_rank(), dist.get_world_size()
    quiet, stdout = _log.quiet(), sys.stdout
    if _state["rank"] != 0:  # rank 0 speaks for the job
        _log.set_quiet(True)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - closed below
    try:
        yield
    except BaseException as e:
        e.shiftbn_rank = _state["rank"]  # main() prints after the group is left
        raise
    finally:
        if sys.stdout is not stdout:
            sys.stdout.close()
            sys.stdout = stdout
        _log.set_quiet(quiet)
        _state["rank"], _state["world"] = 0, 1
        with contextlib.suppress(Exception):  # a broken group (a dead peer) cannot be left cleanly
            dist.destroy_process_group()


def _check(args: argparse.Namespace) -> None:
    if args.command not in COMMANDS:
        raise ValueError(f"shiftbn {args.command} runs in one process; under torchrun use one of "
                         f"{', '.join(COMMANDS)}, or run it without torchrun/--distributed")
    missing = [k for k in ENV if k not in os.environ]
    if missing:
        raise ValueError(f"--distributed needs torchrun's environment ({', '.join(missing)} not set); launch with "
                         "torchrun --nproc-per-node N -m shiftbn ...")


def _env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def should_print(error: BaseException) -> bool:
    """Whether this process prints ``error``: rank 0 always; another rank only its own errors (one raised
    on every rank alike is printed once, by rank 0)."""
    return getattr(error, "shiftbn_rank", 0) == 0 or not getattr(error, "shared_by_ranks", False)


def prefix(error: BaseException) -> str:
    """``rank r: `` for an error of a rank other than 0, else nothing."""
    r = getattr(error, "shiftbn_rank", 0)
    return f"rank {r}: " if r else ""
