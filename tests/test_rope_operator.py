"""The RoPE-equivariant attention operator: exact against its dense definition, and fusing then
rotating equals rotating then fusing for random dense operators (where the paper's block form does not)."""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from fusion_helpers import tiny_config
from lemon_composer.fusion.fuse import FusionOperators, dimension_fuse, stack_layers
from lemon_composer.fusion.operators import frequency_head_mix
from lemon_composer.fusion.plan import FusionPlan, ReceptiveFields, TargetShape

HEAD_DIM = 16


def dense_rope_operator(m: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The (heads2*head_dim, heads1*head_dim) matrix of one layer's rope operator, entry by entry."""
    groups, h2, h1 = m.shape
    per_group = head_dim // 2 // groups
    a = torch.zeros(h2 * head_dim, h1 * head_dim, dtype=m.dtype)
    for i in range(h2):
        for j in range(h1):
            for c in range(head_dim):
                a[i * head_dim + c, j * head_dim + c] = m[(c % (head_dim // 2)) // per_group, i, j]
    return a


@pytest.mark.parametrize("groups", [8, 2, 1])
def test_frequency_head_mix_equals_its_dense_definition(groups):
    g = torch.Generator().manual_seed(groups)
    m = torch.randn(3, groups, 2, 4, generator=g, dtype=torch.float64)        # (L, F/r, h2, h1)
    w = torch.randn(3, 4 * HEAD_DIM, 5, generator=g, dtype=torch.float64)     # (L, h1*d, cols)
    got = frequency_head_mix(m, w, HEAD_DIM)
    assert got.shape == (3, 2 * HEAD_DIM, 5)
    for j in range(3):
        torch.testing.assert_close(got[j], dense_rope_operator(m[j], HEAD_DIM) @ w[j])


def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """HF LLaMA's RoPE on per-head vectors x (T, heads*head_dim) at ``positions`` (T,)."""
    cfg = tiny_config(hidden=4 * HEAD_DIM, heads=4)
    cos, sin = LlamaRotaryEmbedding(cfg)(x, positions[None])
    heads = x.view(1, len(positions), -1, HEAD_DIM).transpose(1, 2)          # (1, heads, T, d)
    rotated, _ = apply_rotary_pos_emb(heads, heads, cos.to(x.dtype), sin.to(x.dtype))
    return rotated.transpose(1, 2).reshape(len(positions), -1)


def fused_query_weight(attention: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random dense operators (B_emb = I so only A acts): the source q weight, the fused one, dense A."""
    cfg = tiny_config(hidden=4 * HEAD_DIM, heads=4, kv_heads=4, layers=1)
    plan = FusionPlan.build(cfg, TargetShape(4 * HEAD_DIM, cfg.intermediate_size, 4, 1), ReceptiveFields(r_a=2),
                            attention=attention)
    g = torch.Generator().manual_seed(seed)
    ops = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in plan.operator_shapes().items()}
    ops["B_emb"] = torch.eye(cfg.hidden_size, dtype=torch.float64)
    source = {f"model.layers.0.{k}": torch.randn(s, generator=g, dtype=torch.float64) for k, s in {
        "self_attn.q_proj.weight": (64, 64), "self_attn.k_proj.weight": (64, 64), "self_attn.v_proj.weight": (64, 64),
        "self_attn.o_proj.weight": (64, 64), "mlp.up_proj.weight": (96, 64), "mlp.gate_proj.weight": (96, 64),
        "mlp.down_proj.weight": (64, 96), "input_layernorm.weight": (64,), "post_attention_layernorm.weight": (64,)}.items()}
    fused = dimension_fuse(plan, ops, stack_layers(source, 1))["q"][0]
    a = ops["A_attn"][0]
    dense = dense_rope_operator(a, HEAD_DIM) if attention == "rope" else torch.kron(a, torch.eye(2, dtype=a.dtype))
    return source["model.layers.0.self_attn.q_proj.weight"], fused, dense


def test_rope_operator_commutes_with_rotary_embedding_for_any_values():
    w, fused, a = fused_query_weight("rope", seed=0)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    positions = torch.tensor([0, 2, 5, 100, 3])
    fuse_then_rotate = rotate(x @ fused.T, positions)
    rotate_then_fuse = rotate(x @ w.T, positions) @ a.T
    torch.testing.assert_close(fuse_then_rotate, rotate_then_fuse)


def test_block_operator_breaks_rotary_embedding_for_learned_values():
    """The paper's r_a = 2 block form is why rope is the default: a dense value splits rotation pairs."""
    w, fused, a = fused_query_weight("block", seed=0)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    positions = torch.tensor([0, 2, 5, 100, 3])
    torch.testing.assert_close(x @ fused.T, x @ w.T @ a.T)                     # the fused weight is A W
    diff = rotate(x @ fused.T, positions) - rotate(x @ w.T, positions) @ a.T
    assert diff[0].abs().max() < 1e-9 and diff[1:].abs().max() > 1.0          # position 0: no rotation


def test_rope_operator_parameter_counts():
    cfg = tiny_config(hidden=4 * HEAD_DIM, heads=4, kv_heads=2, layers=3)
    target = TargetShape(2 * HEAD_DIM, 48, 2, 2, 1)
    rope = FusionOperators(FusionPlan.build(cfg, target, ReceptiveFields(r_a=2)))
    block = FusionOperators(FusionPlan.build(cfg, target, ReceptiveFields(r_a=2), attention="block"))
    assert tuple(rope.A_attn.shape) == (3, 4, 2, 4) and tuple(rope.A_kv.shape) == (3, 4, 1, 2)
    assert tuple(block.A_attn.shape) == (3, 16, 32) and tuple(block.A_kv.shape) == (3, 8, 16)
