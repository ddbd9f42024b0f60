"""``lsq`` initialiser (beyond the paper): prune's selection plus least-squares output scales for depth.

Dropping source layers removes their contribution to the residual stream. Let the kept layers be
k_0 < ... < k_{L2-1} (prune's block-influence choice, with prune's heads, neurons and channels) and
let target layer i stand for the source layers G_i = [k_i, k_{i+1}) (G_0 also takes the layers
before k_0, G_{L2-1} those after k_{L2-1}). On calibration data, with h_j the input of source layer
j, a_i and m_i the attention and MLP outputs of layer k_i, fit per target layer

    (c_attn_i, c_mlp_i) = argmin Σ_tokens || c_attn a_i + c_mlp m_i - (h_{end(G_i)} - h_{start(G_i)}) ||²

(ordinary least squares, a 2 x 2 system), in the spirit of LLM-Streamline / ReplaceMe, which replace
a pruned block by a fitted linear stand-in. The scales are gamma values: gamma.o[i, k_i] = c_attn_i and
gamma.down[i, k_i] = c_mlp_i (every other kind keeps gamma[i, k_i] = 1), so the init is a closed-form
operator value, exact at step 0. Needs one gamma per kind (``shared_gamma: false``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import LlamaForCausalLM

from lemon_composer.fusion.init import Selection
from lemon_composer.fusion.plan import FusionPlan

RIDGE = 1e-8  # relative to the Gram matrix's trace: keeps the 2 x 2 solve defined for a zero output


def groups(kept: list[int], n_source: int) -> list[tuple[int, int]]:
    """[start, end) of the source layers each target layer stands for (see the module docstring)."""
    bounds = [0, *kept[1:], n_source]
    return list(zip(bounds[:-1], bounds[1:]))


class _Outputs:
    """Per batch: every decoder layer's input, and the attention / MLP outputs of the kept layers."""

    def __init__(self, kept: list[int]) -> None:
        self.kept = kept
        self.inputs: dict[int, Tensor] = {}
        self.attn: dict[int, Tensor] = {}
        self.mlp: dict[int, Tensor] = {}

    def hooks(self, source: LlamaForCausalLM) -> list[torch.utils.hooks.RemovableHandle]:
        handles = []
        layers = source.model.layers
        for j, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(self._store(self.inputs, j), with_kwargs=True))
        handles.append(layers[-1].register_forward_hook(self._store_output(len(layers)), with_kwargs=True))
        for k in self.kept:
            handles.append(layers[k].self_attn.register_forward_hook(self._first(self.attn, k)))
            handles.append(layers[k].mlp.register_forward_hook(self._first(self.mlp, k)))
        return handles

    @staticmethod
    def _store(acc: dict[int, Tensor], j: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            acc[j] = (args[0] if args else kwargs["hidden_states"]).double()      # (B, T, D1)
        return hook

    def _store_output(self, j: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            self.inputs[j] = (output[0] if isinstance(output, tuple) else output).double()
        return hook

    @staticmethod
    def _first(acc: dict[int, Tensor], k: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output) -> None:
            acc[k] = (output[0] if isinstance(output, tuple) else output).double()  # (B, T, D1)
        return hook


def output_scales(source: LlamaForCausalLM, kept: list[int], batches: list[Tensor]) -> Tensor:
    """(L2, 2): the least-squares (c_attn, c_mlp) of every target layer on the calibration batches."""
    spans = groups(kept, len(source.model.layers))
    gram = torch.zeros(len(kept), 2, 2, dtype=torch.float64)
    rhs = torch.zeros(len(kept), 2, dtype=torch.float64)
    device = next(source.parameters()).device
    out = _Outputs(kept)
    handles = out.hooks(source)
    try:
        with torch.no_grad():
            for ids in batches:
                source.model(input_ids=ids.to(device), use_cache=False)
                for i, (k, (start, end)) in enumerate(zip(kept, spans)):
                    x = torch.stack([out.attn[k], out.mlp[k]]).flatten(1).cpu()        # (2, B*T*D1)
                    delta = (out.inputs[end] - out.inputs[start]).flatten().cpu()      # (B*T*D1,)
                    gram[i] += x @ x.T
                    rhs[i] += x @ delta
    finally:
        for handle in handles:
            handle.remove()
    ridge = RIDGE * gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)            # (L2,)
    return torch.linalg.solve(gram + ridge[:, None, None] * torch.eye(2, dtype=torch.float64), rhs)


def lsq_selection(plan: FusionPlan, source: LlamaForCausalLM, batches: list[Tensor], pruned: Selection) -> Selection:
    """``lsq``: ``pruned`` (prune's selection) with gamma.o / gamma.down scaled by ``output_scales``."""
    if plan.shared_gamma:
        raise ValueError("model.init=lsq sets gamma.o and gamma.down apart from the other kinds: it needs "
                         "model.shared_gamma=false")
    kept = [int(j) for j in pruned.gamma.argmax(1)]                                   # gamma is one-hot (Eq. 5)
    scales = output_scales(source, kept, batches).float()                            # (L2, 2)
    by_kind = {}
    for kind, column in (("o", 0), ("down", 1)):
        g = pruned.gamma.clone()
        g[torch.arange(len(kept)), torch.tensor(kept)] = scales[:, column]
        by_kind[kind] = g
    return Selection(gamma=pruned.gamma, hidden=pruned.hidden, kv_heads=pruned.kv_heads, heads=pruned.heads,
                     ffn=pruned.ffn, gamma_by_kind=by_kind)
