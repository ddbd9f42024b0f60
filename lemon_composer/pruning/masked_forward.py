"""Run a ``LlamaForCausalLM`` under pruning gates with forward hooks: transformers' own Llama code
(SDPA / flash-attn unchanged), the gates applied where Sheared-LLaMA's ``composer_llama`` applies them.

- head gates multiply o_proj's input per head;  neuron gates multiply down_proj's input;
- hidden gates multiply the embedding output and the o_proj / down_proj outputs, and layer gates
  the o_proj / down_proj outputs too: layer i's residual updates become z_layer_i z_hidden * delta,
  i.e. out = x + z_layer (layer(x) - x) on the kept channels;
- every RMSNorm (input, post-attention, final) averages the squares over the kept channels only
  (those with a non-zero hidden gate; the others of the residual stream are exactly 0), so the
  model sliced to the kept channels computes the same norms.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import LlamaForCausalLM

from lemon_composer.pruning.masks import Gates


class MaskedLlama:
    """Hooks on ``model`` that read the gates last given to ``set`` (kept until the next ``set``, so
    activation checkpointing recomputes with the same gates)."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.gates: Gates | None = None
        self.head_dim = model.config.head_dim if getattr(model.config, "head_dim", None) else \
            model.config.hidden_size // model.config.num_attention_heads
        inner = model.model
        self.handles = [inner.embed_tokens.register_forward_hook(self._scale_output(lambda: self._g.hidden)),
                        inner.norm.register_forward_hook(self._kept_norm)]
        for i, layer in enumerate(inner.layers):
            residual = self._residual_scale(i)
            self.handles += [
                layer.self_attn.o_proj.register_forward_pre_hook(self._head_input(i)),
                layer.self_attn.o_proj.register_forward_hook(self._scale_output(residual)),
                layer.mlp.down_proj.register_forward_pre_hook(self._neuron_input(i)),
                layer.mlp.down_proj.register_forward_hook(self._scale_output(residual)),
                layer.input_layernorm.register_forward_hook(self._kept_norm),
                layer.post_attention_layernorm.register_forward_hook(self._kept_norm)]

    def set(self, gates: Gates) -> None:
        self.gates = gates

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    @property
    def _g(self) -> Gates:
        if self.gates is None:
            raise RuntimeError("MaskedLlama: no gates set before the forward")
        return self.gates

    def _residual_scale(self, i: int) -> Callable[[], Tensor]:
        return lambda: self._g.hidden * self._g.layer[i]

    @staticmethod
    def _scale_output(scale: Callable[[], Tensor]) -> Callable[..., Tensor]:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            return output * scale().to(output.dtype)                                # (B, T, D1) * (D1,)
        return hook

    def _head_input(self, i: int) -> Callable[..., tuple[Tensor]]:
        def hook(module: nn.Module, args: tuple) -> tuple[Tensor]:
            x = args[0]                                                              # (B, T, H1 * hd)
            heads = x.unflatten(-1, (-1, self.head_dim))                             # (B, T, H1, hd)
            return ((heads * self._g.heads[i].to(x.dtype).unsqueeze(-1)).flatten(-2),)
        return hook

    def _neuron_input(self, i: int) -> Callable[..., tuple[Tensor]]:
        def hook(module: nn.Module, args: tuple) -> tuple[Tensor]:
            return (args[0] * self._g.ffn[i].to(args[0].dtype),)                   # (B, T, F1) * (F1,)
        return hook

    def _kept_norm(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """RMSNorm over the kept channels: sum of squares / number kept (replaces HF's output)."""
        x = args[0]
        kept = torch.count_nonzero(self._g.hidden.detach()).clamp(min=1).to(torch.float32)
        x32 = x.to(torch.float32)
        variance = x32.pow(2).sum(-1, keepdim=True) / kept                          # (B, T, 1)
        return module.weight * (x32 * torch.rsqrt(variance + module.variance_epsilon)).to(x.dtype)
