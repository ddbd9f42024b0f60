"""Export to a Hugging Face ``LlamaForCausalLM`` folder: ``python -m lemon_composer.export`` / ``lemon-export``.

    lemon-export --checkpoint runs/fuse/checkpoints/latest-rank0.pt --out exported/lemon-1.3b
    lemon-export --checkpoint <hf_causal_lm (CPT) checkpoint> --out exported/lemon-1.3b-cpt --dtype bf16
    lemon-export --checkpoint runs/cpt/checkpoints/ep0-ba5000 --out exported/lemon-1.3b-cpt   # FSDP sharded
    lemon-export --source /models/Llama-2-7b-hf --init cut --target 2048,5504,16,24 --out exported/cut-1.3b
    lemon-export --checkpoint runs/lemon-prune-7b-to-1.3b/checkpoints/latest-sharded-rank0 --out exported/shear-1.3b
    lemon-export --checkpoint <pruning checkpoint> --folded-source --out exported/shear-source   # init: shear

Checkpoints are one file or a sharded (FSDP ``state_dict_type: sharded``) folder, read weights-only
(``checkpoints.read_checkpoint``). Sources of weights:
- a fusion checkpoint (``lemon_fusion``): the operators are applied to the source they were learned
  on (path and fingerprint are in the checkpoint) to materialise the fused weights;
- an llm-foundry ``hf_causal_lm`` checkpoint (continued pre-training): its weights and HF config;
- a pruning checkpoint (``lemon_prune``): the pruned model, or its folded source (``pruning/export.py``);
- a training-free baseline (cut, random, avg, prune) straight from a source model.

The folder holds config.json, safetensors weights, the tokenizer, a generation config and
``lemon_provenance.json``. It is written under a temporary name and renamed at the end, so an
interrupted export leaves nothing; an existing folder is replaced only with ``--overwrite``.
Unlike Sheared-LLaMA's converter, loading is strict: a missing or unexpected weight is an error.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from lemon_composer.atomic import atomic_folder
from lemon_composer.checkpoints import read_checkpoint
from lemon_composer.cli import run_cli
from lemon_composer.sources.load import DTYPES

log = logging.getLogger(__name__)

PROVENANCE = "lemon_provenance.json"
EXPORT_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def load_tokenizer_of(folder: str | Path, *, key: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside a model; a clear error when there is none."""
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means the same thing to the user
        raise ValueError(f"{key}={folder}: no loadable tokenizer there ({type(err).__name__}: {err}); "
                         f"the exported folder must ship the source's tokenizer") from err


def write_hf_folder(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, out: str | Path, *,
                    dtype: str = "fp32", provenance: dict[str, Any], overwrite: bool = False,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Save model, tokenizer, generation config, provenance and ``extra_files`` to ``out`` atomically."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype={dtype}: expected one of {sorted(EXPORT_DTYPES)}")
    with atomic_folder(out, overwrite=overwrite) as tmp:
        model = model.to(DTYPES[EXPORT_DTYPES[dtype]])
        model.config.torch_dtype = DTYPES[EXPORT_DTYPES[dtype]]
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        GenerationConfig.from_model_config(model.config).save_pretrained(str(tmp))
        (tmp / PROVENANCE).write_text(json.dumps({**provenance, "dtype": dtype}, indent=2, sort_keys=True) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    log.info("exported %s (%s)", out, dtype)
    return Path(out)


def hf_model_from_fused(fusion_model: Any) -> LlamaForCausalLM:
    """A plain ``LlamaForCausalLM`` holding the fusion model's fused weights (strict load)."""
    with torch.no_grad():
        weights = {k: v.detach().clone(memory_format=torch.contiguous_format)
                   for k, v in fusion_model.fused_state_dict().items()}
    cfg = fusion_model.plan.target_config(fusion_model.source.config)
    cfg.torch_dtype = torch.float32
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.load_state_dict(weights, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)  # real buffers, not meta
    return model.float().eval()


def fusion_provenance(fusion_model: Any, step: int | None) -> dict[str, Any]:
    extra = fusion_model.get_extra_state()
    return {"kind": "lemon_fusion", "source_path": extra["source_path"],
            "source_fingerprint": extra["source_fingerprint"], "plan": extra["plan"],
            "config": extra["config"], "checkpoint_step": step}


def strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, dtype: str = "fp32", overwrite: bool = False,
                      source_path: str | None = None, folded_source: bool = False) -> Path:
    """Export a fusion, pruning or ``hf_causal_lm`` Composer checkpoint (see the module docstring)."""
    from lemon_composer.models.fusion_model import LemonFusionModel
    from lemon_composer.pruning.export import is_prune_state

    checkpoint = Path(checkpoint)
    ckpt = read_checkpoint(checkpoint)
    state = strip_prefix(ckpt["state"]["model"], "module.")  # DDP-wrapped saves
    step = ckpt["state"].get("timestamp", {}).get("Timestamp", {}).get("batch")
    if is_prune_state(state):
        return _export_pruned(state, checkpoint, step, out, dtype=dtype, overwrite=overwrite,
                              source_path=source_path, folded_source=folded_source)
    if folded_source:
        raise ValueError(f"--folded-source: {checkpoint} is not a lemon_prune checkpoint")
    extra = state.get("_extra_state")
    if isinstance(extra, dict) and "config" in extra:
        config = dict(extra["config"], init="cut", init_device="cpu")  # operators come from the checkpoint
        if source_path is not None:
            config["source_path"] = source_path
        config.pop("calibration", None)
        model = LemonFusionModel(**config)
        model.load_state_dict(state, strict=True)  # refuses a source whose fingerprint changed
        tokenizer = load_tokenizer_of(config["source_path"], key="source_path")
        return write_hf_folder(hf_model_from_fused(model), tokenizer, out, dtype=dtype, overwrite=overwrite,
                               provenance={**fusion_provenance(model, step), "checkpoint": str(checkpoint)})
    hf = ckpt["state"].get("integrations", {}).get("huggingface")
    if hf is not None:
        from composer.models import HuggingFaceModel
        config = hf["model"]["config"]["content"]
        if config.get("model_type") != "llama":
            raise ValueError(f"--checkpoint={checkpoint}: holds a {config.get('model_type')} model, expected llama")
        model = LlamaForCausalLM(LlamaConfig.from_dict(config))
        model.load_state_dict(strip_prefix(state, "model."), strict=True)
        # Composer writes the tokenizer's files to a folder before loading them (by default a
        # `tokenizer-save-dir-*` left in the working directory): give it a temporary one instead.
        with tempfile.TemporaryDirectory() as tok_dir:
            tokenizer = HuggingFaceModel.load_huggingface_tokenizer_from_saved_state(hf, tokenizer_save_dir=tok_dir)
            if tokenizer is None:
                raise ValueError(f"--checkpoint={checkpoint}: carries no tokenizer to export")
            return write_hf_folder(model.float().eval(), tokenizer, out, dtype=dtype, overwrite=overwrite,
                                   provenance={"kind": "hf_causal_lm", "checkpoint": str(checkpoint),
                                               "checkpoint_step": step})
    raise ValueError(f"--checkpoint={checkpoint}: neither a LEMON fusion checkpoint (no operators and source "
                     f"reference) nor an llm-foundry hf_causal_lm checkpoint (no huggingface integration)")


def _export_pruned(state: dict[str, Any], checkpoint: Path, step: int | None, out: str | Path, *, dtype: str,
                   overwrite: bool, source_path: str | None, folded_source: bool) -> Path:
    """The pruned model of a ``lemon_prune`` checkpoint, or (``folded_source``) the source for ``init: shear``."""
    from lemon_composer.pruning.export import SHEAR_FILE, kept_json, prune_model_from_state

    model = prune_model_from_state(state, source_path)
    tokenizer = load_tokenizer_of(model.cfg.source_path, key="source_path")
    provenance = {"kind": "lemon_prune", "source_path": model.cfg.source_path, "checkpoint": str(checkpoint),
                  "checkpoint_step": step, "config": state["_extra_state"]["config"]}
    if not folded_source:
        return write_hf_folder(model.pruned(), tokenizer, out, dtype=dtype, overwrite=overwrite, provenance=provenance)
    folded, kept = model.folded()
    return write_hf_folder(folded, tokenizer, out, dtype=dtype, overwrite=overwrite,
                           provenance={**provenance, "kind": "lemon_prune:folded_source"},
                           extra_files={SHEAR_FILE: kept_json(kept)})


def export_baseline(source: str, init: str, target: dict[str, int], out: str | Path, *, dtype: str = "fp32",
                    overwrite: bool = False, **model_kwargs: Any) -> Path:
    """Export a training-free baseline (``init`` = cut, random, avg, prune) straight from a source."""
    from lemon_composer.models.fusion_model import LemonFusionModel

    model = LemonFusionModel(source_path=source, target=target, init=init, **model_kwargs)
    tokenizer = load_tokenizer_of(source, key="--source")
    return write_hf_folder(hf_model_from_fused(model), tokenizer, out, dtype=dtype, overwrite=overwrite,
                           provenance={**fusion_provenance(model, 0), "kind": f"baseline:{init}"})


def _parse_ints(text: str, count: int, flag: str, names: str) -> list[int]:
    """``count`` comma-separated positive integers, or a ValueError naming the flag."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count or min(values) < 1:
        raise ValueError(f"{flag}={text}: expected {names} as {count} positive integers")
    return values


def _parse_target(text: str) -> dict[str, int]:
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads")
    count = 5 if text.count(",") == 4 else 4
    return dict(zip(keys, _parse_ints(text, count, "--target", "hidden,ffn,heads,layers[,kv_heads]")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Export a checkpoint or a training-free baseline to a "
                                            "Hugging Face LlamaForCausalLM folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--checkpoint", help="a Composer checkpoint (fusion or hf_causal_lm): a .pt file or a sharded folder")
    p.add_argument("--source", help="a source HF folder, to export a baseline (with --init and --target)")
    p.add_argument("--init", default="cut", help="baseline: cut, random, avg, prune (with --calibration-data)")
    p.add_argument("--target", help="baseline: hidden,ffn,heads,layers[,kv_heads]")
    p.add_argument("--receptive-field", default="1,1,1", help="baseline: r_h,r_a,r_i")
    p.add_argument("--calibration-data", help="baseline prune: data prep output to score importance on")
    p.add_argument("--source-path", help="fusion or pruning checkpoint: the source's path if it moved")
    p.add_argument("--folded-source", action="store_true",
                   help="pruning checkpoint: export the source-size model with the masks folded in and "
                        "lemon_shear.json (the source of a fusion with init: shear) instead of the pruned model")
    p.add_argument("--dtype", default="fp32", choices=sorted(EXPORT_DTYPES))
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def body() -> None:
        if (a.checkpoint is None) == (a.source is None):
            raise ValueError("give exactly one of --checkpoint or --source")
        if a.checkpoint:
            out = export_checkpoint(a.checkpoint, a.out, dtype=a.dtype, overwrite=a.overwrite,
                                    source_path=a.source_path, folded_source=a.folded_source)
        else:
            if a.target is None:
                raise ValueError("--source needs --target hidden,ffn,heads,layers[,kv_heads]")
            r_h, r_a, r_i = _parse_ints(a.receptive_field, 3, "--receptive-field", "r_h,r_a,r_i")
            calibration = {"data_dir": a.calibration_data} if a.calibration_data else None
            out = export_baseline(a.source, a.init, _parse_target(a.target), a.out, dtype=a.dtype,
                                  overwrite=a.overwrite, receptive_field={"r_h": r_h, "r_a": r_a, "r_i": r_i},
                                  calibration=calibration)
        print(out)
    return run_cli("export", body)


if __name__ == "__main__":
    sys.exit(main())
