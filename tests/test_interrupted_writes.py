"""Data prep killed mid-write (real subprocesses, SIGKILL and SIGTERM): the user finds the old output
or the complete new one, and no temporary folder once the next run has started."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import random_docs, write_jsonl
from lemon_composer.atomic import sweep_stale

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> Path:
    """Enough text that tokenizing takes a few seconds on one worker."""
    root = tmp_path_factory.mktemp("big") / "corpus"
    rng = random.Random(3)
    for domain in ("prose", "more"):
        write_jsonl(root / domain / "all.jsonl", random_docs(rng, 4000))
    return root


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small") / "corpus"
    write_jsonl(root / "prose" / "all.jsonl", random_docs(random.Random(4), 60))
    return root


class Prep:
    """A data prep CLI process; its output goes to a file (an unread pipe would fill up and block it)."""

    def __init__(self, corpus: Path, out: Path, tok: Path, *extra: str) -> None:
        self.log = out.parent / f"prep-{time.monotonic_ns()}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "data_prep" / "jsonl_to_mds.py"), "--input", str(corpus), "--out",
                 str(out), "--tokenizer", str(tok), "--seq-len", "32", "--num-workers", "1", "--chunk-mb", "0.05",
                 *extra], stdout=log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    @property
    def output(self) -> str:
        return self.log.read_text()


prep = Prep


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def kill_mid_write(run: Prep, out: Path, sig: int) -> None:
    """Wait until the run writes shards into its temporary folder, then send ``sig``."""
    deadline = time.time() + 120
    while time.time() < deadline and run.proc.poll() is None:
        tmp = [p for p in out.parent.glob(f".{out.name}.tmp-*") if any((p / "train").rglob("*.mds"))]
        if tmp:
            run.proc.send_signal(sig)
            return
        time.sleep(0.02)
    raise AssertionError(f"the run never wrote a shard (exit {run.proc.poll()}): {run.output[-2000:]}")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_overwrite_keeps_the_old_output_and_the_next_run_sweeps(big_corpus, small_corpus, tiny_tokenizer,
                                                                       tmp_path, sig):
    out = tmp_path / "mds"
    out.mkdir()
    old_manifest = '{"the": "previous output"}'
    (out / "manifest.json").write_text(old_manifest)
    second = prep(big_corpus, out, tiny_tokenizer, "--overwrite")
    kill_mid_write(second, out, sig)
    code = second.wait(120)
    stderr = second.output
    assert (out / "manifest.json").read_text() == old_manifest          # the old output, whole
    if sig == signal.SIGTERM:                                            # cleaned up like Ctrl-C
        assert code == 130 and "Traceback" not in stderr and "interrupted: data prep" in stderr
        assert leftovers(out) == []
    else:
        assert code == -signal.SIGKILL and len(leftovers(out)) == 1      # a dead writer's temporary folder
    third = prep(small_corpus, out, tiny_tokenizer, "--overwrite", "--seq-len", "48")
    assert third.wait(300) == 0, third.output
    assert leftovers(out) == [] and json.loads((out / "manifest.json").read_text())["seq_len"] == 48


def test_a_dead_writers_backup_is_restored(tmp_path):
    """Killed between moving the old output aside and moving the new one in: the old comes back."""
    out = tmp_path / "mds"
    (tmp_path / ".mds.old-999999999-0123abcd").mkdir()
    (tmp_path / ".mds.old-999999999-0123abcd" / "manifest.json").write_text("old")
    (tmp_path / ".mds.tmp-999999999-4567cdef").mkdir()
    sweep_stale(out)
    assert (out / "manifest.json").read_text() == "old" and leftovers(out) == []


def test_a_live_writers_temporary_folder_is_left_alone(tmp_path):
    import os
    live = tmp_path / f".mds.tmp-{os.getpid()}-89abcdef"
    live.mkdir()
    sweep_stale(tmp_path / "mds")
    assert live.exists()


def test_every_document_shorter_than_a_row_is_an_error(tmp_path, tiny_tokenizer):
    write_jsonl(tmp_path / "corpus" / "a" / "x.jsonl", ["short text"] * 5)
    proc = prep(tmp_path / "corpus", tmp_path / "mds", tiny_tokenizer, "--seq-len", "4096")
    assert proc.wait(120) == 2
    assert "--seq-len=4096: no domain has a single full train row" in proc.output
    assert not (tmp_path / "mds").exists() and leftovers(tmp_path / "mds") == []
