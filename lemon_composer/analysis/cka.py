"""Layer-by-layer similarity by linear CKA (paper Sec. 2, App. A.5-A.6; Fig. 2, 6, 7-9).

``parameter_cka`` compares the weight matrices of every pair of decoder layers, per parameter kind,
as the paper does to show the cluster-like modules of large LMs (Fig. 2a) and that a fused model keeps
them (Fig. 6). As in ``lemon_composer.fusion.init_cka`` (which clusters layers for the ``avg`` init),
the rows of a weight are the samples and its columns the features; the superdiagonal of these
matrices is the adjacent-layer curve of Fig. 2b. ``hidden_state_cka`` is the usual representation view:
CKA between the hidden states of every pair of layers on the same tokens.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from lemon_composer.atomic import atomic_write_text
from lemon_composer.fusion.fuse import LAYER_WEIGHTS
from lemon_composer.fusion.init_cka import CKA_KINDS, hidden_rows, linear_cka

log = logging.getLogger(__name__)

# aggregate name -> the kinds averaged into it (Fig. 2a shows attention; App. A.5 the FFN)
AGGREGATES = {"attention": ("q", "k", "v", "o"), "ffn": ("up", "gate", "down")}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def _layer_count(state: dict[str, Tensor]) -> int:
    """Number of decoder layers in an HF ``LlamaForCausalLM`` state dict (indices 0..L-1, all present)."""
    found = {int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k))}
    if not found:
        raise ValueError("parameter_cka: the state dict has no 'model.layers.<i>.' weights (expected "
                         "LlamaForCausalLM naming)")
    if found != set(range(max(found) + 1)):
        raise ValueError(f"parameter_cka: decoder layers {sorted(found)} are not contiguous from 0")
    return max(found) + 1


def _as_state(model_or_state: nn.Module | dict[str, Tensor]) -> dict[str, Tensor]:
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


GRAM_BUDGET_BYTES = 1 << 30


def pairwise_cka(reps: Sequence[Tensor], *, gram_budget_bytes: int = GRAM_BUDGET_BYTES) -> Tensor:
    """(n, n) float64: ``linear_cka`` of every pair of ``reps`` (each (rows, features), same rows).

    When the centred Gram matrices of all reps fit in ``gram_budget_bytes`` (float64), each is built
    once and a pair costs one inner product, <K_i, K_j>_F = ||X_i^T X_j||_F^2 (the identity
    ``linear_cka`` uses); otherwise every pair goes through ``linear_cka``. Only i <= j is computed
    and mirrored, so the matrix is exactly symmetric.
    """
    n = len(reps)
    out = torch.zeros(n, n, dtype=torch.float64)
    rows = reps[0].shape[0] if reps else 0
    if any(r.dim() != 2 or r.shape[0] != rows for r in reps):
        raise ValueError(f"pairwise_cka: expected matrices with the same number of rows; got "
                         f"{[tuple(r.shape) for r in reps]}")
    if n * rows * rows * 8 <= gram_budget_bytes:
        grams = []
        for r in reps:
            x = r.double()
            x = x - x.mean(0)
            grams.append(x @ x.T)
        norms = [g.norm() for g in grams]
        for i in range(n):
            for j in range(i, n):
                denom = norms[i] * norms[j]
                value = (grams[i] * grams[j]).sum() / denom if denom > 0 else torch.zeros((), dtype=torch.float64)
                out[i, j] = out[j, i] = value.cpu()
        return out
    for i in range(n):
        for j in range(i, n):
            out[i, j] = out[j, i] = linear_cka(reps[i], reps[j]).cpu()
    return out


def parameter_cka(model_or_state: nn.Module | dict[str, Tensor], kinds: Sequence[str] = CKA_KINDS, *,
                  device: str | torch.device | None = None) -> dict[str, Tensor]:
    """Per kind, the (L, L) float64 matrix of linear CKA between every pair of layers' weights (App. A.6).

    Args:
        model_or_state: a ``LlamaForCausalLM`` or its state dict (a ``module.`` prefix is stripped).
        kinds: parameter kinds of ``LAYER_WEIGHTS`` (q, k, v, o, up, gate, down; ln1 / ln2 are vectors,
            compared as one-feature matrices); rows are the hidden coordinates (``hidden_rows``).
        device: where to compute (e.g. ``cuda`` for a 7B model); default: where the weights are.

    Returns:
        ``{kind: (L, L)}`` plus ``"attention"`` (mean over q, k, v, o) and ``"ffn"`` (mean over up, gate,
        down) when all their kinds were asked for. ``matrix.diagonal(1)`` is the adjacent-layer curve
        (Fig. 2b); the mean over the seven matrix kinds gives ``init_cka.adjacent_layer_similarity``.
    """
    unknown = [k for k in kinds if k not in LAYER_WEIGHTS]
    if unknown or not kinds:
        raise ValueError(f"parameter_cka kinds={list(kinds)}: unknown {unknown or 'empty'}; "
                         f"expected some of {list(LAYER_WEIGHTS)}")
    state = _as_state(model_or_state)
    n_layers = _layer_count(state)
    out: dict[str, Tensor] = {}
    for kind in kinds:
        reps = []
        for j in range(n_layers):
            w = hidden_rows(kind, state[f"model.layers.{j}.{LAYER_WEIGHTS[kind]}"].detach())
            reps.append(w if device is None else w.to(device))
        out[kind] = pairwise_cka(reps)
        log.debug("parameter CKA of %s over %d layers done", kind, n_layers)
    for name, members in AGGREGATES.items():
        if all(k in out for k in members):
            out[name] = torch.stack([out[k] for k in members]).mean(0)
    return out


@torch.no_grad()
def hidden_state_cka(model: nn.Module, batches: Sequence[Tensor], *, drop_first_tokens: int = 0) -> Tensor:
    """(L+1, L+1) float64: linear CKA between the hidden states of every pair of layers (rows = tokens).

    Index 0 is the embedding output, index i the output of decoder layer i (HF's last hidden state
    is after the final norm). ``batches`` are token-id tensors, (B, T) or (T,), without padding.
    ``drop_first_tokens`` leaves the first positions of every row out of the rows compared (they
    still run through the model): in trained LLaMAs the first token's hidden state can be orders
    of magnitude larger than the rest and then dominates linear CKA.
    """
    if not batches:
        raise ValueError("hidden_state_cka: no batches given")
    if drop_first_tokens < 0 or any(b.shape[-1] <= drop_first_tokens for b in batches):
        raise ValueError(f"hidden_state_cka drop_first_tokens={drop_first_tokens}: must be >= 0 and shorter "
                         f"than every row")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_layer: list[list[Tensor]] = []
    try:
        for ids in batches:
            ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
            hidden = model(input_ids=ids.to(device), output_hidden_states=True, use_cache=False).hidden_states
            if not per_layer:
                per_layer = [[] for _ in hidden]
            for acc, h in zip(per_layer, hidden):
                acc.append(h[:, drop_first_tokens:].reshape(-1, h.shape[-1]).float().cpu())
    finally:
        model.train(was_training)
    reps = [torch.cat(acc) for acc in per_layer]
    log.info("hidden-state CKA over %d tokens and %d representations", reps[0].shape[0], len(reps))
    return pairwise_cka(reps)


def save_matrix(matrix: Tensor, path_without_suffix: str | Path, labels: Sequence[str]) -> list[Path]:
    """Write ``<path>.json`` ({"labels", "matrix": list of lists}) and ``<path>.csv`` (labelled rows), atomically."""
    matrix = torch.as_tensor(matrix).detach().cpu().double()
    if matrix.dim() != 2 or matrix.shape[0] != len(labels) or matrix.shape[1] != len(labels):
        raise ValueError(f"save_matrix {path_without_suffix}: matrix {tuple(matrix.shape)} does not match "
                         f"{len(labels)} labels")
    base = Path(path_without_suffix)
    labels = [str(x) for x in labels]
    rows = matrix.tolist()
    js = atomic_write_text(base.with_name(base.name + ".json"),
                           json.dumps({"labels": labels, "matrix": rows}) + "\n")
    lines = [",".join([""] + labels)] + [",".join([lab] + [repr(v) for v in row]) for lab, row in zip(labels, rows)]
    csv = atomic_write_text(base.with_name(base.name + ".csv"), "\n".join(lines) + "\n")
    return [js, csv]


def load_matrix(path: str | Path) -> tuple[Tensor, list[str]]:
    """Read back a ``save_matrix`` JSON: (float64 matrix, labels)."""
    data = json.loads(Path(path).read_text())
    return torch.tensor(data["matrix"], dtype=torch.float64), list(data["labels"])
