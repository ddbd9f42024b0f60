"""The chunked fused loss equals Eq. 4 written the obvious way (full logits, PyTorch's CE and KL)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lemon_composer.models.distill_loss import distill_loss


def reference(h_s, w_s, h_t, w_t, labels, lam, temperature):
    zs, zt = h_s @ w_s.t(), h_t @ w_t.t()
    mask = (labels != -100).to(zs.dtype)
    lm = F.cross_entropy(zs.reshape(-1, zs.shape[-1]), labels.reshape(-1), ignore_index=-100)
    kl_tok = F.kl_div(F.log_softmax(zs / temperature, -1), F.log_softmax(zt / temperature, -1), log_target=True,
                      reduction="none").sum(-1) * temperature**2
    kl = (kl_tok * mask).sum() / mask.sum()
    source_ce = F.cross_entropy(zt.transpose(1, 2), labels.clamp(min=0), reduction="none")
    return lam * lm + (1 - lam) * kl, lm, kl, kl_tok, source_ce


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_fused_loss_and_gradients_equal_the_full_logit_loss(temperature, chunk):
    g = torch.Generator().manual_seed(chunk)
    h_s = torch.randn(3, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(13, 6, generator=g, dtype=torch.float64, requires_grad=True)
    h_t, w_t = torch.randn(3, 7, 8, generator=g, dtype=torch.float64), torch.randn(13, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 13, (3, 7), generator=g)
    labels[0, :3] = -100
    total, lm, kl, stats = distill_loss(h_s, w_s, h_t, w_t, labels, lam=0.3, temperature=temperature, chunk_tokens=chunk)
    ref_total, ref_lm, ref_kl, ref_kl_tok, ref_source_ce = reference(h_s, w_s, h_t, w_t, labels, 0.3, temperature)
    for got, want in ((total, ref_total), (lm, ref_lm), (kl, ref_kl)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    keep = labels != -100
    torch.testing.assert_close(stats.kl[keep], ref_kl_tok[keep], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.source_ce[keep], ref_source_ce[keep], rtol=1e-12, atol=1e-12)
    assert stats.mask.sum() == keep.sum()
    got = torch.autograd.grad(3.0 * total, (h_s, w_s))
    want = torch.autograd.grad(3.0 * ref_total, (h_s, w_s))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert got[0][0, :3].abs().max() == 0  # ignored positions get no gradient


def test_no_gradient_path_gives_the_same_values():
    g = torch.Generator().manual_seed(0)
    h_s, w_s = torch.randn(2, 5, 4, generator=g), torch.randn(9, 4, generator=g)
    h_t, w_t = torch.randn(2, 5, 4, generator=g), torch.randn(9, 4, generator=g)
    labels = torch.randint(0, 9, (2, 5), generator=g)
    with torch.no_grad():
        a = distill_loss(h_s, w_s, h_t, w_t, labels, lam=0.5, temperature=1.0, chunk_tokens=3)
    b = distill_loss(h_s.requires_grad_(), w_s, h_t, w_t, labels, lam=0.5, temperature=1.0, chunk_tokens=3)
    torch.testing.assert_close(a[0], b[0].detach(), rtol=0, atol=0)


def test_autocast_does_not_lower_the_loss_precision():
    """Composer runs loss() under autocast; the fused loss keeps its own fp32 math."""
    g = torch.Generator().manual_seed(1)
    h_s, w_s = torch.randn(2, 8, 16, generator=g), torch.randn(50, 16, generator=g)
    h_t, w_t = torch.randn(2, 8, 16, generator=g), torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 50, (2, 8), generator=g)
    plain = distill_loss(h_s, w_s, h_t, w_t, labels, lam=0.5, temperature=1.0, chunk_tokens=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = distill_loss(h_s, w_s, h_t, w_t, labels, lam=0.5, temperature=1.0, chunk_tokens=4)
    for a, b in zip(plain[:3], autocast[:3]):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=0, atol=0)
