"""Run ``composer train.py <yaml> [key=value ...]`` as a user would, output shown and kept in a log."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

log = logging.getLogger(__name__)


def run_composer(yaml: Path, overrides: list[str], log_path: Path, *, echo: bool = True) -> Path:
    """Launch through Composer's own launcher; raise with the log's path when the run fails."""
    cmd = [str(Path(sys.executable).with_name("composer")), str(REPO / "train.py"), str(yaml), *overrides]
    log.info("running %s (log: %s)", " ".join(cmd[1:]), log_path)
    returncode = stream_to_log(cmd, log_path, echo=echo)
    if returncode != 0:
        raise RuntimeError(f"{yaml.name} failed (exit {returncode}); log: {log_path}")
    return log_path


def stream_to_log(cmd: list[str], log_path: Path, *, echo: bool = True) -> int:
    """Run ``cmd`` (from the repository root) with its output written to ``log_path`` line by line as it
    comes, so a long run can be followed with ``tail -f``; returns the exit code.

    The child runs with ``PYTHONUNBUFFERED=1``: a Python writing to a pipe otherwise holds its lines
    in a block buffer until it exits.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w", buffering=1) as log_file, subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            if echo:
                sys.stdout.write(line)
            log_file.write(line)
    return proc.returncode
