"""The memory / FLOP planner: hand-computed terms, the paper's recipes, errors, the CLI (no weights loaded)."""
from __future__ import annotations

import subprocess
import sys

import pytest
from transformers import LlamaConfig

from conftest import REPO
from lemon_composer.planner import GIB, cpt_model_config, load_config, main, plan_cpt, plan_run, source_config

# source 4 layers x hidden 8 (2 heads of 4), FFN 16, vocab 32, untied -> target 2 x 4 (1 head), FFN 8
TINY_SOURCE = LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=2,
                          num_hidden_layers=4, vocab_size=32, tie_word_embeddings=False)
RECIPES = [REPO / "yamls" / "fuse" / f"{name}.yaml" for name in ("7b_to_1.3b", "7b_to_2.7b")]
CPT_RECIPES = [REPO / "yamls" / "cpt" / f"{name}.yaml" for name in ("1.3b", "2.7b")]


def tiny_cfg(algorithms: dict | None = None, **model) -> dict:
    return {"model": {"name": "lemon_fusion", "source_path": "/unused", "source_dtype": "float32",
                      "target": {"hidden_size": 4, "intermediate_size": 8, "num_attention_heads": 1,
                                 "num_hidden_layers": 2},
                      "receptive_field": {"r_h": 2, "r_a": 2, "r_i": 2}, "attention_operator": "block", **model},
            "algorithms": algorithms or {}, "max_seq_len": 16, "global_train_batch_size": 4,
            "device_train_microbatch_size": 2, "precision": "fp32"}


def test_tiny_hand_computed():
    est = plan_run(tiny_cfg(), gpus=2, source_cfg=TINY_SOURCE, device="cpu")
    # B_emb (2, 4) + A_attn (4, 2, 4) + A_ffn (4, 4, 8) + 7 gammas (2, 4) = 8 + 32 + 128 + 56: the default
    # fold_norms drops the norms' gammas; unfolded, ln1 and ln2 add 2 more
    assert est.memory["operators (fp32)"] == 224 * 4
    assert est.memory["AdamW moments + DDP buckets"] == 224 * 12
    unfolded = plan_run(tiny_cfg(fold_norms=False), gpus=2, source_cfg=TINY_SOURCE, device="cpu")
    assert unfolded.memory["operators (fp32)"] == 240 * 4
    # per source layer l1 * n2 * (m1 + m2): q, k, v, o 4 * 4 * (8 + 4); up, gate, down 4 * 8 * (8 + 4);
    # the embedding and head products are recomputed in backward, so nothing of theirs is saved; fp32
    assert est.memory["fusion intermediates"] == (4 * 192 + 3 * 384) * 4
    assert est.memory["CUDA context"] == 0
    # activations, fp32, SDPA, per token: per layer 2 norms x (4 + 2*4) * 4 + attention 4 * (3 * 4 + 2 * 4)
    # + logsumexp 4 * 1 head + MLP 4 * 4 * 8 = 308; 2 layers + the final norm 12 * 4; 2 x 16 tokens
    assert est.memory["target activations"] == 32 * (2 * 308 + 48)
    # loss: 3 blocks (chunk = 2 x 15 label tokens, V = 32) fp32 + head gradient (32, 4) + hidden gradient (32, 4)
    assert est.memory["loss"] == 3 * 30 * 32 * 4 + 32 * 4 * 4 + 32 * 4 * 4
    assert est.peak == "the last micro-batch's loss"
    # teacher, 2 x 16 = 32 tokens per rank: 2 * (non-embedding params 4 * (4 * 64 + 3 * 128 + 16) + 8)
    # + causal attention 2 * L1 * T * attn1 + head 2 * V * D1, per token
    assert est.flops["teacher"] == 32 * (2 * 2632 + 2 * 4 * 16 * 8 + 2 * 32 * 8)
    # fusion: per source layer 4 * (2*4*8*8/2 + 2*4*8*4/2) + 3 * (2*8*16*8/2 + 2*8*8*4/2) = 5376;
    # gamma 2 * L2 * L1 * (4 * 16 + 3 * 32) = 2560; embedding and head 2 * (2*32*8*4/2) = 2048;
    # forward + backward (2x); the embedding and head products also recompute in backward (4x)
    assert est.flops["fusion"] == 3 * (4 * 5376 + 2560) + 4 * 2048
    sharded = plan_run(tiny_cfg({"lemon_fuse_once": {}}, fusion_parallel="sharded"), gpus=2,
                       source_cfg=TINY_SOURCE, device="cpu")
    assert sharded.flops["fusion"] == 3 * (2 * 5376 + 1280) + 4 * 2048   # each rank: 2 of the 4 source layers
    assert sharded.memory["fusion intermediates"] == (2 * 192 + 3 * 192) * 4


def test_layer_corrections_count():
    """norm_gains / output_gains add 2 L2 D2 + D2 and 2 L2 D2 operators; layer_maps 2 L2 (D2 / r_h)^2, saves the
    unmapped target weights L2 D2 (2 attn2 + 2 kv2 + 3 ffn2) and maps them at 2 x that x D2 / r_h FLOPs forward."""
    base = plan_run(tiny_cfg(), gpus=2, source_cfg=TINY_SOURCE, device="cpu")
    gains = plan_run(tiny_cfg(norm_gains=True, output_gains=True), gpus=2, source_cfg=TINY_SOURCE, device="cpu")
    maps = plan_run(tiny_cfg(layer_maps=True), gpus=2, source_cfg=TINY_SOURCE, device="cpu")
    assert gains.memory["operators (fp32)"] - base.memory["operators (fp32)"] == (2 * 2 * 4 + 4 + 2 * 2 * 4) * 4
    assert gains.flops == base.flops
    assert maps.memory["operators (fp32)"] - base.memory["operators (fp32)"] == 2 * 2 * 2 * 2 * 4
    mapped = 2 * 4 * (2 * 4 + 2 * 4 + 3 * 8)                                 # L2 D2 (2 attn2 + 2 kv2 + 3 ffn2)
    assert maps.memory["fusion intermediates"] - base.memory["fusion intermediates"] == mapped * 4
    assert maps.flops["fusion"] - base.flops["fusion"] == 3 * 2 * mapped * 4 / 2
    with pytest.raises(ValueError, match="model.layer_maps='yes': expected true or false"):
        plan_run(tiny_cfg(layer_maps="yes"), gpus=2, source_cfg=TINY_SOURCE, device="cpu")


def test_staged_schedule_keeps_x_only():
    joint = plan_run(tiny_cfg(), gpus=2, source_cfg=TINY_SOURCE, device="cpu")
    dims_first = plan_run(tiny_cfg({"lemon_fusion_stages": {"schedule": "dims_then_layers"}}), gpus=2,
                          source_cfg=TINY_SOURCE, device="cpu")
    assert dims_first.memory == joint.memory  # its layer stage trains the dimension operators too
    staged = tiny_cfg({"lemon_fusion_stages": {"schedule": "layers_then_dims"}})
    est = plan_run(staged, gpus=2, source_cfg=TINY_SOURCE, device="cpu")
    # X alone: q, k, v, o 4 * 4 * 8; up, gate, down 4 * 8 * 8 (the embedding and head products are recomputed)
    assert est.memory["fusion intermediates"] == (4 * 128 + 3 * 256) * 4


def test_fuse_once_or_every_micro_batch():
    every = plan_run(tiny_cfg(), gpus=1, source_cfg=TINY_SOURCE, device="cpu")      # 2 micro-batches
    once = plan_run(tiny_cfg({"lemon_fuse_once": {}}), gpus=1, source_cfg=TINY_SOURCE, device="cpu")
    assert every.flops["fusion"] == 2 * once.flops["fusion"]
    assert every.memory["operator grads (fp32)"] == 224 * 4 and every.memory["fused-weight grads (leaves)"] == 0
    assert once.memory["fused-weight grads (leaves)"] > 0
    with pytest.raises(ValueError, match="algorithms.lemon_fuse_once"):
        plan_run(tiny_cfg(fusion_parallel="sharded"), gpus=2, source_cfg=TINY_SOURCE, device="cpu")


def test_checkpointing_shrinks_activations_and_adds_a_forward():
    plain = plan_run(tiny_cfg(), gpus=1, source_cfg=TINY_SOURCE, device="cpu")
    ckpt = plan_run(tiny_cfg(activation_checkpointing=True), gpus=1, source_cfg=TINY_SOURCE, device="cpu")
    assert ckpt.flops["student"] > plain.flops["student"]
    assert ckpt.total_bytes < plain.total_bytes


@pytest.mark.parametrize("parallel", ["replicated", "sharded"])
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_paper_recipes(path, parallel):
    cfg = load_config(path, [f"model.fusion_parallel={parallel}"])
    est = plan_run(cfg, gpus=8, source_cfg=source_config("llama-2-7b"), limit_bytes=80 * GIB)
    assert est.memory["source"] == pytest.approx(6.738e9 * 2, rel=1e-3)   # LLaMA-2-7B in bf16
    assert est.memory["CUDA context"] == 1.5 * GIB
    assert all(v > 0 for v in est.flops.values())
    assert est.fits(80 * GIB) == (not est.advice)


def test_sharding_cuts_fusion_cost():
    src = source_config("llama-2-7b")
    rep = plan_run(load_config(RECIPES[0], ["model.fusion_parallel=replicated"]), gpus=8, source_cfg=src)
    sh = plan_run(load_config(RECIPES[0], ["model.fusion_parallel=sharded"]), gpus=8, source_cfg=src)
    assert sh.flops["fusion"] < rep.flops["fusion"] / 4
    assert sh.memory["fusion intermediates"] < rep.memory["fusion intermediates"] / 2


@pytest.mark.parametrize("key,value", [
    ("model.name", "mpt_causal_lm"), ("model.fusion_parallel", "tensor"), ("model.source_dtype", "int8"),
    ("model.activation_checkpointing", "yes"), ("model.loss_chunk_tokens", 0), ("global_train_batch_size", 6),
    ("device_train_microbatch_size", -1), ("precision", "fp64"),
])
def test_bad_value_names_the_key(key, value):
    cfg = tiny_cfg()
    section, _, name = key.rpartition(".")
    (cfg["model"] if section else cfg)[name] = value
    with pytest.raises(ValueError, match=key):
        plan_run(cfg, gpus=2, source_cfg=TINY_SOURCE, device="cpu")


def test_unknown_source_config(tmp_path):
    with pytest.raises(ValueError, match="--source-config"):
        source_config(str(tmp_path))


def test_advice_when_it_does_not_fit(capsys):
    main([str(RECIPES[1]), "--source-config", "llama-2-7b", "--gpu-mem", "40", "model.fusion_parallel=replicated",
          "model.activation_checkpointing=false", "device_train_microbatch_size=2"])
    out = capsys.readouterr().out
    assert "fits in 40 GiB: no" in out
    advice = [line.split(" -> ")[0].strip() for line in out.splitlines() if line.startswith("  ")]
    assert advice == ["try model.fusion_parallel=sharded", "try model.activation_checkpointing=true",
                      "try device_train_microbatch_size=1",
                      "still does not fit: use a smaller max_seq_len or target, or more memory per GPU"]


def test_cli_prints_the_tables():
    run = subprocess.run([sys.executable, "-m", "lemon_composer.planner", str(RECIPES[0]), "--gpus", "8",
                          "--source-config", "llama-2-7b", "model.fusion_parallel=sharded"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    out = run.stdout
    for line in ("fusion_parallel=sharded", "source", "fusion intermediates", "total", "margin 10%",
                 "fits in 80 GiB: yes", "TFLOP/step", "teacher", "student"):
        assert line in out, out


def tiny_cpt_cfg(**fsdp) -> dict:
    return {"model": {"name": "hf_causal_lm", "pretrained_model_name_or_path": "/unused",
                      "attn_implementation": "flash_attention_2"},
            "fsdp_config": {"sharding_strategy": "FULL_SHARD", "mixed_precision": "PURE",
                            "activation_checkpointing": True, **fsdp},
            "precision": "amp_bf16", "max_seq_len": 16, "global_train_batch_size": 8, "device_train_microbatch_size": 2}


def test_cpt_tiny_hand_computed():
    # TINY_SOURCE as the model: embedding + head 2 * 32 * 8 = 512, per layer q, k, v, o 4 * 64 + MLP 3 * 128
    # + 2 norms 16 = 656, 4 layers, final norm 8 -> P = 3144; 2 ranks, micro-batch 2 x 16 = 32 tokens
    est = plan_cpt(tiny_cpt_cfg(), gpus=2, model_cfg=TINY_SOURCE)
    assert est.memory["fp32 parameters (1/2 shard)"] == 3144 * 4 / 2
    assert est.memory["AdamW moments (1/2 shard)"] == 3144 * 8 / 2
    assert est.memory["gathered parameters (bf16)"] == (2 * 656 + 512) * 2          # two layers + embedding, head
    # layer inputs 4 * 8 * 2 + one layer (flash, bf16): norms 2 * (4 + 4) * 8 + attention 2 * (3 * 8 + 2 * 8)
    # + logsumexp 4 * 2 heads + MLP 4 * 2 * 16 = 344 + final norm (4 + 4) * 8, per token
    assert est.memory["activations (checkpointed)"] == 32 * (64 + 344 + 64)
    assert est.memory["logits and loss"] == 32 * 32 * (2 + 4 + 4 + 4)              # V = 32, bf16 logits
    # 8 / 2 ranks x 16 = 64 tokens a step: 4 passes (checkpointing) x 2 x 2632 non-embedding params,
    # causal attention 4 x 2 x 4 layers x 16 x 8, head 6 x 32 x 8, per token
    assert est.flops == {"linear layers": 64 * 4 * 2 * 2632, "attention": 64 * 4 * 2 * 4 * 16 * 8,
                         "lm head": 64 * 6 * 32 * 8}
    no_shard = plan_cpt(tiny_cpt_cfg(sharding_strategy="NO_SHARD"), gpus=2, model_cfg=TINY_SOURCE)
    assert no_shard.memory["fp32 gradients"] == 3144 * 4 and no_shard.memory["gathered parameters (bf16)"] == 3144 * 2


@pytest.mark.parametrize("path", CPT_RECIPES, ids=lambda p: p.stem)
def test_cpt_recipes_fit_with_builtin_configs(path):
    cfg = load_config(path)
    model_cfg, origin = cpt_model_config(cfg)
    assert origin.startswith(f"builtin lemon-{path.stem} ")
    est = plan_cpt(cfg, gpus=8, model_cfg=model_cfg, limit_bytes=80 * GIB)
    params = {"1.3b": 1.345e9, "2.7b": 2.702e9}[path.stem]
    assert est.memory["fp32 parameters (1/8 shard)"] == pytest.approx(params * 4 / 8, rel=1e-3)
    assert est.fits(80 * GIB) and not est.advice


def test_cpt_model_config_folder_wins(tmp_path):
    TINY_SOURCE.save_pretrained(tmp_path)
    cfg = {"run_name": "lemon-cpt-1.3b", "model": {"pretrained_model_name_or_path": str(tmp_path)}}
    assert cpt_model_config(cfg)[0].hidden_size == 8
    assert cpt_model_config(cfg, "lemon-2.7b")[0].hidden_size == 2560
    with pytest.raises(ValueError, match="model.pretrained_model_name_or_path"):
        cpt_model_config({"run_name": "other", "model": {"pretrained_model_name_or_path": str(tmp_path / "x")}})


@pytest.mark.parametrize("strategy,error", [("HYBRID_SHARD", NotImplementedError), ("ZERO3", ValueError)])
def test_cpt_bad_sharding_names_the_key(strategy, error):
    with pytest.raises(error, match="fsdp_config.sharding_strategy"):
        plan_cpt(tiny_cpt_cfg(sharding_strategy=strategy), gpus=2, model_cfg=TINY_SOURCE)


def test_cpt_cli_header_and_advice(capsys):
    main([str(CPT_RECIPES[0]), "--gpu-mem", "16", "fsdp_config.activation_checkpointing=false"])
    out = capsys.readouterr().out
    assert "config: builtin lemon-1.3b for run_name lemon-cpt-1.3b" in out and "fits in 16 GiB: no" in out
    assert "  try fsdp_config.activation_checkpointing=true -> " in out
    assert main([str(CPT_RECIPES[0]), "model.name=mpt_causal_lm"]) == 2   # one line, no traceback
    assert "error: model.name='mpt_causal_lm'" in capsys.readouterr().err
