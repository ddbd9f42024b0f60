"""``lsq`` init: the 2 x 2 least squares against a direct solve, exactness at step 0, and a dropped
layer whose contribution the fit recovers."""
from __future__ import annotations

import copy

import pytest
import torch

from fusion_helpers import reference_baseline, tiny_config, tiny_source
from lemon_composer.fusion.init import operator_values
from lemon_composer.fusion.init_lsq import groups, lsq_selection, output_scales
from lemon_composer.fusion.init_prune import prune_selection
from lemon_composer.fusion.plan import FusionPlan, ReceptiveFields, TargetShape
from test_fusion_inits import calibration
from test_fusion_math import IDS, fused_logits


def test_groups_cover_every_source_layer_once():
    assert groups([1, 3, 4], 6) == [(0, 3), (3, 4), (4, 6)]
    assert groups([0, 1, 2], 3) == [(0, 1), (1, 2), (2, 3)]


def direct_scales(source, kept, batches) -> torch.Tensor:
    """lstsq on explicit (tokens*D, 2) matrices, outputs read at o_proj / down_proj, pre-norm states."""
    model = copy.deepcopy(source).double()
    model.model.norm = torch.nn.Identity()                     # the last hidden state before the final norm
    spans = groups(kept, len(model.model.layers))
    outs: dict[tuple[str, int], torch.Tensor] = {}
    for k in kept:
        for name, module in (("attn", model.model.layers[k].self_attn.o_proj), ("mlp", model.model.layers[k].mlp.down_proj)):
            module.register_forward_hook(lambda m, a, o, key=(name, k): outs.__setitem__(key, o))
    rows = [[] for _ in kept]
    with torch.no_grad():
        for ids in batches:
            hidden = model.model(input_ids=ids, output_hidden_states=True).hidden_states
            for i, (k, (start, end)) in enumerate(zip(kept, spans)):
                x = torch.stack([outs[("attn", k)].flatten(), outs[("mlp", k)].flatten()], dim=1)
                rows[i].append((x, (hidden[end] - hidden[start]).flatten()))
    scales = []
    for pairs in rows:
        x, y = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        scales.append(torch.linalg.lstsq(x, y[:, None]).solution[:, 0])
    return torch.stack(scales)


def test_output_scales_equal_a_direct_least_squares_solve():
    source = tiny_source(tiny_config(layers=5))
    kept = [0, 2, 3]
    torch.testing.assert_close(output_scales(source, kept, calibration()), direct_scales(source, kept, calibration()),
                               rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kv_heads,tied", [(2, False), (4, True)])
def test_lsq_init_is_the_pruned_model_with_scaled_outputs(kv_heads, tied):
    cfg = tiny_config(kv_heads=kv_heads, tied=tied, layers=5)
    source = tiny_source(cfg)
    plan = FusionPlan.build(cfg, TargetShape(32, 48, 2, 3), ReceptiveFields(r_h=2, r_i=3))
    pruned = prune_selection(plan, source, calibration())
    sel = lsq_selection(plan, source, calibration(), pruned)
    kept = pruned.gamma.argmax(1).tolist()
    scales = output_scales(source, kept, calibration())
    reference = reference_baseline(source, plan, pruned)
    with torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            layer.self_attn.o_proj.weight *= float(scales[i, 0])
            layer.mlp.down_proj.weight *= float(scales[i, 1])
        got = fused_logits(source, plan, operator_values(plan, sel), IDS)
        torch.testing.assert_close(got, reference(IDS).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(scales, torch.ones_like(scales))   # the fit moved away from prune


def test_a_dropped_copy_of_a_kept_layer_doubles_its_output():
    """Layers 1 and 2 are the same small update: dropping 2 is made up for by c ~ 2 on layer 1."""
    cfg = tiny_config(layers=4)
    source = tiny_source(cfg)
    with torch.no_grad():
        for j in (1, 2):
            layer = source.model.layers[j]
            layer.load_state_dict(source.model.layers[1].state_dict())
            if j == 1:
                layer.self_attn.o_proj.weight *= 1e-3
                layer.mlp.down_proj.weight *= 1e-3
    scales = output_scales(source, [0, 1, 3], calibration())
    torch.testing.assert_close(scales[1], torch.tensor([2.0, 2.0], dtype=torch.float64), rtol=1e-2, atol=0)
    torch.testing.assert_close(scales[2], torch.tensor([1.0, 1.0], dtype=torch.float64), rtol=1e-6, atol=0)


def test_lsq_needs_one_gamma_per_kind():
    cfg = tiny_config()
    plan = FusionPlan.build(cfg, TargetShape(64, 96, 4, 3), ReceptiveFields(), shared_gamma=True)
    source = tiny_source(cfg)
    with pytest.raises(ValueError, match="init=lsq .* needs model.shared_gamma=false"):
        lsq_selection(plan, source, calibration(), prune_selection(plan, source, calibration()))
