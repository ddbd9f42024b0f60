"""Data of another vocabulary is refused before anything loads, whatever ``tokenizer.name`` says: in
``composer train.py`` (fusion and CPT) and in the perplexity evaluation."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import random_docs, write_jsonl
from fusion_helpers import tiny_config, tiny_source
from lemon_composer.data.prep import DataPrepConfig, prepare
from lemon_composer.eval.perplexity import domain_perplexity
from lemon_composer.run_checks import check_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    """A model folder with tokenizer A; data made with A and with B (A plus one token)."""
    root = tmp_path_factory.mktemp("vocab")
    tok_a = AutoTokenizer.from_pretrained(str(tiny_tokenizer))
    tok_b = AutoTokenizer.from_pretrained(str(tiny_tokenizer))
    tok_b.add_tokens(["<another-vocabulary>"])
    tok_b.save_pretrained(str(root / "tok_b"))
    model = root / "model"
    tiny_source(tiny_config(vocab=512)).save_pretrained(str(model))
    tok_a.save_pretrained(str(model))
    write_jsonl(root / "corpus" / "web" / "a.jsonl", random_docs(random.Random(0), 40))
    data = {}
    for name, tok in (("a", tiny_tokenizer), ("b", root / "tok_b")):
        prepare(DataPrepConfig(input=root / "corpus", out=root / f"data_{name}", tokenizer=str(tok), seq_len=16,
                               num_workers=1, eval_fraction=0.3))
        data[name] = root / f"data_{name}"
    return model, data


def fusion_cfg(model: Path, data: Path) -> dict:
    loader = {"name": "lemon_domains", "data_dir": str(data)}
    target = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 2, "num_hidden_layers": 2}
    return {"model": {"name": "lemon_fusion", "source_path": str(model), "target": target}, "train_loader": loader,
            "eval_loaders": [{**loader, "label": "web"}], "tokenizer": {"name": str(data / "tokenizer")}}


def test_data_of_the_models_vocabulary_passes(setup):
    model, data = setup
    check_run(fusion_cfg(model, data["a"]))


def test_data_of_another_vocabulary_is_refused_for_fusion_and_cpt(setup):
    model, data = setup
    with pytest.raises(ValueError, match=r"train_loader.data_dir=.*data_b: made with the tokenizer .*tok_b .*but "
                                         r"model.source_path=.*model uses another one"):
        check_run(fusion_cfg(model, data["b"]))
    cpt = {"model": {"name": "hf_causal_lm", "pretrained_model_name_or_path": str(model)},
           "train_loader": {"name": "lemon_mixture", "data_dir": str(data["a"])},
           "eval_loaders": [{"name": "lemon_domains", "data_dir": str(data["b"]), "label": "web"}]}
    with pytest.raises(ValueError, match=r"eval_loaders\[0\].data_dir=.*data_b: .*"
                                         r"model.pretrained_model_name_or_path=.*model uses another one"):
        check_run(cpt)


def test_a_missing_model_folder_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"model.pretrained_model_name_or_path='/nowhere': expected a local "
                                         r"model folder with a config.json"):
        check_run({"model": {"name": "hf_causal_lm", "pretrained_model_name_or_path": "/nowhere"}})


def test_perplexity_refuses_data_of_another_vocabulary(setup):
    model, data = setup
    with pytest.raises(ValueError, match=r"--data=.*data_b: made with the tokenizer .* but --model=.*model uses "
                                         r"another one"):
        domain_perplexity(model, data["b"])


def test_train_py_stops_before_loading(setup):
    model, data = setup
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), str(REPO / "yamls" / "fuse" / "smollm2_cpu.yaml"),
                           f"variables.source_path={model}", f"variables.data_dir={data['b']}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "made with the tokenizer" in proc.stderr and "uses another one" in proc.stderr


def test_a_model_trained_from_scratch_needs_only_room_for_the_vocabulary(setup):
    model, data = setup
    scratch = {"model": {"name": "hf_causal_lm", "pretrained": False, "pretrained_model_name_or_path": str(model),
                         "config_overrides": {"vocab_size": 401}},
               "train_loader": {"name": "lemon_domains", "data_dir": str(data["b"])}}
    check_run(scratch)  # B has 401 tokens: any vocabulary of that size trains from scratch
    scratch["model"]["config_overrides"]["vocab_size"] = 400
    with pytest.raises(ValueError, match=r"\(401 tokens\), more than model.pretrained_model_name_or_path=.* \(400\)"):
        check_run(scratch)
