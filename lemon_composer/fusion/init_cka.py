"""``avg`` initialiser (Sec. 4.4): cluster adjacent layers by CKA similarity (App. A.6), average each cluster.

Layers of a large LLaMA form contiguous clusters of similar parameters (Sec. 2, Fig. 2). ``avg`` splits
the L1 source layers into L2 contiguous clusters at the least similar adjacent boundaries and gives
each target layer the mean of its cluster (gamma[i, j] = 1/|C_i|); dims are kept as in ``cut``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lemon_composer.fusion.fuse import TRANSPOSED
from lemon_composer.fusion.init import Selection, cluster_gamma, leading_selection
from lemon_composer.fusion.plan import FusionPlan

CKA_KINDS = ("q", "k", "v", "o", "up", "gate", "down")


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA (App. A.6): ||X^T Y||_F^2 / (||X^T X||_F ||Y^T Y||_F) with columns centred over rows.

    x (n, p), y (n, q): rows are samples, columns features. Computed in float64, through the
    n x n Gram matrices or the feature-space products, whichever is cheaper (the two are equal:
    ||X^T Y||_F^2 = <X X^T, Y Y^T>_F). A representation that is constant over rows gives 0.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs two matrices with the same number of rows; got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    x, y = x.double(), y.double()
    x, y = x - x.mean(0), y - y.mean(0)
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    if n * n * (p + q) <= n * (p * q + p * p + q * q):
        kx, ky = x @ x.T, y @ y.T                                     # (n, n) Gram matrices
        cross, norm_x, norm_y = (kx * ky).sum(), kx.norm(), ky.norm()
    else:
        cross = (x.T @ y).square().sum()                              # (p, q)
        norm_x, norm_y = (x.T @ x).norm(), (y.T @ y).norm()           # (p, p), (q, q)
    denom = norm_x * norm_y
    return cross / denom if denom > 0 else torch.zeros((), dtype=torch.float64, device=x.device)


def hidden_rows(kind: str, w: Tensor) -> Tensor:
    """A layer weight (HF layout) with the residual stream's coordinates as rows: CKA's samples.

    Only the hidden (residual) coordinates correspond across layers; head and neuron coordinates
    do not (any permutation of them gives the same function), so they must be features, not samples:
    q/k/v/up/gate (n, D) are transposed, o/down (D, n) kept, norm vectors become (D, 1).
    """
    if w.dim() == 1:
        return w.reshape(-1, 1)
    return w if kind in TRANSPOSED else w.t()


def adjacent_layer_similarity(stacked: dict[str, Tensor], kinds: tuple[str, ...] = CKA_KINDS) -> Tensor:
    """(L1 - 1,): mean over ``kinds`` of linear_cka(W_j, W_{j+1}) over ``hidden_rows`` (App. A.6, Fig. 2).

    ``stacked`` is ``stack_layers(...)``: kind -> (L1, rows, cols) in HF layout.
    """
    n_layers = stacked[kinds[0]].shape[0]
    sims = [torch.stack([linear_cka(hidden_rows(kind, stacked[kind][j]), hidden_rows(kind, stacked[kind][j + 1]))
                         for kind in kinds]).mean()
            for j in range(n_layers - 1)]
    return torch.stack(sims) if sims else torch.zeros(0, dtype=torch.float64)


def contiguous_clusters(similarity: Tensor, n_clusters: int) -> list[list[int]]:
    """Split layers 0..L1-1 into ``n_clusters`` contiguous groups, cutting the ``n_clusters - 1`` least
    similar adjacent boundaries (``similarity[b]`` is between layers b and b + 1; ties: the earlier)."""
    n_layers = similarity.numel() + 1
    if not 1 <= n_clusters <= n_layers:
        raise ValueError(f"model.init=avg needs 1 <= model.target.num_hidden_layers <= {n_layers} "
                         f"(the source's layers); got {n_clusters}")
    order = sorted(range(n_layers - 1), key=lambda b: (similarity[b].item(), b))
    cuts = sorted(order[:n_clusters - 1])
    bounds = [0] + [b + 1 for b in cuts] + [n_layers]
    return [list(range(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def avg_selection(plan: FusionPlan, stacked: dict[str, Tensor]) -> Selection:
    """``avg``: gamma averages each CKA cluster of adjacent source layers; dims / heads as in ``cut``."""
    clusters = contiguous_clusters(adjacent_layer_similarity(stacked), plan.target.layers)
    return leading_selection(plan, cluster_gamma(clusters, plan.source.layers))
