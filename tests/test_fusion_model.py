"""LemonFusionModel on tiny random sources saved as local HF folders."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fusion_helpers import reference_baseline, tiny_config, tiny_source
from lemon_composer.fusion.init import cut_selection
from lemon_composer.models.fusion_model import LemonFusionModel

TARGET = dict(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_hidden_layers=2)
RF = dict(r_h=2, r_a=4, r_i=3)


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_source")
    tiny_source(tiny_config(kv_heads=2)).save_pretrained(str(folder))
    return folder


def make(source_dir, **kw):
    kw = {"source_path": str(source_dir), "target": TARGET, "receptive_field": RF,
          "attn_implementation": "sdpa", **kw}
    return LemonFusionModel(**kw)


def batch(seed=0, b=2, t=16):
    ids = torch.randint(0, 101, (b, t), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_identity_model_reproduces_source_logits(source_dir):
    cfg = tiny_config(kv_heads=2)
    full = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_attention_heads=cfg.num_attention_heads, num_hidden_layers=cfg.num_hidden_layers)
    model = make(source_dir, target=full, init="identity")
    b = batch()
    with torch.no_grad():
        out = model(b)
        student, teacher = model.logits(out)
    torch.testing.assert_close(student, teacher, rtol=1e-5, atol=1e-5)
    # identity: the fused student equals the teacher, so the KL term of Eq. 4 vanishes
    assert model.loss(out, b)["kl"].item() == pytest.approx(0.0, abs=1e-6)


def test_cut_model_equals_sliced_baseline_and_loss_follows_eq4(source_dir):
    model = make(source_dir, lam=0.3, temperature=2.0)
    b = batch(1)
    with torch.no_grad():
        out = model(b)
        student, teacher = model.logits(out)
        ref = reference_baseline(model.source, model.plan, cut_selection(model.plan))(b["input_ids"]).logits
        torch.testing.assert_close(student, ref, rtol=1e-5, atol=1e-5)
        loss = model.loss(out, b)
    s, t, y = student[:, :-1], teacher[:, :-1], b["labels"][:, 1:]
    lm = F.cross_entropy(s.reshape(-1, 101), y.reshape(-1))
    kl = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True,
                  reduction="none").sum(-1).mean() * 4
    torch.testing.assert_close(loss["lm"], lm)
    torch.testing.assert_close(loss["kl"], kl)
    torch.testing.assert_close(loss["total"], 0.3 * lm + 0.7 * kl)


def test_only_operators_get_gradients_and_the_source_never_changes(source_dir):
    model = make(source_dir)
    before = {k: v.clone() for k, v in model.source.state_dict().items()}
    assert all(n.startswith("operators.") for n, _ in model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(6):
        opt.zero_grad()
        b = batch(step % 2)
        loss = model.loss(model(b), b)["total"]
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        assert not any(p.requires_grad for p in model.source.parameters())
        opt.step()
        losses.append(loss.item())
    after = model.source.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert losses[-1] < losses[0]


def test_param_groups_give_layer_and_dimension_operators_their_own_lr(source_dir):
    from llmfoundry.utils.builders import build_optimizer
    model = make(source_dir)
    opt = build_optimizer(model, "decoupled_adamw", {"lr": 5e-5, "param_groups": [
        {"param_str_match": "operators.gamma", "lr": 5e-4}]})
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_lr[5e-4] == {id(p) for p in model.operators.gamma.values()}
    assert by_lr[5e-5] == {id(p) for n, p in model.named_parameters() if "gamma" not in n}


def test_checkpoint_state_holds_operators_and_a_source_reference(source_dir, tmp_path):
    model = make(source_dir)
    sd = model.state_dict()
    assert {k for k in sd if k != "_extra_state"} == {n for n, _ in model.named_parameters()}
    extra = sd["_extra_state"]
    assert extra["source_path"] == str(source_dir) and len(extra["source_fingerprint"]) == 16
    # same source: loads; a different source (changed weights): refused with a clear message
    make(source_dir).load_state_dict(sd)
    other = tmp_path / "other"
    changed = tiny_source(tiny_config(kv_heads=2), seed=5)
    changed.save_pretrained(str(other))
    with pytest.raises(ValueError, match=r"checkpoint was made from source .* fingerprint"):
        make(other).load_state_dict(sd)
    with pytest.raises(ValueError, match=r"checkpoint operators were made for"):
        make(source_dir, receptive_field=dict(r_h=1, r_a=4, r_i=3)).load_state_dict(sd, strict=False)


def test_checkpoint_from_before_an_option_existed_loads_at_its_default(source_dir):
    # A checkpoint written before FusionPlan had `layer_maps` holds a plan repr without it.
    sd = make(source_dir).state_dict()
    legacy = sd["_extra_state"]["plan"].replace(", layer_maps=False", "")
    assert legacy != sd["_extra_state"]["plan"]
    sd["_extra_state"] = dict(sd["_extra_state"], plan=legacy)
    make(source_dir).load_state_dict(sd)
    # that checkpoint had no maps: a run that turns them on gets the plan error, before any missing key
    with pytest.raises(ValueError, match=r"checkpoint operators were made for"):
        make(source_dir, layer_maps=True).load_state_dict(sd, strict=False)
    # a field the legacy repr holds still counts: fold_norms (on by default) off is refused
    with pytest.raises(ValueError, match=r"checkpoint operators were made for"):
        make(source_dir, fold_norms=False).load_state_dict(sd, strict=False)


@pytest.mark.parametrize("override,match", [
    ({"target": dict(TARGET, num_attention_heads=3)}, r"target.num_attention_heads=3 must divide target.hidden_size=32"),
    ({"target": dict(TARGET, hidden_size=128, num_attention_heads=8)}, r"target.hidden_size=128 is larger than the source's 64"),
    ({"receptive_field": dict(r_h=5)}, r"receptive_field.r_h=5 must be a positive divisor of 64 and 32"),
    ({"receptive_field": dict(r_a=32)}, r"receptive_field.r_a=32 must be a positive divisor of 8, the rotary "
                                        r"frequencies per head \(attention_operator: rope"),
    ({"receptive_field": dict(r_a=32), "attention_operator": "block"},
     r"receptive_field.r_a=32 must be a positive divisor of 16"),
    ({"attention_operator": "dense"}, r"model.attention_operator=dense: expected one of \('rope', 'block'\)"),
    ({"receptive_field": dict(r_i=7)}, r"receptive_field.r_i=7 must be a positive divisor of 96 and 48"),
    ({"target": dict(TARGET, vocab_size=32000)}, r"target.vocab_size=32000 must equal the source's vocab 101"),
    ({"target": dict(TARGET, num_hidden_layers=9)}, r"target.num_hidden_layers=9 is larger than the source's 4"),
    ({"lam": 1.5}, r"model.lam=1.5: must lie in \[0, 1\]"),
    ({"init": "magic"}, r"model.init=magic: expected one of"),
    ({"init": "prune"}, r"model.init=prune needs model.calibration.data_dir"),
    ({"bogus": 1}, r"model: unknown keys \['bogus'\]"),
    ({"attn_implementation": "flash_attention_2"}, r"flash_attention_2 needs a CUDA GPU and flash-attn"),
    ({"fusion_parallel": "tensor"}, r"model.fusion_parallel=tensor: expected one of \('replicated', 'sharded'\)"),
    ({"loss_chunk_tokens": 0}, r"model.loss_chunk_tokens=0: expected a positive integer"),
    ({"activation_checkpointing": "yes"}, r"model.activation_checkpointing='yes': expected true or false"),
    ({"target": dict(TARGET, hidden_size="abc")}, r"model.target.hidden_size='abc': expected an integer"),
    ({"receptive_field": dict(r_h=1.5)}, r"model.receptive_field.r_h=1.5: expected an integer"),
    ({"receptive_field": [2, 2, 2]}, r"model.receptive_field=\[2, 2, 2\]: expected a mapping of"),
])
def test_bad_config_fails_before_weights_load(tmp_path, override, match):
    # a folder with only config.json: any attempt to read weights would fail differently
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(kv_heads=2).to_dict()))
    with pytest.raises(ValueError, match=match):
        make(tmp_path, **override)


def test_missing_source_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"model.source_path=.*nowhere: no config.json there"):
        make(tmp_path / "nowhere")


def test_prune_init_scores_calibration_rows_from_data_prep(tmp_path, synthetic_corpus, tiny_tokenizer):
    """init=prune reads calibration rows from data prep's shards and reproduces its selection exactly."""
    from transformers import AutoTokenizer

    from lemon_composer.data.calibration import calibration_batches
    from lemon_composer.data.prep import DataPrepConfig, prepare
    from lemon_composer.fusion.init_prune import prune_selection

    prepare(DataPrepConfig(input=synthetic_corpus, out=tmp_path / "mds", tokenizer=str(tiny_tokenizer),
                           seq_len=32, num_workers=1))
    vocab = len(AutoTokenizer.from_pretrained(str(tiny_tokenizer)))
    tiny_source(tiny_config(kv_heads=2, vocab=vocab)).save_pretrained(str(tmp_path / "src"))
    calib = {"data_dir": str(tmp_path / "mds"), "num_batches": 2, "batch_size": 3, "seq_len": 16}
    model = make(tmp_path / "src", init="prune", calibration=calib)
    batches = calibration_batches(calib["data_dir"], split="train", num_batches=2, batch_size=3, seq_len=16)
    assert [tuple(b.shape) for b in batches] == [(3, 16), (3, 16)]
    assert max(int(b.max()) for b in batches) < vocab
    sel = prune_selection(model.plan, model.source, batches)
    b = {"input_ids": batches[0], "attention_mask": torch.ones_like(batches[0]), "labels": batches[0]}
    with torch.no_grad():
        torch.testing.assert_close(model.logits(model(b))[0], reference_baseline(model.source, model.plan, sel)(batches[0]).logits,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"model.calibration.seq_len=64 exceeds the rows"):
        make(tmp_path / "src", init="prune", calibration={**calib, "seq_len": 64})
