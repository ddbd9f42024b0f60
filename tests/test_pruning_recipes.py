"""The 7B pruning recipes on the meta device (no weights): mask counts and target sizes; every
prune yaml passes llm-foundry's TrainConfig."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf as om
from transformers import LlamaForCausalLM

from conftest import REPO
from lemon_composer.pruning.model import LemonPruneModel
from test_fuse_recipes import llama2_7b_config  # noqa: F401  (fixture)

RECIPES = {"7b_to_1.3b": (2048, 5504, 16, 24, 1.35), "7b_to_2.7b": (2560, 6912, 20, 32, 2.7)}


def load_recipe(name: str, source_dir) -> dict:
    cfg = om.load(REPO / "yamls" / "prune" / f"{name}.yaml")
    cfg.variables.source_path = str(source_dir)
    cfg.variables.data_dir = "/unused"
    return om.to_container(cfg, resolve=True)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_on_meta_device(name, llama2_7b_config):  # noqa: F811
    cfg = load_recipe(name, llama2_7b_config)
    hidden, ffn, heads, layers, billions = RECIPES[name]
    assert cfg["global_train_batch_size"] == 32 and cfg["max_seq_len"] == 4096 and cfg["max_duration"] == "3200ba"
    assert cfg["optimizer"]["lr"] == 1e-4 and [g["lr"] for g in cfg["optimizer"]["param_groups"]] == [1.0, 1.0]
    assert cfg["fsdp_config"]["sharding_strategy"] == "FULL_SHARD" and cfg["precision"] == "amp_bf16"
    model = LemonPruneModel(**{k: v for k, v in cfg["model"].items() if k != "name"}, init_device="meta")
    assert model.cfg.warmup == 640
    counts = {n: p.numel() for n, p in model.named_parameters() if not n.startswith("source.")}
    assert counts == {"masks.log_alpha.layer": 32, "masks.log_alpha.kv": 32 * 32, "masks.log_alpha.ffn": 32 * 11008,
                      "masks.log_alpha.hidden": 4096,
                      **{f"lagrangian.lambda_{i}.{k}": 1 for i in (1, 2)
                         for k in ("layers", "kv_heads", "ffn", "hidden")}}  # MHA: no query gates
    assert model.lagrangian.sizes == {"layers": (32, layers), "kv_heads": (32, heads), "ffn": (11008, ffn),
                                      "hidden": (4096, hidden)}
    # every mask parameter matches one optimizer group by name, and no source parameter does
    groups = [g["param_str_match"] for g in cfg["optimizer"]["param_groups"]]
    for n, _ in model.named_parameters():
        assert sum(g in n for g in groups) == (0 if n.startswith("source.") else 1), n
    target_cfg = model.shape.target_config(model.source.config)
    with torch.device("meta"):
        target = LlamaForCausalLM(target_cfg)
    assert (target_cfg.hidden_size, target_cfg.intermediate_size, target_cfg.num_attention_heads,
            target_cfg.num_key_value_heads, target_cfg.num_hidden_layers) == (hidden, ffn, heads, heads, layers)
    assert sum(p.numel() for p in target.parameters()) / 1e9 == pytest.approx(billions, abs=0.1)


@pytest.mark.parametrize("name", list(RECIPES) + ["smollm2_cpu"])
def test_recipe_keys_are_valid_for_llmfoundry(name, llama2_7b_config):  # noqa: F811
    from llmfoundry.command_utils.train import TRAIN_CONFIG_KEYS, TrainConfig
    from llmfoundry.utils.config_utils import make_dataclass_and_log_config
    cfg = om.create(load_recipe(name, llama2_7b_config) if name in RECIPES else
                    om.to_container(om.load(REPO / "yamls" / "prune" / f"{name}.yaml"), resolve=True))
    _, train_cfg = make_dataclass_and_log_config(cfg, TrainConfig, TRAIN_CONFIG_KEYS, transforms="all")
    assert train_cfg.model["name"] == "lemon_prune"
