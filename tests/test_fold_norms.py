"""``fold_norms``: the folded source is the same function; selection inits stay exact; and the fused
model is consistent for a B_emb that mixes channels (a random rotation reproduces the source exactly)."""
from __future__ import annotations

import copy

import pytest
import torch

from fusion_helpers import reference_baseline, tiny_config, tiny_source
from lemon_composer.fusion.fold import fold_norms
from lemon_composer.fusion.fuse import FusionOperators, fuse, stack_layers
from lemon_composer.fusion.init import cut_selection, identity_selection, operator_values, random_selection
from lemon_composer.fusion.plan import FusionPlan, ReceptiveFields, TargetShape
from lemon_composer.models.target import TargetSkeleton
from test_fusion_math import IDS, SHAPES
from test_fusion_model import batch, make, source_dir  # noqa: F401  (fixture)

SOURCES = {"untied": dict(kv_heads=2, tied=False), "tied": dict(kv_heads=4, tied=True)}


def folded(source):
    out = copy.deepcopy(source).double()
    fold_norms(out)
    return out


def fused_logits(source, plan, values) -> torch.Tensor:
    ops = FusionOperators(plan).double()
    ops.load_values(values)
    sd = dict(source.state_dict())
    weights = fuse(plan, ops.tensors(), stack_layers(sd, plan.source.layers), sd)
    return TargetSkeleton(plan.target_config(source.config), "sdpa").logits(weights, IDS)


@pytest.mark.parametrize("kind", SOURCES)
def test_folded_source_is_the_same_function(kind):
    source = tiny_source(tiny_config(**SOURCES[kind])).double()
    out = folded(source)
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in out.named_parameters()
               if "layernorm" in n or (n == "model.norm.weight" and kind == "untied"))
    with torch.no_grad():
        torch.testing.assert_close(out(IDS).logits, source(IDS).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("init", ["cut", "random"])
@pytest.mark.parametrize("shape", SHAPES)
def test_selection_inits_stay_exact_with_folded_norms(shape, init):
    src_kw, target, rf = SHAPES[shape]
    cfg = tiny_config(**src_kw)
    source = tiny_source(cfg).double()
    plan = FusionPlan.build(cfg, target, rf, fold_norms=True)
    assert "gamma.ln1" not in plan.operator_shapes() and "gamma.q" in plan.operator_shapes()
    sel = cut_selection(plan) if init == "cut" else random_selection(plan, seed=3)
    with torch.no_grad():
        got = fused_logits(folded(source), plan, operator_values(plan, sel))
        ref = reference_baseline(source, plan, sel)(IDS).logits                  # an fp32 model
        torch.testing.assert_close(got.float(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fold", [True, False])
def test_rotated_hidden_reproduces_the_source_only_with_folded_norms(fold):
    """B_emb = a random orthogonal Q: RMSNorm(Q h) = Q RMSNorm(h) once the gains are in the weights."""
    cfg = tiny_config(kv_heads=2, tied=False)
    source = tiny_source(cfg).double()
    plan = FusionPlan.build(cfg, TargetShape(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                                             cfg.num_hidden_layers, cfg.num_key_value_heads), ReceptiveFields(),
                            fold_norms=fold)
    values = operator_values(plan, identity_selection(plan))
    q, _ = torch.linalg.qr(torch.randn(cfg.hidden_size, cfg.hidden_size, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))
    values["B_emb"] = q
    with torch.no_grad():
        got = fused_logits(folded(source) if fold else source.double(), plan, values)
        ref = source(IDS).logits
    if fold:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)   # HF RMSNorm computes in fp32
    else:  # the gains fused as Q w stand for Q diag(w) Q^T only when Q selects channels
        assert (got - ref).abs().max() > 1e-2


def test_fusion_model_with_folded_norms_trains_from_the_same_start(source_dir):
    plain, fold = make(source_dir), make(source_dir, fold_norms=True)
    assert not any(n.startswith("operators.gamma.ln") for n, _ in fold.named_parameters())
    b = batch(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(fold.logits(fold(b))[0], plain.logits(plain(b))[0], rtol=1e-4, atol=1e-5)
    fold.loss(fold(b), b)["total"].backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in fold.operators.parameters())


def test_fold_norms_must_be_a_flag(source_dir):
    with pytest.raises(ValueError, match=r"model.fold_norms='yes': expected true or false"):
        make(source_dir, fold_norms="yes")
