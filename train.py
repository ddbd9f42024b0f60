"""``composer train.py <yaml> [key=value ...]``: register the plugin, hand over to llm-foundry.

Runs under Composer's launcher (``composer -n 8 train.py ...``, multi-node flags included) or
plain ``python train.py`` for one process. FSDP yamls run on CPU ranks too (``fsdp_backend``).
"""
import sys
from pathlib import Path

import torch
from llmfoundry.command_utils import train_from_yaml
from omegaconf import OmegaConf as om

import llmfoundry_patches
from lemon_composer.fsdp_backend import select_fsdp_version
from lemon_composer.run_checks import check_run

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 else 2)
    try:
        if not Path(sys.argv[1]).is_file():
            raise ValueError(f"{sys.argv[1]}: no such yaml file")
        cfg = om.to_container(om.merge(om.load(sys.argv[1]), om.from_cli(sys.argv[2:])), resolve=True)
        check_run(cfg)
        if select_fsdp_version(cfg, cuda=torch.cuda.is_available()):
            print("fsdp_config without CUDA: Composer's FSDP2 on gloo (FSDP_VERSION=2)", file=sys.stderr)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    llmfoundry_patches.register()
    train_from_yaml(sys.argv[1], sys.argv[2:])
