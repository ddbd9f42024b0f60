"""LEMON's operator math (Sec. 3.1-3.2, Eq. 2-3, Algorithm 1), never materialising a Kronecker product.

A dimension operator with receptive field r is ``b ⊗ I_r`` with ``b`` of shape (n2/r, n1/r): it maps
R^{n1} -> R^{n2} by mixing whole blocks of r consecutive coordinates (Eq. 3). The layer operator
``gamma`` (L2, L1) mixes the dimension-fused source layers into target layers (Eq. 2).

Every product is written as a plain (batched) matmul on a *view* of its right operand: on a
contiguous source weight no copy is made, so autograd saves the frozen source itself, not a
permuted copy of it (``einsum`` permutes its operands into fresh memory).
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_receptive_field(r: int, *sizes: int, name: str) -> None:
    """Raise ValueError naming ``name`` unless the receptive field divides every size."""
    if r < 1 or any(n % r for n in sizes):
        raise ValueError(f"{name}={r} must be a positive divisor of {' and '.join(map(str, sizes))}")


def block_rows(b: Tensor, w: Tensor, r: int) -> Tensor:
    """(b ⊗ I_r) W: mixes the rows of ``w`` (..., n1, m) in blocks of r -> (..., n2, m) (Eq. 3).

    ``b`` (..., n2/r, n1/r) may carry leading batch dims shared with ``w`` (one operator per layer).
    """
    n1, m = w.shape[-2:]
    blocks = w.reshape(*w.shape[:-2], n1 // r, r * m)     # (..., n1/r, r*m): a view of a contiguous w
    return (b @ blocks).reshape(*w.shape[:-2], -1, m)     # (..., n2/r, r*m) -> (..., n2, m)


def frequency_head_mix(m: Tensor, w: Tensor, head_dim: int) -> Tensor:
    """RoPE-equivariant head mixing of the rows of ``w`` (L, heads1*head_dim, cols) -> (L, heads2*head_dim, cols).

    ``m`` (L, F/r, heads2, heads1), F = head_dim/2: output row (h, c) = Σ_h' m[c mod F // r][h, h'] w[(h', c)].
    HF's RoPE rotates the pair (c, c + F) of every head by the same angle at frequency c mod F; both
    coordinates of a pair get the same head mixing, so rotating commutes with it for any ``m``.
    One bmm per layer on a strided view of ``w`` (rows (head, coordinate) read as (coordinate, head)):
    autograd saves the frozen source itself, never a permuted copy.
    """
    n_layers, rows, cols = w.shape
    heads1, freqs = rows // head_dim, head_dim // 2
    per_coord = m.repeat_interleave(freqs // m.shape[1], dim=1)      # (L, F, heads2, heads1)
    per_coord = torch.cat([per_coord, per_coord], dim=1)             # (L, head_dim, heads2, heads1): c and c + F
    mixed = [torch.bmm(per_coord[j], w[j].view(heads1, head_dim, cols).transpose(0, 1))
             for j in range(n_layers)]                               # each (head_dim, heads2, cols)
    return torch.stack(mixed).transpose(1, 2).reshape(n_layers, -1, cols)  # (L, heads2, head_dim, cols) -> rows


def block_cols(b: Tensor, w: Tensor, r: int) -> Tensor:
    """W (b ⊗ I_r)^T: mixes the columns of ``w`` (..., m, n1) in blocks of r -> (..., m, n2).

    ``b`` is one operator (n2/r, n1/r) shared by every row (B_emb); per-layer operators are
    applied on rows (``fuse`` stores o/down transposed for that).
    """
    if r == 1:
        return w @ b.transpose(-1, -2)                    # (..., m, n1) @ (n1, n2)
    blocks = w.unflatten(-1, (-1, r))                     # (..., m, n1/r, r)
    return (b @ blocks).flatten(-2)                       # (..., m, n2/r, r) -> (..., m, n2)


def block_vec(b: Tensor, v: Tensor, r: int) -> Tensor:
    """(b ⊗ I_r) v for vectors (..., n1) -> (..., n2), e.g. RMSNorm weights."""
    return block_rows(b, v.unsqueeze(-1), r).squeeze(-1)


def layer_mix(gamma: Tensor, stacked: Tensor) -> Tensor:
    """Eq. 2 layer operator: W'_i = Σ_j gamma[i, j] W_j; stacked (L1, ...) -> (L2, ...)."""
    flat = stacked.reshape(stacked.shape[0], -1)          # (L1, prod(...))
    return (gamma.to(stacked.dtype) @ flat).reshape(gamma.shape[0], *stacked.shape[1:])
