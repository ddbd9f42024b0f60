"""Read a Composer checkpoint for export and analysis: one file, or a sharded (distributed) folder.

- One file (``ep0-ba100-rank0.pt``, ``latest-rank0.pt``; DDP, or FSDP with ``state_dict_type: full``)
  is loaded with ``torch.load(weights_only=True)``: only tensors, plain containers and the few
  types a Composer checkpoint holds (``SAFE_GLOBALS``) are unpickled, so a tampered file cannot run
  code.
- A folder (``ep0-ba100/``, ``latest-sharded-rank0``; FSDP with ``state_dict_type: sharded``) is a
  torch.distributed.checkpoint (DCP) checkpoint: ``.metadata`` plus one ``__<rank>_0.distcp`` file
  per rank. It is read in this one process without a process group (DCP's ``no_dist``), only the
  model, the HF integration (config, tokenizer) and the timestamp, not the optimizer state.

Either way the result has Composer's layout: ``{"state": {"model": {name: tensor}, "integrations":
..., "timestamp": ...}}``. A truncated or damaged file is an error naming it.
"""
from __future__ import annotations

import datetime
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.torch_version import TorchVersion

#: The non-tensor types in a Composer checkpoint: wall-clock timestamps, the numpy RNG state, the
#: torch version of its metadata (found with torch.serialization.get_unsafe_globals_in_checkpoint;
#: the RNG state's uint32 array is rebuilt through numpy's dtype class).
SAFE_GLOBALS = [datetime.timedelta, np.ndarray, np.dtype, np.dtypes.UInt32DType, np._core.multiarray._reconstruct,
                TorchVersion]

#: What export and analysis read of a sharded checkpoint (DCP key prefixes).
SHARDED_KEYS = {"state.model", "state.integrations", "state.timestamp"}


def read_checkpoint(path: str | Path, *, flag: str = "--checkpoint") -> dict[str, Any]:
    """The checkpoint at ``path`` (file or sharded folder), weights only; ValueError naming ``flag``."""
    path = Path(path)
    if path.is_dir():
        ckpt = _read_sharded(path, flag)
    elif path.is_file():
        ckpt = _read_file(path, flag)
    else:
        raise ValueError(f"{flag}={path}: no such file or folder")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state"), dict) or "model" not in ckpt["state"]:
        raise ValueError(f"{flag}={path}: not a Composer checkpoint (no state.model)")
    return ckpt


def _read_file(path: Path, flag: str) -> dict[str, Any]:
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path)
        if not unsafe:
            raise ValueError(f"{flag}={path}: truncated or damaged checkpoint file ({str(err).splitlines()[0]})") from err
        raise ValueError(f"{flag}={path}: refused: it pickles objects that a Composer checkpoint does not hold "
                         f"({', '.join(unsafe)}); it may have been tampered with, so it is not loaded") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{flag}={path}: truncated or damaged checkpoint file ({str(err).splitlines()[0]})") from err


def _unsafe_globals(path: Path) -> list[str]:
    """The globals beyond SAFE_GLOBALS that the file would unpickle; [] when it is no torch.save zip."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a readable torch.save archive
        return []
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    return [g for g in found if g not in allowed]


class _WeightsOnlyPlanner(_EmptyStateDictLoadPlanner):
    """DCP's planner that rebuilds a state dict from the metadata (as ``dcp_to_torch_save`` does),
    restricted to ``keys``, whose non-tensor entries are unpickled weights-only (the default
    planner uses ``weights_only=False`` for them)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _read_sharded(folder: Path, flag: str) -> dict[str, Any]:
    if not (folder / ".metadata").is_file():
        raise ValueError(f"{flag}={folder}: a folder without .metadata; expected a checkpoint file (*.pt) or a "
                         f"sharded checkpoint folder written with fsdp_config.state_dict_type: sharded")
    reader = FileSystemReader(str(folder))
    try:
        metadata = reader.read_metadata()
    except Exception as err:  # noqa: BLE001 - any failure to read it means a damaged .metadata
        raise ValueError(f"{flag}={folder}: damaged .metadata ({type(err).__name__}: {err})") from err
    _check_shard_files(folder, metadata.storage_data, flag)
    # The call of torch's own dcp_to_torch_save: the planner fills ``state`` in place from the
    # metadata (the public dcp.load would fill a copy of an empty dict and return nothing).
    state: dict[str, Any] = {}
    try:
        _load_state_dict(state, storage_reader=reader, planner=_WeightsOnlyPlanner(keys=SHARDED_KEYS), no_dist=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{flag}={folder}: refused: a shard pickles objects that a Composer checkpoint does not "
                         f"hold; it may have been tampered with ({str(err).splitlines()[0]})") from err
    except Exception as err:  # noqa: BLE001 - DCP wraps per-rank read failures in its own exception types
        raise ValueError(f"{flag}={folder}: damaged sharded checkpoint ({type(err).__name__}: {err})") from err
    return state


def _check_shard_files(folder: Path, storage: dict[Any, Any], flag: str) -> None:
    """Every shard file that ``.metadata`` points into exists and is long enough (before reading)."""
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = folder / name
        if not shard.is_file():
            raise ValueError(f"{flag}={folder}: shard {name} is missing")
        if shard.stat().st_size < size:
            raise ValueError(f"{flag}={folder}: shard {name} is truncated ({shard.stat().st_size} of at least "
                             f"{size} bytes)")
