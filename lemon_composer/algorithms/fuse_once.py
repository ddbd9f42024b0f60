"""``lemon_fuse_once``: fuse the target's weights once per optimizer step and once per evaluation.

Without it ``LemonFusionModel`` fuses on every forward: with k micro-batches per optimizer step the
fusion's forward and backward run k times. This algorithm tells the model, before each step's
micro-batches, how many will follow (``begin_step``); the model fuses once, its micro-batches share
the weights and the fusion's backward runs once, inside the last micro-batch's backward (see
``models/step_weights.py``), so Composer's gradient accumulation, DDP sync, gradient clipping and
``lemon_fusion_stages`` work unchanged. Evaluation fuses once (no grad) per evaluation round
(``EVAL_BEFORE_ALL``, shared by every per-domain evaluator; ``EVAL_START`` for a bare ``trainer.eval``).

It changes how training computes, so it is an Algorithm; it has no state of its own (a resumed
run fuses from the restored operators at its next step).
"""
from __future__ import annotations

import math

from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from lemon_composer.models.fusion_model import LemonFusionModel


def num_microbatches(state: State) -> int:
    """How many micro-batches Composer's default ``split_batch`` makes of ``state.batch`` (ceil)."""
    size = state.batch["input_ids"].shape[0]
    per = state.device_train_microbatch_size
    if not isinstance(per, int) or per < 1:
        raise ValueError(f"lemon_fuse_once needs an integer device_train_microbatch_size, got {per!r}")
    return math.ceil(size / per)


class FuseOnce(Algorithm):
    """Fuse once per optimizer step (``BEFORE_TRAIN_BATCH``) and once per evaluation round."""

    def __init__(self) -> None:
        super().__init__()

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.BEFORE_TRAIN_BATCH, Event.AFTER_TRAIN_BATCH, Event.EVAL_BEFORE_ALL,
                         Event.EVAL_START, Event.EVAL_AFTER_ALL)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        model = getattr(state.model, "module", state.model)
        if not isinstance(model, LemonFusionModel):
            raise ValueError(f"lemon_fuse_once needs model.name: lemon_fusion, got {type(model).__name__}")
        if event == Event.BEFORE_TRAIN_BATCH:
            model.begin_step(num_microbatches(state))
        elif event == Event.AFTER_TRAIN_BATCH:
            model.end_step()
        elif event == Event.EVAL_BEFORE_ALL or (event == Event.EVAL_START and not model.eval_fused):
            model.begin_eval()
        elif event == Event.EVAL_AFTER_ALL:
            model.end_eval()
