"""Which of Composer's FSDP implementations a run uses, chosen before the Trainer is built.

Composer 0.32 builds FSDP1 with ``device_id=torch.cuda.current_device()``, so FSDP1 cannot run
without CUDA; its FSDP2 (``torch.distributed.fsdp.fully_shard``, chosen by Composer when
``FSDP_VERSION=2``) runs on CPU ranks over gloo. On a machine without CUDA a yaml with
``fsdp_config`` therefore runs on FSDP2 (the same yaml keys, same sharded checkpoint format: a
torch.distributed.checkpoint folder); with CUDA, Composer's default (FSDP1) is left as it is.
"""
from __future__ import annotations

import os
from typing import Any


def select_fsdp_version(cfg: dict[str, Any], *, cuda: bool) -> str | None:
    """Set ``FSDP_VERSION=2`` for an FSDP run without CUDA; return what was chosen (None: untouched).

    Raises:
        ValueError: ``FSDP_VERSION`` asks for FSDP1 on a machine without CUDA.
    """
    if not cfg.get("fsdp_config") or cuda:
        return None
    chosen = os.environ.get("FSDP_VERSION")
    if chosen not in (None, "2"):
        raise ValueError(f"fsdp_config on a machine without CUDA: FSDP_VERSION={chosen} selects Composer's FSDP1, "
                         f"which needs CUDA; unset FSDP_VERSION (FSDP2 is chosen on CPU) or set FSDP_VERSION=2")
    os.environ["FSDP_VERSION"] = "2"
    return "2"
