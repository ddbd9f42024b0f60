"""Continued pre-training under FSDP on two gloo ranks, through the real launcher (``composer -n 2``).

The CPU yaml of continued pre-training with the recipes' FSDP settings (full shard, sharded state
dict, activation checkpointing), ``lemon_mixture`` with a loader worker per rank and dynamic batch
loading. Three launches:
- the reference: uninterrupted, ``state_dict_type: full`` (one checkpoint file) and llm-foundry's
  ``hf_checkpointer`` writing an HF folder at the end;
- the same run with sharded checkpoints and ``autoresume``, killed with SIGKILL (the whole process
  group, launcher and ranks) once its first checkpoint is on disk;
- the same command again, which resumes from that checkpoint and finishes.
The resumed run must give the reference's losses and proportions, and ``lemon-export`` of the final
sharded folder, of the reference's file and the hf_checkpointer folder must hold the same weights.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from lemon_composer.checkpoints import read_checkpoint
from lemon_composer.export import main as export_main
from test_cpt import YAML, cpt_inputs
from test_multirank import COMPOSER, free_port

STEPS = 8
FSDP = ("fsdp_config={sharding_strategy: FULL_SHARD, mixed_precision: PURE, state_dict_type: sharded, "
        "activation_checkpointing: true, activation_checkpointing_reentrant: false}")


def command(overrides: list[str], save: Path, *extra: str) -> list[str]:
    return [COMPOSER, "-n", "2", "--master_port", str(free_port()), "train.py", str(YAML), *overrides,
            f"max_duration={STEPS}ba", "eval_interval=4ba", "optimizer.lr=3.0e-3", "global_train_batch_size=8",
            "device_train_microbatch_size=4", "train_loader.num_workers=1", FSDP, f"save_folder={save}",
            "save_interval=2ba", *extra]


def batch_losses(log: str) -> dict[int, float]:
    """{batch: training loss} from the console log of rank 0."""
    losses, batch = {}, None
    for line in log.splitlines():
        if m := re.match(r"\[batch=(\d+)/\d+\]", line):
            batch = int(m.group(1))
        elif (m := re.search(r"Train loss/train/total: ([\d.]+)", line)) and batch is not None:
            losses[batch] = float(m.group(1))
    return losses


def proportions(log: str) -> list[float]:
    return [float(v) for v in re.findall(r"dynamic_loading/proportion/code: ([\d.]+)", log)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("fsdp_cpt")
    overrides = cpt_inputs(root, tiny_tokenizer)

    def run(cmd: list[str]) -> str:
        proc = subprocess.run(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
        assert proc.returncode == 0, proc.stdout[-6000:]
        return proc.stdout

    reference = run(command(overrides, root / "ck_full", "fsdp_config.state_dict_type=full",
                            f"callbacks.hf_checkpointer={{save_folder: {root / 'hf'}, save_interval: {STEPS}ba, "
                            f"precision: float32}}"))
    resumable = command(overrides, root / "ck_sharded", "autoresume=true")
    with open(root / "killed.log", "w") as log:
        proc = subprocess.Popen(resumable, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        latest, deadline = root / "ck_sharded" / "latest-sharded-rank0", time.monotonic() + 600
        while proc.poll() is None and not latest.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = read_checkpoint(latest)["state"]["timestamp"]["Timestamp"]["batch"]
    resumed = run(resumable)
    return root, reference, (root / "killed.log").read_text(), resumed, killed_at


def test_kill_and_autoresume_reproduce_the_uninterrupted_run(runs):
    _, reference, killed, resumed, killed_at = runs
    ref = batch_losses(reference)
    assert sorted(ref) == list(range(1, STEPS + 1)), reference[-3000:]
    assert 0 < killed_at < STEPS, "the run was not killed in the middle"
    before, after = batch_losses(killed), batch_losses(resumed)
    assert sorted(after) == list(range(killed_at + 1, STEPS + 1)), resumed[-3000:]  # resumed, not restarted
    for batch, loss in {**before, **after}.items():
        assert loss == pytest.approx(ref[batch], abs=1e-4), batch  # the console prints 4 decimals
    assert proportions(resumed)[-1] == pytest.approx(proportions(reference)[-1], abs=1e-4)
    assert proportions(reference)[-1] != pytest.approx(0.5, abs=1e-3)  # dynamic loading did move them


def test_sharded_folder_and_single_file_export_the_same_weights(runs, tmp_path):
    root = runs[0]
    sharded, single = root / "ck_sharded" / f"ep0-ba{STEPS}", root / "ck_full" / f"ep0-ba{STEPS}-rank0.pt"
    assert (sharded / ".metadata").is_file() and len(list(sharded.glob("*.distcp"))) == 2  # one shard per rank
    for name, ckpt in (("sharded", sharded), ("single", single), ("latest", root / "ck_sharded" / "latest-sharded-rank0")):
        assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / name)]) == 0
    reference = load_file(root / "hf" / "huggingface" / f"ba{STEPS}" / "model.safetensors")  # llm-foundry's
    for name in ("sharded", "single", "latest"):
        weights = load_file(tmp_path / name / "model.safetensors")
        assert weights.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.equal(weights[key], value), (name, key)
    initial = load_file(root / "model" / "model.safetensors")
    assert not torch.equal(initial["model.norm.weight"], reference["model.norm.weight"])  # it trained


def test_damaged_checkpoints_are_named(runs, tmp_path):
    root = runs[0]
    folder = shutil.copytree(root / "ck_sharded" / f"ep0-ba{STEPS}", tmp_path / "cut")
    shard = folder / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"--checkpoint=.*cut: shard __1_0.distcp is truncated"):
        read_checkpoint(folder)
    (folder / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="damaged .metadata"):
        read_checkpoint(folder)
    single = root / "ck_full" / f"ep0-ba{STEPS}-rank0.pt"
    (tmp_path / "short.pt").write_bytes(single.read_bytes()[:5000])
    with pytest.raises(ValueError, match="short.pt: truncated or damaged"):
        read_checkpoint(tmp_path / "short.pt")


class Payload:
    """Stands for code smuggled into a checkpoint: unpickling it would call ``__reduce__``."""

    def __reduce__(self):
        return (os.system, ("echo tampered",))


def test_tampered_file_is_refused(tmp_path):
    torch.save({"state": {"model": {"w": torch.zeros(2)}}, "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil.pt: refused: .*(posix|os)\.system"):
        read_checkpoint(tmp_path / "evil.pt")


def test_fsdp1_on_cpu_is_refused_before_loading(monkeypatch):
    from lemon_composer.fsdp_backend import select_fsdp_version
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP_VERSION=1 selects Composer's FSDP1, which needs CUDA"):
        select_fsdp_version({"fsdp_config": {"state_dict_type": "sharded"}}, cuda=False)
    assert select_fsdp_version({"fsdp_config": {"state_dict_type": "full"}}, cuda=True) is None and os.environ["FSDP_VERSION"] == "1"
    monkeypatch.delenv("FSDP_VERSION")
    assert select_fsdp_version({"fsdp_config": {"sharding_strategy": "FULL_SHARD"}}, cuda=False) == "2"
    assert os.environ["FSDP_VERSION"] == "2"
