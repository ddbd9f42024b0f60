"""Eq. 4, chunked over tokens: lam * LM + (1 - lam) * T^2 KL(p_source^T || p_target^T), never the full logits.

The loss takes the student's and the teacher's *final hidden states* and their lm_head weights, and
walks the tokens in chunks: per chunk it forms both logit blocks (C, V), the per-token CE and KL,
and, when the student needs gradients, their gradient with respect to the student logits in
closed form,

    dL/dz = m / n * [lam (softmax(z) - onehot(y)) + (1 - lam) T (softmax(z / T) - softmax(t / T))],

which it turns straight into dL/dh = dz W and dL/dW += dz^T h. Backward then only scales those by
the incoming gradient. So at most three (C, V) fp32 blocks exist at any time, and nothing of vocab
size is kept for backward. PyTorch's ``cross_entropy`` and ``kl_div`` would keep several (N, V)
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


def _chunk_terms(zs: Tensor, zt: Tensor, labels: Tensor, temperature: float) -> tuple[Tensor, ...]:
    """One chunk's per-token CE, KL, teacher CE; leaves ``zt`` holding softmax(t / T) (in place).

    zs, zt: (C, V) fp32 (or fp64) student / teacher logits; labels (C,) with IGNORE_INDEX allowed.
    """
    safe = labels.clamp(min=0).unsqueeze(1)                       # (C, 1)
    lse = zs.logsumexp(-1)                                        # (C,)
    ce = lse - zs.gather(1, safe).squeeze(1)
    source_ce = zt.logsumexp(-1) - zt.gather(1, safe).squeeze(1)
    zs_t = zs / temperature if temperature != 1.0 else zs
    lse_t = zs_t.logsumexp(-1)
    zt.div_(temperature)
    zt.sub_(zt.logsumexp(-1, keepdim=True))                       # log q, in place
    entropy_term = (zt.exp() * zt).sum(-1)                        # Σ q log q
    zt.exp_()                                                     # q, in place
    cross = (zt * zs_t).sum(-1)                                   # Σ q z / T
    kl = (entropy_term - cross + lse_t) * temperature**2
    return ce, kl, source_ce, lse, lse_t


class _FusedDistillLoss(torch.autograd.Function):
    """Loss value in forward with dL/dh_s and dL/dW_s computed alongside; backward scales them."""

    @staticmethod
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
            zs = (h_s[sl] @ w_s.t()).to(acc)                     # (C, V)
            zt = (h_t[sl] @ w_t.t()).to(acc)                     # (C, V)
            ce, kl, source_ce, lse, lse_t = _chunk_terms(zs, zt, labels[sl], temperature)
            stats[0, sl], stats[1, sl], stats[2, sl] = ce, kl, source_ce
            if not need_grad:
                continue
            m = mask[sl].to(acc).unsqueeze(1) / n         # (C, 1)
            soft_t = (zs / temperature).sub_(lse_t.unsqueeze(1)).exp_() if temperature != 1.0 else None
            dz = zs.sub_(lse.unsqueeze(1)).exp_()                   # softmax(z), in place
            if soft_t is None:
                dz.mul_(lam + (1 - lam) * temperature)
            else:
                dz.mul_(lam).add_(soft_t, alpha=(1 - lam) * temperature)
            dz.sub_(zt, alpha=(1 - lam) * temperature)             # zt holds softmax(t / T)
            rows = torch.arange(dz.shape[0], device=dz.device)
            dz[rows, labels[sl].clamp(min=0)] -= lam
            dz.mul_(m)                                              # ignored tokens contribute nothing
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
