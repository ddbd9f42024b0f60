"""``lemon_finite_guard``: stop a run at the first NaN or inf, naming the batch (1-based, as Composer's
console shows it) and the tensor.

Composer's ``nan_monitor`` catches a NaN train loss only, and names neither the step nor an inf.
This checks every loss term after each loss and, every ``interval`` batches after the optimizer
step, every trainable parameter (the fusion operators; the whole model in continued pre-training,
each rank its own FSDP shard), with one device sync for all of them; only when something is not
finite does it look for the name. The run stops before the next checkpoint can save the damage.

Logged: nothing; raises ``FloatingPointError``.
"""
from __future__ import annotations

import torch
from composer.core import Callback, State
from composer.loggers import Logger


def _kind(t: torch.Tensor) -> str:
    return "NaN" if torch.isnan(t).any() else "inf"


class FiniteGuard(Callback):
    """Args: interval: check the trainable parameters every this many batches (the loss: every batch)."""

    def __init__(self, interval: int = 1) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"callbacks.lemon_finite_guard.interval={interval!r}: expected a positive integer")
        self.interval = interval

    def after_loss(self, state: State, logger: Logger) -> None:
        losses = state.loss if isinstance(state.loss, dict) else {"total": state.loss}
        for name, value in losses.items():
            if isinstance(value, torch.Tensor) and not torch.isfinite(value).all():
                raise FloatingPointError(f"batch {int(state.timestamp.batch) + 1}: train loss '{name}' is "
                                         f"{_kind(value)}; stopping before the optimizer step")

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) % self.interval:
            return
        params = [(n, p) for n, p in state.model.named_parameters() if p.requires_grad and p.numel()]
        if not params or torch.stack([torch.isfinite(p).all() for _, p in params]).all():  # one sync
            return
        name, bad = next((n, p) for n, p in params if not torch.isfinite(p).all())
        raise FloatingPointError(f"batch {int(state.timestamp.batch)}: parameter {name} {tuple(bad.shape)} holds "
                                 f"{_kind(bad.detach())} after the optimizer step (lower the learning rate or "
                                 f"resume from the last checkpoint)")
