"""Sharded fusion across data-parallel ranks: each rank fuses a contiguous share of the *source* layers.

Why source layers and not target layers: with a dense gamma every target layer mixes every
dimension-fused source layer (Eq. 2), and the dimension products A_j W_j B_emb^T are ~99% of the
fusion FLOPs (the gamma mix is the rest). Splitting the source layers splits that work N ways;
splitting the target layers would leave every rank computing all of it.

Each rank's partial mix Σ_{j in its share} gamma_ij F_j has the full target shape; the partials are
summed with one all-reduce (torch.distributed through Composer's process group). Its autograd
backward all-reduces the fused weights' gradient, so each rank back-propagates the whole batch's
gradient into its own share of the operators; DDP then averages the operator gradients as usual.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


def source_share(n_layers: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous share of ``n_layers`` source layers; sizes differ by at most one."""
    base, extra = divmod(n_layers, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def all_reduce_layers(partial: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sum the ranks' partial layer fusions in one collective; differentiable (backward all-reduces)."""
    flat = torch.cat([t.reshape(-1) for t in partial.values()])    # one buffer, one collective
    total = dist_fn.all_reduce(flat, group=dist.group.WORLD)
    pieces = total.split([t.numel() for t in partial.values()])
    return {kind: piece.view_as(t) for (kind, t), piece in zip(partial.items(), pieces)}
