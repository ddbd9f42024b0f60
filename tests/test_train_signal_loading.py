"""``lemon_dynamic_loading`` with ``signal: train`` on a real Composer Trainer running fusion.

The per-domain losses it reads are checked against independent references (the source and the
initial fused model as Hugging Face models on the same rows), the proportions against Sheared-LLaMA's
update computed by hand from the recorded per-token losses, and a run resumed in the middle of a
window against the uninterrupted one.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from composer import Callback, Trainer
from composer.core import State
from composer.loggers import Logger
from composer.optim import ConstantScheduler, DecoupledAdamW
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, LlamaForCausalLM

from conftest import random_docs, write_jsonl
from fusion_helpers import tiny_config, tiny_source
from lemon_composer.callbacks.dynamic_loading import DynamicLoading
from lemon_composer.data.mixing import DomainMixture, collate_rows
from lemon_composer.data.prep import DataPrepConfig, prepare
from lemon_composer.export import hf_model_from_fused
from lemon_composer.models.fusion_model import LemonFusionModel

TARGET = dict(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_hidden_layers=2)
RF = dict(r_h=2, r_a=4, r_i=3)
W0 = [0.5, 0.3, 0.2]
ETA, SMOOTHING = 4.0, 1e-3


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("train_signal")
    rng = random.Random(1)
    for domain, code in (("code", True), ("prose", False), ("web", False)):
        write_jsonl(root / "corpus" / domain / "a.jsonl", random_docs(rng, 60, code=code))
    prepare(DataPrepConfig(input=root / "corpus", out=root / "mds", tokenizer=str(tiny_tokenizer), seq_len=16,
                           num_workers=1))
    vocab = len(AutoTokenizer.from_pretrained(str(tiny_tokenizer)))
    tiny_source(tiny_config(kv_heads=2, vocab=vocab)).save_pretrained(str(root / "src"))
    return root


class Spy(Callback):
    """Every micro-batch's per-token losses and rows, and the operators in force when it ran."""

    def __init__(self) -> None:
        self.rows: list[dict[str, torch.Tensor]] = []

    def after_loss(self, state: State, logger: Logger) -> None:
        stats = state.outputs["stats"]
        self.rows.append({"ce": stats.ce.detach().clone(), "source_ce": stats.source_ce.detach().clone(),
                          "mask": stats.mask.clone(), "domain": state.batch["domain"].clone(),
                          "input_ids": state.batch["input_ids"].clone()})


def run(root, steps: int, *, interval: int, folder=None, load=None) -> tuple[DomainMixture, Spy, LemonFusionModel]:
    torch.manual_seed(0)
    model = LemonFusionModel(source_path=str(root / "src"), target=TARGET, receptive_field=RF,
                             attn_implementation="sdpa", lam=0.0)
    dataset = DomainMixture(str(root / "mds"), device_batch_size=4, proportions=W0, seed=5, update_delay=1)
    spy = Spy()
    trainer = Trainer(
        model=model, train_dataloader=DataLoader(dataset, batch_size=4, collate_fn=collate_rows),
        max_duration=f"{steps}ba", optimizers=DecoupledAdamW(model.parameters(), lr=1e-2),
        schedulers=ConstantScheduler(alpha=1.0, t_max="1dur"),
        callbacks=[spy, DynamicLoading(signal="train", interval=interval, eta=ETA, smoothing=SMOOTHING)],
        device_train_microbatch_size=2, progress_bar=False, log_to_console=False, device="cpu", seed=0,
        save_folder=folder, save_interval="2ba" if folder else "1ep", load_path=load)
    trainer.fit()
    trainer.close()
    return dataset, spy, model


def hand_update(w: np.ndarray, rows: list[dict[str, torch.Tensor]],
                last: dict[int, tuple[float, float]]) -> np.ndarray:
    """Sheared-LLaMA's update from per-domain token means, one row at a time; a domain without rows in
    the window keeps its ``last`` means (none yet: no excess). Updates ``last``."""
    sums: dict[int, list[float]] = {}
    for r in rows:
        for i in range(len(r["domain"])):
            d, m = int(r["domain"][i]), r["mask"][i].double()
            fused, source, tokens = sums.setdefault(d, [0.0, 0.0, 0.0])
            sums[d] = [fused + float((r["ce"][i].double() * m).sum()),
                       source + float((r["source_ce"][i].double() * m).sum()), tokens + float(m.sum())]
    last.update({d: (f / n, s / n) for d, (f, s, n) in sums.items()})
    excess = np.array([max(last[d][0] - last[d][1], 0.0) if d in last else 0.0 for d in range(3)])
    alpha = w * np.exp(ETA * excess)
    return (1 - SMOOTHING) * alpha / alpha.sum() + SMOOTHING / 3


def token_ce(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()  # (B, T-1, V)
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)


def test_losses_are_the_fused_and_source_models_on_the_same_rows(inputs):
    _, spy, _ = run(inputs, 1, interval=1)
    first = spy.rows[0]
    source = LlamaForCausalLM.from_pretrained(str(inputs / "src"), torch_dtype=torch.float32).eval()
    torch.testing.assert_close(first["source_ce"], token_ce(source, first["input_ids"]), rtol=1e-4, atol=1e-4)
    init = LemonFusionModel(source_path=str(inputs / "src"), target=TARGET, receptive_field=RF,
                            attn_implementation="sdpa")
    torch.testing.assert_close(first["ce"], token_ce(hf_model_from_fused(init), first["input_ids"]),
                               rtol=1e-4, atol=1e-4)


def test_proportions_follow_the_training_excess_of_each_window(inputs):
    dataset, spy, _ = run(inputs, 4, interval=2)
    history = dataset.history()
    assert [s // 4 for s, _ in history] == [0, 3, 5]          # updates at batches 2 and 4, one batch of delay
    per_batch = [spy.rows[2 * b: 2 * b + 2] for b in range(4)]  # two micro-batches per batch
    windows = [per_batch[0] + per_batch[1], per_batch[2] + per_batch[3]]
    # the draws (seed 5) put every domain in the first window and only domain 0 in the second, whose
    # other domains keep the first window's losses
    assert {int(d) for r in windows[0] for d in r["domain"]} == {0, 1, 2}
    assert {int(d) for r in windows[1] for d in r["domain"]} == {0}
    last: dict[int, tuple[float, float]] = {}
    first = hand_update(np.asarray(W0), windows[0], last)
    np.testing.assert_allclose(history[1][1], first, rtol=1e-9)
    np.testing.assert_allclose(history[2][1], hand_update(first, windows[1], last), rtol=1e-9)
    assert np.abs(first - W0).max() > 1e-2                    # the update did move the mixture


def test_resume_in_the_middle_of_a_window_gives_the_same_proportions(inputs, tmp_path):
    full, _, full_model = run(inputs, 6, interval=4, folder=str(tmp_path / "ckpt"))  # saves at 2ba, mid-window
    resumed, _, resumed_model = run(inputs, 6, interval=4, load=str(tmp_path / "ckpt" / "ep0-ba2-rank0.pt"))
    assert len(full.history()) == 2
    for (s1, p1), (s2, p2) in zip(full.history(), resumed.history(), strict=True):
        assert s1 == s2
        np.testing.assert_array_equal(p1, p2)
    for (name, a), b in zip(full_model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kwargs, match", [
    ({"signal": "loss"}, r"lemon_dynamic_loading.signal='loss': expected one of \('eval', 'train'\)"),
    ({"signal": "train"}, r"lemon_dynamic_loading.interval=None: signal: train needs a positive number"),
    ({"signal": "train", "interval": 0}, r"lemon_dynamic_loading.interval=0"),
    ({"signal": "train", "interval": 40, "reference_losses": [1.0, 2.0, 3.0]},
     r"lemon_dynamic_loading.reference_losses: must be null with signal: train"),
    ({"interval": 40}, r"lemon_dynamic_loading.interval=40: only for signal: train"),
])
def test_bad_signal_keys_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicLoading(**kwargs)


def test_train_signal_needs_the_fusion_model(inputs):
    dataset = DomainMixture(str(inputs / "mds"), device_batch_size=4, proportions=W0, seed=5, update_delay=1)
    state = SimpleNamespace(train_dataloader=DataLoader(dataset, batch_size=4, collate_fn=collate_rows),
                            model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"signal=train needs the fusion model \(model.name: lemon_fusion\).*Linear"):
        DynamicLoading(signal="train", interval=2).fit_start(state, None)
