"""From deterministic masks to a model: fold the gate values into the weights, slice to the target.

Folding (exact for the masked forward of ``masked_forward``):
- o_proj W (D1, H1 hd): columns of head h times z_head[h], rows times z_hidden * z_layer;
- down_proj W (D1, F1): columns times z_ffn, rows times z_hidden * z_layer (both residual updates);
- embedding columns times z_hidden. The head reads the final norm's output, which is scale-free in
  its input, so an untied head is unchanged. A tied head would read the scaled embedding, so the
  final norm's weight takes 1 / z_hidden on the kept channels: logits = sum_c (x_c / rms) (w_c / z_c)
  (W_vc z_c), the masked model's value.
Slicing keeps the layers, KV groups, query heads, neurons and channels whose gate is non-zero; the
RMSNorm weights are sliced to the kept channels (the masked norms already average over them only).
The result loads strictly into ``LlamaForCausalLM(target config)``.

``shear_selection`` describes the same result as a fusion ``Selection`` over the *folded* source.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import LlamaForCausalLM

from lemon_composer.fusion.init import Selection, layer_subset_gamma
from lemon_composer.fusion.plan import FusionPlan
from lemon_composer.pruning.masks import Gates, PruneShape


@dataclass
class Kept:
    """Kept units (sorted source indices). Per-layer lists have one entry per *source* layer."""
    layers: list[int]
    kv_heads: list[list[int]]
    heads: list[list[int]]       # source query heads, k * G1 + g, inside the kept KV groups
    ffn: list[list[int]]
    hidden: list[int]


def _nonzero(t: Tensor) -> list[int]:
    return torch.nonzero(t.detach()).flatten().tolist()


def kept_units(gates: Gates, shape: PruneShape) -> Kept:
    """The units with non-zero deterministic gates; checked to be exactly the target's counts."""
    heads = [_nonzero(h) for h in gates.heads]
    kept = Kept(layers=_nonzero(gates.layer), heads=heads,
                kv_heads=[sorted({h // shape.group1 for h in hs}) for hs in heads],
                ffn=[_nonzero(f) for f in gates.ffn], hidden=_nonzero(gates.hidden))
    counts = {"layers": (len(kept.layers), shape.layers2), "hidden": (len(kept.hidden), shape.hidden2)}
    for i in range(shape.layers1):
        counts[f"kv_heads[{i}]"] = (len(kept.kv_heads[i]), shape.kv2)
        counts[f"heads[{i}]"] = (len(kept.heads[i]), shape.heads2)
        counts[f"ffn[{i}]"] = (len(kept.ffn[i]), shape.ffn2)
    bad = {k: v for k, v in counts.items() if v[0] != v[1]}
    if bad:
        raise ValueError(f"gates are not deterministic target-size masks (kept, expected): {bad}")
    return kept


def fold_gates(state: dict[str, Tensor], gates: Gates, shape: PruneShape, *, tied: bool) -> dict[str, Tensor]:
    """Source-size weights (HF names) with the gate values folded in (module docstring)."""
    out = dict(state)
    z_h = gates.hidden.detach()
    emb = state["model.embed_tokens.weight"] * z_h.to(state["model.embed_tokens.weight"].dtype)   # (V, D1)
    out["model.embed_tokens.weight"] = emb
    if tied:
        norm = state["model.norm.weight"]
        out["model.norm.weight"] = torch.where(z_h != 0, norm / torch.where(z_h != 0, z_h, 1).to(norm.dtype),
                                               torch.zeros_like(norm))
        out["lm_head.weight"] = emb
    for i in range(shape.layers1):
        p = f"model.layers.{i}."
        rows = (z_h * gates.layer[i].detach()).unsqueeze(-1)                                      # (D1, 1)
        head_cols = gates.heads[i].detach().repeat_interleave(shape.head_dim)                    # (H1 hd,)
        for name, cols in (("self_attn.o_proj", head_cols), ("mlp.down_proj", gates.ffn[i].detach())):
            w = state[p + name + ".weight"]
            out[p + name + ".weight"] = w * (rows * cols).to(w.dtype)
            if p + name + ".bias" in state:
                b = state[p + name + ".bias"]
                out[p + name + ".bias"] = b * rows.squeeze(-1).to(b.dtype)
    return out


def _take(t: Tensor, rows: list[int] | None = None, cols: list[int] | None = None) -> Tensor:
    if rows is not None:
        t = t.index_select(0, torch.tensor(rows, device=t.device))
    if cols is not None:
        t = t.index_select(1, torch.tensor(cols, device=t.device))
    return t.contiguous()


def _head_rows(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def slice_state(state: dict[str, Tensor], kept: Kept, shape: PruneShape) -> dict[str, Tensor]:
    """Source-size (folded) weights -> the target's weights, layers renumbered 0..L2-1."""
    d = kept.hidden
    out = {"model.embed_tokens.weight": _take(state["model.embed_tokens.weight"], cols=d),
           "model.norm.weight": _take(state["model.norm.weight"], rows=d),
           "lm_head.weight": _take(state["lm_head.weight"], cols=d)}
    for new, i in enumerate(kept.layers):
        p, q = f"model.layers.{i}.", f"model.layers.{new}."
        q_rows = _head_rows(kept.heads[i], shape.head_dim)
        kv_rows = _head_rows(kept.kv_heads[i], shape.head_dim)
        rows_cols = {"self_attn.q_proj": (q_rows, d), "self_attn.k_proj": (kv_rows, d),
                     "self_attn.v_proj": (kv_rows, d), "self_attn.o_proj": (d, q_rows),
                     "mlp.gate_proj": (kept.ffn[i], d), "mlp.up_proj": (kept.ffn[i], d),
                     "mlp.down_proj": (d, kept.ffn[i])}
        for name, (rows, cols) in rows_cols.items():
            out[q + name + ".weight"] = _take(state[p + name + ".weight"], rows, cols)
            if p + name + ".bias" in state:
                out[q + name + ".bias"] = _take(state[p + name + ".bias"], rows)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[q + norm + ".weight"] = _take(state[p + norm + ".weight"], rows=d)
    return out


def pruned_model(source: LlamaForCausalLM, gates: Gates, shape: PruneShape) -> LlamaForCausalLM:
    """The strict target ``LlamaForCausalLM`` equal to ``source`` under deterministic ``gates``."""
    tied = bool(source.config.tie_word_embeddings)
    kept = kept_units(gates, shape)
    with torch.no_grad():
        state = slice_state(fold_gates(dict(source.state_dict()), gates, shape, tied=tied), kept, shape)
    cfg = shape.target_config(source.config)
    dtype = source.model.embed_tokens.weight.dtype
    model = LlamaForCausalLM(cfg).to(dtype)
    model.load_state_dict(state, strict=True)
    return model.eval()


def folded_source(source: LlamaForCausalLM, gates: Gates, shape: PruneShape) -> LlamaForCausalLM:
    """A source-size copy of ``source`` with the gate values folded in: the source that
    ``shear_selection`` selects from (its own forward is not the masked model's)."""
    model = LlamaForCausalLM(source.config).to(source.model.embed_tokens.weight.dtype)
    with torch.no_grad():
        state = fold_gates(dict(source.state_dict()), gates, shape, tied=bool(source.config.tie_word_embeddings))
    model.load_state_dict(state, strict=True)
    return model.eval()


def shear_selection(plan: FusionPlan, kept: Kept) -> Selection:
    """A fusion ``Selection`` that, applied to ``folded_source``, gives exactly ``pruned_model``.

    One-hot operators cannot carry the gate values, hence the folded source. Needs receptive fields
    of 1 (kept channels / neurons need not form aligned blocks) and the plan's target equal to the
    pruning target.
    """
    rf = plan.rf
    if (rf.r_h, rf.r_i) != (1, 1):
        raise ValueError(f"init from pruning masks needs receptive_field r_h = r_i = 1 (got r_h={rf.r_h}, "
                         f"r_i={rf.r_i}): pruned channels and neurons are not aligned blocks")
    t = plan.target
    if (len(kept.layers), len(kept.hidden), len(kept.kv_heads[0]), len(kept.heads[0]), len(kept.ffn[0])) != \
            (t.layers, t.hidden, t.kv_heads, t.heads, t.ffn):
        raise ValueError(f"the pruning masks keep a different shape than the fusion target {t}")
    return Selection(gamma=layer_subset_gamma(kept.layers, plan.source.layers), hidden=list(kept.hidden),
                     kv_heads=[list(k) for k in kept.kv_heads], heads=[list(h) for h in kept.heads],
                     ffn=[list(f) for f in kept.ffn])
