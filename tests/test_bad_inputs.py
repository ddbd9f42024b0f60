"""Malformed inputs across the entry points (issue 12): each exits 2 with one line naming the key or flag
the user wrote, and fails before the expensive step: no weights loaded, no tokenization, no training."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import random_docs, write_jsonl
from fusion_helpers import tiny_config, tiny_source
from lemon_composer import ablation, evaluate, export, planner
from lemon_composer.analysis import __main__ as analysis
from lemon_composer.data import prep, prep_cli
from lemon_composer.eval import perplexity
from lemon_composer.run_checks import check_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """A corpus, its data prep output, a tiny model folder with the same tokenizer, a damaged copy."""
    root = tmp_path_factory.mktemp("bad")
    write_jsonl(root / "corpus" / "web" / "a.jsonl", random_docs(random.Random(0), 30))
    (root / "broken" / "web").mkdir(parents=True)
    (root / "broken" / "web" / "a.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    prep.prepare(prep.DataPrepConfig(input=root / "corpus", out=root / "mds", tokenizer=str(tiny_tokenizer),
                                     seq_len=16, num_workers=1, eval_fraction=0.3))
    model = root / "model"
    tiny_source(tiny_config(vocab=512)).save_pretrained(str(model))
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(str(tiny_tokenizer)).save_pretrained(str(model))
    truncated = root / "truncated"
    import shutil
    shutil.copytree(root / "mds", truncated)
    shard = next((truncated / "eval" / "web").glob("shard.*.mds"))
    shard.write_bytes(shard.read_bytes()[:-7])
    damaged = root / "damaged"
    shutil.copytree(root / "mds", damaged)
    (damaged / "manifest.json").write_text('{"seq_len": 16, "tok')
    return {"root": root, "corpus": root / "corpus", "broken": root / "broken", "mds": root / "mds",
            "model": model, "tok": tiny_tokenizer, "truncated": truncated, "damaged": damaged}


def fill(args: list[str], w: dict[str, Path]) -> list[str]:
    """``{name}`` placeholders replaced by the fixture's paths."""
    out = []
    for a in args:
        for k, v in w.items():
            a = a.replace("{" + k + "}", str(v))
        out.append(a)
    return out


CLI = {"prep": prep_cli.main, "export": export.main, "perplexity": perplexity.main, "eval": evaluate.main,
       "planner": planner.main, "ablation": ablation.main, "analysis": analysis.main}
PREP = ["--input", "{corpus}", "--out", "{root}/out", "--tokenizer", "{tok}"]
EXPORT = ["--source", "{model}", "--out", "{root}/exported"]

CASES = [  # (entry point, arguments, message fragment)
    ("prep", ["--input", "{root}/nowhere", "--out", "{root}/out", "--tokenizer", "{tok}"], "--input="),
    ("prep", PREP[:4] + ["--tokenizer", "{root}/no.model"], "--tokenizer="),
    ("prep", PREP + ["--seq-len", "1"], "--seq-len=1: must be at least 2"),
    ("prep", PREP + ["--num-workers", "0"], "--num-workers=0: must be at least 1"),
    ("prep", PREP + ["--eval-fraction", "1.5"], "--eval-fraction=1.5"),
    ("prep", ["--input", "{broken}", "--out", "{root}/out", "--tokenizer", "{tok}"], "a.jsonl:2: malformed JSON line"),
    ("prep", ["--input", "{corpus}", "--out", "{mds}", "--tokenizer", "{tok}"], "already exists; pass --overwrite"),
    ("export", ["--out", "{root}/exported"], "give exactly one of --checkpoint or --source"),
    ("export", EXPORT, "--source needs --target"),
    ("export", EXPORT + ["--target", "32,48,2"], "--target=32,48,2: expected hidden,ffn,heads,layers"),
    ("export", EXPORT + ["--target", "32,48,x,2"], "--target=32,48,x,2: expected"),
    ("export", EXPORT + ["--target", "32,48,2,2", "--receptive-field", "2,2"], "--receptive-field=2,2: expected r_h,r_a,r_i"),
    ("export", EXPORT + ["--target", "32,48,2,2", "--init", "magic"], "model.init=magic: expected one of"),
    ("export", EXPORT + ["--target", "32,48,2,2", "--init", "prune"], "model.init=prune needs model.calibration"),
    ("export", EXPORT + ["--target", "128,48,8,2"], "target.hidden_size=128 is larger than the source's 64"),
    ("export", ["--checkpoint", "{root}/none.pt", "--out", "{root}/exported"], "--checkpoint="),
    ("perplexity", ["--model", "{model}", "--data", "{root}/nowhere"], "--data={root}/nowhere: no manifest.json"),
    ("perplexity", ["--model", "{model}", "--data", "{damaged}"], "manifest.json is damaged"),
    ("perplexity", ["--model", "{model}", "--data", "{truncated}"], "domain 'web': shard"),
    ("perplexity", ["--model", "{model}", "--data", "{mds}", "--seq-len", "99"], "--seq-len=99: must lie in [2, 16]"),
    ("perplexity", ["--model", "{model}", "--data", "{mds}", "--max-rows", "0"], "--max-rows=0: must be at least 1"),
    ("eval", ["--model", "{root}/nowhere", "--tasks", "sciq"], "--model="),
    ("eval", ["--model", "{model}", "--tasks", "arc_chalenge"], "unknown task 'arc_chalenge'"),
    ("eval", ["--model", "{model}", "--tasks", "sciq", "--out", "{mds}/manifest.json/x.json"], "--out="),
    ("planner", ["{root}/none.yaml"], "yaml={root}/none.yaml: no such file"),
    ("planner", [str(REPO / "yamls/fuse/7b_to_1.3b.yaml"), "--source-config", "llama-2-7b",
                 "model.receptive_field.r_a=5"], "receptive_field.r_a=5"),
    ("planner", [str(REPO / "yamls/fuse/7b_to_1.3b.yaml"), "--source-config", "llama-2-7b",
                 "model.fusion_parallel=tensor"], "model.fusion_parallel='tensor'"),
    ("ablation", [str(REPO / "yamls/ablation/smollm2_depth.yaml"), "source_path={root}/nowhere"], "source_path="),
    ("ablation", [str(REPO / "yamls/ablation/smollm2_depth.yaml"), "source_path={model}", "data_dir={mds}",
                  "setting=sideways"], "setting=sideways: expected one of"),
    ("ablation", [str(REPO / "yamls/ablation/smollm2_depth.yaml"), "fusion_step=3"], "unknown keys ['fusion_step']"),
    ("ablation", [str(REPO / "yamls/ablation/smollm2_depth.yaml"), "lr_sweep=[a]"], "lr_sweep=['a']: expected a list of numbers"),
    ("ablation", [str(REPO / "yamls/ablation/smollm2_deep.yaml")], "smollm2_deep.yaml: no such yaml file"),
    ("ablation", [str(REPO / "yamls/ablation/smollm2_depth.yaml"), "fusion_steps=abc"],
     "fusion_steps='abc': expected an integer"),
    ("ablation", [str(REPO / "yamls/ablation/smollm2_depth.yaml"), "batch_size=0"], "batch_size=0: expected an integer >= 1"),
    ("ablation", [str(REPO / "yamls/ablation/smollm2_depth.yaml"), "lr_gamma=-1"], "lr_gamma=-1: expected a positive number"),
    ("analysis", ["cka", "--model", "{root}/nowhere", "--out", "{root}/cka"], "--model="),
    ("analysis", ["operators", "--checkpoint", "{root}/none.pt", "--out", "{root}/ops"], "--checkpoint="),
]


@pytest.fixture
def nothing_expensive(monkeypatch):
    """Loading weights, tokenizing or training fails the test: every case must stop before."""
    import composer
    import transformers

    def forbidden(what: str):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} ran before the input was rejected")
        return fail
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(forbidden("from_pretrained")))
    monkeypatch.setattr(prep, "_tokenize_and_write", forbidden("tokenization"))
    monkeypatch.setattr(composer.Trainer, "fit", forbidden("training"))


@pytest.mark.parametrize("entry,args,fragment", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_malformed_input_is_named_before_expensive_work(world, nothing_expensive, capsys, entry, args, fragment):
    code = CLI[entry](fill(args, world))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert fill([fragment], world)[0] in err, err


TARGET = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1,
          "num_hidden_layers": 2}
FUSION = {"name": "lemon_fusion", "source_path": "{model}", "target": TARGET}
TRAIN_CASES = [  # composer train.py: the resolved config, checked before llm-foundry loads anything
    ({"model": {"name": "lemon_fusion", "source_path": "{root}/nowhere"}}, "model.source_path='{root}/nowhere'"),
    ({"model": {"name": "hf_causal_lm", "pretrained_model_name_or_path": "{model}"},
      "train_loader": {"name": "lemon_mixture", "data_dir": "{root}/nowhere"}}, "train_loader.data_dir={root}/nowhere"),
    ({"model": {"name": "hf_causal_lm", "pretrained_model_name_or_path": "{model}"},
      "eval_loaders": [{"name": "lemon_domains", "data_dir": "{damaged}"}]}, "manifest.json is damaged"),
    ({"model": {**FUSION, "lam": "abc"}}, "model.lam='abc': expected a number"),
    ({"model": {**FUSION, "target": {**TARGET, "hidden_size": "abc"}}},
     "model.target.hidden_size='abc': expected an integer"),
    ({"model": {**FUSION, "target": {**TARGET, "num_attention_heads": 3}}}, "num_attention_heads"),
    ({"model": {**FUSION, "fusion_parallel": "sharded"}}, "add the lemon_fuse_once algorithm"),
    ({"model": FUSION, "callbacks": {"lemon_dynamic_loading": {"eta": "abc"}}},
     "callbacks.lemon_dynamic_loading.eta='abc': expected a number"),
    ({"model": FUSION, "callbacks": {"lemon_finite_guard": {"interval": 0}}},
     "callbacks.lemon_finite_guard.interval=0: expected a positive integer"),
    ({"model": FUSION, "callbacks": {"lemon_hf_export": {"folder": "x"}}},
     "callbacks.lemon_hf_export: unknown keys ['folder']"),
    ({"model": FUSION, "algorithms": {"lemon_fusion_stages": {"schedule": "sideways"}}},
     "algorithms.lemon_fusion_stages.schedule=sideways"),
    ({"model": {"name": "hf_causal_lm", "pretrained_model_name_or_path": "{model}"},
      "algorithms": {"lemon_fuse_once": {}}}, "algorithms.lemon_fuse_once: works only with model.name: lemon_fusion"),
]


@pytest.mark.parametrize("cfg,fragment", TRAIN_CASES)
def test_train_config_is_checked_before_anything_loads(world, nothing_expensive, cfg, fragment):
    resolved = json.loads(fill([json.dumps(cfg)], world)[0])
    with pytest.raises(ValueError) as err:
        check_run(resolved)
    assert fill([fragment], world)[0] in str(err.value)
