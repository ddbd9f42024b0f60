"""Eq. 4, chunked over tokens: lam * LM + (1 - lam) * T^2 KL(p_source^T || p_target^T), never the full logits.

The loss takes the student's and the teacher's *final hidden states* and their lm_head weights, and
walks the tokens in chunks: per chunk it forms both logit blocks (C, V), the per-token CE and KL,
and, when the student needs gradients, their gradient with respect to the student logits in
closed form,

    dL/dz = m / n * [lam (softmax(z) - onehot(y)) + (1 - lam) T (softmax(z / T) - softmax(t / T))],

which it turns straight into dL/dh = dz W and dL/dW += dz^T h. Backward then only scales those by
the incoming gradient. Softmaxes are computed in place where possible, so at most three (C, V) fp32
blocks exist at any time (two between steps), and nothing of vocab size is kept for backward. PyTorch's ``cross_entropy`` and ``kl_div`` would keep several (N, V)
copies of the logits alive until backward (what Liger-Kernel's fused linear cross-entropy also
avoids); that is why this is written by hand.

Per-token statistics (student CE, KL, teacher CE) come out alongside, for the metrics.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class TokenStats:
    """Per-token values at label positions (B, T-1) and the label mask, for metrics and logging."""
    ce: Tensor
    kl: Tensor
    source_ce: Tensor
    mask: Tensor


def _rowdot(x: Tensor, y: Tensor) -> Tensor:
    """Σ_v x[c, v] y[c, v] per row as a batched dot product: no (C, V) temporary."""
    return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).view(-1)


def _chunk(zs: Tensor, zt: Tensor, labels: Tensor, lam: float, temperature: float, n: Tensor,
           need_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One chunk: per-token CE, KL, teacher CE and (if ``need_grad``) dL/dz; consumes ``zs`` and ``zt``.

    zs, zt: (C, V) student / teacher logits; labels (C,) with IGNORE_INDEX allowed; n: label count.
    """
    T = temperature
    safe = labels.clamp(min=0).unsqueeze(1)                        # (C, 1)
    ls = torch.log_softmax(zs, dim=-1)                             # log p
    ce = -ls.gather(1, safe).squeeze(1)
    ls_t = ls if T == 1.0 else torch.log_softmax(zs.div_(T), dim=-1)   # log p^T
    del zs
    if T == 1.0:
        lq = torch.log_softmax(zt, dim=-1)                         # log q (teacher)
        source_ce = -lq.gather(1, safe).squeeze(1)
    else:
        source_ce = zt.logsumexp(-1) - zt.gather(1, safe).squeeze(1)
        lq = torch.log_softmax(zt.div_(T), dim=-1)                 # log q^T
    del zt
    diff = lq - ls_t
    q = lq.exp_()                                                  # q^T, in place
    kl = _rowdot(q, diff) * T**2                                   # Σ q (log q - log p) T^2
    del diff
    if not need_grad:
        return ce, kl, source_ce, None
    # dL/dz = lam (p - onehot) + (1 - lam) T (p^T - q^T), scaled by mask / n
    p_t = ls_t.exp_() if T != 1.0 else None
    dz = ls.exp_()                                                 # p, in place
    if p_t is None:
        dz.sub_(q, alpha=1 - lam)
    else:
        dz.mul_(lam).add_(p_t, alpha=(1 - lam) * T).sub_(q, alpha=(1 - lam) * T)
    dz[torch.arange(dz.shape[0], device=dz.device), safe.squeeze(1)] -= lam
    dz.mul_(((labels != IGNORE_INDEX).to(dz.dtype) / n).unsqueeze(1))   # ignored tokens contribute nothing
    return ce, kl, source_ce, dz


class _FusedDistillLoss(torch.autograd.Function):
    """Loss value in forward with dL/dh_s and dL/dW_s computed alongside; backward scales them."""

    @staticmethod
    @torch.autocast("cuda", enabled=False)  # Composer runs loss() under autocast: keep this math in fp32
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, labels: Tensor,  # type: ignore[override]
                lam: float, temperature: float, chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        acc = torch.promote_types(h_s.dtype, torch.float32)      # fp32 at least (fp64 stays fp64)
        mask = (labels != IGNORE_INDEX)
        n = mask.sum().clamp(min=1).to(acc)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(h_s, dtype=acc) if need_grad else None
        grad_w = torch.zeros_like(w_s, dtype=acc) if need_grad else None
        w_s_acc = w_s.to(acc) if need_grad else None
        stats = torch.empty(3, labels.numel(), dtype=acc, device=h_s.device)  # ce, kl, source ce
        for start in range(0, labels.numel(), chunk):
            sl = slice(start, start + chunk)
            # the logit blocks are handed over, not kept here, so _chunk can free them as it goes
            ce, kl, source_ce, dz = _chunk((h_s[sl].to(w_s.dtype) @ w_s.t()).to(acc),   # (C, V) student
                                           (h_t[sl].to(w_t.dtype) @ w_t.t()).to(acc),   # (C, V) teacher
                                           labels[sl], lam, temperature, n, need_grad)
            stats[0, sl], stats[1, sl], stats[2, sl] = ce, kl, source_ce
            if dz is not None:
                grad_h[sl] = dz @ w_s_acc
                grad_w.addmm_(dz.t(), h_s[sl].to(acc))
        maskf = mask.to(acc)
        lm = (stats[0] * maskf).sum() / n
        kl = (stats[1] * maskf).sum() / n
        total = lam * lm + (1 - lam) * kl
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h_s.dtype, w_s.dtype)
        ctx.mark_non_differentiable(lm, kl, stats)
        return total, lm, kl, stats

    @staticmethod
    def backward(ctx, grad_total: Tensor, *_: Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        dh = (grad_h * grad_total).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        dw = (grad_w * grad_total).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None, None, None, None


def distill_loss(h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, labels: Tensor, *, lam: float,
                 temperature: float, chunk_tokens: int) -> tuple[Tensor, Tensor, Tensor, TokenStats]:
    """Eq. 4 over label positions: (total, lm, kl, per-token stats).

    Args:
        h_s: student final hidden states (B, T, D2); w_s: student lm_head (V, D2).
        h_t: teacher final hidden states (B, T, D1); w_t: teacher lm_head (V, D1).
        labels: (B, T) next-token targets already aligned with the hidden states, IGNORE_INDEX masked.
        chunk_tokens: tokens per chunk; memory is about 3 * chunk_tokens * V * 4 bytes.
    """
    shape = labels.shape
    total, lm, kl, stats = _FusedDistillLoss.apply(
        h_s.reshape(-1, h_s.shape[-1]), w_s, h_t.reshape(-1, h_t.shape[-1]), w_t, labels.reshape(-1),
        lam, temperature, chunk_tokens)
    mask = (labels != IGNORE_INDEX).to(torch.float32)
    return total, lm, kl, TokenStats(ce=stats[0].view(shape), kl=stats[1].view(shape),
                                     source_ce=stats[2].view(shape), mask=mask)
