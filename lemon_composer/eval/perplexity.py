"""Held-out perplexity per domain of any HF causal-LM folder on data prep's MDS rows.

The "Eval PPL" of Sec. 4.3 / Fig. 4 (middle), per RedPajama domain: each row of ``seq_len``
tokens predicts its tokens 2..seq_len from the ones before; a domain's loss is the
token-weighted mean cross-entropy (nats) over all its rows, ``ppl = exp(loss)``.

    python -m lemon_composer.eval.perplexity --model DIR --data DIR [--max-rows N]
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from streaming import LocalDataset
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from lemon_composer.cli import run_cli
from lemon_composer.data.manifest import check_data_matches_model, domain_dirs, read_manifest

log = logging.getLogger(__name__)


def model_config(model_dir: str | Path, *, option: str = "--model") -> PretrainedConfig:
    """The config of a local HF model folder; ``option`` names the flag in errors."""
    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"{option}={model_dir}: no config.json there (expected an exported Hugging Face "
                         f"model folder)")
    return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)


def torch_device(device: str, *, option: str = "--device") -> torch.device:
    """Parse ``device``; CUDA must be present when asked for."""
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"{option}={device}: not a torch device ({err})") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option}={device}: CUDA is not available on this machine; use --device cpu")
    return dev


def domain_perplexity(model_dir: str | Path, data_dir: str | Path, *, split: str = "eval",
                      max_rows: int | None = None, batch_size: int = 8, seq_len: int | None = None,
                      device: str = "cpu") -> dict[str, dict[str, float]]:
    """Per-domain ``{"loss", "ppl", "tokens"}`` of the model in ``model_dir`` on ``<data_dir>/<split>``.

    Args:
        max_rows: at most this many rows per domain (the first ones).
        seq_len: use only the first ``seq_len`` tokens of each row (default: whole rows).

    Raises:
        ValueError: no manifest / shards, a model vocabulary smaller than the data's tokenizer,
            or rows longer than the model's positions.
    """
    manifest = read_manifest(data_dir, key="--data")
    dirs = domain_dirs(data_dir, split, None, key="--data")
    cfg = model_config(model_dir)
    dev = torch_device(device)
    check_data_matches_model(manifest, data_dir, model_dir, data_key="--data", model_key="--model")
    seq_len = manifest["seq_len"] if seq_len is None else seq_len
    if not 2 <= seq_len <= manifest["seq_len"]:
        raise ValueError(f"--seq-len={seq_len}: must lie in [2, {manifest['seq_len']}] (the rows of {data_dir})")
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if max_pos is not None and seq_len - 1 > max_pos:
        raise ValueError(f"--seq-len={seq_len}: {model_dir} has {max_pos} positions; pass --seq-len {max_pos + 1}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"--max-rows={max_rows}: must be at least 1")
    if batch_size < 1:
        raise ValueError(f"--batch-size={batch_size}: must be at least 1")

    dtype = torch.float32 if dev.type == "cpu" else "auto"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=dtype, local_files_only=True)
    model = model.to(dev).eval()
    results = {}
    for domain, path in dirs.items():
        ds = LocalDataset(str(path))
        n = len(ds) if max_rows is None else min(len(ds), max_rows)
        log.info("perplexity: domain %s, %d rows of %d tokens", domain, n, seq_len)
        nll, tokens = 0.0, 0
        for start in range(0, n, batch_size):
            rows = np.stack([np.asarray(ds[i]["tokens"][:seq_len], dtype=np.int64)
                             for i in range(start, min(start + batch_size, n))])
            batch = torch.from_numpy(rows).to(dev)  # (B, seq_len)
            with torch.no_grad():
                logits = model(input_ids=batch[:, :-1]).logits.float()  # (B, seq_len - 1, V)
            nll += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
            tokens += batch[:, 1:].numel()
        loss = nll / tokens
        results[domain] = {"loss": loss, "ppl": math.exp(loss), "tokens": tokens}
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Domains as rows, plus ``all`` (token-weighted over domains)."""
    tokens = sum(r["tokens"] for r in results.values())
    loss = sum(r["loss"] * r["tokens"] for r in results.values()) / tokens
    rows = [(d, r["tokens"], r["loss"], r["ppl"]) for d, r in results.items()]
    rows.append(("all", tokens, loss, math.exp(loss)))
    width = max(len("domain"), *(len(r[0]) for r in rows))
    lines = [f"{'domain':<{width}}  {'tokens':>10}  {'loss':>8}  {'ppl':>10}"]
    lines += [f"{d:<{width}}  {t:>10d}  {lo:>8.4f}  {p:>10.3f}" for d, t, lo, p in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lemon_composer.eval.perplexity``: print the per-domain table (exit 2 on a user error)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF model folder (config.json, weights)")
    parser.add_argument("--data", required=True, help="data prep output folder (manifest.json, <split>/<domain>)")
    parser.add_argument("--split", default="eval")
    parser.add_argument("--max-rows", type=int, default=None, help="rows per domain (default: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row used (default: whole rows)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_cli("perplexity", lambda: print(format_table(domain_perplexity(
        args.model, args.data, split=args.split, max_rows=args.max_rows, batch_size=args.batch_size,
        seq_len=args.seq_len, device=args.device))))


if __name__ == "__main__":
    sys.exit(main())
