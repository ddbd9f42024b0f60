"""``composer train.py <yaml> [key=value ...]``: register the plugin, hand over to llm-foundry.

Runs under Composer's launcher (``composer -n 8 train.py ...``, multi-node flags included) or
plain ``python train.py`` for one process.
"""
import sys
from pathlib import Path

from llmfoundry.command_utils import train_from_yaml
from omegaconf import OmegaConf as om

import llmfoundry_patches
from lemon_composer.run_checks import check_run

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 else 2)
    try:
        if not Path(sys.argv[1]).is_file():
            raise ValueError(f"{sys.argv[1]}: no such yaml file")
        check_run(om.to_container(om.merge(om.load(sys.argv[1]), om.from_cli(sys.argv[2:])), resolve=True))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    llmfoundry_patches.register()
    train_from_yaml(sys.argv[1], sys.argv[2:])
