"""Cost of a LEMON fusion step against a plain training step of the target, at SmolLM2-135M shapes.

    .venv/bin/python bench/fusion_step.py [--tokens 8x128] [--micro-tokens 2x128] [--settings depth,width,both]

Source: a random LLaMA of SmolLM2-135M's shape (576 / 1536 / 9 heads, 3 KV / 30 layers, vocab 49152,
tied). Settings: depth (30 -> 20 layers, widths kept, dimension operators frozen at r = 64 as in
``yamls/ablation/smollm2_depth.yaml``), width (576 -> 384, ffn 1024, 6 heads, r = 2, attention operator rope), both (both).
Every number comes from its own fresh process, so peak RSS (VmHWM, reset before the measured
step) belongs to that step alone. Ratios, each against baselines measured in the same run:

1. full fusion step / (plain target step + teacher forward + fusion alone): what fusing costs
   beyond its parts (issue 10 asks <= 1.3);
2. fusion alone (forward + backward of the fused weights) / plain target step (depth: <= 10%);
3. peak RSS of a fusion step / peak RSS of a plain target step (<= 2);
4. for the last setting, fusion alone, step time and peak RSS with the RoPE-equivariant attention
   operator (default) against the paper's block form (rope / block);
5. step time with k micro-batches per optimizer step against k x the 1-micro-batch step minus
   (k - 1) x fusion alone: with fusion paid once per step the measured time stays below it.

Runs the code it finds on the import path: with ``PYTHONPATH=<older checkout>`` it measures that
checkout (one that fuses on every forward), which is how docs/performance.md's "before" column
was taken.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SOURCE = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
              num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
SETTINGS = {
    "depth": (dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                   num_hidden_layers=20), dict(r_h=64, r_a=32, r_i=64), True),
    "width": (dict(hidden_size=384, intermediate_size=1024, num_attention_heads=6, num_key_value_heads=2,
                   num_hidden_layers=30), dict(r_h=2, r_a=2, r_i=2), False),
    "both": (dict(hidden_size=384, intermediate_size=1024, num_attention_heads=6, num_key_value_heads=2,
                  num_hidden_layers=20), dict(r_h=2, r_a=2, r_i=2), False),
}


def vm_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS


def timed(fn: Callable[[], None], repeat: int, sync: Callable[[], None] = lambda: None) -> float:
    """Best of ``repeat`` runs after a warm-up (the least disturbed by other work on the machine)."""
    fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def batch(tokens: str, seed: int) -> dict[str, torch.Tensor]:
    b, t = map(int, tokens.split("x"))
    ids = torch.randint(0, SOURCE["vocab_size"], (b, t), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def fusion_model(setting: str, folder: str, attention: str = "rope"):
    from lemon_composer.models.fusion_model import LemonFusionModel
    target, rf, frozen_dims = SETTINGS[setting]
    model = LemonFusionModel(source_path=folder, target=target, receptive_field=rf, attn_implementation="sdpa",
                             source_dtype="float32", attention_operator=attention)
    if frozen_dims:  # the depth-only ablation trains gamma only (optimizer.disable_grad)
        for name, p in model.named_parameters():
            p.requires_grad_("gamma" in name)
    return model.train()


def fusion_step(model, opt, microbatches: list[dict]) -> None:
    """One optimizer step as Composer runs it (fuse once per step when the model supports it)."""
    amortised = hasattr(model, "begin_step")
    if amortised:
        model.begin_step(len(microbatches))
    for mb in microbatches:
        (model.loss(model(mb), mb)["total"] / len(microbatches)).backward()
    if amortised:
        model.end_step()
    opt.step()
    opt.zero_grad(set_to_none=True)


def fusion_alone(model, grads: list[torch.Tensor]) -> None:
    """Fuse and back-propagate ``grads`` (made once: in a step they come from the target's backward)."""
    weights = [w for w in {id(w): w for w in model.fused_state_dict().values()}.values() if w.requires_grad]
    torch.autograd.backward(weights, grads)
    model.zero_grad(set_to_none=True)


def worker(job: dict) -> dict:
    """One measurement in this (fresh) process."""
    torch.manual_seed(0)
    folder = job["source"]
    if job["what"] == "plain":
        target, _, _ = SETTINGS[job["setting"]]
        cfg = LlamaConfig(**{**SOURCE, **target}, attn_implementation="sdpa")
        model = LlamaForCausalLM(cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        b = batch(job["tokens"], 0)

        def step():
            model(input_ids=b["input_ids"], labels=b["labels"]).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        step()
        before = vm_kib("VmRSS")
        reset_peak()
        seconds = timed(step, job["repeat"])
        return {"seconds": seconds, "peak_gib": vm_kib("VmHWM") / 2**20, "step_gib": (vm_kib("VmHWM") - before) / 2**20}
    model = fusion_model(job["setting"], folder, job.get("attention", "rope"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    micro = [batch(job["tokens"], i) for i in range(job.get("micro", 1))]
    fusion_step(model, opt, micro)
    before = vm_kib("VmRSS")
    reset_peak()
    out = {"seconds": timed(lambda: fusion_step(model, opt, micro), job["repeat"])}
    out["peak_gib"], out["step_gib"] = vm_kib("VmHWM") / 2**20, (vm_kib("VmHWM") - before) / 2**20
    if job["what"] == "fusion":
        ids = micro[0]["input_ids"]
        with torch.no_grad():
            out["teacher"] = timed(lambda: model.source(input_ids=ids), job["repeat"])  # logits included
        grads = [torch.ones_like(w) for w in {id(w): w for w in model.fused_state_dict().values()}.values()
                 if w.requires_grad]
        out["fusion_alone"] = timed(lambda: fusion_alone(model, grads), job["repeat"])
    return out


def run(job: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    if proc.returncode:
        raise RuntimeError(f"worker {job} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="8x128", help="micro-batch for the ratio table: sequences x length")
    p.add_argument("--micro-tokens", default="2x128", help="micro-batch for the micro-batches-per-step table")
    p.add_argument("--settings", default="depth,width,both")
    p.add_argument("--micro", default="1,2,4,8", help="micro-batches per optimizer step to time")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SOURCE)).save_pretrained(tmp)
        print(f"torch threads {torch.get_num_threads()}; micro-batch {args.tokens}; best of {args.repeat}")
        print(f"{'setting':8} {'plain s':>8} {'teacher s':>9} {'fusion s':>9} {'step s':>7} {'step/parts':>10} "
              f"{'fusion/plain':>12} {'peak GiB':>9} {'plain GiB':>9} {'peak/plain':>10}")
        for setting in args.settings.split(","):
            common = {"setting": setting, "source": tmp, "tokens": args.tokens, "repeat": args.repeat}
            plain, fused = run({**common, "what": "plain"}), run({**common, "what": "fusion"})
            parts = plain["seconds"] + fused["teacher"] + fused["fusion_alone"]
            print(f"{setting:8} {plain['seconds']:8.2f} {fused['teacher']:9.2f} {fused['fusion_alone']:9.2f} "
                  f"{fused['seconds']:7.2f} {fused['seconds'] / parts:10.2f} "
                  f"{fused['fusion_alone'] / plain['seconds']:12.2%} {fused['peak_gib']:9.2f} "
                  f"{plain['peak_gib']:9.2f} {fused['peak_gib'] / plain['peak_gib']:10.2f}")
        setting = args.settings.split(",")[-1]
        common = {"setting": setting, "source": tmp, "tokens": args.tokens, "repeat": args.repeat}
        by_form = {a: run({**common, "what": "fusion", "attention": a}) for a in ("block", "rope")}
        print(f"\nattention operator ({setting}): the paper's block form against the RoPE-equivariant one")
        print(f"{'form':6} {'fusion s':>9} {'step s':>7} {'peak GiB':>9}")
        for form, r in by_form.items():
            print(f"{form:6} {r['fusion_alone']:9.2f} {r['seconds']:7.2f} {r['peak_gib']:9.2f}")
        print(f"{'ratio':6} {by_form['rope']['fusion_alone'] / by_form['block']['fusion_alone']:9.2f} "
              f"{by_form['rope']['seconds'] / by_form['block']['seconds']:7.2f} "
              f"{by_form['rope']['peak_gib'] / by_form['block']['peak_gib']:9.2f}")
        common = {"setting": setting, "source": tmp, "tokens": args.micro_tokens, "repeat": args.repeat}
        one = run({**common, "what": "fusion", "micro": 1})
        print(f"\nmicro-batches per optimizer step ({setting}, {args.micro_tokens} each); fusion alone "
              f"{one['fusion_alone']:.2f} s, 1-micro-batch step {one['seconds']:.2f} s")
        print(f"{'k':>3} {'step s':>7} {'k*step1 - (k-1)*fusion':>23} {'ratio':>6}")
        for k in map(int, args.micro.split(",")):
            t = one["seconds"] if k == 1 else run({**common, "what": "step", "micro": k})["seconds"]
            bound = k * one["seconds"] - (k - 1) * one["fusion_alone"]
            print(f"{k:3d} {t:7.2f} {bound:23.2f} {t / bound:6.2f}")


if __name__ == "__main__":
    main()
