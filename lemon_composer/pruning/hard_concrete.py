"""Hard-concrete L0 gates (Louizos et al. 2018, "Learning Sparse Neural Networks through L0
Regularization", Sec. 3), with the constants and evaluation rule of Sheared-LLaMA's ``l0_module``.

A gate with location ``log_alpha`` is a binary-concrete variable s stretched to (l, r) and clipped:
    u ~ U(eps, 1 - eps),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
    z = clamp(s (r - l) + l, 0, 1).
Its probability of being non-zero (the expected L0 norm, used as the gate's expected size) is
    P(z > 0) = 1 - Q(s < 0) = sigmoid(log_alpha - beta log(-l / r)).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

BETA = 2.0 / 3.0                      # temperature
STRETCH = (-0.1, 1.1)                 # (l, r)
EPS = 1e-6                            # u is drawn from U(EPS, 1 - EPS)
EVAL_SHARPNESS = 0.8                  # Sheared-LLaMA's deterministic soft gate sigmoid(log_alpha / beta * 0.8)
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))  # Sheared-LLaMA clamps log_alpha to this range


def init_log_alpha(shape: tuple[int, ...], droprate_init: float, *, noise_std: float = 1e-2,
                   device: torch.device | str | None = None) -> Tensor:
    """log(1 - p) - log(p) plus N(0, noise_std) noise (Louizos et al. Sec. 4; Sheared-LLaMA)."""
    mean = math.log(1 - droprate_init) - math.log(droprate_init)
    return torch.empty(shape, device=device).normal_(mean, noise_std)


def sample_gates(log_alpha: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One reparameterised sample z in [0, 1] per gate (differentiable w.r.t. ``log_alpha``).

    The uniform noise is drawn on the CPU from ``generator`` (default: torch's global one) and moved
    to ``log_alpha``'s device, so a CPU generator's state reproduces it on any device.
    """
    low, high = STRETCH
    u = torch.empty(log_alpha.shape, dtype=log_alpha.dtype).uniform_(EPS, 1 - EPS, generator=generator)
    u = u.to(log_alpha.device)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (high - low) + low).clamp(0.0, 1.0)


def expected_gates(log_alpha: Tensor) -> Tensor:
    """P(z > 0) = sigmoid(log_alpha - beta log(-l / r)): each gate's expected L0 norm."""
    low, high = STRETCH
    return torch.sigmoid(log_alpha - BETA * math.log(-low / high))


def deterministic_gates(log_alpha: Tensor, keep: int) -> Tensor:
    """Evaluation gates: the ``keep`` largest ``log_alpha`` along the last dim (ties: lower index)
    keep the soft value sigmoid(log_alpha / beta * 0.8); the others are 0 (Sheared-LLaMA)."""
    soft = torch.sigmoid(log_alpha / BETA * EVAL_SHARPNESS)
    order = torch.sort(log_alpha.detach(), dim=-1, descending=True, stable=True).indices
    kept = torch.zeros_like(soft, dtype=torch.bool).scatter_(-1, order[..., :keep], True)
    return torch.where(kept, soft, torch.zeros_like(soft))
