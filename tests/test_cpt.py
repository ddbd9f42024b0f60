"""Continued pre-training with dynamic batch loading through `composer train.py yamls/cpt/smollm2_cpu.yaml`.

A tiny LLaMA (with the tiny test tokenizer) stands in for the exported fused model, so the run takes
seconds; the yaml, the mixture loader, the per-domain evaluators and the callback are the real ones.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import REPO, random_docs, write_jsonl
from fusion_helpers import tiny_config, tiny_source
from lemon_composer.data.prep import DataPrepConfig, prepare
from test_train_launcher import launch, train_losses

YAML = REPO / "yamls" / "cpt" / "smollm2_cpu.yaml"


def cpt_inputs(root: Path, tokenizer: Path) -> list[str]:
    """Two domains of rows of 32 tokens and a tiny LLaMA with its tokenizer under ``root``; the yaml overrides."""
    rng = random.Random(2)
    for domain, code in (("code", True), ("docs", False)):
        for part in range(3):
            write_jsonl(root / "corpus" / domain / f"p{part}.jsonl", random_docs(rng, 80, code=code))
    prepare(DataPrepConfig(input=root / "corpus", out=root / "mds", tokenizer=str(tokenizer),
                           seq_len=32, num_workers=1, eval_fraction=0.34))
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    tiny_source(tiny_config(vocab=len(tok), hidden=64, ffn=128)).save_pretrained(str(root / "model"))
    tok.save_pretrained(str(root / "model"))
    return [f"variables.model_path={root / 'model'}", f"variables.data_dir={root / 'mds'}", "variables.seq_len=32"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("cpt")
    common = [*cpt_inputs(root, tiny_tokenizer), "max_duration=12ba", "eval_interval=4ba", "optimizer.lr=3.0e-3"]
    full = launch(YAML, *common, f"save_folder={root / 'ck'}", "save_interval=6ba")
    resumed = launch(YAML, *common, f"load_path={root / 'ck' / 'ep0-ba6-rank0.pt'}", "eval_first=false",
                     f"save_folder={root / 'ck2'}", "save_interval=6ba")
    return full, resumed


def logged(log: str, key: str) -> list[float]:
    return [float(v) for v in re.findall(rf"{re.escape(key)}: ([\d.]+)", log)]


def test_cpt_loss_goes_down_and_proportions_move(setup):
    full, _ = setup
    losses = train_losses(full)
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]) - 1.0
    code, docs = logged(full, "dynamic_loading/proportion/code"), logged(full, "dynamic_loading/proportion/docs")
    assert len(code) >= 3  # eval_first, then every 4 batches (the console may not flush the last)
    assert all(abs(c + d - 1) < 1e-3 and c > 0 and d > 0 for c, d in zip(code, docs))
    assert code[0] == pytest.approx(0.5, abs=1e-3) and abs(code[-1] - 0.5) > 1e-3  # the reference run, then moves
    for domain in ("code", "docs"):
        ce = logged(full, f"metrics/eval/{domain}/LanguageCrossEntropy")
        assert ce[-1] < ce[0]


def test_resumed_run_follows_the_same_loss_curve(setup):
    full, resumed = setup
    a, b = train_losses(full), train_losses(resumed)
    assert len(b) == 6
    assert b == pytest.approx(a[6:], rel=1e-4)  # same samples (mixture state) and same model state
    # the update at batch 8 starts from the restored proportions and the reference measured at step 0
    full_code = logged(full, "dynamic_loading/proportion/code")
    assert logged(resumed, "dynamic_loading/proportion/code")[0] == pytest.approx(full_code[2], abs=1e-4)


SHEARED_REFERENCE = {  # design.md sec. 2, domain order [cc, github, book, stackexchange, wiki, arxiv, c4-rp]
    "1.3b": [1.9643, 0.7459, 2.1393, 1.6117, 1.7590, 1.4449, 2.1251],
    "2.7b": [1.8712, 0.6883, 2.0325, 1.5353, 1.6297, 1.3560, 2.0328],
}


@pytest.mark.parametrize("size", SHEARED_REFERENCE)
def test_paper_cpt_recipes(size):
    """The 1.3B/2.7B recipes: valid for llm-foundry and Composer's FSDP, with the paper's numbers."""
    import dataclasses

    from composer.utils.parallelism import FSDPConfig
    from llmfoundry.command_utils.train import TRAIN_CONFIG_KEYS, TrainConfig
    from llmfoundry.utils.config_utils import make_dataclass_and_log_config
    from omegaconf import OmegaConf as om

    from lemon_composer.callbacks.dynamic_loading import DynamicLoading

    cfg = om.load(REPO / "yamls" / "cpt" / f"{size}.yaml")
    _, train = make_dataclass_and_log_config(cfg, TrainConfig, TRAIN_CONFIG_KEYS, transforms="all")
    assert train.global_train_batch_size * train.max_seq_len == 256 * 4096  # 1M-token batches
    assert train.max_duration == "50000000000tok" and train.eval_interval == "40ba"
    assert train.optimizer["lr"] == 1e-4 and train.scheduler["t_warmup"] == "0.03dur"
    assert train.scheduler["alpha_f"] == 0.1 and train.precision == "amp_bf16"
    fsdp = train.fsdp_config
    assert set(fsdp) <= {f.name for f in dataclasses.fields(FSDPConfig)}
    assert fsdp["sharding_strategy"] == "FULL_SHARD" and fsdp["activation_checkpointing"] is True
    loader = train.train_loader
    assert loader["name"] == "lemon_mixture"
    assert loader["domains"] == ["cc", "github", "book", "stackexchange", "wiki", "arxiv", "c4-rp"]
    assert loader["proportions"] == [0.67, 0.045, 0.045, 0.02, 0.045, 0.025, 0.15]
    dl = train.callbacks["lemon_dynamic_loading"]
    assert [dl["reference_losses"][d] for d in loader["domains"]] == SHEARED_REFERENCE[size]
    DynamicLoading(domains=loader["domains"], **dl)  # the callback accepts its section
    labels = [e["label"] for e in train.eval_loaders]
    assert labels == loader["domains"] and all(e["domains"] == [e["label"]] for e in train.eval_loaders)
