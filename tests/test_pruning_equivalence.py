"""Masks at their deterministic eval values give the same logits as the folded, sliced HF model
(fp32), for MHA, GQA (both query_per_kv modes) and tied sources; the sliced model saves and reloads
strictly with the target's exact shapes; the fusion ``Selection`` over the folded source
reproduces it too."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lemon_composer.fusion.init import operator_values
from lemon_composer.models.fusion_model import LemonFusionModel
from lemon_composer.pruning.masks import Gates
from lemon_composer.pruning.model import LemonPruneModel
from lemon_composer.pruning.slice import folded_source, kept_units, shear_selection

VOCAB = 96


def tiny_source(folder: Path, *, heads: int, kv: int, tied: bool, layers: int = 3, head_dim: int = 8,
                ffn: int = 48, seed: int = 0, vocab: int = VOCAB) -> Path:
    """A random tiny LLaMA saved as a local HF folder (norm weights randomised too)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=ffn,
                      num_attention_heads=heads, num_key_value_heads=kv, num_hidden_layers=layers,
                      max_position_embeddings=64, tie_word_embeddings=tied, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(folder))
    return folder


def prune_model(source: Path, target: dict, query_per_kv: str) -> LemonPruneModel:
    return LemonPruneModel(source_path=str(source), target=target, query_per_kv=query_per_kv,
                           lagrangian_warmup="4ba", source_dtype="float32", attn_implementation="sdpa")


# name: (heads, kv, tied, target, query_per_kv)
CASES = {
    "mha": (4, 4, False, dict(hidden_size=16, intermediate_size=24, num_attention_heads=2,
                              num_key_value_heads=2, num_hidden_layers=2), "source"),
    "gqa_source_ratio": (4, 2, False, dict(hidden_size=16, intermediate_size=24, num_attention_heads=2,
                                           num_key_value_heads=1, num_hidden_layers=2), "source"),
    "gqa_target_ratio": (6, 2, False, dict(hidden_size=32, intermediate_size=24, num_attention_heads=4,
                                           num_key_value_heads=2, num_hidden_layers=2), "target"),
    "tied_gqa_target_ratio": (6, 3, True, dict(hidden_size=24, intermediate_size=32, num_attention_heads=3,
                                               num_key_value_heads=3, num_hidden_layers=2), "target"),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    heads, kv, tied, target, mode = CASES[request.param]
    folder = tiny_source(tmp_path_factory.mktemp(request.param), heads=heads, kv=kv, tied=tied)
    model = prune_model(folder, target, mode)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.masks.parameters():
            p.normal_(0.0, 2.0)                    # deterministic soft gates spread over (0, 1)
        for p in model.source.parameters():         # a "trained" source differs from the saved one
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    return request.param, model, target


def test_masked_logits_equal_sliced_model(case):
    name, model, target = case
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        masked = model({"input_ids": ids})["logits"]
        gates = model.masks.gates()
        pruned = model.pruned()
        sliced = pruned(ids).logits
    assert ((gates.hidden > 0) & (gates.hidden < 0.99)).sum() >= 2   # non-trivial gate values
    assert pruned.config.num_hidden_layers == target["num_hidden_layers"]
    assert pruned.config.num_key_value_heads == target["num_key_value_heads"]
    assert pruned.config.tie_word_embeddings == CASES[name][2]
    if CASES[name][2]:
        assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(sliced, masked, atol=2e-5, rtol=1e-5)


def test_exported_folder_reloads_strictly(case, tmp_path):
    name, model, target = case
    pruned = model.pruned()
    pruned.save_pretrained(str(tmp_path / "out"))
    cfg = LlamaConfig.from_pretrained(str(tmp_path / "out"))
    assert {k: getattr(cfg, k) for k in target} == target
    reloaded, info = LlamaForCausalLM.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    with torch.device("meta"):
        reference = LlamaForCausalLM(cfg)
    assert {k: v.shape for k, v in reloaded.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits)


def test_all_ones_gates_are_the_source(case):
    """With every gate 1, the hooks change nothing: the masked model is the plain source."""
    _, model, _ = case
    s = model.shape
    ones = Gates(layer=torch.ones(s.layers1), heads=torch.ones(s.layers1, s.heads1),
                 ffn=torch.ones(s.layers1, s.ffn1), hidden=torch.ones(s.hidden1))
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        model.masked.set(ones)
        masked = model.source(ids).logits
        model.masked.remove()
        try:
            plain = model.source(ids).logits
        finally:
            model.masked.__init__(model.source)
    torch.testing.assert_close(masked, plain)


def test_fusion_selection_over_folded_source_reproduces_pruned_model(case, tmp_path):
    name, model, target = case
    gates = model.masks.gates()
    folded_source(model.source, gates, model.shape).save_pretrained(str(tmp_path / "folded"))
    fusion = LemonFusionModel(source_path=str(tmp_path / "folded"), target=target, init="cut",
                              source_dtype="float32", attn_implementation="sdpa")
    selection = shear_selection(fusion.plan, kept_units(gates, model.shape))
    fusion.operators.load_values(operator_values(fusion.plan, selection))
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        fused = fusion.skeleton.logits(fusion.fused_state_dict(), ids)
        torch.testing.assert_close(fused, model.pruned()(ids).logits, atol=2e-5, rtol=1e-5)
