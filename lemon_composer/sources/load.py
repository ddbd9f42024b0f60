"""A frozen source ``LlamaForCausalLM`` from a local folder: config first (cheap checks), then weights."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}  # float64: exactness tests


def read_source_config(path: str | Path, *, key: str = "model.source_path") -> LlamaConfig:
    """The source's config.json, checked to be a LLaMA-architecture model; no weights are read."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{key}={path}: no config.json there (expected a local Hugging Face model folder)")
    cfg = LlamaConfig.from_pretrained(str(folder), local_files_only=True)
    if cfg.model_type != "llama":
        raise ValueError(f"{key}={path}: model_type is {cfg.model_type!r}; LEMON here fuses LLaMA models")
    return cfg


def resolve_dtype(name: str, *, key: str = "model.source_dtype") -> torch.dtype:
    """``auto``: bf16 where CUDA is available, fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"{key}={name}: expected auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_source(path: str | Path, cfg: LlamaConfig, dtype: torch.dtype, attn_implementation: str) -> LlamaForCausalLM:
    """Load the weights, frozen and in eval mode (the teacher never trains)."""
    model = LlamaForCausalLM.from_pretrained(str(path), config=cfg, torch_dtype=dtype, local_files_only=True,
                                             attn_implementation=attn_implementation)
    model.requires_grad_(False)
    return model.eval()


def fingerprint(model: torch.nn.Module) -> str:
    """A cheap content hash of a model: names, shapes and a strided sample of every tensor.

    Detects a changed or different source without hashing gigabytes. Samples are rounded to bf16,
    so the same weights loaded in fp32 or bf16 give the same fingerprint.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to(torch.bfloat16).float().cpu()
        h.update(f"{name}:{tuple(tensor.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
