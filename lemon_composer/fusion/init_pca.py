"""``pca`` initialiser (beyond the paper): B_emb from the principal directions of the residual stream.

SliceGPT (Ashkboos et al. 2024) shows that with the RMSNorm gains folded into the weights, a
transformer is invariant to an orthogonal rotation Q of its residual stream, and that keeping the
top principal directions of the normalised hidden states loses little. Here, on calibration data:

    C = Σ over tokens and over every decoder layer's input (and the last output) of x x^T,  x = h / rms(h)
    Q = the top D2 eigenvectors of C (D2, D1),   e = Σ |Q x|² / Σ |x|²   (the energy Q keeps)
    B_emb = s Q,   s = sqrt(e D1 / D2)

The target's residual stream is then s Q h; RMSNorm cannot see s, and s makes rms(s Q h) / s match
rms(h) on average, so every input weight A W diag(w) B_emb^T reads Q^T Q h / rms(h) ≈ h / rms(h).
Heads, neurons and layers come from ``prune``. One B_emb acts on the whole residual stream, so it is
one rotation for all layers (SliceGPT's per-layer rotations need adapters LEMON has no operator for).
Needs ``fold_norms`` (with unfolded gains, B_emb w does not stand for the gains once B_emb mixes
channels) and ``receptive_field.r_h: 1`` (principal directions are not blocks).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import LlamaForCausalLM

from lemon_composer.fusion.init import Selection
from lemon_composer.fusion.plan import FusionPlan


def check_pca(fold_norms: bool, r_h: int) -> None:
    """The options ``pca`` needs, named by their yaml keys (checked before any weights load)."""
    if not fold_norms:
        raise ValueError("model.init=pca mixes hidden channels: it needs model.fold_norms=true so the RMSNorm "
                         "gains stay consistent")
    if r_h != 1:
        raise ValueError(f"model.init=pca sets a dense B_emb: it needs model.receptive_field.r_h=1, got {r_h}")


def residual_second_moment(source: LlamaForCausalLM, batches: list[Tensor]) -> Tensor:
    """(D1, D1) Σ x x^T of the normalised inputs of every decoder layer and the last layer's output (fp64)."""
    d = source.config.hidden_size
    moment = torch.zeros(d, d, dtype=torch.float64)

    def add(h: Tensor) -> None:
        x = h.double().reshape(-1, d)                                             # (tokens, D1)
        x = x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)          # h / rms(h)
        moment.add_((x.T @ x).cpu())

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        add(args[0] if args else kwargs["hidden_states"])

    def post(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        add(output[0] if isinstance(output, tuple) else output)

    layers = source.model.layers
    handles = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(post, with_kwargs=True))
    device = next(source.parameters()).device
    try:
        with torch.no_grad():
            for ids in batches:
                source.model(input_ids=ids.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return moment


def principal_b_emb(moment: Tensor, d2: int) -> Tensor:
    """s Q: the top-``d2`` eigenvectors of ``moment`` as rows, signs fixed (largest entry positive), scaled."""
    evals, evecs = torch.linalg.eigh(moment)                                      # ascending
    q = evecs[:, -d2:].flip(-1).T                                                 # (D2, D1), descending
    signs = torch.sign(q.gather(1, q.abs().argmax(1, keepdim=True)))              # (D2, 1)
    q = q * signs
    energy = evals[-d2:].sum() / evals.sum()
    scale = torch.sqrt(energy * moment.shape[0] / d2)
    return (scale * q).float()


def pca_selection(plan: FusionPlan, source: LlamaForCausalLM, batches: list[Tensor], pruned: Selection) -> Selection:
    """``pca``: ``pruned`` (prune's heads, neurons and layers) with ``principal_b_emb`` as B_emb."""
    check_pca(plan.fold_norms, plan.rf.r_h)
    b = principal_b_emb(residual_second_moment(source, batches), plan.target.hidden)
    return Selection(gamma=pruned.gamma, hidden=pruned.hidden, kv_heads=pruned.kv_heads, heads=pruned.heads,
                     ffn=pruned.ffn, b_emb=b)

