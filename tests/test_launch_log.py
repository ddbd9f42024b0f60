"""Logs of the runs the demo and the ablation runner launch fill line by line while the run goes on."""
from __future__ import annotations

import sys
import threading
import time

from lemon_composer.launch import stream_to_log


def test_log_fills_while_the_child_runs(tmp_path):
    log, go = tmp_path / "run.log", tmp_path / "go"
    child = (f"import pathlib, time\nprint('step 1 of 2')\n"
             f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.05)\nprint('step 2 of 2')\n")
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("rc", stream_to_log(
        [sys.executable, "-c", child], log, echo=False)))
    runner.start()
    deadline = time.time() + 60
    while "step 1 of 2" not in (log.read_text() if log.exists() else "") and time.time() < deadline:
        time.sleep(0.05)
    seen_while_running = log.read_text()
    go.touch()
    runner.join(60)
    assert seen_while_running == "step 1 of 2\n"       # the child was still waiting: nothing buffered
    assert log.read_text() == "step 1 of 2\nstep 2 of 2\n" and result["rc"] == 0
