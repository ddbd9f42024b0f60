"""``lemon_fusion_stages``: which operators a fusion run trains when (App. A.4), each stage with its own warm-up.

The paper learns the dimension operators first, then the layer operator ("dimension fusion first
and then layer fusion"). Its second stage here trains the dimension operators *with* gamma: a
source layer that the initial gamma leaves out (cut drops the last layers) gets no gradient in the
dimension stage, and when gamma mixes it in later it must be able to move away from its initial
selection like every other layer did. ``layers_then_dims`` trains gamma, then the dimension
operators of every layer gamma uses; ``joint`` trains all at once.

Each stage gets its own linear warm-up: from the switch on, the scheduler's learning rate is
multiplied by ``min(1, (batches since the switch + 1) / t_warmup)``, so operators that start
training at the switch (fresh Adam moments) do not start at the decayed peak. The scheduler's own
warm-up covers the first stage.

It changes training, so it is a Composer Algorithm (callbacks only observe). Stage and warm-up
follow from the batch count alone, so a resumed run is in the same stage at the same rate with no
state of its own; the optimizer holds state for both groups from the start, so a checkpoint from
either stage resumes (``materialise_optimizer_state``).

Logged: ``fusion/stage`` (0 = first stage, 1 = second) whenever the stage changes.
"""
from __future__ import annotations

import logging
import math

import torch
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from lemon_composer.models.fusion_model import LemonFusionModel

log = logging.getLogger(__name__)

KEY = "algorithms.lemon_fusion_stages"
SCHEDULES = {
    "joint": (("dims", "layers"), ("dims", "layers")),
    "dims_then_layers": (("dims",), ("dims", "layers")),
    "layers_then_dims": (("layers",), ("dims",)),
}


@torch.no_grad()
def materialise_optimizer_state(optimizer: Optimizer) -> None:
    """Give every trainable parameter the state its first optimizer step would create, without a step.

    Composer checkpoints the optimizer through torch.distributed.checkpoint, which on load expects
    state for every parameter that requires grad: a staged run saved before its second stage holds
    none for the second group and fails to resume (KeyError in ``set_optimizer_state_dict``). One
    step with zero gradients and lr 0 over the stateless parameters creates their state (zero
    moments: params unchanged); their step counters are then reset, so the first real update is
    exactly that of a lazily initialised state.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    missing = [p for p in params if p.requires_grad and p not in optimizer.state]
    if not missing:
        return
    grads, lrs = [p.grad for p in params], [g["lr"] for g in optimizer.param_groups]
    missing_ids = {id(p) for p in missing}
    for p in params:
        p.grad = torch.zeros_like(p) if id(p) in missing_ids else None
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for p, grad in zip(params, grads):
        p.grad = grad
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    for p in missing:
        state = optimizer.state[p]
        if "step" in state:
            state["step"] = torch.zeros_like(state["step"]) if torch.is_tensor(state["step"]) else 0


def _time(value: str, key: str) -> Time:
    try:
        t = Time.from_timestring(value)
    except ValueError as err:
        raise ValueError(f"{KEY}.{key}={value}: {err}") from None
    if t.unit not in (TimeUnit.BATCH, TimeUnit.DURATION):
        raise ValueError(f"{KEY}.{key}={value}: expected batches (e.g. 1000ba) or a fraction of the run (0.5dur)")
    return t


class FusionStages(Algorithm):
    """Train ``schedule``'s first operator group until ``switch_at``, then the second.

    Args:
        schedule: ``dims_then_layers`` (paper; the second stage also trains the dimension
            operators), ``layers_then_dims`` or ``joint``.
        switch_at: batches (``1000ba``) or a fraction of ``max_duration`` (``0.5dur``).
        t_warmup: the second stage's linear warm-up, in the same units; ``0ba`` for none.
    """

    def __init__(self, schedule: str = "dims_then_layers", switch_at: str = "0.5dur",
                 t_warmup: str = "0.05dur") -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"{KEY}.schedule={schedule}: expected one of {list(SCHEDULES)}")
        self.schedule = schedule
        self.switch_at = _time(switch_at, "switch_at")
        self.t_warmup = _time(t_warmup, "t_warmup")
        self._stage: int | None = None

    @property
    def find_unused_parameters(self) -> bool:
        """A staged run leaves one operator group without gradients: DDP must allow it."""
        return self.schedule != "joint"

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.FIT_START, Event.BATCH_START, Event.EVAL_START)

    def _warms_up(self) -> bool:
        return self.schedule != "joint" and self.t_warmup.value > 0

    def _batches(self, t: Time, state: State) -> int:
        """``t`` in batches; a duration needs ``max_duration`` in batches (as in the fusion recipes)."""
        if t.unit == TimeUnit.BATCH:
            return t.value
        if state.max_duration is None or state.max_duration.unit != TimeUnit.BATCH:
            raise ValueError(f"{KEY}: switch_at / t_warmup in 'dur' need max_duration in batches (e.g. 2000ba), "
                             f"got max_duration={state.max_duration}; or give them in batches")
        return math.ceil(t.value * state.max_duration.value)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        model = getattr(state.model, "module", state.model)
        if not isinstance(model, LemonFusionModel):
            raise ValueError(f"lemon_fusion_stages needs model.name: lemon_fusion, got {type(model).__name__}")
        if event == Event.FIT_START and self.schedule != "joint":
            for optimizer in state.optimizers:
                materialise_optimizer_state(optimizer)
        if event == Event.FIT_START and self._warms_up() and not (
                state.schedulers and all(isinstance(s, LambdaLR) for s in state.schedulers)):
            raise ValueError(f"{KEY}.t_warmup scales the rate a Composer scheduler sets every batch: add a "
                             f"scheduler (e.g. cosine_with_warmup) or set t_warmup=0ba; got schedulers "
                             f"{[type(s).__name__ for s in state.schedulers]}")
        since = int(state.timestamp.batch) - self._batches(self.switch_at, state)
        stage = int(since >= 0)
        model.trainable = SCHEDULES[self.schedule][stage]
        if stage != self._stage:
            self._stage = stage
            log.info("fusion stage %d: training %s", stage, model.trainable)
            logger.log_metrics({"fusion/stage": stage})
        warmup = self._batches(self.t_warmup, state) if self._warms_up() and event == Event.BATCH_START else 0
        if 0 <= since < warmup - 1:  # the first ``warmup`` batches of the second stage
            factor = (since + 1) / warmup
            for opt in state.optimizers:  # the scheduler resets the rate from its base every batch
                for group in opt.param_groups:
                    group["lr"] *= factor
