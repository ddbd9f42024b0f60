"""The Lagrangian of targeted structured pruning (Sheared-LLaMA Eq. 2; Wang et al. 2020):

    L_c = sum over size kinds of mean_i [ lambda1 e_i + lambda2 e_i^2 ],   e_i = (s_i - t) / n_source,

with s_i the expected size (``PruningMasks.expected_sizes``; i runs over layers for per-layer kinds),
t the target size ramped linearly from the source's size to the target's over the warm-up, and the
error taken as a fraction of the source's units (the scale of Sheared-LLaMA's sparsities).

The multipliers are *maximised* while everything else is minimised. Here that is a gradient
reversal: the loss uses ``GradReverse(lambda)``, identity forward and negated gradient backward,
so any optimizer that descends the total loss ascends it in the lambdas. Give them their own
optimizer param group (``param_str_match: lagrangian.``) with ``weight_decay: 0`` (decay would pull
them to 0, weakening the constraint), as the recipes do.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn


class GradReverse(torch.autograd.Function):
    """Identity forward, negated gradient backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return -grad


def warmup_batches(warmup: str, max_duration: str | None) -> int:
    """``lagrangian_warmup`` in batches: ``"320ba"``, or ``"0.1dur"`` of a ``max_duration`` in batches."""
    if m := re.fullmatch(r"\s*(\d+)\s*ba\s*", str(warmup)):
        return int(m.group(1))
    if m := re.fullmatch(r"\s*(\d*\.?\d+(?:e-?\d+)?)\s*dur\s*", str(warmup)):
        fraction = float(m.group(1))
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"model.lagrangian_warmup={warmup}: the fraction of dur must lie in [0, 1]")
        total = re.fullmatch(r"\s*(\d+)\s*ba\s*", str(max_duration)) if max_duration is not None else None
        if total is None:
            raise ValueError(f"model.lagrangian_warmup={warmup} is a fraction of the run, so model.max_duration "
                             f"must be the run's length in batches (e.g. max_duration: ${{max_duration}} with "
                             f"max_duration: 3200ba); got model.max_duration={max_duration!r}")
        return round(fraction * int(total.group(1)))
    raise ValueError(f"model.lagrangian_warmup={warmup!r}: expected batches (\"320ba\") or a fraction of the "
                     f"run (\"0.1dur\")")


class Lagrangian(nn.Module):
    """lambda_1 / lambda_2 per size kind (parameters ``lambda_1.<kind>``, ``lambda_2.<kind>``, init 0)."""

    def __init__(self, sizes: dict[str, tuple[int, int]], kinds: tuple[str, ...], warmup: int) -> None:
        super().__init__()
        self.sizes = {k: sizes[k] for k in kinds}
        self.warmup = warmup
        # shape (1,), not (): FSDP2's fully_shard refuses scalar parameters
        self.lambda_1 = nn.ParameterDict({k: nn.Parameter(torch.zeros(1)) for k in kinds})
        self.lambda_2 = nn.ParameterDict({k: nn.Parameter(torch.zeros(1)) for k in kinds})

    def target(self, kind: str, step: int) -> float:
        """Target size at ``step`` (batches done): source size -> target size, linear over the warm-up."""
        n1, n2 = self.sizes[kind]
        progress = 1.0 if self.warmup <= 0 else min(1.0, step / self.warmup)
        return n1 + (n2 - n1) * progress

    def forward(self, expected: dict[str, Tensor], step: int) -> Tensor:
        """The Lagrangian term; its gradient ascends the lambdas (``GradReverse``)."""
        total = torch.zeros((), device=self.lambda_1[next(iter(self.sizes))].device)
        for kind, (n1, _) in self.sizes.items():
            error = (expected[kind] - self.target(kind, step)) / n1
            l1, l2 = GradReverse.apply(self.lambda_1[kind]), GradReverse.apply(self.lambda_2[kind])
            total = total + (l1 * error + l2 * error.pow(2)).mean()
        return total
