"""RMSNorm gain folding (``model.fold_norms``): an equivalent source whose gains live in the weights.

LLaMA computes W (w ⊙ x / rms(x)) for q, k, v (w = ln1) and up, gate (w = ln2), and H (w ⊙ h / rms(h))
for the head (w = the final norm). Folding sets W <- W diag(w) and w <- 1: the same function. Fused
from the folded source, a target weight is A W diag(w) B_emb^T for any B_emb, while fusing the gain
as a vector, B_emb w, stands for B_emb diag(w) B_emb^T only when B_emb selects channels. So the
target's norms are fixed at 1 and their gammas drop out (``FusionPlan.gamma_kinds``).

A tied head shares the embedding matrix, so the final gain stays unfolded there (``fuse_shared`` fuses it
as the energy-weighted mean of the source gains each target channel reads).
"""
from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

#: the norm each decoder weight reads its input through
FOLDS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "post_attention_layernorm": ("mlp.up_proj", "mlp.gate_proj")}


@torch.no_grad()
def fold_norms(model: LlamaForCausalLM) -> None:
    """Fold every RMSNorm gain into the weights that read its output, in place (an equivalent model)."""
    for layer in model.model.layers:
        for norm_name, linears in FOLDS.items():
            norm = layer.get_submodule(norm_name).weight
            for name in linears:
                layer.get_submodule(name).weight.mul_(norm[None, :])
            norm.fill_(1.0)
    if not model.config.tie_word_embeddings:
        model.lm_head.weight.mul_(model.model.norm.weight[None, :])
        model.model.norm.weight.fill_(1.0)
