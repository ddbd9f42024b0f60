"""The CKA report of one model (App. A.6): matrices, heatmaps and the adjacent-layer curve, saved to a folder."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from lemon_composer.analysis.cka import hidden_state_cka, parameter_cka, save_matrix
from lemon_composer.analysis.plots import adjacent_similarity_curve, heatmap
from lemon_composer.atomic import atomic_write_text
from lemon_composer.fusion.init_cka import CKA_KINDS


def _eval_batches(data: str, model: torch.nn.Module, num_batches: int, batch_size: int, seq_len: int | None,
                  model_dir: str, drop_first_tokens: int) -> list[torch.Tensor]:
    """Rows of ``<data>/eval/<domain>`` (domains interleaved), checked to fit the model's vocabulary."""
    from lemon_composer.data.calibration import calibration_batches

    if num_batches < 1 or batch_size < 1:
        raise ValueError(f"--num-batches={num_batches} / --batch-size={batch_size}: both must be >= 1")
    if drop_first_tokens < 0:
        raise ValueError(f"--drop-first-tokens={drop_first_tokens}: must be >= 0")
    batches = calibration_batches(data, split="eval", num_batches=num_batches, batch_size=batch_size,
                                  seq_len=seq_len, key="--data")
    top = max(int(b.max()) for b in batches)
    if top >= model.config.vocab_size:
        raise ValueError(f"--data={data}: token id {top} is outside --model={model_dir}'s vocabulary "
                         f"({model.config.vocab_size}); the data was made with another tokenizer")
    if batches[0].shape[1] <= drop_first_tokens:
        raise ValueError(f"--drop-first-tokens={drop_first_tokens}: rows have only {batches[0].shape[1]} tokens")
    return batches


def cka_report(model_dir: str, out_dir: str, *, data: str | None = None, num_batches: int = 4, batch_size: int = 4,
            seq_len: int | None = None, device: str = "cpu", kinds: Sequence[str] = CKA_KINDS,
            drop_first_tokens: int = 0, name: str | None = None) -> list[Path]:
    """Parameter CKA per kind (Fig. 2a, 6-9), the adjacent-layer curve (Fig. 2b) and, with ``data``, hidden-state
    CKA on rows of its eval split, saved under ``out_dir``; returns the files written (``cka`` subcommand)."""
    from lemon_composer.eval.perplexity import torch_device
    from lemon_composer.sources.load import load_source, read_source_config

    dev = torch_device(device)
    model = load_source(model_dir, read_source_config(model_dir, key="--model"), torch.float32, "sdpa").to(dev)
    batches = None if data is None else _eval_batches(data, model, num_batches, batch_size, seq_len, model_dir,
                                                      drop_first_tokens)
    out = Path(out_dir)
    name = name or Path(model_dir).name or str(model_dir)
    written: list[Path] = []
    matrices = parameter_cka(model, kinds, device=dev)
    layers = [str(j) for j in range(model.config.num_hidden_layers)]
    for kind, matrix in matrices.items():
        written += save_matrix(matrix, out / f"param_cka_{kind}", layers)
        written.append(heatmap(matrix, out / f"param_cka_{kind}.png", title=f"{name}: parameter CKA ({kind})",
                               xlabel="layer", ylabel="layer", vmin=0.0, vmax=1.0))
    curves = {kind: m.diagonal(1) for kind, m in matrices.items()}
    written.append(atomic_write_text(out / "adjacent_similarity.json",
                                     json.dumps({k: v.tolist() for k, v in curves.items()}) + "\n"))
    written.append(adjacent_similarity_curve(curves, out / "adjacent_similarity.png",
                                             title=f"{name}: CKA of adjacent layers"))
    if batches is not None:
        hidden = hidden_state_cka(model, batches, drop_first_tokens=drop_first_tokens)
        labels = ["emb"] + [str(i) for i in range(1, hidden.shape[0])]
        written += save_matrix(hidden, out / "hidden_cka", labels)
        written.append(heatmap(hidden, out / "hidden_cka.png", title=f"{name}: hidden-state CKA",
                               xlabel="layer output (0 = embedding)", ylabel="layer output (0 = embedding)",
                               vmin=0.0, vmax=1.0))
    return written
