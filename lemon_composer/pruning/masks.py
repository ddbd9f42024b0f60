"""The L0 mask set of targeted structured pruning (Sheared-LLaMA Sec. 2.1), extended to
grouped-query attention.

Gates (hard-concrete, ``hard_concrete``), for a source of L1 layers, K1 KV groups of G1 query heads
(H1 = K1 G1; an MHA source is K1 = H1, G1 = 1), F1 FFN neurons and D1 hidden channels:
- ``layer`` (L1,): one per decoder layer, scaling its attention and MLP residual updates;
- ``kv`` (L1, K1): one per KV group; a dropped group drops its query heads too;
- ``query`` (L1, K1, G1): query heads inside each group, only when the target keeps fewer query
  heads per group than the source (``query_per_kv: target`` with G2 < G1);
- ``ffn`` (L1, F1): FFN neurons; ``hidden`` (D1,): residual channels, shared by all layers.
Query head h = k G1 + g reads KV group k (transformers' ``repeat_kv`` layout).

Expected sizes (units kept, from E[z] = P(z > 0) of each gate):
    layers  = sum_i E[z_layer_i]
    kv_heads[i] = sum_k E[z_kv_ik]
    heads[i]    = sum_k E[z_kv_ik] * sum_g E[z_query_ikg]     (G1 sum_k E[z_kv_ik] without query gates)
    ffn[i]      = sum_f E[z_ffn_if]
    hidden  = sum_c E[z_hidden_c]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LlamaConfig

from lemon_composer.pruning.hard_concrete import (LOG_ALPHA_RANGE, deterministic_gates, expected_gates,
                                                  init_log_alpha, sample_gates)

QUERY_PER_KV = ("source", "target")
TARGET_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "num_hidden_layers", "vocab_size")


@dataclass(frozen=True)
class PruneShape:
    """Source and target unit counts (``*1``, ``*2``), checked against each other."""
    layers1: int
    layers2: int
    kv1: int
    kv2: int
    group1: int
    group2: int
    ffn1: int
    ffn2: int
    hidden1: int
    hidden2: int
    head_dim: int

    @property
    def heads1(self) -> int:
        return self.kv1 * self.group1

    @property
    def heads2(self) -> int:
        return self.kv2 * self.group2

    @property
    def has_query_gates(self) -> bool:
        return self.group2 < self.group1

    def sizes(self) -> dict[str, tuple[int, int]]:
        """Size kind -> (source units, target units), per layer for kv_heads / heads / ffn."""
        return {"layers": (self.layers1, self.layers2), "kv_heads": (self.kv1, self.kv2),
                "heads": (self.heads1, self.heads2), "ffn": (self.ffn1, self.ffn2),
                "hidden": (self.hidden1, self.hidden2)}

    @classmethod
    def build(cls, source: LlamaConfig, target: dict[str, Any], query_per_kv: str,
              *, key: str = "model.target") -> "PruneShape":
        """Validate ``target`` (yaml ``model.target``) against the source config; errors name the key."""
        if not isinstance(target, dict):
            raise ValueError(f"{key}={target!r}: expected a mapping with keys {list(TARGET_KEYS[:5])}")
        unknown = sorted(set(target) - set(TARGET_KEYS))
        if unknown:
            raise ValueError(f"{key}: unknown keys {unknown}; accepted: {list(TARGET_KEYS)}")
        if query_per_kv not in QUERY_PER_KV:
            raise ValueError(f"model.query_per_kv={query_per_kv!r}: expected one of {QUERY_PER_KV}")
        for name in TARGET_KEYS[:5]:
            if name == "num_key_value_heads" and target.get(name) is None:
                continue
            value = target.get(name)
            if value is None:
                raise ValueError(f"{key}.{name} is required")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}.{name}={value!r}: expected a positive integer")
        if target.get("vocab_size") not in (None, source.vocab_size):
            raise ValueError(f"{key}.vocab_size={target['vocab_size']}: pruning keeps the source's vocabulary "
                             f"({source.vocab_size})")
        heads1, kv1 = source.num_attention_heads, source.num_key_value_heads or source.num_attention_heads
        head_dim = getattr(source, "head_dim", None) or source.hidden_size // heads1
        group1 = heads1 // kv1
        heads2 = target["num_attention_heads"]
        kv2 = target.get("num_key_value_heads") or max(1, heads2 // group1)
        if heads2 * head_dim != target["hidden_size"]:
            raise ValueError(f"{key}.hidden_size={target['hidden_size']}: expected num_attention_heads x the "
                             f"source's head_dim = {heads2} x {head_dim} = {heads2 * head_dim} (whole heads are "
                             f"pruned, head_dim is kept)")
        if heads2 % kv2:
            raise ValueError(f"{key}.num_key_value_heads={kv2} must divide num_attention_heads={heads2}")
        if query_per_kv == "source" and kv2 * group1 != heads2:
            raise ValueError(f"{key}.num_attention_heads={heads2}: query_per_kv=source keeps the source's "
                             f"{group1} query heads per KV group, so it must equal num_key_value_heads x "
                             f"{group1} = {kv2 * group1}; set query_per_kv: target to prune heads inside groups")
        group2 = heads2 // kv2
        shape = cls(layers1=source.num_hidden_layers, layers2=target["num_hidden_layers"], kv1=kv1, kv2=kv2,
                    group1=group1, group2=group2, ffn1=source.intermediate_size,
                    ffn2=target["intermediate_size"], hidden1=source.hidden_size, hidden2=target["hidden_size"],
                    head_dim=head_dim)
        for name, (n1, n2) in (("num_hidden_layers", (shape.layers1, shape.layers2)),
                               ("num_key_value_heads", (kv1, kv2)), ("num_attention_heads", (heads1, heads2)),
                               ("intermediate_size", (shape.ffn1, shape.ffn2)),
                               ("hidden_size", (shape.hidden1, shape.hidden2))):
            if n2 > n1:
                raise ValueError(f"{key}.{name}={n2} is larger than the source's {n1}; pruning only removes")
        if group2 > group1:
            raise ValueError(f"{key}: {group2} query heads per KV group (num_attention_heads / "
                             f"num_key_value_heads) exceeds the source's {group1}; raise num_key_value_heads")
        return shape

    def target_config(self, source: LlamaConfig) -> LlamaConfig:
        """The source's config with the target's sizes (same vocab, RoPE, norms, tying, head_dim)."""
        cfg = LlamaConfig.from_dict(source.to_dict())
        cfg.hidden_size, cfg.intermediate_size = self.hidden2, self.ffn2
        cfg.num_attention_heads, cfg.num_key_value_heads = self.heads2, self.kv2
        cfg.num_hidden_layers, cfg.head_dim = self.layers2, self.head_dim
        return cfg


@dataclass
class Gates:
    """Gate values for one forward: layer (L1,), heads (L1, H1), ffn (L1, F1), hidden (D1,)."""
    layer: Tensor
    heads: Tensor
    ffn: Tensor
    hidden: Tensor


class PruningMasks(nn.Module):
    """The ``log_alpha`` of every gate; ``forward`` gives this step's gates and the expected sizes.

    Training mode samples the gates; eval mode gives the deterministic top-k gates with exactly the
    target's counts (per layer for KV groups, query heads in each group and neurons).
    """

    def __init__(self, shape: PruneShape, droprate_init: float, seed: int = 0) -> None:
        super().__init__()
        self.shape = shape
        # The gates' own noise, saved with the checkpoint (``get_extra_state``): Composer restores
        # its global RNG only at an epoch start or while spinning a loader, not when a streaming
        # dataset resumes mid-epoch, so noise from the global generator would differ after resume.
        self.generator = torch.Generator().manual_seed(seed)
        s = shape
        shapes = {"layer": (s.layers1,), "kv": (s.layers1, s.kv1), "ffn": (s.layers1, s.ffn1), "hidden": (s.hidden1,)}
        if s.has_query_gates:
            shapes["query"] = (s.layers1, s.kv1, s.group1)
        self.log_alpha = nn.ParameterDict({k: nn.Parameter(init_log_alpha(v, droprate_init))
                                           for k, v in shapes.items()})

    def get_extra_state(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])

    @torch.no_grad()
    def constrain(self) -> None:
        """Clamp log_alpha into Sheared-LLaMA's range in place (element-wise: safe on sharded parameters)."""
        for p in self.parameters():
            p.clamp_(*LOG_ALPHA_RANGE)

    def gates(self) -> Gates:
        """Sampled (training) or deterministic (eval) gates; head gate = z_kv[group] * z_query."""
        s = self.shape
        keep = {"layer": s.layers2, "kv": s.kv2, "query": s.group2, "ffn": s.ffn2, "hidden": s.hidden2}
        if self.training:
            z = {k: sample_gates(v, self.generator) for k, v in self.log_alpha.items()}
        else:
            z = {k: deterministic_gates(v, keep[k]) for k, v in self.log_alpha.items()}
        heads = z["kv"].unsqueeze(-1).expand(s.layers1, s.kv1, s.group1)       # (L1, K1, G1)
        if "query" in z:
            heads = heads * z["query"]
        return Gates(layer=z["layer"], heads=heads.reshape(s.layers1, s.heads1), ffn=z["ffn"], hidden=z["hidden"])

    def expected_sizes(self) -> dict[str, Tensor]:
        """Expected kept units (module docstring): scalars for layers / hidden, (L1,) per layer otherwise."""
        e = {k: expected_gates(v) for k, v in self.log_alpha.items()}
        kv = e["kv"].sum(-1)                                                        # (L1,)
        heads = ((e["kv"] * e["query"].sum(-1)).sum(-1) if "query" in e else kv * self.shape.group1)
        return {"layers": e["layer"].sum(), "kv_heads": kv, "heads": heads, "ffn": e["ffn"].sum(-1),
                "hidden": e["hidden"].sum()}

    def constrained_kinds(self) -> tuple[str, ...]:
        """Size kinds with their own Lagrangian term: ``heads`` only when query gates exist."""
        return ("layers", "kv_heads") + (("heads",) if self.shape.has_query_gates else ()) + ("ffn", "hidden")

    def forward(self) -> tuple[Gates, dict[str, Tensor]]:
        """One call per model forward (so FSDP gathers ``log_alpha`` once): gates and expected sizes."""
        return self.gates(), self.expected_sizes()
