"""Held-out perplexity per domain equals a direct token-weighted cross-entropy over the MDS rows."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from streaming import LocalDataset
from transformers import AutoTokenizer, LlamaForCausalLM

from fusion_helpers import tiny_config, tiny_source
from lemon_composer.data.prep import DataPrepConfig, prepare
from lemon_composer.eval.perplexity import domain_perplexity, main

SEQ_LEN = 32


@pytest.fixture()
def mds(synthetic_corpus, tiny_tokenizer, tmp_path) -> Path:
    out = tmp_path / "mds"
    prepare(DataPrepConfig(input=synthetic_corpus, out=out, tokenizer=str(tiny_tokenizer), seq_len=SEQ_LEN,
                           num_workers=1))
    return out


def save_model(folder: Path, vocab: int) -> Path:
    tiny_source(tiny_config(vocab=vocab)).save_pretrained(folder)
    return folder


@pytest.fixture()
def model_dir(tiny_tokenizer, tmp_path) -> Path:
    return save_model(tmp_path / "model", len(AutoTokenizer.from_pretrained(str(tiny_tokenizer))))


def direct_loss(model_dir: Path, rows_dir: Path, *, n: int | None = None, seq_len: int = SEQ_LEN) -> tuple[float, int]:
    """All rows in one batch, mean next-token NLL over every predicted token."""
    ds = LocalDataset(str(rows_dir))
    n = len(ds) if n is None else n
    rows = torch.from_numpy(np.stack([ds[i]["tokens"][:seq_len] for i in range(n)]).astype(np.int64))
    model = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=rows[:, :-1]).logits, dim=-1)
    nll = -logp.gather(-1, rows[:, 1:, None]).squeeze(-1)  # (n, seq_len - 1)
    return nll.mean().item(), nll.numel()


def test_matches_direct_computation(mds, model_dir):
    res = domain_perplexity(model_dir, mds)  # batch 8: the last batch of each domain is partial
    manifest = json.loads((mds / "manifest.json").read_text())
    assert set(res) == {"code", "prose"}
    for domain, r in res.items():
        loss, tokens = direct_loss(model_dir, mds / "eval" / domain)
        assert r["tokens"] == tokens == manifest["domains"][domain]["eval"]["rows"] * (SEQ_LEN - 1)
        assert r["loss"] == pytest.approx(loss, abs=1e-5)
        assert r["ppl"] == pytest.approx(math.exp(loss), rel=1e-4)


def test_batch_size_max_rows_and_seq_len(mds, model_dir):
    one = domain_perplexity(model_dir, mds, max_rows=7, batch_size=1)
    three = domain_perplexity(model_dir, mds, max_rows=7, batch_size=3)  # batches of 3, 3, 1 rows
    short = domain_perplexity(model_dir, mds, max_rows=2, seq_len=16)
    for domain in one:
        loss, tokens = direct_loss(model_dir, mds / "eval" / domain, n=7)
        assert one[domain]["tokens"] == three[domain]["tokens"] == tokens == 7 * (SEQ_LEN - 1)
        assert one[domain]["loss"] == pytest.approx(loss, abs=1e-5)
        assert three[domain]["loss"] == pytest.approx(loss, abs=1e-5)
        loss, tokens = direct_loss(model_dir, mds / "eval" / domain, n=2, seq_len=16)
        assert short[domain]["tokens"] == tokens == 2 * 15
        assert short[domain]["loss"] == pytest.approx(loss, abs=1e-5)


def test_cli_prints_a_row_per_domain(mds, model_dir, capsys):
    main(["--model", str(model_dir), "--data", str(mds), "--max-rows", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["domain", "tokens", "loss", "ppl"]
    assert [line.split()[0] for line in lines[1:]] == ["code", "prose", "all"]
    assert all(line.split()[1] == str(SEQ_LEN - 1) for line in lines[1:3])


def test_model_vocab_must_cover_the_data_tokenizer(mds, tiny_tokenizer, tmp_path):
    small = save_model(tmp_path / "small", len(AutoTokenizer.from_pretrained(str(tiny_tokenizer))) - 1)
    with pytest.raises(ValueError, match=r"--data=.*\(400 tokens\), more than --model=.*small has \(399\)"):
        domain_perplexity(small, mds)


def test_missing_manifest_and_bad_options(mds, model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"--data=.*no manifest\.json"):
        domain_perplexity(model_dir, tmp_path)
    with pytest.raises(ValueError, match=r"--model=.*no config\.json"):
        domain_perplexity(tmp_path, mds)
    with pytest.raises(ValueError, match=r"--seq-len=64: must lie in \[2, 32\]"):
        domain_perplexity(model_dir, mds, seq_len=64)
