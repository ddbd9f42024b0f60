"""The ablation runner end to end on a tiny model: baselines, LEMON runs, CPT, evaluation, tables, figures,
the learning-rate sweep."""
from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf as om

from lemon_composer import ablation
from lemon_composer.ablation import AblationConfig, main, pick_multiplier, run
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


def test_shear_rows_come_from_a_pruning_run(inputs):
    """prune_steps runs lemon_prune first: "Shear" is its pruned model, "LEMON-Shear" fuses from its folded source."""
    root, source = inputs
    out = root / "shear"
    results = run(config(root, source, out=str(out), baselines=["shear"], lemon_inits=["shear"], prune_steps=2,
                         fusion_steps=2, mc_tasks=None, receptive_field={"r_h": 2, "r_a": 1, "r_i": 2}))
    assert list(results) == ["Source", "Shear", "LEMON-Shear"]
    assert [results[m]["layers"] for m in results] == [4, 2, 2]
    fuse = om.load(out / "fuse-shear.yaml")
    assert fuse.variables.source_path == str(out / "models" / "shear-source") and fuse.model.init == "shear"
    assert (fuse.model.receptive_field.r_h, fuse.model.receptive_field.r_i) == (1, 1)  # units, not blocks
    assert (out / "models" / "shear-source" / "lemon_shear.json").is_file()
    assert om.load(out / "prune.yaml").max_duration == "2ba"
    with pytest.raises(ValueError, match="lemon_inits: shear needs a pruning run first: set prune_steps > 0"):
        config(root, source, lemon_inits=["shear"])


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


def test_an_early_failure_leaves_no_empty_output_folder(inputs, monkeypatch):
    root, source = inputs
    cfg = config(root, source, out=str(root / "early" / "out"))
    def fail(*args, **kwargs):
        raise RuntimeError("the first fusion run failed")
    monkeypatch.setattr(ablation, "sweep_learning_rates", fail)
    with pytest.raises(RuntimeError, match="first fusion run failed"):
        ablation.run(cfg)
    assert not (root / "early" / "out").exists()
    (root / "kept").mkdir()
    with pytest.raises(RuntimeError):
        ablation.run(config(root, source, out=str(root / "kept")))
    assert (root / "kept").is_dir()  # a folder the user made stays


def test_pick_multiplier_takes_the_lowest_held_out_loss():
    assert pick_multiplier({0.25: 5.1, 1.0: 4.2, 4.0: 6.0}) == 1.0
    assert pick_multiplier({4.0: 3.9, 0.25: 5.0, 1.0: 4.2}) == 4.0
    assert pick_multiplier({4.0: 3.0, 0.25: 3.5, 1.0: 3.0}) == 1.0  # a tie goes to the smaller multiplier
    assert pick_multiplier({0.5: math.nan, 2.0: 9.0}) == 2.0  # a diverged run never wins
    assert pick_multiplier({3.0: 7.0}) == 3.0


def test_lr_sweep_then_short_cpt_of_every_candidate(inputs, tmp_path):
    """One run for both (each composer run costs seconds): the sweep picks the full run's rates; CPT follows."""
    root, source = inputs
    out = tmp_path / "out"
    cfg = config(root, source, out=str(out), setting="both",
                 target={**DEPTH_TARGET, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1},
                 baselines=["cut"], lemon_inits=["cut"], cpt_steps=2, mc_tasks=None,
                 lr_sweep=[0.5, 8], lr_sweep_steps=2, model_overrides={"temperature": 2.0})
    results = run(cfg)
    assert list(results) == ["Source", "Cut", "LEMON-Cut", "Cut + CPT", "LEMON-Cut + CPT"]
    assert "mc" not in results["Cut"]
    rows = json.loads((out / "results.json").read_text())["lr_sweep"]
    assert [(r["init"], r["multiplier"], r["lr_gamma"]) for r in rows] == [
        ("cut", 0.5, pytest.approx(0.5 * cfg.lr_gamma)), ("cut", 8.0, pytest.approx(8 * cfg.lr_gamma))]
    losses = {r["multiplier"]: r["loss"] for r in rows}
    assert losses[0.5] != losses[8.0] and all(math.isfinite(v) for v in losses.values())
    chosen = [r["multiplier"] for r in rows if r["chosen"]]
    assert chosen == [min(losses, key=losses.get)]
    for mult, folder, steps in [(0.5, out / "sweep" / "cut" / "x0.5", 2), (8.0, out / "sweep" / "cut" / "x8.0", 2),
                                (chosen[0], out, cfg.fusion_steps)]:  # the sweep runs, then the full run
        y = om.load(folder / "fuse-cut.yaml")
        assert y.optimizer.lr == pytest.approx(mult * cfg.lr_dims)
        assert y.optimizer.param_groups[0].lr == pytest.approx(mult * cfg.lr_gamma)
        assert y.max_duration == f"{steps}ba" and y.model.temperature == 2.0 and y.model.init == "cut"
        assert (folder / "fuse-cut.log").is_file()
    assert not (out / "sweep" / "cut" / "x0.5" / "ckpt-cut").exists()  # sweep checkpoints are not kept
    table = (out / "results.md").read_text()
    assert "### Learning-rate sweep (2 fusion steps per run" in table
    assert re.search(rf"\| cut \| {chosen[0]:g} \| .* \| yes \|", table)


@pytest.mark.parametrize("key, value, message", [
    ("lr_sweep", [], "lr_sweep=[]: expected null or a non-empty list"),
    ("lr_sweep", [1.0, -0.5], "lr_sweep=[1.0, -0.5]: expected"),
    ("lr_sweep", [1.0, 1], "lr_sweep=[1.0, 1]: expected null or a non-empty list of distinct positive numbers"),
    ("lr_sweep", 2.0, "lr_sweep=2.0: expected"),
    ("lr_sweep", ["fast"], "lr_sweep=['fast']: expected"),
    ("lr_sweep", [math.inf], "lr_sweep=[inf]: expected"),
    ("lr_sweep_steps", 0, "lr_sweep_steps=0: expected a positive integer"),
    ("lr_sweep_steps", 2.5, "lr_sweep_steps=2.5: expected a positive integer"),
    ("model_overrides", ["fold_norms"], "model_overrides=['fold_norms']: expected a mapping"),
    ("model_overrides", {"init": "random"}, "model_overrides: ['init'] are set by the runner"),
    ("baselines", ["cut", "sheer"], "baselines=['cut', 'sheer']: expected a list of inits from ("),
    ("lemon_inits", "cut", "lemon_inits='cut': expected a list of inits from ("),
    ("trained_operators", "layers", "trained_operators='layers': expected one of ('auto', 'gamma', 'dims', 'all')"),
])
def test_bad_run_keys_are_named_before_anything_loads(inputs, key, value, message):
    root, _ = inputs
    with pytest.raises(ValueError, match=re.escape(message)):  # a missing source would fail later
        config(root, root / "no-source", **{key: value})


@pytest.mark.parametrize("trained, frozen", [("auto", r"operators\.(B_emb|A_|G_|M_)"),
                                             ("gamma", r"operators\.(B_emb|A_|G_|M_)"),
                                             ("all", None), ("dims", r"operators\.gamma")])
def test_trained_operators_choose_what_the_fusion_run_freezes(inputs, tmp_path, trained, frozen):
    """depth freezes the dimension operators unless trained_operators says otherwise; the regex must
    match exactly the frozen names (the end-to-end test shows it freezes them in a real run)."""
    root, source = inputs
    cfg = config(root, source, out=str(tmp_path), trained_operators=trained)
    y = om.load(ablation._fusion_yaml(cfg, "cut", tmp_path, 2, 1.0))
    assert y.optimizer.get("disable_grad") == frozen
    names = ["operators.gamma.q", "operators.B_emb", "operators.A_ffn"]
    assert [n for n in names if frozen and re.search(frozen, n)] == {
        "auto": names[1:], "gamma": names[1:], "all": [], "dims": names[:1]}[trained]


def test_lr_operators_give_each_named_operator_its_own_rate(inputs, tmp_path):
    """llm-foundry's optimizer builder, fed the fusion yaml, puts exactly the named operator in a group at
    its rate (times the sweep multiplier); the others stay at lr_dims, gamma at lr_gamma."""
    from llmfoundry.utils.builders import build_optimizer
    root, source = inputs
    cfg = config(root, source, out=str(tmp_path), trained_operators="all", lr_dims=1e-3, lr_gamma=2e-3,
                 lr_operators={"A_attn": 4e-3})
    y = om.to_container(om.load(ablation._fusion_yaml(cfg, "cut", tmp_path, 2, 0.5)))
    model = torch.nn.Module()
    model.operators = torch.nn.Module()
    for name in ("B_emb", "A_attn", "A_ffn"):
        setattr(model.operators, name, torch.nn.Parameter(torch.zeros(2)))
    model.operators.gamma = torch.nn.ParameterDict({"q": torch.nn.Parameter(torch.zeros(2))})
    opt = build_optimizer(model, y["optimizer"].pop("name"), y["optimizer"])
    ids = {id(p): n for n, p in model.named_parameters()}
    groups = sorted((g["lr"], sorted(ids[id(p)] for p in g["params"])) for g in opt.param_groups)
    assert groups == [(5e-4, ["operators.A_ffn", "operators.B_emb"]), (1e-3, ["operators.gamma.q"]),
                      (2e-3, ["operators.A_attn"])]


@pytest.mark.parametrize("value", [{"A_mlp": 1e-3}, {"A_attn": 0.0}, {"gamma": 1e-3}, ["A_attn"]])
def test_bad_lr_operators_are_named(inputs, value):
    root, _ = inputs
    with pytest.raises(ValueError, match=re.escape(f"lr_operators={value!r}: expected a mapping of")):
        config(root, root / "no-source", lr_operators=value)


def test_lr_operators_need_trained_dimension_operators(inputs):
    root, source = inputs
    with pytest.raises(ValueError, match="the dimension operators are frozen here"):
        config(root, source, lr_operators={"A_ffn": 1e-3})


@pytest.mark.parametrize("value, expected", [("uniform", [0.5, 0.5]), ([9, 1], [0.9, 0.1])])
def test_train_proportions_set_the_fusion_runs_domain_mixture(inputs, tmp_path, tiny_tokenizer, value, expected):
    """The fusion yaml's train loader, built by llm-foundry's registry entry, draws the domains (alpha, beta)
    at the asked proportions; without the key the template's loader is kept."""
    from transformers import AutoTokenizer

    from llmfoundry_patches.dataloaders import build_mixture_dataloader
    root, source = inputs
    plain = om.load(ablation._fusion_yaml(config(root, source, out=str(tmp_path)), "cut", tmp_path, 2, 1.0))
    assert plain.train_loader.name == "lemon_domains"
    cfg = config(root, source, out=str(tmp_path), train_proportions=value)
    y = om.load(ablation._fusion_yaml(cfg, "cut", tmp_path, 2, 1.0))
    loader_cfg = om.to_container(y.train_loader, resolve=True)
    assert loader_cfg.pop("name") == "lemon_mixture" and loader_cfg["proportions"] == pytest.approx(expected)
    spec = build_mixture_dataloader(AutoTokenizer.from_pretrained(str(tiny_tokenizer)), 4, **loader_cfg)
    batches = [b for _, b in zip(range(100), spec.dataloader)]
    counts = torch.bincount(torch.cat([b["domain"] for b in batches]), minlength=2).double()
    assert (counts / counts.sum()).tolist() == pytest.approx(expected, abs=0.06)  # 400 draws: sd <= 0.025


def mixture_batches(inputs, tmp_path, tiny_tokenizer, n: int, **kw) -> tuple[Any, list[dict[str, torch.Tensor]]]:
    """The fusion yaml of a uniform-mixture config with ``kw``, and the first n batches of 4 rows of its train
    loader as llm-foundry's registry entry builds it."""
    from transformers import AutoTokenizer

    from llmfoundry_patches.dataloaders import build_mixture_dataloader
    root, source = inputs
    y = om.load(ablation._fusion_yaml(config(root, source, out=str(tmp_path), train_proportions="uniform", **kw),
                                      "cut", tmp_path, 2, 1.0))
    loader_cfg = om.to_container(y.train_loader, resolve=True)
    loader_cfg.pop("name")
    spec = build_mixture_dataloader(AutoTokenizer.from_pretrained(str(tiny_tokenizer)), 4, **loader_cfg)
    return y, [b for _, b in zip(range(n), spec.dataloader)]


def test_seed_sets_the_fusion_runs_batches(inputs, tmp_path, tiny_tokenizer):
    """``seed`` reaches Composer's seed and the mixture loader: the same seed draws the same rows, another
    seed other rows; the default is the template's 17."""
    def first_rows(**kw):
        y, batches = mixture_batches(inputs, tmp_path, tiny_tokenizer, 3, **kw)
        return y.seed, torch.cat([b["input_ids"] for b in batches])
    seed, rows = first_rows()
    assert seed == 17 == om.load(ablation.FUSE_TEMPLATE).seed
    seed, again = first_rows(seed=17)
    assert torch.equal(rows, again)
    seed, other = first_rows(seed=18)
    assert seed == 18 and not torch.equal(rows, other)


def test_fusion_batching_reaches_the_mixture_loader(inputs, tmp_path, tiny_tokenizer):
    """``fusion_batching: stratified``, through the fusion yaml and llm-foundry's registry entry, gives batches
    of 4 rows with exactly 2 of each of the 2 uniform domains; the default draws each row on its own, which
    leaves some batch unbalanced."""
    def per_batch(**kw):
        _, batches = mixture_batches(inputs, tmp_path, tiny_tokenizer, 40, **kw)
        return [torch.bincount(b["domain"], minlength=2).tolist() for b in batches]
    assert all(c == [2, 2] for c in per_batch(fusion_batching="stratified"))
    assert any(c != [2, 2] for c in per_batch())


@pytest.mark.parametrize("kw, message", [
    ({"fusion_batching": "per_stream", "train_proportions": "uniform"},
     "fusion_batching='per_stream': expected one of ('random', 'stratified')"),
    ({"fusion_batching": "stratified"}, "fusion_batching=stratified: needs train_proportions"),
])
def test_bad_fusion_batching_is_named(inputs, kw, message):
    root, source = inputs
    with pytest.raises(ValueError, match=re.escape(message)):
        config(root, source, **kw)


@pytest.mark.parametrize("value", [-1, 1.5, True, "17"])
def test_bad_seed_is_named(inputs, value):
    root, _ = inputs
    with pytest.raises(ValueError, match=re.escape(f"seed={value!r}: expected an integer >= 0")):
        config(root, root / "no-source", seed=value)


@pytest.mark.parametrize("value, message", [
    ("even", "train_proportions='even': expected null, uniform or a list of positive numbers, one per domain"),
    ([1.0, 0.0], "train_proportions=[1.0, 0.0]: expected null, uniform or a list of positive numbers"),
    ([1.0, 1.0, 1.0], "train_proportions=[1.0, 1.0, 1.0]: expected 2 values, one per domain ['alpha', 'beta']"),
])
def test_bad_train_proportions_are_named(inputs, value, message):
    root, source = inputs
    with pytest.raises(ValueError, match=re.escape(message)):
        config(root, source, train_proportions=value)


def test_fusion_scheduler_replaces_the_templates_schedule(inputs, tmp_path):
    """Built by llm-foundry's registry from the fusion yaml, the schedule warms up over 5% of the run and
    decays linearly to zero; without the key the template's cosine (alpha_f 0.1) is kept."""
    from types import SimpleNamespace

    from composer.core import Time, Timestamp
    from llmfoundry import registry
    from llmfoundry.utils.builders import build_scheduler
    assert set(ablation.SCHEDULERS) <= set(registry.schedulers.get_all())
    root, source = inputs

    def multipliers(cfg):
        sched = om.to_container(om.load(ablation._fusion_yaml(cfg, "cut", tmp_path, 200, 1.0)).scheduler)
        scheduler = build_scheduler(sched.pop("name"), sched)
        return [scheduler(SimpleNamespace(max_duration=Time.from_timestring("200ba"), timestamp=Timestamp(batch=b),
                                          dataloader_len=None)) for b in (5, 10, 105, 200)]
    d2z = {"name": "linear_decay_with_warmup", "t_warmup": "0.05dur", "alpha_f": 0.0}
    assert multipliers(config(root, source, out=str(tmp_path), fusion_scheduler=d2z)) == pytest.approx(
        [0.5, 1.0, 0.5, 0.0])
    assert multipliers(config(root, source, out=str(tmp_path)))[3] == pytest.approx(0.1)


def test_fusion_betas_reach_the_optimizer(inputs, tmp_path):
    """Built by llm-foundry's builder from the fusion yaml, every param group (gamma's, the gains') runs Adam
    with the runner's betas; without the key the template's (0.9, 0.95) are kept."""
    from llmfoundry.utils.builders import build_optimizer
    root, source = inputs
    model = torch.nn.Module()
    model.operators = torch.nn.ParameterDict({name: torch.nn.Parameter(torch.zeros(2))
                                              for name in ("gamma", "B_emb", "G_norm")})

    def betas(cfg):
        opt = om.to_container(om.load(ablation._fusion_yaml(cfg, "cut", tmp_path, 200, 1.0)).optimizer)
        optimizer = build_optimizer(model, opt.pop("name"), opt)
        assert len(optimizer.param_groups) == 3  # gamma, G_norm, the rest
        return {tuple(group["betas"]) for group in optimizer.param_groups}
    every = dict(out=str(tmp_path), trained_operators="all", lr_operators={"G_norm": 4e-2})
    assert betas(config(root, source, fusion_betas=[0.9, 0.99], **every)) == {(0.9, 0.99)}
    assert betas(config(root, source, **every)) == {(0.9, 0.95)}


@pytest.mark.parametrize("value", [0.99, [0.9], [0.9, 1.0], [0.9, -0.1], [True, 0.99], "0.9,0.99"])
def test_bad_fusion_betas_are_named(inputs, value):
    root, _ = inputs
    with pytest.raises(ValueError, match=re.escape(f"fusion_betas={value!r}: expected null or [beta1, beta2], "
                                                   "each in [0, 1)")):
        config(root, root / "no-source", fusion_betas=value)


@pytest.mark.parametrize("value", ["linear", {"t_warmup": "0.1dur"}, {"name": "cosine"}])
def test_bad_fusion_scheduler_is_named(inputs, value):
    root, _ = inputs
    with pytest.raises(ValueError, match=re.escape(f"fusion_scheduler={value!r}: expected null or a mapping whose "
                                                   "name is one of ('constant_with_warmup'")):
        config(root, root / "no-source", fusion_scheduler=value)


def test_every_fusion_init_is_accepted(inputs):
    from lemon_composer.fusion.init import INITS
    root, source = inputs
    cfg = config(root, source, baselines=list(INITS), lemon_inits=list(INITS), lr_sweep=[1, 0.5], prune_steps=2)
    assert cfg.lr_sweep == [1.0, 0.5] and cfg.model_overrides == {} and cfg.lr_sweep_steps == 10


@pytest.mark.parametrize("name", ["smollm2_depth", "smollm2_width"])
def test_shipped_yamls_are_valid_for_the_real_source(inputs, name):
    from conftest import REPO
    from lemon_composer.sources.smollm2 import local_smollm2
    root, _ = inputs
    y = om.to_container(om.load(REPO / "yamls" / "ablation" / f"{name}.yaml"), resolve=True)
    cfg = AblationConfig(**{**y, "source_path": str(local_smollm2(REPO / ".cache" / "smollm2", with_model=True)),
                            "data_dir": str(root / "mds"), "mc_tasks": str(root / "mc")})
    assert cfg.setting == name.split("_")[1] and cfg.out == f"runs/ablation/{name}"  # never over docs/results


def test_fusion_dynamic_loading_adds_the_train_signal_callback(inputs, tmp_path):
    """The fusion yaml gets ``lemon_dynamic_loading`` with ``signal: train``, which llm-foundry's registry
    builds; the mixture loader applies new proportions from the next batch on."""
    from llmfoundry.utils.builders import build_callback

    root, source = inputs
    cfg = config(root, source, out=str(tmp_path), train_proportions="uniform",
                 fusion_dynamic_loading={"interval": 40, "eta": 0.5})
    y = om.to_container(om.load(ablation._fusion_yaml(cfg, "cut", tmp_path, 2, 1.0)), resolve=True)
    entry = y["callbacks"]["lemon_dynamic_loading"]
    assert entry == {"signal": "train", "interval": 40, "eta": 0.5}
    callback = build_callback("lemon_dynamic_loading", entry)
    assert (callback.signal, callback.interval, callback.eta) == ("train", 40, 0.5)
    assert y["train_loader"]["update_delay"] == 1 and y["train_loader"]["num_workers"] == 0
    plain = om.to_container(om.load(ablation._fusion_yaml(config(root, source, out=str(tmp_path)), "cut", tmp_path,
                                                          2, 1.0)))
    assert "lemon_dynamic_loading" not in plain["callbacks"]


@pytest.mark.parametrize("kw, match", [
    ({"fusion_dynamic_loading": {"interval": 40}}, "fusion_dynamic_loading: needs train_proportions"),
    ({"fusion_dynamic_loading": {"interval": 0}, "train_proportions": "uniform"},
     r"fusion_dynamic_loading: callbacks.lemon_dynamic_loading.interval=0"),
    ({"fusion_dynamic_loading": {"interval": 40, "speed": 2}, "train_proportions": "uniform"},
     r"fusion_dynamic_loading=\{'interval': 40, 'speed': 2\}: .*unexpected keyword argument 'speed'"),
    ({"fusion_dynamic_loading": {"signal": "eval"}, "train_proportions": "uniform"},
     r"fusion_dynamic_loading=\{'signal': 'eval'\}: expected null or a mapping"),
    ({"fusion_dynamic_loading": [40], "train_proportions": "uniform"}, r"fusion_dynamic_loading=\[40\]: expected"),
])
def test_bad_fusion_dynamic_loading_is_named(inputs, kw, match):
    root, source = inputs
    with pytest.raises(ValueError, match=match):
        config(root, source, **kw)
