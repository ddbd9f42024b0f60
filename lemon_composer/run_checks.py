"""Checks of a resolved ``composer train.py`` config that llm-foundry does not make, before anything loads.

- the model folder a run names (``model.source_path`` for fusion, ``model.pretrained_model_name_or_path``
  for continued pre-training) is an existing local folder: otherwise transformers reports a missing
  folder as an invalid hub repo id;
- every data folder of our loaders (``lemon_domains``, ``lemon_mixture``) was made with that
  model's tokenizer, whatever ``tokenizer.name`` says (``check_data_matches_model``); for a model
  trained from scratch (``pretrained: false``) the data's vocabulary must fit its ``vocab_size``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lemon_composer.data.manifest import check_data_matches_model, read_manifest

OUR_LOADERS = ("lemon_domains", "lemon_mixture")
MODEL_FOLDER_KEYS = {"lemon_fusion": "source_path", "hf_causal_lm": "pretrained_model_name_or_path"}


def _loaders(cfg: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(yaml key, loader config) of every train / eval loader."""
    out = [(key, cfg[key]) for key in ("train_loader", "eval_loader") if isinstance(cfg.get(key), dict)]
    evals = cfg.get("eval_loaders")
    if isinstance(evals, list):
        out += [(f"eval_loaders[{i}]", loader) for i, loader in enumerate(evals) if isinstance(loader, dict)]
    return out


def check_run(cfg: dict[str, Any]) -> None:
    """Raise ValueError naming the yaml key for a missing model folder or data of another vocabulary."""
    model = cfg.get("model") or {}
    key = MODEL_FOLDER_KEYS.get(model.get("name"))
    if key is None:
        return
    folder = model.get(key)
    if not isinstance(folder, str) or not (Path(folder) / "config.json").is_file():
        raise ValueError(f"model.{key}={folder!r}: expected a local model folder with a config.json "
                         f"(this project never downloads from a hub)")
    trained = model.get("pretrained", True) is not False  # hf_causal_lm from scratch: only sizes must fit
    vocab_size = (model.get("config_overrides") or {}).get("vocab_size")
    for loader_key, loader in _loaders(cfg):
        if loader.get("name") in OUR_LOADERS:
            data_key = f"{loader_key}.data_dir"
            data_dir = loader.get("data_dir")
            check_data_matches_model(read_manifest(data_dir, key=data_key), data_dir, folder, data_key=data_key,
                                     model_key=f"model.{key}", trained=trained, vocab_size=vocab_size)
