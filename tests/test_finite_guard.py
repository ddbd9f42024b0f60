"""``lemon_finite_guard`` on a real Composer Trainer: a NaN loss or a non-finite operator stops the run
at that batch, naming it and the tensor; a healthy run is untouched."""
from __future__ import annotations

import pytest
import torch
from composer import Trainer
from torch.utils.data import DataLoader

from lemon_composer.callbacks.finite_guard import FiniteGuard
from test_fusion_model import batch, make, source_dir  # noqa: F401  (fixture)


def fit(model, lr: float = 1e-3, steps: int = 3) -> None:
    trainer = Trainer(model=model, train_dataloader=DataLoader([batch(seed=s, b=2, t=8) for s in range(steps)],
                                                               batch_size=None),
                      max_duration=f"{steps}ba", optimizers=torch.optim.SGD(model.parameters(), lr=lr),
                      callbacks=[FiniteGuard()], device_train_microbatch_size=2, progress_bar=False,
                      log_to_console=False, device="cpu")
    try:
        trainer.fit()
    finally:
        trainer.close()


def test_nan_loss_stops_the_run_at_its_batch(source_dir):
    model = make(source_dir)
    calls = []
    loss = model.loss

    def poisoned(outputs, b):
        calls.append(1)
        out = loss(outputs, b)
        return {**out, "kl": out["kl"] * float("nan")} if len(calls) == 2 else out
    model.loss = poisoned
    with pytest.raises(FloatingPointError, match=r"batch 2: train loss 'kl' is NaN"):
        fit(model)


def test_an_exploding_operator_is_named(source_dir):
    model = make(source_dir)
    with pytest.raises(FloatingPointError, match=r"batch 1: parameter operators\.\S+ \(.*\) holds (NaN|inf)"):
        fit(model, lr=float("inf"))


def test_a_healthy_run_is_untouched(source_dir):
    fit(make(source_dir))


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match=r"callbacks.lemon_finite_guard.interval=0: expected a positive integer"):
        FiniteGuard(interval=0)
