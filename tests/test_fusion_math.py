"""Block operators and fuse(): exact against dense Kronecker products and independently built baselines."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from fusion_helpers import reference_baseline, tiny_config, tiny_source
from lemon_composer.fusion.fuse import FusionOperators, fuse, stack_layers
from lemon_composer.fusion.init import Selection, cut_selection, identity_selection, operator_values, random_selection
from lemon_composer.fusion.operators import block_cols, block_rows, block_vec, check_receptive_field, layer_mix
from lemon_composer.fusion.plan import ATTENTION_OPERATORS, FusionPlan, ReceptiveFields, TargetShape
from lemon_composer.models.target import TargetSkeleton


def dense(b: torch.Tensor, r: int) -> torch.Tensor:
    """The dense Kronecker product b ⊗ I_r (tests only)."""
    return torch.kron(b, torch.eye(r, dtype=b.dtype))


@pytest.mark.parametrize("r", [1, 2, 3, 6])
def test_block_operators_equal_dense_kronecker(r):
    g = torch.Generator().manual_seed(r)
    n1, n2, m = 12, 6, 5
    b = torch.randn(n2 // r, n1 // r, generator=g, dtype=torch.float64)
    w_rows = torch.randn(n1, m, generator=g, dtype=torch.float64)
    w_cols = torch.randn(m, n1, generator=g, dtype=torch.float64)
    v = torch.randn(n1, generator=g, dtype=torch.float64)
    torch.testing.assert_close(block_rows(b, w_rows, r), dense(b, r) @ w_rows)
    torch.testing.assert_close(block_cols(b, w_cols, r), w_cols @ dense(b, r).T)
    torch.testing.assert_close(block_vec(b, v, r), dense(b, r) @ v)


def test_batched_block_operators_and_layer_mix():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)       # one operator per layer
    w = torch.randn(3, 8, 5, generator=g, dtype=torch.float64)
    got = block_rows(b, w, 2)
    for j in range(3):
        torch.testing.assert_close(got[j], dense(b[j], 2) @ w[j])
    gamma = torch.randn(2, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(layer_mix(gamma, w), torch.einsum("ij,jab->iab", gamma, w))


def test_receptive_field_must_divide():
    with pytest.raises(ValueError, match=r"receptive_field.r_h=3 must be a positive divisor of 64 and 32"):
        check_receptive_field(3, 64, 32, name="receptive_field.r_h")


def fused_logits(source, plan, values, ids):
    ops = FusionOperators(plan)
    ops.load_values(values)
    sd = dict(source.state_dict())
    weights = fuse(plan, ops.tensors(), stack_layers(sd, plan.source.layers), sd)
    return TargetSkeleton(plan.target_config(source.config), "sdpa").logits(weights, ids)


IDS = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(0))
SOURCES = {"gqa_untied": dict(kv_heads=2, tied=False), "mha_tied": dict(kv_heads=4, tied=True)}


@pytest.mark.parametrize("attention", ATTENTION_OPERATORS)
@pytest.mark.parametrize("kind", SOURCES)
def test_identity_init_reproduces_the_source(kind, attention):
    cfg = tiny_config(**SOURCES[kind])
    source = tiny_source(cfg)
    target = TargetShape(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers,
                         cfg.num_key_value_heads)
    plan = FusionPlan.build(cfg, target, ReceptiveFields(r_h=2, r_a=4, r_i=3), attention=attention)
    with torch.no_grad():
        got = fused_logits(source, plan, operator_values(plan, identity_selection(plan)), IDS)
        torch.testing.assert_close(got, source(IDS).logits, rtol=1e-5, atol=1e-5)


SHAPES = {  # (source kwargs, target, receptive fields)
    "gqa_depth_and_width": (dict(kv_heads=2), TargetShape(32, 48, 2, 2), ReceptiveFields(2, 4, 3)),
    "gqa_smaller_groups": (dict(heads=4, kv_heads=1), TargetShape(48, 96, 3, 3, 1), ReceptiveFields(1, 8, 1)),
    "gqa_fewer_per_group": (dict(heads=4, kv_heads=2), TargetShape(32, 96, 2, 4, 2), ReceptiveFields(1, 1, 1)),
    "mha_tied": (dict(kv_heads=4, tied=True), TargetShape(48, 64, 3, 3), ReceptiveFields(4, 8, 8)),
}


def shape_case(shape: str, attention: str = "rope") -> tuple[LlamaForCausalLM, FusionPlan]:
    """The tiny source and fusion plan of ``SHAPES[shape]``."""
    src_kw, target, rf = SHAPES[shape]
    cfg = tiny_config(**src_kw)
    return tiny_source(cfg), FusionPlan.build(cfg, target, rf, attention=attention)


@torch.no_grad()
def selection_logits(source: LlamaForCausalLM, plan: FusionPlan, sel: Selection) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits on IDS of the model fused with ``sel``'s operators, and of the independently built baseline."""
    return (fused_logits(source, plan, operator_values(plan, sel), IDS),
            reference_baseline(source, plan, sel)(IDS).logits)


@pytest.mark.parametrize("attention", ATTENTION_OPERATORS)
@pytest.mark.parametrize("init", ["cut", "random"])
@pytest.mark.parametrize("shape", SHAPES)
def test_selection_inits_equal_the_sliced_baseline(init, shape, attention):
    source, plan = shape_case(shape, attention)
    sel = cut_selection(plan) if init == "cut" else random_selection(plan, seed=3)
    got, ref = selection_logits(source, plan, sel)
    assert got.shape == (2, 17, 101)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_cut_equals_plain_truncation_of_hf_weights():
    """cut == keep the first layers and the leading rows/columns of every HF weight."""
    cfg = tiny_config(kv_heads=2)
    source = tiny_source(cfg)
    plan = FusionPlan.build(cfg, TargetShape(32, 48, 2, 2), ReceptiveFields())
    sd = source.state_dict()
    target_cfg = plan.target_config(cfg)
    from transformers import LlamaForCausalLM
    truncated = LlamaForCausalLM(target_cfg).eval()
    new = {}
    for name, p in truncated.state_dict().items():
        src = sd[name]
        new[name] = src[tuple(slice(0, n) for n in p.shape)]
    truncated.load_state_dict(new)
    with torch.no_grad():
        got = fused_logits(source, plan, operator_values(plan, cut_selection(plan)), IDS)
        torch.testing.assert_close(got, truncated(IDS).logits, rtol=1e-5, atol=1e-5)
