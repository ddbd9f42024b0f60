"""``lemon_fusion_stages`` on a real Composer Trainer: every operator gamma uses trains, the second
stage warms up on its own, and a run resumed across the switch follows the uninterrupted one exactly."""
from __future__ import annotations

import pytest
import torch
from composer import Callback, Trainer
from composer.core import Event, State
from composer.loggers import Logger
from composer.optim import ConstantScheduler, DecoupledAdamW
from torch.utils.data import DataLoader

from lemon_composer.algorithms.fuse_once import FuseOnce
from lemon_composer.algorithms.fusion_stages import FusionStages, materialise_optimizer_state
from lemon_composer.models.fusion_model import LemonFusionModel
from test_fusion_model import batch, make, source_dir  # noqa: F401  (fixture)

LR = 1e-2


class Record(Callback):
    """Per batch: the learning rate in effect, which operator groups received gradients, the loss."""

    def __init__(self) -> None:
        self.lr: list[float] = []
        self.trained: list[set[str]] = []
        self.loss: list[float] = []

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.AFTER_TRAIN_BATCH:
            self.lr.append(state.optimizers[0].param_groups[0]["lr"])
            self.trained.append({"layers" if n.startswith("operators.gamma") else "dims"
                                 for n, p in state.model.named_parameters() if p.grad is not None})
            self.loss.append(float(state.loss["total"]))


def run(source_dir, steps: int, *, folder=None, load=None,
        schedule: str = "dims_then_layers") -> tuple[LemonFusionModel, Record]:
    torch.manual_seed(0)
    model = make(source_dir)
    record = Record()
    trainer = Trainer(
        model=model, train_dataloader=DataLoader([batch(seed=s, b=2, t=12) for s in range(steps)], batch_size=None),
        max_duration=f"{steps}ba", optimizers=DecoupledAdamW(model.parameters(), lr=LR),
        schedulers=ConstantScheduler(alpha=1.0, t_max="1dur"), callbacks=[record],
        algorithms=[FusionStages(schedule, switch_at="0.5dur", t_warmup="2ba"), FuseOnce()],
        device_train_microbatch_size=2, progress_bar=False, log_to_console=False, device="cpu", seed=0,
        save_folder=folder, save_interval="3ba" if folder else "1ep", load_path=load)
    trainer.fit()
    trainer.close()
    return model, record


@pytest.mark.parametrize("schedule,stages", [("dims_then_layers", ({"dims"}, {"dims", "layers"})),
                                             ("layers_then_dims", ({"layers"}, {"dims"}))])
def test_every_operator_block_that_gamma_uses_has_moved(source_dir, schedule, stages):
    """cut keeps source layers 0-1: layers 2-3 enter only when gamma mixes them in."""
    init = {n: p.detach().clone() for n, p in make(source_dir).named_parameters()}
    assert not any(v[:, 2:].any() for n, v in init.items() if n.startswith("operators.gamma."))
    assert FusionStages(schedule).find_unused_parameters and not FusionStages("joint").find_unused_parameters
    model, record = run(source_dir, 8, schedule=schedule)
    assert record.trained == [stages[0]] * 4 + [stages[1]] * 4
    ops = dict(model.operators.named_parameters())
    used = torch.stack([g.detach().abs().sum(0) for n, g in ops.items() if n.startswith("gamma.")]).sum(0) > 0
    assert used.all()  # gamma now mixes every source layer in, the dropped ones too
    for name in ("A_attn", "A_kv", "A_ffn"):
        for j in torch.nonzero(used).flatten().tolist():
            assert not torch.equal(ops[name][j].detach(), init[f"operators.{name}"][j]), f"{name}[{j}] never trained"
    assert not torch.equal(ops["B_emb"].detach(), init["operators.B_emb"])


def test_second_stage_has_its_own_warmup(source_dir):
    _, record = run(source_dir, 8)
    assert record.lr == pytest.approx([LR] * 4 + [LR / 2, LR, LR, LR], rel=1e-12)


def test_resume_across_the_switch_is_exact(source_dir, tmp_path):
    full_model, full = run(source_dir, 8, folder=str(tmp_path / "ckpt"))     # saves at 3ba: in the dims stage
    resumed_model, resumed = run(source_dir, 8, load=str(tmp_path / "ckpt" / "ep0-ba3-rank0.pt"))
    assert resumed.loss == full.loss[3:] and resumed.lr == full.lr[3:]
    for (name, a), b in zip(full_model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), name


def test_materialised_optimizer_state_changes_nothing():
    """Pre-created state (zero moments, step 0) updates exactly as AdamW's lazily created state."""
    params = [torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(i))) for i in range(2)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    lazy, early = (DecoupledAdamW(ps, lr=0.1, weight_decay=0.01) for ps in (params, twins))
    materialise_optimizer_state(early)
    assert len(early.state) == 2 and all(torch.equal(a, b) for a, b in zip(params, twins))
    for step in range(3):
        for ps in (params, twins):
            ps[0].grad = torch.full_like(ps[0], 0.5 * step) if step else None   # p0 starts late, as gamma does
            ps[1].grad = torch.full_like(ps[1], -0.3)
        lazy.step()
        early.step()
    for a, b in zip(params, twins):
        assert torch.equal(a, b)


@pytest.mark.parametrize("key,value,match", [
    ("schedule", "dims_first", r"algorithms.lemon_fusion_stages.schedule=dims_first: expected one of"),
    ("switch_at", "5tok", r"algorithms.lemon_fusion_stages.switch_at=5tok: expected batches"),
    ("t_warmup", "soon", r"algorithms.lemon_fusion_stages.t_warmup=soon"),
])
def test_bad_values_name_the_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        FusionStages(**{key: value})
