"""Initialisers (Sec. 3.4, 4.4): operators that reproduce a training-free baseline exactly at step 0.

Each baseline is a ``Selection``: layer weights ``gamma`` and, per source layer, which hidden blocks,
query heads, KV heads and FFN blocks the target keeps. ``operator_values`` turns it into one-hot
block operators (Eq. 5-6), so fusion at step 0 *is* the baseline.

- ``cut``: the first L2 layers and the first dims / heads / neurons (Eq. 5-6 with leading subsets);
- ``identity``: ``cut`` where every size is equal (the source itself);
- ``random``: seeded random sorted subsets of layers, hidden blocks, KV groups, heads, FFN blocks;
- ``avg``: adjacent layers clustered by CKA similarity (App. A.6), averaged in each cluster;
- ``prune``: the most important layers, heads, neurons and hidden channels on calibration data
  (``lemon_composer.fusion.init_prune``);
- ``lsq`` (beyond the paper): ``prune`` with least-squares scales of each kept layer's attention and
  MLP outputs standing in for the dropped layers (``lemon_composer.fusion.init_lsq``);
- ``pca`` (beyond the paper): ``prune`` with B_emb the scaled principal directions of the normalised
  residual stream, as SliceGPT rotates it (``lemon_composer.fusion.init_pca``; needs fold_norms, r_h 1).

Query heads are always chosen inside the chosen KV groups (the first ``group2`` members of each,
or the most important), so grouped-query attention stays exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lemon_composer.fusion.plan import FusionPlan

INITS = ("cut", "identity", "random", "avg", "prune", "lsq", "pca", "shear")
CALIBRATED_INITS = ("prune", "lsq", "pca")  # read calibration data (``model.calibration``)


@dataclass
class Selection:
    """A training-free baseline. Index lists are sorted and count blocks of the receptive field
    (hidden: r_h, ffn: r_i) or whole heads; per-layer lists have one entry per source layer."""
    gamma: Tensor                 # (L2, L1)
    hidden: list[int]             # D2/r_h source hidden blocks
    kv_heads: list[list[int]]     # per source layer: KV2 source KV heads
    heads: list[list[int]]        # per source layer: H2 source query heads, grouped under kv_heads
    ffn: list[list[int]]          # per source layer: H2/r_i source FFN blocks
    gamma_by_kind: dict[str, Tensor] = field(default_factory=dict)  # kinds whose gamma differs (lsq)
    b_emb: Tensor | None = None   # a dense B_emb instead of the ``hidden`` selection (pca)


def heads_in_groups(kv_heads: list[int], members: list[list[int]], group: int) -> list[int]:
    """Source query heads for the chosen KV heads and, in each group, the chosen member offsets."""
    return [k * group + m for k, ms in zip(kv_heads, members) for m in ms]


def leading_selection(plan: FusionPlan, gamma: Tensor) -> Selection:
    """First dims / KV groups / heads / neurons for every layer, with the given layer weights."""
    s, t, rf = plan.source, plan.target, plan.rf
    kv = list(range(t.kv_heads))
    heads = heads_in_groups(kv, [list(range(t.group))] * t.kv_heads, s.group)
    return Selection(gamma=gamma, hidden=list(range(t.hidden // rf.r_h)), kv_heads=[kv] * s.layers,
                     heads=[heads] * s.layers, ffn=[list(range(t.ffn // rf.r_i))] * s.layers)


def layer_subset_gamma(layers: list[int], n_source: int) -> Tensor:
    """Eq. 5: gamma[i, layers[i]] = 1."""
    gamma = torch.zeros(len(layers), n_source)
    gamma[torch.arange(len(layers)), torch.tensor(layers)] = 1.0
    return gamma


def cluster_gamma(clusters: list[list[int]], n_source: int) -> Tensor:
    """Averaging inside clusters: gamma[i, j] = 1/|C_i| for j in C_i."""
    gamma = torch.zeros(len(clusters), n_source)
    for i, members in enumerate(clusters):
        gamma[i, members] = 1.0 / len(members)
    return gamma


def cut_selection(plan: FusionPlan) -> Selection:
    return leading_selection(plan, layer_subset_gamma(list(range(plan.target.layers)), plan.source.layers))


def identity_selection(plan: FusionPlan) -> Selection:
    if plan.source != plan.target:
        raise ValueError(f"init=identity needs the target to equal the source; got target {plan.target} "
                         f"for source {plan.source}")
    return cut_selection(plan)


def random_selection(plan: FusionPlan, seed: int) -> Selection:
    """Seeded random sorted subsets, the same for every layer."""
    s, t, rf = plan.source, plan.target, plan.rf
    g = torch.Generator().manual_seed(seed)

    def subset(n: int, k: int) -> list[int]:
        return sorted(torch.randperm(n, generator=g)[:k].tolist())

    layers = subset(s.layers, t.layers)
    kv = subset(s.kv_heads, t.kv_heads)
    heads = heads_in_groups(kv, [subset(s.group, t.group) for _ in kv], s.group)
    return Selection(gamma=layer_subset_gamma(layers, s.layers), hidden=subset(s.hidden // rf.r_h, t.hidden // rf.r_h),
                     kv_heads=[kv] * s.layers, heads=[heads] * s.layers,
                     ffn=[subset(s.ffn // rf.r_i, t.ffn // rf.r_i)] * s.layers)


def _one_hot(rows: list[int], n_cols: int) -> Tensor:
    """b with b[i, rows[i]] = 1 (a block selection, Eq. 6)."""
    b = torch.zeros(len(rows), n_cols)
    b[torch.arange(len(rows)), torch.tensor(rows, dtype=torch.long)] = 1.0
    return b


def _head_operator(plan: FusionPlan, heads: list[int], n_source_heads: int) -> Tensor:
    """The attention operator of one source layer that keeps ``heads`` (whole heads, in order).

    rope: the head selection for every frequency group (F/r_a, heads2, heads1); block: the
    head_dim/r_a blocks of every kept head (Eq. 6).
    """
    d, r_a = plan.source.head_dim, plan.rf.r_a
    if plan.attention == "rope":
        return _one_hot(heads, n_source_heads).expand(d // 2 // r_a, -1, -1).clone()
    per_head = d // r_a
    return _one_hot([h * per_head + t for h in heads for t in range(per_head)], n_source_heads * per_head)


def operator_values(plan: FusionPlan, sel: Selection) -> dict[str, Tensor]:
    """One-hot operators (names of ``plan.operator_shapes()``) that reproduce the selection exactly."""
    s, rf = plan.source, plan.rf
    values = {
        "B_emb": _one_hot(sel.hidden, s.hidden // rf.r_h) if sel.b_emb is None else sel.b_emb,
        "A_attn": torch.stack([_head_operator(plan, h, s.heads) for h in sel.heads]),
        "A_ffn": torch.stack([_one_hot(f, s.ffn // rf.r_i) for f in sel.ffn]),
    }
    if plan.separate_kv:
        values["A_kv"] = torch.stack([_head_operator(plan, k, s.kv_heads) for k in sel.kv_heads])
    if plan.shared_gamma and sel.gamma_by_kind:
        raise ValueError(f"this init sets gamma per kind ({sorted(sel.gamma_by_kind)}): it needs shared_gamma=false")
    for kind in plan.gamma_kinds:
        values[f"gamma.{kind}"] = sel.gamma_by_kind.get(kind, sel.gamma).clone()
    shapes = plan.operator_shapes()
    if plan.norm_gains:  # no gain correction: the selection's own gains
        values["G_norm"], values["G_final"] = torch.zeros(shapes["G_norm"]), torch.zeros(shapes["G_final"])
    if plan.output_gains:  # nor output scaling
        values["G_out"] = torch.zeros(shapes["G_out"])
    if plan.layer_maps:  # nor read / write maps: identity
        values["M_read"], values["M_write"] = torch.zeros(shapes["M_read"]), torch.zeros(shapes["M_write"])
    for name, value in values.items():
        if tuple(value.shape) != shapes[name]:
            raise ValueError(f"selection gives {name} of shape {tuple(value.shape)}, plan expects {shapes[name]}")
    return values
