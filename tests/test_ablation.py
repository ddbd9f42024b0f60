"""The ablation runner end to end on a tiny model: baselines, LEMON runs, CPT, evaluation, tables, figures."""
from __future__ import annotations

import json

import pytest
import torch

from lemon_composer.ablation import AblationConfig, main, run
from lemon_composer.analysis.cka import load_matrix
from lemon_composer.analysis.operators import load_operators
from lemon_composer.data.prep import DataPrepConfig, prepare
from test_export import make_source

DEPTH_TARGET = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
                "num_hidden_layers": 2}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_tokenizer):
    import random

    from conftest import random_docs, write_jsonl
    root = tmp_path_factory.mktemp("ablation")
    rng = random.Random(4)
    for domain in ("alpha", "beta"):
        for part in range(3):
            write_jsonl(root / "corpus" / domain / f"p{part}.jsonl", random_docs(rng, 60, code=domain == "beta"))
    prepare(DataPrepConfig(input=root / "corpus", out=root / "mds", tokenizer=str(tiny_tokenizer), seq_len=32,
                           num_workers=1, eval_fraction=0.34))
    source = make_source(root / "src", tiny_tokenizer)
    (root / "mc").mkdir()
    (root / "mc" / "tiny.json").write_text(json.dumps({"examples": [
        {"input": f"Is {w} a word?", "target_scores": {"yes": 1, "no": 0}} for w in ("alpha", "beta", "gamma")]}))
    return root, source


def config(root, source, **kw) -> AblationConfig:
    base = dict(source_path=str(source), data_dir=str(root / "mds"), out=str(root / "out"), setting="depth",
                target=DEPTH_TARGET, receptive_field={"r_h": 1, "r_a": 1, "r_i": 1}, fusion_steps=3, seq_len=32,
                batch_size=4, eval_max_rows=8, mc_tasks=str(root / "mc"), mc_limit=3)
    return AblationConfig(**{**base, **kw})


def test_depth_ablation_end_to_end(inputs):
    root, source = inputs
    results = run(config(root, source))
    methods = ["Source", "Cut", "Random", "Avg", "Prune", "LEMON-Cut", "LEMON-Prune"]
    assert list(results) == methods
    assert [results[m]["layers"] for m in methods] == [4, 2, 2, 2, 2, 2, 2]
    assert all(set(r["loss"]) == {"alpha", "beta"} and set(r["mc"]) == {"tiny"} for r in results.values())
    out = root / "out"
    table = (out / "results.md").read_text()
    assert table.index("| LEMON-Cut |") > table.index("| Prune |") and "| Method | L. | tiny | AVG |" in table
    assert table.startswith("### depth ablation: 4 layers x 64 (ffn 96, 4 heads) -> 2 layers x 64 (ffn 96, 4 heads)")
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"]["Cut"]["loss"] == pytest.approx(results["Cut"]["loss"])
    assert [s for s, _ in saved["curves"]["LEMON-Cut"]] == [0, 1, 2, 3]  # eval_first, then every step
    assert (out / "figures" / "fusion_heldout_loss.png").stat().st_size > 1000
    assert (out / "figures" / "operators-lemon-cut" / "gamma_q.png").is_file()
    # depth-only: the dimension operators stayed at their (identity) init; the layer operator learned
    ops = load_operators(out / "ckpt-cut" / "ep0-ba3-rank0.pt")
    assert torch.equal(ops["B_emb"], torch.eye(64)) and torch.equal(ops["A_ffn"][0], torch.eye(96))
    assert not torch.equal(ops["gamma.q"], torch.eye(2, 4))
    assert (out / "fuse-cut.yaml").is_file()  # the record of what ran
    # CKA reports (Fig. 2, 6): the source's 4 layers with hidden states, each LEMON model's 2 layers
    src_q, labels = load_matrix(out / "figures" / "cka-source" / "param_cka_q.json")
    lemon_q, _ = load_matrix(out / "figures" / "cka-lemon-cut" / "param_cka_q.json")
    assert labels == ["0", "1", "2", "3"] and lemon_q.shape == (2, 2)
    assert torch.allclose(src_q.diagonal(), torch.ones(4, dtype=torch.float64)) and torch.allclose(
        lemon_q.diagonal(), torch.ones(2, dtype=torch.float64))
    assert (out / "figures" / "cka-source" / "hidden_cka.png").stat().st_size > 1000
    assert not (out / "figures" / "cka-lemon-cut" / "hidden_cka.png").exists()


def test_short_cpt_of_every_candidate(inputs, tmp_path):
    root, source = inputs
    results = run(config(root, source, out=str(tmp_path / "out"), setting="both",
                         target={**DEPTH_TARGET, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1},
                         baselines=["cut"], lemon_inits=["cut"], cpt_steps=2, mc_tasks=None))
    assert list(results) == ["Source", "Cut", "LEMON-Cut", "Cut + CPT", "LEMON-Cut + CPT"]
    assert "mc" not in results["Cut"]


def test_bad_settings_are_named(inputs, capsys):
    root, source = inputs
    with pytest.raises(ValueError, match=r"setting=depth keeps the source's hidden_size=64; target.hidden_size=32"):
        config(root, source, target={**DEPTH_TARGET, "hidden_size": 32})
    with pytest.raises(ValueError, match=r"setting=sideways: expected one of"):
        config(root, source, setting="sideways")
    with pytest.raises(ValueError, match=r"mc_tasks=.*nowhere: no such folder"):
        config(root, source, mc_tasks=str(root / "nowhere"))
    cfg_file = root / "bad.yaml"
    cfg_file.write_text(f"source_path: {source}\ndata_dir: {root / 'mds'}\nout: x\nsetting: depth\n"
                        f"target: {json.dumps(DEPTH_TARGET)}\nunknown_key: 1\n")
    assert main([str(cfg_file)]) == 2 and "unknown_key" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["smollm2_depth", "smollm2_width"])
def test_shipped_yamls_are_valid_for_the_real_source(inputs, name):
    from omegaconf import OmegaConf as om

    from conftest import REPO
    from lemon_composer.sources.smollm2 import local_smollm2
    root, _ = inputs
    y = om.to_container(om.load(REPO / "yamls" / "ablation" / f"{name}.yaml"), resolve=True)
    cfg = AblationConfig(**{**y, "source_path": str(local_smollm2(REPO / ".cache" / "smollm2", with_model=True)),
                            "data_dir": str(root / "mds"), "mc_tasks": str(root / "mc")})
    assert cfg.setting == name.split("_")[1] and cfg.out == f"runs/ablation/{name}"  # never over docs/results
