"""Check the planner's memory model against the peak RSS of real fusion steps on the CPU.

    .venv/bin/python bench/planner_check.py [--tight-malloc]

The source is a random LLaMA of SmolLM2-135M's shape (saved once with ``save_pretrained``), fused
into several targets (both ways, depth only, width only; 1-2 micro-batches; one with activation
checkpointing). Each case runs in a fresh subprocess: build ``LemonFusionModel`` (source loaded),
take the RSS as baseline, then run optimizer steps the way Composer with ``lemon_fuse_once`` does
(``begin_step``, zero_grad, per micro-batch forward / loss / backward, AdamW step, ``end_step``).
Measured: the peak RSS above the baseline (VmHWM, reset before each step through
/proc/self/clear_refs) of step 2, the steady state in which AdamW's moments exist (step 1's peak is
shown too). Planned: the planner's components allocated during a step, i.e. its total less the
source and the operators (both in the baseline); ``plan_run(..., device="cpu")``.
The measured peak also holds what glibc keeps of freed memory (heap retention, per-thread arenas)
and the library pages first touched by step 1; ``--tight-malloc`` removes most of the former.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fusion_step import SOURCE  # the benches share one source shape (SmolLM2-135M)
SEQ = 128
FULL = dict(hidden_size=384, intermediate_size=1024, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=20)
DEPTH = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
             num_hidden_layers=20)
WIDTH = dict(FULL, num_hidden_layers=30)
# name: (target, device_train_microbatch_size, micro-batches per step, more model keys)
CASES = {
    "30x576 -> 20x384, mb 4 x1": (FULL, 4, 1, {}),
    "30x576 -> 20x384, mb 4 x2": (FULL, 4, 2, {}),
    "30x576 -> 20x384, mb 8 x1": (FULL, 8, 1, {}),
    "30x576 -> 20x384, ckpt, mb 2 x2": (FULL, 2, 2, {"activation_checkpointing": True}),
    "depth only -> 20x576, mb 4 x1": (DEPTH, 4, 1, {}),
    "width only -> 30x384, mb 4 x2": (WIDTH, 4, 2, {}),
}
STEPS = 2


def model_cfg(source_path: str, name: str) -> dict:
    target, _, _, extra = CASES[name]
    return dict(name="lemon_fusion", source_path=source_path, target=target,
                receptive_field=dict(r_h=2, r_a=2, r_i=2), init="cut", source_dtype="float32",
                attn_implementation="sdpa", **extra)


def rss(field: str) -> int:
    """VmRSS or VmHWM of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def release() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(source_path: str, name: str) -> dict:
    """Child process: peak RSS increase of each step over the built model's RSS."""
    import torch

    from lemon_composer.models.fusion_model import LemonFusionModel

    torch.manual_seed(0)
    _, micro, n_micro, _ = CASES[name]
    cfg = model_cfg(source_path, name)
    model = LemonFusionModel(**{k: v for k, v in cfg.items() if k != "name"})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = [{"input_ids": (ids := torch.randint(0, SOURCE["vocab_size"], (micro, SEQ))),
                "attention_mask": torch.ones_like(ids)} for _ in range(n_micro)]
    release()
    base = rss("VmRSS")
    peaks, times = [], []
    for _ in range(STEPS):
        release()
        Path("/proc/self/clear_refs").write_text("5")    # reset VmHWM to the current RSS
        start = time.perf_counter()
        model.begin_step(n_micro)
        opt.zero_grad(set_to_none=True)
        for batch in batches:
            out = model(batch)
            model.loss(out, batch)["total"].backward()
            del out
        opt.step()
        model.end_step()
        times.append(time.perf_counter() - start)
        peaks.append(rss("VmHWM") - base)
    return {"peaks": peaks, "seconds": times}


def planned(source_path: str, name: str) -> float:
    """The planner's bytes allocated during a step (total less the source and the operators)."""
    from lemon_composer.planner import plan_run, source_config

    _, micro, n_micro, _ = CASES[name]
    cfg = {"model": model_cfg(source_path, name), "algorithms": {"lemon_fuse_once": {}}, "max_seq_len": SEQ,
           "precision": "fp32", "device_train_microbatch_size": micro, "global_train_batch_size": micro * n_micro}
    est = plan_run(cfg, gpus=1, source_cfg=source_config(source_path), device="cpu")
    return est.total_bytes - est.memory["source"] - est.memory["operators (fp32)"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs=2, metavar=("SOURCE", "CASE"), help=argparse.SUPPRESS)
    p.add_argument("--tight-malloc", action="store_true",
                   help="run the steps with MALLOC_MMAP_THRESHOLD_=65536: glibc then returns every freed tensor "
                        "to the OS at once, so RSS follows the live tensors (no heap retention)")
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    gib = 2**30
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SOURCE)).save_pretrained(tmp)
        print(f"{'case (source 30x576, seq ' + str(SEQ) + ')':<34}{'planned GiB':>12}{'measured GiB':>13}"
              f"{'error %':>9}{'step 1 GiB':>11}{'s/step':>8}")
        for name in CASES:
            env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if args.tight_malloc else {})}
            run = subprocess.run([sys.executable, __file__, "--child", tmp, name], capture_output=True, text=True,
                                 env=env)
            if run.returncode:
                raise RuntimeError(f"{name}: {run.stderr[-3000:]}")
            m = json.loads(run.stdout.strip().splitlines()[-1])
            plan, meas = planned(tmp, name), m["peaks"][-1]
            print(f"{name:<34}{plan / gib:>12.3f}{meas / gib:>13.3f}{100 * (plan - meas) / meas:>+9.1f}"
                  f"{m['peaks'][0] / gib:>11.3f}{m['seconds'][-1]:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
