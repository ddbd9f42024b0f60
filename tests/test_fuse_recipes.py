"""The paper's 7B fusion recipes, checked without the weights: both models on the meta device."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf as om
from transformers import LlamaForCausalLM

from conftest import REPO
from lemon_composer.models.fusion_model import LemonFusionModel

LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
             "num_hidden_layers": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
             "bos_token_id": 1, "eos_token_id": 2}
RECIPES = {"7b_to_1.3b": (2048, 5504, 16, 24), "7b_to_2.7b": (2560, 6912, 20, 32)}


def load_recipe(name: str, source_dir) -> dict:
    cfg = om.load(REPO / "yamls" / "fuse" / f"{name}.yaml")
    cfg.variables.source_path = str(source_dir)
    cfg.variables.data_dir = "/unused"
    return om.to_container(cfg, resolve=True)


@pytest.fixture(scope="module")
def llama2_7b_config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama2-7b-config")
    (folder / "config.json").write_text(json.dumps(LLAMA2_7B))
    return folder


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_on_meta_device(name, llama2_7b_config):
    cfg = load_recipe(name, llama2_7b_config)
    hidden, ffn, heads, layers = RECIPES[name]
    assert cfg["global_train_batch_size"] == 32 and cfg["max_seq_len"] == 4096   # 131K tokens a batch
    assert cfg["max_duration"] == "2000ba" and cfg["precision"] == "amp_bf16"
    assert cfg["optimizer"]["lr"] == 5e-5 and cfg["optimizer"]["param_groups"][0]["lr"] == 5e-4
    model_cfg = {k: v for k, v in cfg["model"].items() if k != "name"}
    model = LemonFusionModel(**model_cfg, init_device="meta")
    rf = model.plan.rf
    assert (rf.r_h, rf.r_a, rf.r_i) == (2, 1, 2) and model.plan.attention == "rope"
    # operator parameter counts (Table 1 with receptive fields)
    counts = {n: p.numel() for n, p in model.named_parameters()}
    expected = {
        "operators.B_emb": (hidden // 2) * (4096 // 2),
        "operators.A_attn": 32 * 64 * heads * 32,   # per source layer and rotary frequency: heads2 x heads1
        "operators.A_ffn": 32 * (ffn // 2) * (11008 // 2),
        **{f"operators.gamma.{k}": layers * 32 for k in ("q", "k", "v", "o", "up", "gate", "down")},
    }  # folded norms (the default): the target's norms are 1, so ln1 / ln2 have no gamma
    assert counts == expected  # MHA source and target: k/v share A_attn, no A_kv
    # every fused tensor has the shape of the target LlamaForCausalLM
    fused = model.fused_state_dict()
    with torch.device("meta"):
        target = LlamaForCausalLM(model.plan.target_config(model.source.config))
    shapes = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in fused.items()} == shapes
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (hidden, hidden)
    assert shapes["model.layers.0.mlp.up_proj.weight"] == (ffn, hidden)
    assert target.config.num_attention_heads == heads and target.config.num_hidden_layers == layers
    n_params = sum(p.numel() for p in target.parameters()) / 1e9
    assert n_params == pytest.approx({"7b_to_1.3b": 1.35, "7b_to_2.7b": 2.7}[name], abs=0.1)


@pytest.mark.parametrize("name", list(RECIPES) + ["smollm2_cpu"])
def test_recipe_keys_are_valid_for_llmfoundry(name, llama2_7b_config):
    """llm-foundry rejects unknown top-level keys; every recipe must pass its TrainConfig."""
    from llmfoundry.command_utils.train import TRAIN_CONFIG_KEYS, TrainConfig
    from llmfoundry.utils.config_utils import make_dataclass_and_log_config
    cfg = om.create(load_recipe(name, llama2_7b_config) if name in RECIPES else
                    om.to_container(om.load(REPO / "yamls" / "fuse" / f"{name}.yaml"), resolve=True))
    _, train_cfg = make_dataclass_and_log_config(cfg, TrainConfig, TRAIN_CONFIG_KEYS, transforms="all")
    assert train_cfg.model["name"] == "lemon_fusion"
