"""Export to HF folders: exact logits after reload, atomic writes, clear errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from composer import Trainer
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion_helpers import reference_baseline, tiny_config, tiny_source
from lemon_composer import export as export_mod
from lemon_composer.export import PROVENANCE, export_baseline, export_checkpoint
from lemon_composer.fusion.init import cut_selection
from lemon_composer.models.fusion_model import LemonFusionModel

TARGET = dict(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_hidden_layers=2)


def make_source(folder, tokenizer_dir, *, tied=False, seed=0):
    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    tiny_source(tiny_config(kv_heads=2, vocab=vocab, tied=tied), seed=seed).save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(folder))
    return folder


def batches(vocab: int, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 16), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def train_and_checkpoint(model, folder, steps=3) -> str:
    data = batches(model.plan.source.vocab, n=steps)
    loader = DataLoader(data, batch_size=None)
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=f"{steps}ba",
                      optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2), save_folder=str(folder),
                      save_interval=f"{steps}ba", progress_bar=False, log_to_console=False, device="cpu",
                      device_train_microbatch_size=2)
    trainer.fit()
    trainer.close()
    return str(folder / f"ep0-ba{steps}-rank0.pt")


@pytest.fixture()
def source(tmp_path, tiny_tokenizer):
    return make_source(tmp_path / "src", tiny_tokenizer)


def reload_logits(folder, ids):
    model = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits, model


@pytest.mark.parametrize("tied", [False, True])
def test_fusion_checkpoint_exports_the_same_logits(tmp_path, tiny_tokenizer, tied):
    src = make_source(tmp_path / "src", tiny_tokenizer, tied=tied)
    model = LemonFusionModel(source_path=str(src), target=TARGET, attn_implementation="sdpa")
    ckpt = train_and_checkpoint(model, tmp_path / "ckpt")
    out = export_checkpoint(ckpt, tmp_path / "hf")
    ids = batches(model.plan.source.vocab, n=1, seed=9)[0]["input_ids"]
    with torch.no_grad():
        expected = model.logits(model(batches(model.plan.source.vocab, n=1, seed=9)[0]))[0]
    got, reloaded = reload_logits(out, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert reloaded.config.tie_word_embeddings is tied
    assert (reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()) is tied
    provenance = json.loads((out / PROVENANCE).read_text())
    assert provenance["kind"] == "lemon_fusion" and provenance["checkpoint_step"] == 3
    assert provenance["source_fingerprint"] == model.source_fingerprint
    assert AutoTokenizer.from_pretrained(str(out)).get_vocab() == AutoTokenizer.from_pretrained(str(src)).get_vocab()
    assert (out / "generation_config.json").is_file() and list(out.glob("*.safetensors"))


def test_bf16_export_within_documented_tolerance(tmp_path, source):
    model = LemonFusionModel(source_path=str(source), target=TARGET, attn_implementation="sdpa")
    ckpt = train_and_checkpoint(model, tmp_path / "ckpt", steps=2)
    out = export_checkpoint(ckpt, tmp_path / "hf16", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    b = batches(model.plan.source.vocab, n=1, seed=4)[0]
    with torch.no_grad():
        expected = model.logits(model(b))[0]
    got, _ = reload_logits(out, b["input_ids"])  # bf16 weights, fp32 compute
    # documented tolerance (README): bf16 weights keep ~3 significant digits
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()


def test_plain_training_checkpoint_exports_the_same_logits(tmp_path, source, tiny_tokenizer):
    from llmfoundry.models.hf.hf_causal_lm import ComposerHFCausalLM
    tok = AutoTokenizer.from_pretrained(str(source))
    model = ComposerHFCausalLM(tokenizer=tok, pretrained_model_name_or_path=str(source), pretrained=True,
                               use_flash_attention_2=False, attn_implementation="sdpa")
    vocab = model.model.config.vocab_size
    loader = DataLoader(batches(vocab, n=2), batch_size=None)
    trainer = Trainer(model=model, train_dataloader=loader, max_duration="2ba",
                      optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2), save_folder=str(tmp_path / "ck"),
                      save_interval="2ba", progress_bar=False, log_to_console=False, device="cpu",
                      device_train_microbatch_size=2)
    trainer.fit()
    trainer.close()
    out = export_checkpoint(tmp_path / "ck" / "ep0-ba2-rank0.pt", tmp_path / "hf")
    ids = batches(vocab, n=1, seed=5)[0]["input_ids"]
    with torch.no_grad():
        expected = model.model(ids).logits
    got, _ = reload_logits(out, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert json.loads((out / PROVENANCE).read_text())["kind"] == "hf_causal_lm"


@pytest.mark.parametrize("init", ["cut", "random", "avg"])
def test_baseline_export_without_training(tmp_path, source, init):
    out = export_baseline(str(source), init, TARGET, tmp_path / init, attn_implementation="sdpa")
    model = LemonFusionModel(source_path=str(source), target=TARGET, init=init, attn_implementation="sdpa")
    ids = batches(model.plan.source.vocab, n=1)[0]["input_ids"]
    with torch.no_grad():
        expected = model.skeleton.logits(model.fused_state_dict(), ids)
    got, _ = reload_logits(out, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if init == "cut":  # and cut is the independently sliced model
        with torch.no_grad():
            ref = reference_baseline(model.source, model.plan, cut_selection(model.plan))(ids).logits
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert json.loads((out / PROVENANCE).read_text())["kind"] == f"baseline:{init}"


def test_interrupted_export_leaves_nothing(tmp_path, source, monkeypatch):
    def fail(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod.GenerationConfig, "save_pretrained", fail)  # after weights were written
    with pytest.raises(KeyboardInterrupt):
        export_baseline(str(source), "cut", TARGET, tmp_path / "hf", attn_implementation="sdpa")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_overwrite_only_when_asked(tmp_path, source):
    out = export_baseline(str(source), "cut", TARGET, tmp_path / "hf", attn_implementation="sdpa")
    with pytest.raises(ValueError, match=r"--out=.*hf already exists; pass --overwrite"):
        export_baseline(str(source), "cut", TARGET, out, attn_implementation="sdpa")
    export_baseline(str(source), "random", TARGET, out, overwrite=True, attn_implementation="sdpa")
    assert json.loads((out / PROVENANCE).read_text())["kind"] == "baseline:random"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "src"]


def test_bad_inputs_are_named(tmp_path, source, tiny_tokenizer):
    junk = tmp_path / "junk.pt"
    torch.save({"state": {"model": {"w": torch.zeros(1)}}}, junk)
    with pytest.raises(ValueError, match=r"neither a LEMON fusion checkpoint .* nor an llm-foundry hf_causal_lm"):
        export_checkpoint(junk, tmp_path / "o1")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"text.pt: truncated or damaged checkpoint file"):
        export_checkpoint(tmp_path / "text.pt", tmp_path / "o2")
    # a source whose weights changed after fusion: refused by fingerprint
    model = LemonFusionModel(source_path=str(source), target=TARGET, attn_implementation="sdpa")
    ckpt = train_and_checkpoint(model, tmp_path / "ckpt", steps=1)
    make_source(source, tiny_tokenizer, seed=7)
    with pytest.raises(ValueError, match=r"checkpoint was made from source .* fingerprint"):
        export_checkpoint(ckpt, tmp_path / "o3")
    # a source folder without tokenizer files
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(source / f, bare / f)
    with pytest.raises(ValueError, match=r"--source=.*bare: no loadable tokenizer there"):
        export_baseline(str(bare), "cut", TARGET, tmp_path / "o4", attn_implementation="sdpa")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_export_callback_writes_the_fused_model_at_fit_end(tmp_path, source):
    from lemon_composer.callbacks.hf_export import HFExport
    model = LemonFusionModel(source_path=str(source), target=TARGET, attn_implementation="sdpa")
    loader = DataLoader(batches(model.plan.source.vocab, n=2), batch_size=None)
    trainer = Trainer(model=model, train_dataloader=loader, max_duration="2ba", device="cpu",
                      optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2), progress_bar=False,
                      log_to_console=False, device_train_microbatch_size=2,
                      callbacks=[HFExport(str(tmp_path / "hf"), dtype="fp32")])
    trainer.fit()
    trainer.close()
    b = batches(model.plan.source.vocab, n=1, seed=3)[0]
    with torch.no_grad():
        expected = model.logits(model(b))[0]
    got, _ = reload_logits(tmp_path / "hf", b["input_ids"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "hf" / PROVENANCE).read_text())["checkpoint_step"] == 2


def test_cli_exports_a_prune_baseline_with_calibration_data(tmp_path, source, synthetic_corpus, tiny_tokenizer):
    from lemon_composer.data.prep import DataPrepConfig, prepare
    prepare(DataPrepConfig(input=synthetic_corpus, out=tmp_path / "mds", tokenizer=str(tiny_tokenizer),
                           seq_len=32, num_workers=1))
    rc = export_mod.main(["--source", str(source), "--init", "prune", "--target", "32,48,2,2",
                          "--calibration-data", str(tmp_path / "mds"), "--out", str(tmp_path / "pruned")])
    assert rc == 0 and json.loads((tmp_path / "pruned" / PROVENANCE).read_text())["kind"] == "baseline:prune"
    assert export_mod.main(["--source", str(source), "--init", "prune", "--target", "32,48,2,2",
                            "--out", str(tmp_path / "p2")]) == 2  # prune without calibration: a clear error
    assert not (tmp_path / "p2").exists()
