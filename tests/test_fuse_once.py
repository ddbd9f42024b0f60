"""Fuse once per optimizer step: the same operator gradients as fusing on every micro-batch.

The reference fuses on every forward (no ``begin_step``), exactly what the model did before; the
amortised path fuses once and back-propagates into the operators once (``StepWeights``).
"""
from __future__ import annotations

import pytest
import torch
from composer import Trainer
from composer.algorithms import GradientClipping
from composer.core import Evaluator
from torch.utils.data import DataLoader

from lemon_composer.algorithms.fuse_once import FuseOnce
from lemon_composer.algorithms.fusion_stages import FusionStages
from test_fusion_model import batch, make, source_dir  # noqa: F401  (fixture)


def operator_grads(model, microbatches, *, amortised: bool) -> dict[str, torch.Tensor]:
    """One optimizer step's accumulated gradients, micro-batch losses scaled as Composer does."""
    model.zero_grad(set_to_none=True)
    total = sum(mb["input_ids"].shape[0] for mb in microbatches)
    if amortised:
        model.begin_step(len(microbatches))
    for mb in microbatches:
        loss = model.loss(model(mb), mb)["total"] * (mb["input_ids"].shape[0] / total)
        loss.backward()
    if amortised:
        model.end_step()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("n_micro", [1, 2, 4])
@pytest.mark.parametrize("trainable", [("dims", "layers"), ("dims",)])
def test_amortised_step_gives_the_per_microbatch_gradients(source_dir, n_micro, trainable):
    model = make(source_dir, source_dtype="float64", activation_checkpointing=True, loss_chunk_tokens=7)
    model.operators.double()
    with torch.no_grad():  # move off the exact cut selection so every operator has a generic gradient
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    model.train()
    model.trainable = trainable
    full = batch(seed=n_micro, b=4, t=12)
    micro = [{k: v[i::n_micro] for k, v in full.items()} for i in range(n_micro)]
    ref = operator_grads(model, micro, amortised=False)
    got = operator_grads(model, micro, amortised=True)
    trained = {n for n, _ in model.named_parameters() if ("layers" if n.startswith("operators.gamma") else "dims")
               in trainable}
    assert ref.keys() == got.keys() == trained
    for name in ref:
        assert got[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], ref[name], rtol=1e-12, atol=1e-14, msg=name)


def test_more_forwards_than_announced_is_an_error(source_dir):
    model = make(source_dir)
    model.train()
    b = batch()
    model.begin_step(1)
    model.loss(model(b), b)["total"].backward()
    with pytest.raises(RuntimeError, match="more training forwards than the micro-batches announced"):
        model(b)


def test_evaluation_fuses_once(source_dir, monkeypatch):
    model = make(source_dir)
    model.eval()
    calls = []
    fuse = model._fuse
    monkeypatch.setattr(model, "_fuse", lambda ops: calls.append(1) or fuse(ops))
    with torch.no_grad():
        expected = [model.eval_forward(batch(s))["stats"].ce for s in range(3)]
        assert len(calls) == 3  # without the algorithm: one fusion per batch
        model.begin_eval()
        got = [model.eval_forward(batch(s))["stats"].ce for s in range(3)]
        model.end_eval()
    assert len(calls) == 4
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.begin_eval()
    with torch.no_grad():
        model.operators.gamma["q"].mul_(0.5)  # e.g. a checkpoint loaded between evaluations
        model.eval_forward(batch(0))
    assert len(calls) == 6 and not model.eval_fused  # stale weights are never used


def run_trainer(source_dir, *, fuse_once: bool, microbatch: int, schedule: str = "joint"):
    torch.manual_seed(0)
    model = make(source_dir)
    data = [batch(seed=s, b=4, t=12) for s in range(4)]
    algorithms = [FusionStages(schedule=schedule, switch_at="0.5dur", t_warmup="0ba"),
                  GradientClipping(clipping_type="norm", clipping_threshold=0.05)]
    if fuse_once:
        algorithms.append(FuseOnce())
    trainer = Trainer(model=model, train_dataloader=DataLoader(data, batch_size=None), max_duration="4ba",
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.5), algorithms=algorithms,
                      device_train_microbatch_size=microbatch, progress_bar=False, log_to_console=False,
                      device="cpu", eval_interval="2ba",
                      eval_dataloader=Evaluator(label="eval", dataloader=DataLoader(data[:2], batch_size=None),
                                                device_eval_microbatch_size=2))
    trainer.fit()
    trainer.close()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("schedule", ["joint", "dims_then_layers"])
def test_trainer_with_fuse_once_follows_the_per_microbatch_run(source_dir, schedule):
    """A real Composer Trainer: 2 micro-batches, gradient clipping, the stage switch at 0.5dur, evaluation."""
    ref = run_trainer(source_dir, fuse_once=False, microbatch=2, schedule=schedule)
    got = run_trainer(source_dir, fuse_once=True, microbatch=2, schedule=schedule)
    init = make(source_dir)
    for name, value in ref.items():
        assert not torch.equal(value, dict(init.named_parameters())[name].detach()), name  # it trained
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_activation_checkpointing_recomputes_layers_and_keeps_the_gradients(source_dir):
    grads, calls = {}, {}
    for ckpt in (False, True):
        model = make(source_dir, source_dtype="float64", activation_checkpointing=ckpt)
        model.operators.double()
        model.train()
        layer = model.skeleton.model.model.layers[0]
        calls[ckpt] = 0

        def count(*_):
            calls[ckpt] += 1
        layer.register_forward_pre_hook(count)  # (recompute stops early: a post-hook would not fire)
        grads[ckpt] = operator_grads(model, [batch(seed=7, b=2, t=10)], amortised=True)
    assert calls == {False: 1, True: 2}  # the checkpointed layer runs again in backward
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-12, atol=1e-14, msg=name)


def test_layer_stage_reuses_the_dimension_products_and_keeps_gamma_exact(source_dir):
    """With the dimension operators detached, fusion is gamma's mix over cached A_j W_j B_emb^T."""
    model = make(source_dir, source_dtype="float64")
    model.operators.double()
    model.train()
    micro = [batch(seed=3, b=2, t=10), batch(seed=4, b=2, t=10)]
    joint = operator_grads(model, micro, amortised=True)
    model.trainable = ("layers",)
    first = operator_grads(model, micro, amortised=True)
    cached = model._dims_cache[1][0]
    second = operator_grads(model, micro, amortised=True)
    assert model._dims_cache[1][0] is cached  # reused, not recomputed
    with torch.no_grad():
        model.operators.B_emb.mul_(1.5)     # any change to a dimension operator invalidates it
    operator_grads(model, micro, amortised=True)
    assert model._dims_cache[1][0] is not cached
    assert first.keys() == second.keys() == {n for n in joint if n.startswith("operators.gamma")}
    for name in first:
        torch.testing.assert_close(first[name], joint[name], rtol=1e-12, atol=1e-14, msg=name)
        torch.testing.assert_close(second[name], joint[name], rtol=1e-12, atol=1e-14, msg=name)
