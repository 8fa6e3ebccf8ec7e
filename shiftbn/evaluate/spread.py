"""Matrix cells under ``torch.distributed``: each cell's outputs computed by the ranks together.

Why: evaluation is most of a matrix's time; spread over W ranks it takes about 1/W. How a cell is
shared depends on what its outputs depend on, so every rank ends with the outputs one process
computes (the same batches, bit for bit):

* fixed statistics (``ema``, ``precise``, ``target``, ``prior:N@n``, ``stats:*``, ``per-source``
  and any strategy that only defines ``bn_stats``): whole evaluation batches of ``batch_size`` are
  dealt round-robin to the ranks; the statistics themselves were merged exactly beforehand;
* ``batch:B``: each grouping's seeded prediction-time batches are dealt to the ranks, each batch whole;
* ``tent``, ``tent-episodic``, ``tent-offline:S`` and per-batch ``prior:N``: every grouping of a
  source on one rank, sources spread over ranks; ``batch:B:mixed``: on one rank (its batches mix
  every source);
* any other strategy (its own ``logits``/``outputs``): computed on every rank, as in one process.

Each rank's rows travel in one ``all_gather`` per strategy: (G x N x K) float32 per cell in total
(G groupings).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from shiftbn._torch import Inputs, batch_chunks
from shiftbn.adapt import AdaptContext, BatchStats, Prior, Strategy, Tent, TentOffline
from shiftbn.adapt.grouped import grouping_seed
from shiftbn.adapt.strategies import fixed_stats_logits
from shiftbn.bn.batchstats import batch_stats_logits
from shiftbn.bn.distributed import RankSync
from shiftbn.data.tagged import SourceTaggedDataset

SAMPLES, BATCHES, OWNER, EVERY = "samples", "batches", "owner", "every"


def how(strat: Strategy) -> str:
    """How a strategy's cells are shared over ranks (see the module docstring)."""
    if isinstance(strat, (Tent, TentOffline)):
        return OWNER
    if isinstance(strat, BatchStats):
        return OWNER if strat.mixed else BATCHES
    if isinstance(strat, Prior):
        return SAMPLES if strat.samples is not None else OWNER
    if type(strat).logits is Strategy.logits and type(strat).outputs is Strategy.outputs:
        return SAMPLES
    return EVERY


def prefetch(ctx: AdaptContext, strategies: Sequence[Strategy], eval_sources: Sequence[str]) -> None:
    """Compute, on every rank together, the statistics the strategies declare they read.

    Why: statistics are collective passes (sharded, merged exactly); done first, the cells that
    follow need no collective until their outputs are gathered.
    """
    if any(st.stats_sources(j) for st in strategies for j in eval_sources):
        ctx.stats  # noqa: B018 - computed and memoized on first access
    if any(st.needs_precise for st in strategies):
        ctx.precise_stats()


def _rows(x: Inputs, idx: np.ndarray) -> Inputs:
    """The samples of ``x`` at ``idx`` (a view of a dataset; nothing is read)."""
    if isinstance(x, torch.Tensor):
        return x[torch.as_tensor(idx, dtype=torch.long)]
    if isinstance(x, SourceTaggedDataset):
        return x.take(idx)
    return Subset(x, idx.tolist())


def _dealt(n_chunks: int, world: int, rank: int, turn: int) -> list[int]:
    """Chunks of this rank when chunk c goes to rank (c + turn) % world."""
    return [c for c in range(n_chunks) if (c + turn) % world == rank]


def strategy_outputs(ctx: AdaptContext, strat: Strategy, sources: Sequence[str]) -> dict[str, list[torch.Tensor]]:
    """``strat.outputs`` on each eval source in ``sources`` (one (N_j, K) tensor per grouping),
    computed by all ranks together.

    Every rank returns the same outputs, in the order of ``ctx.eval_inputs(j)``. An error on any rank
    is raised on every rank.
    """
    sync = RankSync()
    world, rank = sync.world, sync.rank
    mode = how(strat)
    if mode == EVERY:  # may run collectives of its own: every rank runs it whole, errors shared
        return {j: sync.check(lambda j=j: strat.outputs(ctx, j, ctx.eval_inputs(j))) for j in sources}
    stats = sync.check(lambda: {j: strat.bn_stats(ctx, j) for j in sources}) if mode == SAMPLES else {}
    sizes = {j: len(ctx.eval_inputs(j)) for j in sources}
    order = list(ctx.eval_sources)

    def local() -> dict[str, Any]:
        mine: dict[str, Any] = {}
        turn = 0
        for j in sources:
            x, n = ctx.eval_inputs(j), sizes[j]
            if mode == SAMPLES:
                if n == 0:
                    raise ValueError("no inputs to evaluate: the data is empty")
                starts = list(range(0, n, ctx.batch_size))
                idx = np.concatenate([np.arange(starts[c], min(starts[c] + ctx.batch_size, n), dtype=np.int64)
                                      for c in _dealt(len(starts), world, rank, turn)] or [np.zeros(0, np.int64)])
                turn += len(starts)
                if len(idx):
                    mine[j] = (idx, [fixed_stats_logits(ctx, strat.name, j, stats[j], _rows(x, idx)).numpy()])
            elif mode == BATCHES:
                rows = []
                part = (world, (rank - turn % world) % world)
                for g in range(strat.groupings):
                    seed = grouping_seed(ctx.seed, g)
                    chunks = batch_chunks(n, strat.batch, seed)
                    out = batch_stats_logits(ctx.model, x, strat.batch, seed, amp=ctx.amp, progress=ctx.progress,
                                             desc=f"{strat.name} on {j}", part=part, runner=ctx.runner)
                    if len(out):
                        # a rank's batches are the same rows in every grouping only by chance: keep each
                        # grouping's own row order (idx per grouping) and scatter them separately below
                        rows.append((torch.cat(chunks[part[1]::world]).numpy(), out.numpy()))
                    else:
                        rows.append((np.zeros(0, np.int64), None))
                turn += len(chunks)  # the same number of batches in every grouping
                if any(r is not None for _, r in rows):
                    mine[j] = ("per-grouping", rows)
            else:
                owner = (order.index(j) if not isinstance(strat, BatchStats) and j in order else 0) % world
                if owner == rank:
                    outs = [o.detach().float().cpu().numpy() for o in strat.outputs(ctx, j, x)]
                    mine[j] = (np.arange(len(outs[0])), outs)
        return mine

    gathered = sync.gather(local)
    result = {}
    for j in sources:
        parts = [g[j] for g in gathered if j in g]
        if not parts:
            raise ValueError(f"strategy {strat.name!r} produced no outputs for source {j!r} on any rank")
        if isinstance(parts[0][0], str):  # BATCHES: (idx, rows) per grouping from each rank
            per_group = [[p[1][g] for p in parts] for g in range(len(parts[0][1]))]
        else:  # one idx per rank, shared by its groupings
            per_group = [[(idx, outs[g]) for idx, outs in parts] for g in range(len(parts[0][1]))]
        result[j] = [_scatter([(i, r) for i, r in group if r is not None]) for group in per_group]
    return result


def _scatter(parts: list[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
    """Rows of every rank put back in the original sample order."""
    k_shape = parts[0][1].shape[1:]
    out = np.empty((sum(len(i) for i, _ in parts), *k_shape), dtype=np.float32)
    for idx, rows in parts:
        out[idx] = rows
    return torch.from_numpy(out)
