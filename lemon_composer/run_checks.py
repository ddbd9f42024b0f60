"""Checks of a resolved ``composer train.py`` config that llm-foundry does not make, before anything loads.

- the model folder a run names (``model.source_path`` for fusion, ``model.pretrained_model_name_or_path``
  for continued pre-training) is an existing local folder: otherwise transformers reports a missing
  folder as an invalid hub repo id;
- every data folder of our loaders (``lemon_domains``, ``lemon_mixture``) was made with that
  model's tokenizer, whatever ``tokenizer.name`` says (``check_data_matches_model``); for a model
  trained from scratch (``pretrained: false``) the data's vocabulary must fit its ``vocab_size``;
- a fusion ``model:`` section is parsed (``FuseConfig``) and its shapes planned against the source's
  config.json, which llm-foundry would only do after the tokenizer and the data loaders;
- the arguments of our callbacks and algorithms have the names and types of their constructors, and
  the constructors' own value checks run (``config_types``); the fusion-only ones need a fusion model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from llmfoundry import registry

from lemon_composer.config_types import check_arguments
from lemon_composer.data.manifest import check_data_matches_model, read_manifest
from lemon_composer.fusion.plan import FusionPlan
from lemon_composer.models.fuse_config import FuseConfig
from lemon_composer.sources.load import read_source_config
from llmfoundry_patches import COMPONENTS

OUR_LOADERS = ("lemon_domains", "lemon_mixture")
MODEL_FOLDER_KEYS = {"lemon_fusion": "source_path", "lemon_prune": "source_path",
                     "hf_causal_lm": "pretrained_model_name_or_path"}
FUSION_ONLY = ("lemon_fuse_once", "lemon_fusion_stages", "lemon_hf_export")


def _loaders(cfg: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(yaml key, loader config) of every train / eval loader."""
    out = [(key, cfg[key]) for key in ("train_loader", "eval_loader") if isinstance(cfg.get(key), dict)]
    evals = cfg.get("eval_loaders")
    if isinstance(evals, list):
        out += [(f"eval_loaders[{i}]", loader) for i, loader in enumerate(evals) if isinstance(loader, dict)]
    return out


def check_components(cfg: dict[str, Any]) -> None:
    """Our callbacks and algorithms: known keys of the right types, values their constructors accept."""
    fusion = (cfg.get("model") or {}).get("name") == "lemon_fusion"
    for section, reg in (("callbacks", registry.callbacks), ("algorithms", registry.algorithms)):
        entries = cfg.get(section) or {}
        if not isinstance(entries, dict):
            raise ValueError(f"{section}: expected a mapping of name -> arguments, got {entries!r}")
        for name, args in entries.items():
            cls = COMPONENTS[reg].get(name)
            if cls is None:
                continue  # Composer's and llm-foundry's own: their builders check them
            if name in FUSION_ONLY and not fusion:
                raise ValueError(f"{section}.{name}: works only with model.name: lemon_fusion, got "
                                 f"{(cfg.get('model') or {}).get('name')!r}")
            if args is not None and not isinstance(args, dict):
                raise ValueError(f"{section}.{name}={args!r}: expected a mapping of arguments")
            check_arguments(cls, args, f"{section}.{name}")
            cls(**(args or {}))  # the constructor's value checks (cheap: nothing is loaded)


def check_fusion_model(cfg: dict[str, Any]) -> None:
    """Parse and plan a ``lemon_fusion`` model section from the source's config.json alone."""
    model = {k: v for k, v in cfg["model"].items() if k != "name"}
    fuse = FuseConfig.from_yaml(model)
    FusionPlan.build(read_source_config(fuse.source_path), fuse.target, fuse.receptive_field,
                     shared_gamma=fuse.shared_gamma, attention=fuse.attention_operator, fold_norms=fuse.fold_norms)
    if fuse.fusion_parallel == "sharded" and "lemon_fuse_once" not in (cfg.get("algorithms") or {}):
        raise ValueError("model.fusion_parallel=sharded fuses with a collective: add the lemon_fuse_once algorithm "
                         "(algorithms: {lemon_fuse_once: {}})")


def check_run(cfg: dict[str, Any]) -> None:
    """Raise ValueError naming the yaml key for a missing model folder, data of another vocabulary,
    a bad fusion model section, or bad arguments of our callbacks and algorithms."""
    check_components(cfg)
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
    if model.get("name") == "lemon_fusion":
        check_fusion_model(cfg)
