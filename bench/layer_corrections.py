"""Cost of the per-target-layer corrections beyond the paper (norm_gains, output_gains, layer_maps) in a
fusion step, against the same step without them, at the depth ablation's LEMON-Cut setting.

    .venv/bin/python bench/layer_corrections.py [--tokens 8x128] [--repeat 3]

Source: bench/fusion_step.py's random LLaMA of SmolLM2-135M's shape; target 30 -> 20 layers, widths kept,
r 2-2-2, rope attention operator, every operator training (``trained_operators=all`` in
docs/results/redpajama_depth_all). Each variant is measured in its own fresh process (fusion_step.py's
worker); ratios are against the no-correction step measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fusion_step import SOURCE, batch, fusion_alone, fusion_step, reset_peak, timed, vm_kib  # noqa: E402

TARGET = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
              num_hidden_layers=20)
VARIANTS = {"none": {}, "gains": {"norm_gains": True, "output_gains": True},
            "gains+maps": {"norm_gains": True, "output_gains": True, "layer_maps": True}}


def worker(job: dict) -> dict:
    """Step time, fusion alone and peak RSS of one variant, in this (fresh) process."""
    from lemon_composer.models.fusion_model import LemonFusionModel
    torch.manual_seed(0)
    model = LemonFusionModel(source_path=job["source"], target=TARGET, receptive_field=dict(r_h=2, r_a=2, r_i=2),
                             attn_implementation="sdpa", source_dtype="float32", fold_norms=False,
                             shared_gamma=True, **VARIANTS[job["variant"]]).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    micro = [batch(job["tokens"], 0)]
    fusion_step(model, opt, micro)
    reset_peak()
    out = {"seconds": timed(lambda: fusion_step(model, opt, micro), job["repeat"]), "peak_gib": vm_kib("VmHWM") / 2**20}
    grads = [torch.ones_like(w) for w in {id(w): w for w in model.fused_state_dict().values()}.values()
             if w.requires_grad]
    out["fusion_alone"] = timed(lambda: fusion_alone(model, grads), job["repeat"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="8x128", help="micro-batch: sequences x length")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SOURCE)).save_pretrained(tmp)
        results = {}
        for variant in VARIANTS:
            job = json.dumps({"variant": variant, "source": tmp, "tokens": args.tokens, "repeat": args.repeat})
            proc = subprocess.run([sys.executable, __file__, "--worker", job], text=True, capture_output=True)
            if proc.returncode:
                raise RuntimeError(f"worker {variant} failed:\n{proc.stderr[-3000:]}")
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = results["none"]
    print(f"torch threads {torch.get_num_threads()}; micro-batch {args.tokens}; best of {args.repeat}")
    print(f"{'variant':11} {'fusion s':>9} {'step s':>7} {'step/none':>9} {'peak GiB':>9} {'peak/none':>9}")
    for variant, r in results.items():
        print(f"{variant:11} {r['fusion_alone']:9.2f} {r['seconds']:7.2f} {r['seconds'] / base['seconds']:9.2f} "
              f"{r['peak_gib']:9.2f} {r['peak_gib'] / base['peak_gib']:9.2f}")


if __name__ == "__main__":
    main()
