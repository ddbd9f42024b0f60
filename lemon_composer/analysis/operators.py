"""Heatmaps of the learned fusion operators (paper Sec. 4.4 "Explainability Analysis", Fig. 5; App. A.7, Fig. 10).

The layer operators gamma (L2 x L1, one per parameter kind or one shared) show which source layers
each target layer is fused from: clusters of neighbouring layers, weights decaying with distance and
even turning negative. So every map uses a diverging colormap centred at 0. The dimension operators
are drawn too: B_emb, and A_attn / A_kv / A_ffn of the first, middle and last source layer.
"""
from __future__ import annotations

import logging
from pathlib import Path

from torch import Tensor

from lemon_composer.analysis.plots import heatmap
from lemon_composer.checkpoints import read_checkpoint
from lemon_composer.export import strip_prefix

log = logging.getLogger(__name__)

PREFIX = "operators."
DIVERGING = "RdBu_r"
PER_LAYER_OPERATORS = {"A_attn": "attention width (q rows, o columns)", "A_kv": "key/value width",
                       "A_ffn": "FFN width (up/gate rows, down columns)"}


def load_operators(checkpoint_path: str | Path) -> dict[str, Tensor]:
    """The operators of a LEMON fusion Composer checkpoint: ``{"B_emb", "A_attn", ["A_kv"], "A_ffn", "gamma.<kind>"}``.

    Raises:
        ValueError: the file is missing, not a Composer checkpoint, or not a fusion checkpoint.
    """
    path = Path(checkpoint_path)
    state = strip_prefix(read_checkpoint(path)["state"]["model"], "module.")  # DDP-wrapped saves
    extra = state.get("_extra_state")
    ops = {k[len(PREFIX):]: v.detach().float().cpu() for k, v in state.items() if k.startswith(PREFIX)}
    if not isinstance(extra, dict) or "plan" not in extra or "B_emb" not in ops or not any(
            k.startswith("gamma.") for k in ops):
        raise ValueError(f"--checkpoint={path}: not a LEMON fusion checkpoint (no operators.B_emb / "
                         f"operators.gamma.* and plan in state.model)")
    log.info("%s: operators %s", path, {k: tuple(v.shape) for k, v in ops.items()})
    return ops


def _centred(t: Tensor) -> dict[str, float]:
    """vmin / vmax symmetric about 0, so white is 0 in the diverging map."""
    m = float(t.abs().max()) if t.numel() else 0.0
    m = m if m > 0 else 1.0
    return {"vmin": -m, "vmax": m}


def _layers_to_show(n_layers: int) -> list[int]:
    return sorted({0, n_layers // 2, n_layers - 1})


def operator_figures(checkpoint_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write heatmaps of every gamma, of B_emb and of the per-layer A operators; returns the PNG paths.

    Files: ``gamma_<kind>.png`` (target layer i x source layer j), ``B_emb.png`` and
    ``<A_name>_layer<j>.png`` for source layers j = first, middle, last.
    """
    ops = load_operators(checkpoint_path)
    out = Path(out_dir)
    paths: list[Path] = []
    for name in sorted(k for k in ops if k.startswith("gamma.")):
        kind = name.split(".", 1)[1]
        g = ops[name]
        paths.append(heatmap(g, out / f"gamma_{kind}.png", title=f"layer operator gamma ({kind})",
                             xlabel="source layer j", ylabel="target layer i", cmap=DIVERGING, **_centred(g)))
    b = ops["B_emb"]
    paths.append(heatmap(b, out / "B_emb.png", title="dimension operator B_emb (hidden width)",
                         xlabel="source hidden block", ylabel="target hidden block", cmap=DIVERGING, **_centred(b)))
    for name, what in PER_LAYER_OPERATORS.items():
        if name not in ops:
            continue
        a = ops[name]
        rope = a.dim() == 4  # (L1, frequency groups, heads2, heads1): stack the groups' head matrices
        for j in _layers_to_show(a.shape[0]):
            aj = a[j].flatten(0, 1) if rope else a[j]            # rope: (groups*heads2, heads1)
            paths.append(heatmap(aj, out / f"{name}_layer{j}.png",
                                 title=f"dimension operator {name}, source layer {j} ({what})",
                                 xlabel="source head" if rope else "source block",
                                 ylabel="(frequency group, target head)" if rope else "target block",
                                 cmap=DIVERGING, **_centred(aj)))
    return paths
