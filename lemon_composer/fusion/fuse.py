"""Eq. 2 for a whole LLaMA: the trainable operators and ``fuse()``, source weights -> target state dict.

Per target layer i (Algorithm 1, dimension operators per source layer j, then layer mixing; A_j of
q, k, v, o mixes heads per rotary frequency by default, ``plan.attention``):
    q, k, v, up, gate: W'_i = Σ_j gamma_ij A_j W_j B_emb^T
    o, down:           W'_i = Σ_j gamma_ij B_emb W_j A_j^T
    ln1, ln2:          w'_i = Σ_j gamma_ij B_emb w_j   (1 with ``fold_norms``: the gains are in q, k, v, up, gate)
    embedding E' = E B_emb^T, lm_head H' = H B_emb^T, final norm B_emb w.
With ``norm_gains`` every target gain above is then scaled by (1 + G_norm[i]) or (1 + G_final); with
``output_gains`` every row of o'_i and down'_i by (1 + G_out[i]); with ``layer_maps`` q, k, v, up, gate
of layer i read through (I + M_read[i]) ⊗ I_{r_h} and o, down write through (I + M_write[i]) ⊗ I_{r_h}.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lemon_composer.fusion.operators import block_cols, block_rows, block_vec, frequency_head_mix, layer_mix
from lemon_composer.fusion.plan import FusionPlan

# parameter kind -> HF name inside a decoder layer
LAYER_WEIGHTS = {
    "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight", "up": "mlp.up_proj.weight", "gate": "mlp.gate_proj.weight",
    "down": "mlp.down_proj.weight", "ln1": "input_layernorm.weight", "ln2": "post_attention_layernorm.weight",
}


class FusionOperators(nn.Module):
    """The only trainable parameters of fusion: B_emb, A_attn, (A_kv), A_ffn, gamma.<kind>, (G_norm, G_final, G_out,
    M_read, M_write).

    Initialised to zeros; an initialiser (``lemon_composer.fusion.init``) sets the values.
    """

    def __init__(self, plan: FusionPlan) -> None:
        super().__init__()
        self.plan = plan
        shapes = plan.operator_shapes()
        self.B_emb = nn.Parameter(torch.zeros(shapes["B_emb"]))
        self.A_attn = nn.Parameter(torch.zeros(shapes["A_attn"]))
        self.A_kv = nn.Parameter(torch.zeros(shapes["A_kv"])) if "A_kv" in shapes else None
        self.A_ffn = nn.Parameter(torch.zeros(shapes["A_ffn"]))
        self.gamma = nn.ParameterDict({k: nn.Parameter(torch.zeros(shapes[f"gamma.{k}"]))
                                       for k in plan.gamma_kinds})
        self.G_norm = nn.Parameter(torch.zeros(shapes["G_norm"])) if plan.norm_gains else None
        self.G_final = nn.Parameter(torch.zeros(shapes["G_final"])) if plan.norm_gains else None
        self.G_out = nn.Parameter(torch.zeros(shapes["G_out"])) if plan.output_gains else None
        self.M_read = nn.Parameter(torch.zeros(shapes["M_read"])) if plan.layer_maps else None
        self.M_write = nn.Parameter(torch.zeros(shapes["M_write"])) if plan.layer_maps else None

    def tensors(self, *, train_dims: bool = True, train_layers: bool = True) -> dict[str, Tensor]:
        """The operators by name (``plan.operator_shapes()``); a group not trained is detached (App. A.4 stages)."""
        out = {}
        for name, p in self.named_parameters():
            train = train_layers if name.startswith("gamma.") else train_dims
            out[name] = p if train else p.detach()
        return out

    @torch.no_grad()
    def load_values(self, values: dict[str, Tensor]) -> None:
        """Set operators from ``{'B_emb': ..., 'gamma.q': ...}`` (names of ``plan.operator_shapes()``)."""
        params = dict(self.named_parameters())
        missing = set(params) - set(values)
        if missing:
            raise ValueError(f"initial values missing for {sorted(missing)}")
        for name, value in values.items():
            params[name].copy_(value)


#: kinds whose HF weight is (D1, n1) (output side on the residual stream); ``stack_layers`` stores
#: them transposed, (L1, n1, D1) contiguous, so that A_j acts on rows for every kind (no copy).
TRANSPOSED = ("o", "down")
NORMS = ("ln1", "ln2")


def stack_layers(source: dict[str, Tensor], n_layers: int) -> dict[str, Tensor]:
    """Source decoder weights stacked per kind in HF layout: {'q': (L1, attn1, D1), 'o': (L1, D1, attn1), ...}.

    o and down are transposed views of a contiguous (L1, n1, D1) stack (see ``TRANSPOSED``).
    """
    out = {}
    for kind, name in LAYER_WEIGHTS.items():
        ws = [source[f"model.layers.{j}.{name}"] for j in range(n_layers)]
        out[kind] = torch.stack([w.t() for w in ws]).transpose(1, 2) if kind in TRANSPOSED else torch.stack(ws)
    return out


def dimension_operator(plan: FusionPlan, kind: str) -> tuple[str, int]:
    """The per-layer operator of a kind and its receptive field (Table 1): A_attn, A_kv or A_ffn."""
    if kind in ("q", "o"):
        return "A_attn", plan.rf.r_a
    if kind in ("k", "v"):
        return ("A_kv" if plan.separate_kv else "A_attn"), plan.rf.r_a
    return "A_ffn", plan.rf.r_i


def dimension_fuse(plan: FusionPlan, ops: dict[str, Tensor], stacked: dict[str, Tensor],
                   sources: slice = slice(None)) -> dict[str, Tensor]:
    """Algorithm 1's dimension step for the source layers ``sources``: R_dim of Eq. 2, before gamma.

    Per source layer j: q, k, v, up, gate: A_j W_j B_emb^T; o, down: (B_emb W_j A_j^T)^T = A_j W_j^T B_emb^T;
    ln1, ln2: B_emb w_j. Returns kind -> (Lj, n2, D2) (o, down: the target weight transposed), norms (Lj, D2).
    """
    b = ops["B_emb"].to(stacked["q"].dtype)                      # one cast for every kind
    out: dict[str, Tensor] = {}
    for kind in plan.fused_kinds:
        w = stacked[kind][sources]                                # (Lj, rows, cols) HF layout
        if kind in NORMS:
            out[kind] = block_vec(b, w, plan.rf.r_h)             # (Lj, D2)
            continue
        if kind in TRANSPOSED:
            w = w.transpose(1, 2)                                 # (Lj, n1, D1): the contiguous storage
        name, r = dimension_operator(plan, kind)
        a = ops[name][sources].to(w.dtype)                        # block: (Lj, n2/r, n1/r); rope: (Lj, F/r, h2, h1)
        rows = (frequency_head_mix(a, w, plan.source.head_dim) if name != "A_ffn" and plan.attention == "rope"
                else block_rows(a, w, r))                         # (Lj, n2, m)
        out[kind] = block_cols(b, rows, plan.rf.r_h)              # (Lj, n2, D2)
    return out


def mix_layers(plan: FusionPlan, ops: dict[str, Tensor], per_source: dict[str, Tensor],
               sources: slice = slice(None)) -> dict[str, Tensor]:
    """Eq. 2's layer operator over the source layers ``sources``: kind -> (L2, ...).

    Summing the results over a partition of the source layers gives the full fusion: that is how
    sharded fusion splits the work across ranks.
    """
    out = {}
    for kind, stack in per_source.items():
        gamma = ops["gamma.shared"] if plan.shared_gamma else ops[f"gamma.{kind}"]
        out[kind] = layer_mix(gamma[:, sources], stack)          # (L2, ...)
    return out


def fuse_shared(plan: FusionPlan, ops: dict[str, Tensor], source: dict[str, Tensor]) -> dict[str, Tensor]:
    """Algorithm 1's shared weights: embedding E B_emb^T, final norm B_emb w, lm_head H B_emb^T (untied only).

    With ``fold_norms`` the final norm is 1 for an untied head (its gain is folded into it) and, for a
    tied head, which cannot hold it, the gain diag(B w B^T) would stand for read back through
    normalised rows: ((B∘B) w) / ((B∘B) 1), each target channel the energy-weighted mean of the source
    gains it reads (w at a selection; the best diagonal of Q^T diag(w) Q for a scaled rotation Q).
    """
    r_h = plan.rf.r_h
    emb, norm = source["model.embed_tokens.weight"], source["model.norm.weight"]
    b = ops["B_emb"].to(norm.dtype)
    if not plan.fold_norms:
        fused_norm = block_vec(b, norm, r_h)
    elif plan.source.tied:
        energy = b * b                                              # (D2/r_h, D1/r_h)
        fused_norm = block_vec(energy, norm, r_h) / block_vec(energy, torch.ones_like(norm), r_h).clamp_min(1e-12)
    else:
        fused_norm = norm.new_ones(plan.target.hidden)              # the gain lives in the head (fold.py)
    out = {"embed": _vocab_product(ops["B_emb"].to(emb.dtype), emb, r_h), "norm": fused_norm}
    if not plan.source.tied:
        head = source["lm_head.weight"]
        out["head"] = _vocab_product(ops["B_emb"].to(head.dtype), head, r_h)
    return out


def _vocab_product(b: Tensor, w: Tensor, r: int) -> Tensor:
    """E B_emb^T for a frozen (V, D1) embedding or head, recomputed in backward when r > 1.

    With r > 1 the blocked matmul works on a permuted copy of the whole (V, D1) source matrix,
    which autograd would keep until the step's backward; checkpointing keeps only ``b`` and a
    reference to ``w`` and redoes the product (once per optimizer step) in backward.
    """
    if r == 1 or not b.requires_grad:
        return block_cols(b, w, r)
    return checkpoint(block_cols, b, w, r, use_reentrant=False)


def to_state_dict(plan: FusionPlan, layers: dict[str, Tensor], shared: dict[str, Tensor]) -> dict[str, Tensor]:
    """The target's weights in ``LlamaForCausalLM`` naming, as views of the fused stacks (no copy)."""
    out: dict[str, Tensor] = {}
    for kind, stack in layers.items():
        for i, w in enumerate(stack.unbind(0)):                  # one UnbindBackward, not L2 selects
            out[f"model.layers.{i}.{LAYER_WEIGHTS[kind]}"] = w.t() if kind in TRANSPOSED else w
    if plan.fold_norms:                                          # folded gains: the target's norms are 1
        ones = shared["norm"].new_ones(plan.target.hidden)
        for i in range(plan.target.layers):
            for kind in NORMS:
                out[f"model.layers.{i}.{LAYER_WEIGHTS[kind]}"] = ones
    out["model.embed_tokens.weight"] = shared["embed"]
    out["model.norm.weight"] = shared["norm"]
    out["lm_head.weight"] = shared.get("head", shared["embed"])
    return out


def apply_gains(plan: FusionPlan, ops: dict[str, Tensor], state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The per-target-layer corrections beyond the paper, zero at init (every init stays exact); without
    either flag, ``state`` as is.

    ``norm_gains``: each target RMSNorm gain w'_i times (1 + G_norm[i]), the final one times (1 + G_final).
    The fused gains are B_emb-mixes of the source's, tied to the shared basis; these let each target
    layer rescale the channels it reads, which no LEMON operator can (A_j acts on the head / FFN side).
    ``output_gains``: each row (hidden output channel) of o'_i and down'_i times (1 + G_out[i]): the same
    freedom on the side each layer writes to the residual stream.
    ``layer_maps``: the dense form of both, in B_emb's Kronecker form: the columns of q'_i, k'_i, v'_i, up'_i,
    gate'_i times ((I + M_read[i]) ⊗ I_{r_h})^T, the rows of o'_i and down'_i (after G_out) by
    (I + M_write[i]) ⊗ I_{r_h}. B_emb is one basis for every layer; these give each target layer its own
    read and write maps on the residual stream.
    """
    if not (plan.norm_gains or plan.output_gains or plan.layer_maps):
        return state
    out = dict(state)

    def scale(name: str, g: Tensor) -> None:  # g (D2,): per hidden channel, the leading dim of every weight here
        w = state[name]
        out[name] = w * (1 + g.to(w.dtype)).reshape(-1, *([1] * (w.dim() - 1)))  # (D2[, in])

    for i in range(plan.target.layers):
        for n, kind in enumerate(NORMS if plan.norm_gains else ()):
            scale(f"model.layers.{i}.{LAYER_WEIGHTS[kind]}", ops["G_norm"][i, n])
        for n, kind in enumerate(("o", "down") if plan.output_gains else ()):
            scale(f"model.layers.{i}.{LAYER_WEIGHTS[kind]}", ops["G_out"][i, n])
    if plan.norm_gains:
        scale("model.norm.weight", ops["G_final"])
    for i in range(plan.target.layers if plan.layer_maps else 0):
        read, write, r = ops["M_read"][i], ops["M_write"][i], plan.rf.r_h
        for kind in ("q", "k", "v", "up", "gate"):
            w = out[f"model.layers.{i}.{LAYER_WEIGHTS[kind]}"]                   # (n, D2)
            out[f"model.layers.{i}.{LAYER_WEIGHTS[kind]}"] = w + block_cols(read.to(w.dtype), w, r)
        for kind in ("o", "down"):
            w = out[f"model.layers.{i}.{LAYER_WEIGHTS[kind]}"]                   # (D2, n)
            out[f"model.layers.{i}.{LAYER_WEIGHTS[kind]}"] = w + block_rows(write.to(w.dtype), w, r)
    return out


def fuse(plan: FusionPlan, ops: dict[str, Tensor], stacked: dict[str, Tensor],
         source: dict[str, Tensor]) -> dict[str, Tensor]:
    """Emit the full target state dict in ``LlamaForCausalLM`` naming (Eq. 2, Algorithm 1).

    Args:
        plan: sizes and receptive fields.
        ops: operator tensors by name (``FusionOperators.tensors()``).
        stacked: ``stack_layers(source)`` (computed once; the source is frozen).
        source: the source state dict (embedding, final norm, lm_head are read from it).
    """
    state = to_state_dict(plan, mix_layers(plan, ops, dimension_fuse(plan, ops, stacked)), fuse_shared(plan, ops, source))
    return apply_gains(plan, ops, state)
