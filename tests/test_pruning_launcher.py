"""``composer train.py yamls/prune/smollm2_cpu.yaml`` on a tiny source and synthetic data: the run
logs the pruning sizes, checkpoints hold masks and multipliers, and a run resumed from the middle
checkpoint follows the uninterrupted run's loss curve."""
from __future__ import annotations

import random
import re

import pytest
import torch
from transformers import AutoTokenizer

from conftest import REPO, random_docs, write_jsonl
from lemon_composer.data.prep import DataPrepConfig, prepare
from test_pruning_equivalence import tiny_source
from test_train_launcher import launch, train_losses

YAML = REPO / "yamls" / "prune" / "smollm2_cpu.yaml"
FAST = ["variables.seq_len=32", "global_train_batch_size=4", "device_train_microbatch_size=4",
        "device_eval_batch_size=4", "eval_subset_num_batches=1", "max_duration=6ba", "eval_interval=3ba",
        "scheduler.t_warmup=1ba", "model.target.hidden_size=16", "model.target.intermediate_size=24",
        "model.target.num_attention_heads=2", "model.target.num_key_value_heads=1",
        "model.target.num_hidden_layers=2", "model.lagrangian_warmup=2ba"]


@pytest.fixture(scope="module")
def prune_runs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("prune")
    rng = random.Random(0)
    write_jsonl(root / "corpus" / "prose" / "all.jsonl", random_docs(rng, 150))
    write_jsonl(root / "corpus" / "code" / "all.jsonl", random_docs(rng, 150, code=True))
    mds = root / "mds"
    prepare(DataPrepConfig(input=root / "corpus", out=mds, tokenizer=str(tiny_tokenizer), seq_len=32))
    source = tiny_source(root / "source", heads=4, kv=2, tied=False, layers=3, vocab=400)  # tiny_tokenizer's
    AutoTokenizer.from_pretrained(str(tiny_tokenizer)).save_pretrained(str(source))  # exports ship it
    common = [f"variables.data_dir={mds}", f"variables.source_path={source}", *FAST]
    full = launch(YAML, *common, f"save_folder={root / 'ckpt'}", "save_interval=3ba")
    resumed = launch(YAML, *common, f"load_path={root / 'ckpt' / 'ep0-ba3-rank0.pt'}",
                     f"save_folder={root / 'ckpt_resumed'}", "save_interval=3ba")
    return root, full, resumed


def test_run_logs_sizes_and_held_out_loss(prune_runs):
    _, log, _ = prune_runs
    layers = [float(v) for v in re.findall(r"prune/expected/layers: ([\d.]+)", log)]
    targets = [float(v) for v in re.findall(r"prune/target/layers: ([\d.]+)", log)]
    assert len(layers) == 6 and targets[0] == 3.0 and targets[-1] == 2.0   # ramp 3 -> 2 layers over 2 batches
    assert len(re.findall(r"metrics/eval/LanguageCrossEntropy: ([\d.]+)", log)) == 2
    assert re.search(r"loss/train/lagrangian: ", log)


def test_checkpoint_holds_source_masks_and_multipliers(prune_runs):
    root, _, _ = prune_runs
    state = torch.load(root / "ckpt" / "ep0-ba6-rank0.pt", map_location="cpu", weights_only=False)
    names = set(state["state"]["model"])
    assert {"masks.log_alpha.layer", "masks.log_alpha.kv", "lagrangian.lambda_1.layers",
            "source.model.layers.2.mlp.down_proj.weight"} <= names
    lam = state["state"]["model"]["lagrangian.lambda_1.layers"]
    assert float(lam) != 0.0   # the multipliers moved


def test_resumed_run_follows_the_same_loss_curve(prune_runs):
    _, full, resumed = prune_runs
    a, b = train_losses(full), train_losses(resumed)
    assert len(a) == 6 and len(b) == 3
    assert b == pytest.approx(a[3:], abs=1e-4)   # the console prints 4 decimals
    root = prune_runs[0]
    states = [torch.load(root / folder / "ep0-ba6-rank0.pt", map_location="cpu", weights_only=False)["state"]["model"]
              for folder in ("ckpt", "ckpt_resumed")]
    assert states[0].keys() == states[1].keys()
    for name, value in states[0].items():   # source, log_alpha, lambdas
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, states[1][name]), name
    noise = [s["masks._extra_state"]["generator"] for s in states]  # the gates' noise generator
    assert torch.equal(*noise)


def test_export_gives_the_masked_model_and_init_shear_reproduces_it(prune_runs, tmp_path):
    """lemon-export of the checkpoint is a strict target-shape LlamaForCausalLM with the masked model's
    eval logits; a fusion with init: shear on its folded source gives the same logits at step 0."""
    from transformers import LlamaForCausalLM

    from lemon_composer.checkpoints import read_checkpoint
    from lemon_composer.export import hf_model_from_fused, main as export_main
    from lemon_composer.models.fusion_model import LemonFusionModel
    from lemon_composer.pruning.export import prune_model_from_state

    root = prune_runs[0]
    ckpt = root / "ckpt" / "ep0-ba6-rank0.pt"
    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "shear")]) == 0
    assert export_main(["--checkpoint", str(ckpt), "--folded-source", "--out", str(tmp_path / "source")]) == 0
    pruned, info = LlamaForCausalLM.from_pretrained(str(tmp_path / "shear"), output_loading_info=True)
    assert not any(info.values()), info                          # no missing / unexpected / mismatched keys
    c = pruned.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
            c.num_hidden_layers) == (16, 24, 2, 1, 2)            # FAST's target, exactly
    masked = prune_model_from_state(read_checkpoint(ckpt)["state"]["model"])
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = masked({"input_ids": ids})["logits"]          # eval: deterministic masks
        torch.testing.assert_close(pruned(ids).logits, reference, rtol=0, atol=2e-5)
        fusion = LemonFusionModel(source_path=str(tmp_path / "source"), init="shear", source_dtype="float32",
                                  attn_implementation="sdpa", receptive_field={"r_h": 1, "r_a": 1, "r_i": 1},
                                  target={"hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 2,
                                          "num_key_value_heads": 1, "num_hidden_layers": 2})
        torch.testing.assert_close(hf_model_from_fused(fusion)(ids).logits, reference, rtol=0, atol=2e-5)


def test_init_shear_needs_a_folded_source(prune_runs):
    from lemon_composer.models.fuse_config import FuseConfig

    root = prune_runs[0]
    target = {"hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 2, "num_hidden_layers": 2}
    with pytest.raises(ValueError, match=r"model.source_path=.*source: no lemon_shear.json; init: shear fuses from "
                                         r"a folded source"):
        FuseConfig.from_yaml({"source_path": str(root / "source"), "target": target, "init": "shear"})
    with pytest.raises(ValueError, match=r"model.init=shear needs model.receptive_field r_h=1 and r_i=1"):
        FuseConfig.from_yaml({"source_path": str(root / "source"), "target": target, "init": "shear",
                              "receptive_field": {"r_h": 2}})


def test_two_fsdp_ranks_prune_and_the_sharded_checkpoint_exports(prune_runs, tmp_path):
    """The recipes' FSDP path on two gloo ranks (Composer's FSDP2 on CPU): the sharded checkpoint
    holds source, masks (with their noise generator) and multipliers, and exports to a strict
    target-shaped model with the masked model's eval logits."""
    import subprocess

    from transformers import LlamaForCausalLM

    from lemon_composer.checkpoints import read_checkpoint
    from lemon_composer.export import main as export_main
    from lemon_composer.pruning.export import prune_model_from_state
    from test_multirank import COMPOSER, free_port

    root = prune_runs[0]
    args = [COMPOSER, "-n", "2", "--master_port", str(free_port()), "train.py", str(YAML),
            f"variables.data_dir={root / 'mds'}", f"variables.source_path={root / 'source'}", *FAST,
            "global_train_batch_size=8", "device_train_microbatch_size=4", "max_duration=2ba", "eval_interval=2ba",
            "fsdp_config={sharding_strategy: FULL_SHARD, mixed_precision: DEFAULT, state_dict_type: sharded}",
            f"save_folder={tmp_path / 'ck'}", "save_interval=2ba"]
    proc = subprocess.run(args, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:]
    folder = tmp_path / "ck" / "ep0-ba2"
    assert len(list(folder.glob("*.distcp"))) == 2
    assert export_main(["--checkpoint", str(folder), "--out", str(tmp_path / "shear")]) == 0
    pruned, info = LlamaForCausalLM.from_pretrained(str(tmp_path / "shear"), output_loading_info=True)
    assert not any(info.values()) and pruned.config.num_hidden_layers == 2 and pruned.config.hidden_size == 16
    masked = prune_model_from_state(read_checkpoint(folder)["state"]["model"])
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, masked({"input_ids": ids})["logits"], rtol=0, atol=2e-5)
