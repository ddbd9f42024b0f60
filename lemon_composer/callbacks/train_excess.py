"""Per-domain excess loss of the fused model over its source on the training batches.

Dynamic batch loading (Sheared-LLaMA, Alg. 1) moves the mixture towards the domains whose loss ``l``
lags furthest behind a reference ``l_ref``. During fusion the frozen source is the natural reference,
and the fusion model already computes, for every training token, the fused model's cross-entropy and
the source's (``TokenStats`` of Eq. 4's loss): their per-domain means over a window of batches are
``l`` and ``l_ref`` at no extra forward and without touching the held-out split.

Why by hand: Composer's train metrics are means over all domains; nothing splits them by the
``domain`` of each row that ``lemon_mixture`` puts in the batch.

Each batch's sums are all-reduced at its end (Composer's ``dist.all_reduce``), so every rank holds
the same window and a checkpoint written by rank 0 resumes exactly with any number of ranks.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from composer.utils import dist
from torch import Tensor

SUMS = ("fused_ce", "source_ce", "tokens")  # the window's rows


class DomainExcess:
    """Sums of the fused and the source cross-entropy and of the tokens per domain, over a window."""

    def __init__(self, num_domains: int) -> None:
        self.window = np.zeros((len(SUMS), num_domains), dtype=np.float64)  # (3, k)
        self._batch: Tensor | None = None  # (3, k) on the loss's device, this batch's micro-batches

    def add(self, ce: Tensor, source_ce: Tensor, mask: Tensor, domain: Tensor) -> None:
        """One micro-batch: per-token ``ce``, ``source_ce``, ``mask`` (B, T-1) and each row's ``domain`` (B,)."""
        m = mask.to(torch.float64)
        rows = torch.stack([(ce.to(torch.float64) * m).sum(1), (source_ce.to(torch.float64) * m).sum(1),
                            m.sum(1)])  # (3, B)
        if self._batch is None:
            self._batch = torch.zeros(len(SUMS), self.window.shape[1], dtype=torch.float64, device=rows.device)
        self._batch.index_add_(1, domain.to(device=rows.device, dtype=torch.long), rows)

    def end_batch(self, to_device: Callable[[Tensor], Tensor]) -> None:
        """Add the batch's sums of every rank to the window (every rank calls this at every batch end);
        ``to_device`` puts a tensor where the process group's backend reduces it (Composer's
        ``state.device.tensor_to_device``)."""
        batch = self._batch
        if batch is None:  # a rank that saw no micro-batch still joins the collective
            batch = torch.zeros(len(SUMS), self.window.shape[1], dtype=torch.float64)
        batch = to_device(batch)
        dist.all_reduce(batch, reduce_operation="SUM")
        self.window += batch.cpu().numpy()
        self._batch = None

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The window's mean fused and source cross-entropy per domain (NaN where it had no token) and its
        token counts; starts a new window."""
        fused, source, tokens = self.window
        with np.errstate(invalid="ignore", divide="ignore"):
            means = fused / tokens, source / tokens
        self.window = np.zeros_like(self.window)
        return means[0], means[1], tokens

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        window = np.asarray(state["window"], dtype=np.float64)
        if window.shape != self.window.shape:
            raise ValueError(f"resume: the checkpoint's dynamic-loading window has shape {window.shape}, "
                             f"this run's {self.window.shape} (another number of domains)")
        self.window = window
