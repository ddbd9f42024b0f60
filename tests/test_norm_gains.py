"""``norm_gains`` / ``output_gains`` / ``layer_maps``: per-target-layer corrections beyond the paper, G_norm /
G_final (RMSNorm gains), G_out (output channels of o and down) and M_read / M_write (dense read / write maps).

Zero at init, so every selection init still equals the sliced baseline; any value scales exactly the
target's norm weights and o / down rows, or maps exactly the columns of q, k, v, up, gate and the rows of
o, down (checked against the sliced HF model changed by hand with an explicit Kronecker product); they
train with the dimension operators and the export carries them.
"""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from fusion_helpers import reference_baseline, tiny_config, tiny_source
from lemon_composer.ablation import FROZEN
from lemon_composer.export import export_checkpoint
from lemon_composer.fusion.init import cut_selection, operator_values, random_selection
from lemon_composer.fusion.plan import FusionPlan
from lemon_composer.models.fusion_model import LemonFusionModel
from test_export import batches, make_source, reload_logits, train_and_checkpoint
from test_fold_norms import folded, fused_logits
from test_fusion_math import IDS, SHAPES
from test_fusion_model import make, source_dir  # noqa: F401  (fixture)


def gains_case(shape: str, fold: bool, *, output: bool = False, maps: bool = False):
    src_kw, target, rf = SHAPES[shape]
    cfg = tiny_config(**src_kw)
    source = tiny_source(cfg).double()
    return source, FusionPlan.build(cfg, target, rf, fold_norms=fold, norm_gains=True, output_gains=output,
                                    layer_maps=maps)


@pytest.mark.parametrize("init", ["cut", "random"])
@pytest.mark.parametrize("shape", SHAPES)
def test_zero_gains_keep_selection_inits_exact(shape, init):
    source, plan = gains_case(shape, fold=False, output=True, maps=True)
    sel = cut_selection(plan) if init == "cut" else random_selection(plan, seed=3)
    values = operator_values(plan, sel)
    assert not any(values[name].any() for name in ("G_norm", "G_final", "G_out", "M_read", "M_write"))
    with torch.no_grad():
        got = fused_logits(source, plan, values)
        ref = reference_baseline(source, plan, sel)(IDS).logits
    torch.testing.assert_close(got.float(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("shape", ["gqa_depth_and_width", "mha_tied"])
def test_gains_scale_exactly_the_target_norms(shape, fold):
    source, plan = gains_case(shape, fold)
    sel = random_selection(plan, seed=5)
    values = operator_values(plan, sel)
    g = torch.Generator().manual_seed(1)
    values["G_norm"] = 0.5 * torch.randn(plan.operator_shapes()["G_norm"], generator=g)
    values["G_final"] = 0.5 * torch.randn(plan.operator_shapes()["G_final"], generator=g)
    ref = reference_baseline(source, plan, sel)  # the paper's gains, built by slicing the HF weights
    if fold:  # the folded source's gains are 1 (fold.py) except a tied head's final norm
        ref = reference_baseline(folded(source), dataclasses.replace(plan, fold_norms=False), sel)
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            layer.input_layernorm.weight.mul_(1 + values["G_norm"][i, 0].float())
            layer.post_attention_layernorm.weight.mul_(1 + values["G_norm"][i, 1].float())
        ref.model.norm.weight.mul_(1 + values["G_final"].float())
        got = fused_logits(folded(source) if fold else source, plan, values)
        expected = ref(IDS).logits
        plain = reference_baseline(source, plan, sel)(IDS).logits
    torch.testing.assert_close(got.float(), expected, rtol=1e-5, atol=1e-5)
    assert (got.float() - plain).abs().max() > 1e-2  # the gains do change the function


@pytest.mark.parametrize("shape", ["gqa_depth_and_width", "mha_tied"])
def test_output_gains_scale_exactly_the_o_and_down_rows(shape):
    source, plan = gains_case(shape, fold=False, output=True)
    sel = random_selection(plan, seed=5)
    values = operator_values(plan, sel)
    g = torch.Generator().manual_seed(2)
    values["G_out"] = 0.5 * torch.randn(plan.operator_shapes()["G_out"], generator=g)
    ref = reference_baseline(source, plan, sel)
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):  # HF weights are (out, in): a row is an output channel
            layer.self_attn.o_proj.weight.mul_(1 + values["G_out"][i, 0].float()[:, None])
            layer.mlp.down_proj.weight.mul_(1 + values["G_out"][i, 1].float()[:, None])
        got = fused_logits(source, plan, values)
        expected = ref(IDS).logits
        plain = reference_baseline(source, plan, sel)(IDS).logits
    torch.testing.assert_close(got.float(), expected, rtol=1e-5, atol=1e-5)
    assert (got.float() - plain).abs().max() > 1e-2  # the output gains do change the function


@pytest.mark.parametrize("shape", ["gqa_depth_and_width", "mha_tied"])
def test_layer_maps_map_exactly_what_each_layer_reads_and_writes(shape):
    """Against the sliced HF model with q, k, v, up, gate times ((I + M_read[i]) ⊗ I_r)^T on the right and
    o, down times (I + M_write[i]) ⊗ I_r on the left, the Kronecker products built explicitly."""
    source, plan = gains_case(shape, fold=False, output=True, maps=True)
    assert plan.rf.r_h > 1  # the Kronecker form, not only a dense map
    sel = random_selection(plan, seed=5)
    values = operator_values(plan, sel)
    g = torch.Generator().manual_seed(3)
    shapes = plan.operator_shapes()
    for name in ("G_out", "M_read", "M_write"):
        values[name] = 0.3 * torch.randn(shapes[name], generator=g)
    eye = torch.eye(plan.rf.r_h, dtype=torch.float64)
    ref = reference_baseline(source, plan, sel)
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            read = torch.kron(torch.eye(shapes["M_read"][1]) + values["M_read"][i], eye)     # (D2, D2)
            write = torch.kron(torch.eye(shapes["M_write"][1]) + values["M_write"][i], eye)  # (D2, D2)
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                        layer.mlp.up_proj, layer.mlp.gate_proj):
                lin.weight.copy_(lin.weight.double() @ read.T)
            for lin, n in ((layer.self_attn.o_proj, 0), (layer.mlp.down_proj, 1)):
                lin.weight.copy_(write @ (lin.weight.double() * (1 + values["G_out"][i, n].double()[:, None])))
        got = fused_logits(source, plan, values)
        expected = ref(IDS).logits
        values["M_read"].zero_()
        values["M_write"].zero_()
        gains_only = fused_logits(source, plan, values)
    torch.testing.assert_close(got.float(), expected, rtol=1e-5, atol=1e-5)
    assert (got - gains_only).abs().max() > 1e-2  # the maps do change the function


def test_gains_train_and_export_with_the_checkpoint(tmp_path, tiny_tokenizer):
    src = make_source(tmp_path / "src", tiny_tokenizer)
    model = LemonFusionModel(source_path=str(src), attn_implementation="sdpa", norm_gains=True, output_gains=True,
                             layer_maps=True, target=dict(hidden_size=32, intermediate_size=48,
                                                          num_attention_heads=2, num_hidden_layers=2))
    ckpt = train_and_checkpoint(model, tmp_path / "ckpt")
    ops = model.operators
    assert min(ops.G_norm.abs().min(), ops.G_final.abs().min(), ops.G_out.abs().min()) > 0  # every gain moved
    assert ops.M_read.abs().min() > 0 and ops.M_write.abs().min() > 0  # and every map entry
    out = export_checkpoint(ckpt, tmp_path / "hf")
    b = batches(model.plan.source.vocab, n=1, seed=9)[0]
    with torch.no_grad():
        expected = model.logits(model(b))[0]
    got, _ = reload_logits(out, b["input_ids"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gamma_only_runs_freeze_the_gains():
    frozen = re.compile(FROZEN["gamma"])
    assert all(frozen.search(f"operators.{name}") for name in ("G_norm", "G_final", "G_out", "M_read", "M_write"))
    assert not frozen.search("operators.gamma.shared")


@pytest.mark.parametrize("key", ["norm_gains", "output_gains", "layer_maps"])
def test_gains_must_be_a_flag(source_dir, key):
    with pytest.raises(ValueError, match=rf"model.{key}='yes': expected true or false"):
        make(source_dir, **{key: "yes"})
