"""``LemonFusionModel``: the frozen source emits the fused target's weights (Sec. 3).

forward: weights = fuse(operators, source)              (Eq. 2, Algorithm 1)
         student hidden = target skeleton(weights, ids)   (transformers' Llama code)
         teacher hidden = source.model(ids) under no_grad (the same frozen weights, no copy)
loss:    lam * LM + (1 - lam) * T^2 KL(p_source^T || p_target^T)   (Eq. 4), chunked over tokens
         from the hidden states and both lm_heads (``distill_loss``): no full logits are kept.

When does it fuse: with the ``lemon_fuse_once`` algorithm, once per optimizer step
(``begin_step``; its micro-batches share the weights, see ``step_weights``) and once per
evaluation (``begin_eval``); without it, on every forward. ``fusion_parallel: sharded`` splits the
fusion's source layers across data-parallel ranks (``fusion/shard.py``).

The source is deliberately *not* a registered submodule: it is no parameter of the model, so
Composer's DDP/FSDP neither syncs nor shards it (each rank holds its own frozen copy), and
checkpoints hold only the operators plus a reference to the source (path and fingerprint).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import torch
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel
from composer.utils import dist
from torch import Tensor
from torchmetrics import Metric
from transformers import LlamaForCausalLM

from lemon_composer.data.calibration import calibration_batches
from lemon_composer.fusion.fold import fold_norms
from lemon_composer.fusion.fuse import (LAYER_WEIGHTS, TRANSPOSED, FusionOperators, apply_gains, dimension_fuse,
                                        fuse_shared, mix_layers, stack_layers, to_state_dict)
from lemon_composer.fusion.init import (Selection, cut_selection, identity_selection, operator_values,
                                        random_selection)
from lemon_composer.fusion.plan import FusionPlan
from lemon_composer.fusion.shard import all_reduce_layers, source_share
from lemon_composer.models.distill_loss import TokenStats, distill_loss
from lemon_composer.models.fuse_config import FuseConfig
from lemon_composer.models.step_weights import StepWeights
from lemon_composer.models.target import TargetSkeleton, resolve_attn_implementation
from lemon_composer.sources.load import fingerprint, load_source, read_source_config, resolve_dtype

log = logging.getLogger(__name__)

OPERATOR_GROUPS = ("dims", "layers")  # what a stage trains: dimension operators, gamma


class _PerToken:
    """Metric update from per-token losses at label positions (``TokenStats``), not from logits.

    The loss never forms full logits (``distill_loss``); it hands the metrics the per-token values.
    """
    field = "ce"

    def update(self, stats: TokenStats) -> None:  # type: ignore[override]
        values = getattr(stats, self.field)
        self.sum_loss += (values * stats.mask).sum().to(self.sum_loss.dtype)
        self.total_items += stats.mask.sum().to(self.total_items.dtype)


class TokenCrossEntropy(_PerToken, LanguageCrossEntropy):
    """The fused target's LM loss (logged as ``LanguageCrossEntropy``)."""


class TokenPerplexity(_PerToken, LanguagePerplexity):
    """exp of the fused target's LM loss (logged as ``LanguagePerplexity``)."""


class FusionKL(_PerToken, LanguageCrossEntropy):
    """Mean per-token T^2 KL(p_source^T || p_target^T) over label positions (the KL term of Eq. 4)."""
    field = "kl"


class SourceCrossEntropy(_PerToken, LanguageCrossEntropy):
    """The frozen source's own LM loss on the same tokens: the reference the fused target approaches."""
    field = "source_ce"


class LemonFusionModel(ComposerModel):
    """The fusion ComposerModel (yaml ``model.name: lemon_fusion``; keys: ``FuseConfig``).

    ``tokenizer`` is what llm-foundry passes every model; fusion keeps the source's vocabulary and
    never needs it.
    """
    # ``loss`` leaves each token's fused and source cross-entropy in ``outputs["stats"]``
    # (``lemon_dynamic_loading`` with ``signal: train`` reads them)
    REPORTS_SOURCE_LOSS = True

    def __init__(self, tokenizer: Any = None, **cfg: Any) -> None:
        super().__init__()
        del tokenizer
        self.cfg = FuseConfig.from_yaml(cfg)
        source_cfg = read_source_config(self.cfg.source_path)
        self.plan = FusionPlan.build(source_cfg, self.cfg.target, self.cfg.receptive_field,
                                     shared_gamma=self.cfg.shared_gamma,
                                     attention=self.cfg.attention_operator,
                                     fold_norms=self.cfg.fold_norms,
                                     norm_gains=self.cfg.norm_gains,
                                     output_gains=self.cfg.output_gains,
                                     layer_maps=self.cfg.layer_maps)  # shapes checked before weights load
        attn = resolve_attn_implementation(self.cfg.attn_implementation)
        if self.cfg.init_device == "meta":
            with torch.device("meta"):
                source = LlamaForCausalLM(source_cfg)
            self.source_fingerprint = "meta"
        else:
            source = load_source(self.cfg.source_path, source_cfg, resolve_dtype(self.cfg.source_dtype), attn)
            self.source_fingerprint = fingerprint(source)
        source.requires_grad_(False)
        if self.cfg.fold_norms:
            fold_norms(source)  # an equivalent source: the teacher's outputs are unchanged
        object.__setattr__(self, "_source", source)  # not a submodule: see the module docstring
        self._stacked = self._share_stacked(source)
        with torch.device("meta") if self.cfg.init_device == "meta" else contextlib.nullcontext():
            self.operators = FusionOperators(self.plan)
        self.skeleton = TargetSkeleton(self.plan.target_config(source_cfg), attn,
                                       activation_checkpointing=self.cfg.activation_checkpointing)
        self.rotary_emb = self.skeleton.rotary_emb  # registered so it moves with the model
        self.trainable: tuple[str, ...] = OPERATOR_GROUPS
        self._step: StepWeights | None = None           # set by begin_step (lemon_fuse_once)
        self._eval_weights: dict[str, Tensor] | None = None  # set by begin_eval
        self._eval_versions: tuple[int, ...] = ()
        self._dims_cache: tuple[tuple, tuple[dict, dict]] | None = None  # see _dimension_products
        if self.cfg.init_device != "meta":
            self.operators.load_values(operator_values(self.plan, self._initial_selection()))
        self.train_metrics = {"LanguageCrossEntropy": TokenCrossEntropy(),
                              "LanguagePerplexity": TokenPerplexity(), "KL": FusionKL()}
        self.eval_metrics = {"LanguageCrossEntropy": TokenCrossEntropy(),
                             "LanguagePerplexity": TokenPerplexity(), "KL": FusionKL(),
                             "SourceCrossEntropy": SourceCrossEntropy()}
        log.info("lemon_fusion: %s -> %s, %d operator parameters", self.plan.source, self.plan.target,
                 sum(p.numel() for p in self.operators.parameters()))

    # ---- source handling ----
    def _share_stacked(self, source: LlamaForCausalLM) -> dict[str, Tensor]:
        """Stack the source's per-layer weights once and make the layers views of the stack (no copy)."""
        stacked = stack_layers(dict(source.state_dict()), self.plan.source.layers)
        for kind, name in LAYER_WEIGHTS.items():
            for j, layer in enumerate(source.model.layers):
                layer.get_parameter(name).data = stacked[kind][j]
        return stacked

    def _place_source(self, device: torch.device) -> None:
        """Move the frozen source to ``device`` keeping the layers as views of the stacked weights."""
        if self._stacked["q"].device == device:
            return
        self._stacked = {k: v.transpose(1, 2).to(device).transpose(1, 2) if k in TRANSPOSED else v.to(device)
                         for k, v in self._stacked.items()}  # o / down: move the contiguous storage
        for kind, name in LAYER_WEIGHTS.items():
            for j, layer in enumerate(self._source.model.layers):
                layer.get_parameter(name).data = self._stacked[kind][j]
        self._source.to(device)

    @property
    def source(self) -> LlamaForCausalLM:
        return self._source

    def _initial_selection(self) -> Selection:
        init, plan = self.cfg.init, self.plan
        if init == "cut":
            return cut_selection(plan)
        if init == "identity":
            return identity_selection(plan)
        if init == "random":
            return random_selection(plan, self.cfg.init_seed)
        if init == "avg":
            from lemon_composer.fusion.init_cka import avg_selection
            return avg_selection(plan, self._stacked)
        if init == "shear":  # the source is a pruning run's folded source; select what its masks kept
            from lemon_composer.pruning.export import read_kept
            from lemon_composer.pruning.slice import shear_selection
            return shear_selection(plan, read_kept(self.cfg.source_path))
        from lemon_composer.fusion.init_prune import prune_selection
        c = self.cfg.calibration
        batches = calibration_batches(c.data_dir, split=c.split, num_batches=c.num_batches,
                                      batch_size=c.batch_size, seq_len=c.seq_len)
        pruned = prune_selection(plan, self._source, batches)
        if init == "prune":
            return pruned
        if init == "pca":
            from lemon_composer.fusion.init_pca import pca_selection
            return pca_selection(plan, self._source, batches, pruned)
        from lemon_composer.fusion.init_lsq import lsq_selection
        return lsq_selection(plan, self._source, batches, pruned)

    # ---- the fused target ----
    def _sharded(self) -> bool:
        return self.cfg.fusion_parallel == "sharded" and dist.get_world_size() > 1

    def _fuse(self, ops: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The fused layer stacks and shared weights (``to_state_dict``'s inputs), differentiable w.r.t. ``ops``.

        Sharded: this rank fuses its share of the source layers and one all-reduce sums the shares.
        """
        self._place_source(self.operators.B_emb.device)
        sharded = self._sharded()
        sources = (source_share(self.plan.source.layers, dist.get_global_rank(), dist.get_world_size())
                   if sharded else slice(None))
        per_source, shared = self._dimension_products(ops, sources)
        layers = mix_layers(self.plan, ops, per_source, sources)
        return (all_reduce_layers(layers) if sharded else layers), shared

    def _dimension_products(self, ops: dict[str, Tensor],
                            sources: slice) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``dimension_fuse`` and ``fuse_shared``, cached while no dimension operator takes gradients.

        Then each step's fusion is gamma's mix alone: the first stage of ``layers_then_dims`` and
        depth-only runs (dimension operators frozen) skip the dimension products. The cache is keyed
        on the operators' version counters, so any change to their values (a load, an optimizer
        step) recomputes it.
        """
        def compute() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
            return (dimension_fuse(self.plan, ops, self._stacked, sources),
                    fuse_shared(self.plan, ops, self._source_weights()))

        if any(t.requires_grad for name, t in ops.items() if not name.startswith("gamma.")):
            self._dims_cache = None
            return compute()
        key = (sources.start, sources.stop, self._stacked["q"].device, self._operator_versions(dims_only=True))
        if self._dims_cache is None or self._dims_cache[0] != key:
            with torch.no_grad():
                self._dims_cache = (key, compute())
        return self._dims_cache[1]

    def _source_weights(self) -> dict[str, Tensor]:
        names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if self.plan.source.tied else ["lm_head.weight"])
        return {name: self._source.get_parameter(name) for name in names}

    def fused_state_dict(self) -> dict[str, Tensor]:
        """The target's weights in ``LlamaForCausalLM`` naming (differentiable w.r.t. the operators)."""
        ops = self.operators.tensors(train_dims="dims" in self.trainable, train_layers="layers" in self.trainable)
        return apply_gains(self.plan, ops, to_state_dict(self.plan, *self._fuse(ops)))

    def begin_step(self, num_microbatches: int) -> None:
        """Fuse once for the optimizer step whose ``num_microbatches`` training forwards follow."""
        self._step = None  # free the previous step's graph before fusing the next
        self.end_eval()  # operators change in this step: an older evaluation's weights are stale
        self._step = StepWeights(self.fused_state_dict(), num_microbatches)

    def end_step(self) -> None:
        """Release the step's fused weights; every announced micro-batch must have run."""
        step, self._step = self._step, None
        self.skeleton.clear()
        if step is not None and step.remaining:
            raise RuntimeError(f"lemon_fuse_once: {step.remaining} announced micro-batches did not run in this step")

    def begin_eval(self) -> None:
        """Fuse once (no grad) for a whole evaluation."""
        with torch.no_grad():
            self._eval_weights = self.fused_state_dict()
        self._eval_versions = self._operator_versions()

    def _operator_versions(self, *, dims_only: bool = False) -> tuple[int, ...]:
        """The operators' version counters: they change with every in-place update (step, load)."""
        return tuple(p._version for n, p in self.operators.named_parameters()
                     if not (dims_only and n.startswith("gamma.")))

    @property
    def eval_fused(self) -> bool:
        """Weights fused for evaluation from the operators' current values (a load or a step invalidates)."""
        return self._eval_weights is not None and self._eval_versions == self._operator_versions()

    def end_eval(self) -> None:
        self._eval_weights = None
        self.skeleton.clear()

    def _weights(self) -> dict[str, Tensor]:
        """This forward's fused weights (HF names): the step's, the evaluation's, or freshly fused."""
        if torch.is_grad_enabled() and self.training and self._step is not None:
            return self._step.next()
        if not torch.is_grad_enabled() and self.eval_fused:
            return self._eval_weights
        if self._sharded():
            raise RuntimeError("model.fusion_parallel=sharded fuses with a collective: add the lemon_fuse_once "
                               "algorithm (algorithms: {lemon_fuse_once: {}}) so every rank fuses at the same "
                               "points, once per optimizer step and once per evaluation")
        return self.fused_state_dict()

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        weights = self._weights()
        self.skeleton.train(self.training)
        self.skeleton.load(weights)
        hidden = self.skeleton.hidden(ids, mask)
        with torch.no_grad():
            teacher = self._source.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return {"hidden": hidden, "head": weights["lm_head.weight"], "teacher_hidden": teacher}

    def loss(self, outputs: dict[str, Any], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Eq. 4 on the next-token targets; leaves the per-token values in ``outputs['stats']`` for metrics."""
        labels = batch.get("labels", batch["input_ids"])[:, 1:]
        total, lm, kl, stats = distill_loss(
            outputs["hidden"][:, :-1], outputs["head"], outputs["teacher_hidden"][:, :-1],
            self._source.lm_head.weight, labels, lam=self.cfg.lam, temperature=self.cfg.temperature,
            chunk_tokens=self.cfg.loss_chunk_tokens)
        outputs["stats"] = stats
        return {"total": total, "lm": lm, "kl": kl}

    def logits(self, outputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Full (B, T, V) student and teacher logits of ``forward``'s outputs (tests, analysis; not training)."""
        return outputs["hidden"] @ outputs["head"].t(), outputs["teacher_hidden"] @ self._source.lm_head.weight.t()

    # ---- metrics ----
    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return self.train_metrics if is_train else self.eval_metrics

    def eval_forward(self, batch: dict[str, Tensor], outputs: Any = None) -> dict[str, Any]:
        if outputs is None:
            outputs = self.forward(batch)
        if "stats" not in outputs:
            with torch.no_grad():
                self.loss(outputs, batch)
        return outputs

    def update_metric(self, batch: dict[str, Tensor], outputs: dict[str, Any], metric: Metric) -> None:
        metric.update(outputs["stats"])

    # ---- checkpoints: operators plus a reference to the source ----
    def get_extra_state(self) -> dict[str, Any]:
        """Saved in every checkpoint: enough to rebuild this model (export) and to check the source."""
        return {"source_path": self.cfg.source_path, "source_fingerprint": self.source_fingerprint,
                "plan": repr(self.plan), "config": dataclasses.asdict(self.cfg)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state["source_fingerprint"] != self.source_fingerprint and "meta" not in (
                state["source_fingerprint"], self.source_fingerprint):
            raise ValueError(f"checkpoint was made from source {state['source_path']} (fingerprint "
                             f"{state['source_fingerprint']}), but model.source_path={self.cfg.source_path} has "
                             f"fingerprint {self.source_fingerprint}: the operators only fit their own source")
        if not self.plan.matches_saved(state["plan"]):
            raise ValueError(f"checkpoint operators were made for {state['plan']}, this run's plan is "
                             f"{self.plan!r}: target sizes or receptive fields differ")

