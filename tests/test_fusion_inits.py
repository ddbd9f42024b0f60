"""avg (CKA clusters, App. A.6) and prune (activation importance, Sec. 3.4 Eq. 5-6) initialisers: exact
against the independently built baseline, and choosing what they claim to choose."""
from __future__ import annotations

import pytest
import torch

from fusion_helpers import tiny_config, tiny_source
from lemon_composer.fusion.fuse import stack_layers
from lemon_composer.fusion.init import cut_selection
from lemon_composer.fusion.init_cka import (adjacent_layer_similarity, avg_selection, contiguous_clusters,
                                            linear_cka)
from lemon_composer.fusion.init_prune import prune_selection
from lemon_composer.fusion.plan import FusionPlan, ReceptiveFields, TargetShape
from test_fusion_math import SHAPES, selection_logits, shape_case


def feature_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """App. A.6 written out in feature space (tests only)."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return (x.T @ y).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())


@pytest.mark.parametrize("n", [5, 40])  # n < p: Gram path; n > p: feature path
def test_linear_cka_properties(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 12, generator=g)
    y = torch.randn(n, 9, generator=g) + x[:, :9]
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    one = torch.tensor(1.0, dtype=torch.float64)
    torch.testing.assert_close(linear_cka(x, x), one)
    torch.testing.assert_close(linear_cka(x.double() @ q, y), linear_cka(x, y))
    torch.testing.assert_close(linear_cka(3.5 * x, y), linear_cka(x, y))
    torch.testing.assert_close(linear_cka(x, y), linear_cka(y, x))
    torch.testing.assert_close(linear_cka(x, y), feature_cka(x, y))
    assert linear_cka(x, y).dtype == torch.float64
    assert 0.0 <= linear_cka(x, y).item() <= 1.0
    assert 0.0 <= linear_cka(x, torch.randn(n, 9, generator=g)).item() <= 1.0


def test_linear_cka_needs_matching_rows():
    with pytest.raises(ValueError, match="same number of rows"):
        linear_cka(torch.randn(4, 3), torch.randn(5, 3))


def test_contiguous_clusters_cut_the_least_similar_boundaries():
    sim = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.95])
    assert contiguous_clusters(sim, 3) == [[0, 1], [2, 3], [4, 5]]
    assert contiguous_clusters(sim, 1) == [[0, 1, 2, 3, 4, 5]]
    assert contiguous_clusters(sim, 6) == [[0], [1], [2], [3], [4], [5]]
    assert contiguous_clusters(torch.tensor([0.5, 0.5, 0.5]), 2) == [[0], [1, 2, 3]]  # tie: earlier boundary
    for k in range(1, 7):
        clusters = contiguous_clusters(torch.rand(5, generator=torch.Generator().manual_seed(k)), k)
        assert len(clusters) == k and all(clusters)
        assert [j for c in clusters for j in c] == list(range(6))


@pytest.mark.parametrize("k", [0, 7])
def test_contiguous_clusters_reject_bad_counts(k):
    with pytest.raises(ValueError, match=r"model.init=avg needs 1 <= model.target.num_hidden_layers <= 6"):
        contiguous_clusters(torch.rand(5), k)


def test_avg_merges_identical_adjacent_layers():
    cfg = tiny_config(layers=4)
    source = tiny_source(cfg)
    sd = dict(source.state_dict())
    for name in list(sd):
        if name.startswith("model.layers.1."):
            sd[name.replace("layers.1.", "layers.2.")] = sd[name]
    stacked = stack_layers(sd, 4)
    sim = adjacent_layer_similarity(stacked)
    assert sim.shape == (3,)
    torch.testing.assert_close(sim[1], torch.tensor(1.0, dtype=torch.float64))
    assert sim[0] < 1 and sim[2] < 1
    plan = FusionPlan.build(cfg, TargetShape(64, 96, 4, 3), ReceptiveFields())
    expected = torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0, 1.0]])
    torch.testing.assert_close(avg_selection(plan, stacked).gamma, expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_avg_init_equals_the_averaged_baseline(shape):
    source, plan = shape_case(shape)
    sel = avg_selection(plan, stack_layers(dict(source.state_dict()), plan.source.layers))
    torch.testing.assert_close(sel.gamma.sum(1), torch.ones(plan.target.layers))
    if plan.target.layers < plan.source.layers:
        assert (sel.gamma > 0).sum(1).max() > 1
    got, ref = selection_logits(source, plan, sel)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def calibration(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 101, (2, 9), generator=g) for _ in range(n)]


@pytest.mark.parametrize("shape", SHAPES)
def test_prune_init_equals_the_sliced_baseline(shape):
    source, plan = shape_case(shape)
    sel = prune_selection(plan, source, calibration())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in source.modules())
    got, ref = selection_logits(source, plan, sel)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_prune_keeps_the_loud_channels_heads_neurons_and_layers():
    """Blow up the last hidden block, the last KV head and the last FFN block; make layer 0 a no-op."""
    cfg = tiny_config(hidden=64, ffn=96, heads=4, kv_heads=2, layers=4)
    source = tiny_source(cfg)
    with torch.no_grad():
        source.model.embed_tokens.weight[:, 62:] *= 50.0            # hidden block 31 (r_h=2)
        for layer in source.model.layers:
            layer.self_attn.v_proj.weight[16:] *= 50.0              # KV head 1 (head_dim 16)
            layer.mlp.up_proj.weight[93:] *= 50.0                   # FFN block 31 (r_i=3)
        source.model.layers[0].self_attn.o_proj.weight.zero_()      # layer 0: output == input
        source.model.layers[0].mlp.down_proj.weight.zero_()
    plan = FusionPlan.build(cfg, TargetShape(32, 48, 2, 3), ReceptiveFields(r_h=2, r_a=1, r_i=3))
    sel, cut = prune_selection(plan, source, calibration()), cut_selection(plan)
    assert 31 in sel.hidden and 31 not in cut.hidden
    assert sel.kv_heads == [[1]] * 4 and cut.kv_heads == [[0]] * 4
    assert all(h == [2, 3] for h in sel.heads)
    assert all(31 in f for f in sel.ffn) and 31 not in cut.ffn[0]
    assert sel.gamma.argmax(1).tolist() == [1, 2, 3] and cut.gamma.argmax(1).tolist() == [0, 1, 2]


def test_prune_needs_calibration_batches():
    cfg = tiny_config()
    plan = FusionPlan.build(cfg, TargetShape(32, 48, 2, 2), ReceptiveFields())
    with pytest.raises(ValueError, match="init=prune needs calibration batches"):
        prune_selection(plan, tiny_source(cfg), [])


def test_cka_clustering_ignores_permutations_of_head_and_neuron_coordinates():
    """Only hidden coordinates align across layers: permuting a layer's heads / neurons changes nothing."""
    cfg = tiny_config(kv_heads=2, layers=6)
    sd = dict(tiny_source(cfg).state_dict())
    stacked = stack_layers(sd, 6)
    g = torch.Generator().manual_seed(0)
    permuted = dict(stacked)
    for kind in ("q", "k", "v", "up", "gate"):   # rows are head / neuron coordinates
        permuted[kind] = torch.stack([w[torch.randperm(w.shape[0], generator=g)] for w in stacked[kind]])
    for kind in ("o", "down"):                   # columns are head / neuron coordinates
        permuted[kind] = torch.stack([w[:, torch.randperm(w.shape[1], generator=g)] for w in stacked[kind]])
    torch.testing.assert_close(adjacent_layer_similarity(permuted), adjacent_layer_similarity(stacked))
    for k in range(1, 7):
        assert contiguous_clusters(adjacent_layer_similarity(permuted), k) == \
            contiguous_clusters(adjacent_layer_similarity(stacked), k)
