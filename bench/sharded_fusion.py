"""Replicated vs sharded fusion on data-parallel ranks: per-rank time of fusion forward + backward (best of --repeat).

    .venv/bin/composer -n 2 bench/sharded_fusion.py [--setting both|width|depth] [--repeat 3]

Runs under Composer's launcher, which sets up the process group (gloo on CPU). Per rank, times one
fusion forward and backward (what ``lemon_fuse_once`` does once per optimizer step): replicated,
every rank fuses every source layer; sharded, each rank fuses its share and one all-reduce sums
them (and one more in backward). Rank 0 prints the table; the ratio is sharded / replicated.
Shapes as in ``bench/fusion_step.py`` (SmolLM2-135M source).
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
from composer.devices import DeviceCPU
from composer.utils import dist
from transformers import LlamaConfig, LlamaForCausalLM

from fusion_step import SOURCE, fusion_model, timed


def fuse_forward_backward(model) -> None:
    layers, shared = model._fuse()
    tensors = list({id(t): t for t in (*layers.values(), *shared.values()) if t.requires_grad}.values())
    torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])
    model.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setting", default="both")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    dist.initialize_dist(DeviceCPU())
    # ranks share this machine's cores: oversubscribed OpenMP threads would measure contention, not fusion
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    folder = [tempfile.mkdtemp()] if dist.get_global_rank() == 0 else [None]
    if dist.get_global_rank() == 0:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SOURCE)).save_pretrained(folder[0])
    dist.broadcast_object_list(folder)
    model = fusion_model(args.setting, folder[0])
    times = {}
    for mode in ("replicated", "sharded"):
        model.cfg.fusion_parallel = mode
        times[mode] = timed(lambda: fuse_forward_backward(model), args.repeat, sync=dist.barrier)
    per_rank = dist.all_gather_object(times)
    if dist.get_global_rank() == 0:
        print(f"{dist.get_world_size()} ranks, {args.setting}, torch threads {torch.get_num_threads()} per rank")
        print(f"{'rank':>4} {'replicated s':>12} {'sharded s':>10} {'sharded/replicated':>19}")
        for rank, t in enumerate(per_rank):
            print(f"{rank:4d} {t['replicated']:12.2f} {t['sharded']:10.2f} {t['sharded'] / t['replicated']:19.2f}")


if __name__ == "__main__":
    main()
