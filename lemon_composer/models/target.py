"""Run the fused target through transformers' own Llama code, fed weights that are not parameters.

A ``LlamaForCausalLM`` skeleton is built on the meta device (no memory for weights); its parameters
are removed and the fused tensors are set as plain attributes before each forward (``load``), so
numerics are exactly HF's and SDPA / flash-attn come for free. The tensors stay in place until the
next ``load``: activation checkpointing (HF's, non-reentrant) recomputes a layer during backward
from the same tensors, which ``torch.func.functional_call`` could not offer (it restores the meta
weights on return, before backward). Only the rotary embedding holds real buffers; it is exposed
so the owner can register it (and so move it with the model).
"""
from __future__ import annotations

import importlib.util

import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")


def resolve_attn_implementation(name: str, *, key: str = "model.attn_implementation") -> str:
    """``auto``: flash-attn on a CUDA machine that has it (the ``gpu`` extra), SDPA otherwise."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"{key}={name}: expected one of {ATTN_IMPLEMENTATIONS}")
    has_flash = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    if name == "auto":
        return "flash_attention_2" if has_flash else "sdpa"
    if name == "flash_attention_2" and not has_flash:
        raise ValueError(f"{key}=flash_attention_2 needs a CUDA GPU and flash-attn "
                         f"(pip install -e .[gpu]); use sdpa on this machine")
    return name


class TargetSkeleton:
    """``LlamaForCausalLM(cfg)`` without weights; ``load(weights)`` then ``hidden(ids)`` / ``logits(weights, ids)``."""

    def __init__(self, cfg: LlamaConfig, attn_implementation: str, *, activation_checkpointing: bool = False) -> None:
        cfg = LlamaConfig.from_dict(cfg.to_dict())
        cfg._attn_implementation = attn_implementation
        with torch.device("meta"):
            self.model = LlamaForCausalLM(cfg)
        self.rotary_emb = LlamaRotaryEmbedding(config=cfg)
        self.model.model.rotary_emb = self.rotary_emb
        if activation_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.eval()  # no dropout in LLaMA; ``train(True)`` only switches checkpointing on
        self._slots: dict[str, tuple[torch.nn.Module, str]] = {}
        for name, _ in list(self.model.named_parameters(remove_duplicate=False)):
            module_name, _, leaf = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            module._parameters.pop(leaf, None)  # tied weights share one Parameter: pop once, fill both
            self._slots[name] = (module, leaf)
        self.weight_names = frozenset(self._slots)

    def train(self, mode: bool) -> None:
        """Training mode enables activation checkpointing (when configured); numerics are unchanged."""
        self.model.train(mode)

    def load(self, weights: dict[str, Tensor]) -> None:
        """Set the target's weights (HF names) as plain tensors; they stay until the next ``load``."""
        missing = self.weight_names - weights.keys()
        if missing:
            raise ValueError(f"fused weights lack {sorted(missing)[:5]} ({len(missing)} in all)")
        for name, (module, leaf) in self._slots.items():
            setattr(module, leaf, weights[name])

    def clear(self) -> None:
        """Drop the references to the last weights (so a finished step or evaluation frees them)."""
        for module, leaf in self._slots.values():
            setattr(module, leaf, None)

    def hidden(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, T) token ids -> (B, T, hidden) final hidden states (after the final norm)."""
        out = self.model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def logits(self, weights: dict[str, Tensor], input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, T) token ids -> (B, T, vocab) logits of the model with ``weights`` (HF names)."""
        self.load(weights)
        return self.model.lm_head(self.hidden(input_ids, attention_mask))
