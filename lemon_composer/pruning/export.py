"""From a ``lemon_prune`` checkpoint to Hugging Face folders (``lemon-export --checkpoint``).

- default: the pruned model (the paper's "Shear" row): deterministic masks folded into the trained
  source and sliced to the exact target shape, a strict target ``LlamaForCausalLM``;
- ``--folded-source``: the source-size model with the masks' values folded in, plus
  ``lemon_shear.json`` (the kept units): the source of a fusion run with ``init: shear``, whose
  operators then select exactly the pruned model at step 0 ("LEMON-Shear").
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from torch import Tensor

from lemon_composer.pruning.model import LemonPruneModel
from lemon_composer.pruning.slice import Kept

SHEAR_FILE = "lemon_shear.json"


def is_prune_state(state: dict[str, Any]) -> bool:
    """Whether a checkpoint's ``state.model`` is a ``lemon_prune`` model's."""
    extra = state.get("_extra_state")
    return isinstance(extra, dict) and {"shape", "config"} <= set(extra) and "masks.log_alpha.layer" in state


def prune_model_from_state(state: dict[str, Tensor], source_path: str | None = None) -> LemonPruneModel:
    """The pruning model of a checkpoint: built from its own config, loaded strictly (trained source included)."""
    config = {k: v for k, v in state["_extra_state"]["config"].items() if k != "warmup"}  # warmup is derived
    if source_path is not None:
        config["source_path"] = source_path
    model = LemonPruneModel(**config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def kept_json(kept: Kept) -> str:
    return json.dumps(dataclasses.asdict(kept), sort_keys=True) + "\n"


def read_kept(folder: str | Path, *, key: str = "model.source_path") -> Kept:
    """The kept units a folded source was exported with; a clear error for any other folder."""
    path = Path(folder) / SHEAR_FILE
    if not path.is_file():
        raise ValueError(f"{key}={folder}: no {SHEAR_FILE}; init: shear fuses from a folded source, exported with "
                         f"lemon-export --checkpoint <pruning checkpoint> --folded-source")
    try:
        return Kept(**json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{key}={folder}: damaged {SHEAR_FILE} ({err})") from err
