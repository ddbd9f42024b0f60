"""``pca`` init: B_emb spans the top principal directions; with every width kept it is a rotation
that reproduces an untied source exactly (the fold_norms invariance SliceGPT relies on)."""
from __future__ import annotations

import copy

import pytest
import torch

from fusion_helpers import tiny_config, tiny_source
from lemon_composer.fusion.fold import fold_norms
from lemon_composer.fusion.init import operator_values
from lemon_composer.fusion.init_pca import pca_selection, principal_b_emb, residual_second_moment
from lemon_composer.fusion.init_prune import prune_selection
from lemon_composer.fusion.plan import FusionPlan, ReceptiveFields, TargetShape
from test_fold_norms import fused_logits
from test_fusion_inits import calibration
from test_fusion_math import IDS
from test_fusion_model import make, source_dir  # noqa: F401  (fixture)


def test_b_emb_spans_the_top_singular_directions_of_the_normalised_states():
    source = tiny_source(tiny_config(layers=3))
    states = []
    with torch.no_grad():
        for ids in calibration():
            hidden = source.model(input_ids=ids, output_hidden_states=True).hidden_states   # last one is normed
            layer_out = source.model.layers[-1](hidden[-2], position_embeddings=source.model.rotary_emb(
                hidden[-2], torch.arange(ids.shape[1])[None]))
            layer_out = layer_out[0] if isinstance(layer_out, tuple) else layer_out
            for h in (*hidden[:-1], layer_out):
                x = h.double().reshape(-1, 64)
                states.append(x / x.pow(2).mean(-1, keepdim=True).sqrt())
    x = torch.cat(states)                                            # (samples, D1)
    _, sv, vh = torch.linalg.svd(x, full_matrices=False)
    b = principal_b_emb(residual_second_moment(source, calibration()), 40).double()
    scale = torch.sqrt(sv[:40].pow(2).sum() / sv.pow(2).sum() * 64 / 40)
    torch.testing.assert_close(b @ b.T, scale ** 2 * torch.eye(40, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.T @ b / scale ** 2, vh[:40].T @ vh[:40], rtol=1e-4, atol=1e-4)


def test_full_width_pca_is_a_rotation_that_reproduces_an_untied_source():
    cfg = tiny_config(kv_heads=2, tied=False)
    source = tiny_source(cfg).double()
    folded = copy.deepcopy(source)
    fold_norms(folded)
    plan = FusionPlan.build(cfg, TargetShape(64, 96, 4, 4, 2), ReceptiveFields(), fold_norms=True)
    sel = pca_selection(plan, folded, calibration(), prune_selection(plan, folded, calibration()))
    assert not torch.allclose(sel.b_emb.abs(), torch.eye(64), atol=0.1)   # a real rotation, not a selection
    with torch.no_grad():
        values = {k: v.double() for k, v in operator_values(plan, sel).items()}
        torch.testing.assert_close(fused_logits(folded, plan, values), source(IDS).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("override,match", [
    ({"fold_norms": False}, r"model.init=pca mixes hidden channels: it needs model.fold_norms=true"),
    ({"fold_norms": True, "receptive_field": dict(r_h=2)}, r"model.init=pca .* needs model.receptive_field.r_h=1, got 2"),
])
def test_pca_needs_folded_norms_and_unit_hidden_field(source_dir, override, match):
    with pytest.raises(ValueError, match=match):
        make(source_dir, init="pca", calibration={"data_dir": "/unused"}, **override)
