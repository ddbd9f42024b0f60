"""``LemonPruneModel``: Sheared-LLaMA targeted structured pruning as an llm-foundry model
(yaml ``model.name: lemon_prune``).

forward: gates, expected sizes = masks()         (sampled in training, deterministic top-k at eval)
         logits = source under the gates         (``masked_forward``: transformers' Llama code)
loss:    LM cross-entropy + Lagrangian(expected sizes, batches done)  (Sheared-LLaMA Eq. 2)

Unlike fusion, the source is trained (as in Sheared-LLaMA) and is a registered submodule, wrapped
by FSDP per decoder layer; the masks and multipliers are small modules of their own outside the
wrapped blocks. The Lagrangian's target ramp reads the Trainer's batch count, which checkpoints
restore, so a resumed run follows the same curve. Outside a Trainer the ramp stays at batch 0.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel
from torch import Tensor, nn
from torchmetrics import Metric
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from lemon_composer.config_types import check_section
from lemon_composer.models.target import resolve_attn_implementation
from lemon_composer.pruning.lagrangian import Lagrangian, warmup_batches
from lemon_composer.pruning.masked_forward import MaskedLlama
from lemon_composer.pruning.masks import Gates, PruneShape, PruningMasks
from lemon_composer.pruning.slice import Kept, folded_source, kept_units, pruned_model
from lemon_composer.sources.load import load_source, read_source_config, resolve_dtype

log = logging.getLogger(__name__)


@dataclass
class PruneConfig:
    """Keys of ``model:`` for ``name: lemon_prune``.

    source_path: local HF folder of the source LLaMA (trained while pruning).
    target: hidden_size, intermediate_size, num_attention_heads, num_hidden_layers
        [, num_key_value_heads (default num_attention_heads / source group), vocab_size (= source's)].
    query_per_kv: source (keep every query head of a kept KV group; num_attention_heads must be
        num_key_value_heads x the source's group) | target (prune query heads inside the groups too).
    lagrangian_warmup: batches over which the target sizes ramp from the source's ("320ba" or
        "0.1dur"; "dur" needs max_duration, e.g. ``max_duration: ${max_duration}``, in batches).
    droprate_init: initial drop probability p of every gate: log_alpha = log(1-p) - log(p) + N(0, 0.01).
    mask_seed: seed of the gates' sampling noise (its own generator, saved in checkpoints).
    source_dtype: auto | float32 | bfloat16 | float16 | float64; attn_implementation: auto | sdpa |
        eager | flash_attention_2; init_device: cpu (load weights) | meta (shapes only, recipe checks).
    """
    source_path: str
    target: dict[str, Any]
    query_per_kv: str = "source"
    lagrangian_warmup: str = "0.1dur"
    max_duration: str | None = None
    droprate_init: float = 0.5
    mask_seed: int = 0
    source_dtype: str = "auto"
    attn_implementation: str = "auto"
    init_device: str = "cpu"
    warmup: int = field(init=False, default=0)

    @classmethod
    def from_yaml(cls, cfg: dict[str, Any]) -> "PruneConfig":
        check_section(cls, cfg, key="model", owner="lemon_prune", required=("source_path", "target"))
        return cls(**cfg)

    def __post_init__(self) -> None:
        if not isinstance(self.source_path, str) or not self.source_path:
            raise ValueError(f"model.source_path={self.source_path!r}: expected a local model folder")
        d = self.droprate_init
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d < 1.0:
            raise ValueError(f"model.droprate_init={d!r}: expected a probability strictly between 0 and 1")
        if self.init_device not in ("cpu", "meta"):
            raise ValueError(f"model.init_device={self.init_device!r}: expected cpu or meta")
        resolve_dtype(self.source_dtype)
        resolve_attn_implementation(self.attn_implementation)
        self.warmup = warmup_batches(self.lagrangian_warmup, self.max_duration)


class LemonPruneModel(ComposerModel):
    """The pruning ComposerModel: ``source`` (trainable), ``masks`` (log_alpha), ``lagrangian`` (lambdas).

    Parameter names for optimizer groups: ``masks.log_alpha.*``, ``lagrangian.lambda_{1,2}.*``.
    ``tokenizer`` is what llm-foundry passes every model; pruning keeps the source's vocabulary.
    """

    def __init__(self, tokenizer: Any = None, **cfg: Any) -> None:
        super().__init__()
        del tokenizer
        self.cfg = PruneConfig.from_yaml(cfg)
        source_cfg = read_source_config(self.cfg.source_path)
        self.shape = PruneShape.build(source_cfg, self.cfg.target, self.cfg.query_per_kv)  # before weights load
        attn = resolve_attn_implementation(self.cfg.attn_implementation)
        if self.cfg.init_device == "meta":
            with torch.device("meta"):
                source = LlamaForCausalLM(source_cfg)
        else:
            source = load_source(self.cfg.source_path, source_cfg, resolve_dtype(self.cfg.source_dtype), attn)
        source.requires_grad_(True)
        source.config.use_cache = False
        source.fsdp_wrap_fn = _is_decoder_layer                   # read by Composer's FSDP wrapping
        source.activation_checkpointing_fn = _is_decoder_layer
        self.source = source.train()
        device = "meta" if self.cfg.init_device == "meta" else "cpu"
        with torch.device(device):
            self.masks = PruningMasks(self.shape, self.cfg.droprate_init, self.cfg.mask_seed)
            self.lagrangian = Lagrangian(self.shape.sizes(), self.masks.constrained_kinds(), self.cfg.warmup)
        self.masked = MaskedLlama(self.source)
        self.train_metrics = {"LanguageCrossEntropy": LanguageCrossEntropy(),
                              "LanguagePerplexity": LanguagePerplexity()}
        self.eval_metrics = {"LanguageCrossEntropy": LanguageCrossEntropy(),
                             "LanguagePerplexity": LanguagePerplexity()}
        log.info("lemon_prune: %s, %d mask parameters, Lagrangian warm-up %d batches", self.shape,
                 sum(p.numel() for p in self.masks.parameters()), self.cfg.warmup)

    def batches_done(self) -> int:
        """The Trainer's batch count (the Lagrangian ramp's clock); 0 outside a Trainer."""
        logger = getattr(self, "logger", None)
        return 0 if logger is None else int(logger._state.timestamp.batch.value)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        if self.training:
            self.masks.constrain()
        gates, expected = self.masks()
        self.masked.set(gates)
        logits = self.source(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                             use_cache=False).logits
        return {"logits": logits, "expected": expected}

    def loss(self, outputs: dict[str, Any], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        labels = batch.get("labels", batch["input_ids"])[:, 1:]
        logits = outputs["logits"][:, :-1]
        lm = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        step = self.batches_done()
        lagrangian = self.lagrangian(outputs["expected"], step)
        if self.training:
            self._log_sizes(outputs["expected"], step)
        return {"total": lm + lagrangian, "lm": lm, "lagrangian": lagrangian}

    def _log_sizes(self, expected: dict[str, Tensor], step: int) -> None:
        """Expected sizes (mean over layers for per-layer kinds), their targets and the multipliers."""
        logger = getattr(self, "logger", None)
        if logger is None:
            return
        metrics = {f"prune/expected/{k}": float(v.detach().float().mean()) for k, v in expected.items()}
        for kind in self.lagrangian.sizes:
            metrics[f"prune/target/{kind}"] = self.lagrangian.target(kind, step)
            metrics[f"prune/lambda_1/{kind}"] = float(self.lagrangian.lambda_1[kind].detach())
            metrics[f"prune/lambda_2/{kind}"] = float(self.lagrangian.lambda_2[kind].detach())
        logger.log_metrics(metrics)

    # ---- metrics ----
    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return self.train_metrics if is_train else self.eval_metrics

    def eval_forward(self, batch: dict[str, Tensor], outputs: Any = None) -> dict[str, Any]:
        return outputs if outputs is not None else self.forward(batch)

    def update_metric(self, batch: dict[str, Tensor], outputs: dict[str, Any], metric: Metric) -> None:
        labels = batch.get("labels", batch["input_ids"])[:, 1:].contiguous()                 # (B, T-1)
        metric.update(outputs["logits"][:, :-1].contiguous(), labels)                         # (B, T-1, V)

    # ---- the pruned model ----
    @torch.no_grad()
    def final_gates(self) -> Gates:
        """The deterministic gates (exactly the target's counts), whatever the training mode."""
        was_training = self.masks.training
        self.masks.eval()
        try:
            return self.masks.gates()
        finally:
            self.masks.train(was_training)

    def pruned(self) -> LlamaForCausalLM:
        """The folded, sliced target ``LlamaForCausalLM`` (``slice.pruned_model``) of the deterministic masks."""
        return pruned_model(self.source, self.final_gates(), self.shape)

    def folded(self) -> tuple[LlamaForCausalLM, Kept]:
        """The source-size model with the deterministic gate values folded in (``slice.folded_source``)
        and the units the masks keep: the source and the selection of a fusion with ``init: shear``."""
        gates = self.final_gates()
        return folded_source(self.source, gates, self.shape), kept_units(gates, self.shape)

    # ---- checkpoints ----
    def get_extra_state(self) -> dict[str, Any]:
        return {"shape": repr(self.shape), "config": asdict(self.cfg)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state["shape"] != repr(self.shape):
            raise ValueError(f"checkpoint masks were made for {state['shape']}, this run's is {self.shape!r}")


def _is_decoder_layer(module: nn.Module) -> bool:
    return isinstance(module, LlamaDecoderLayer)
