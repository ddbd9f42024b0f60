"""GPU check: cost of one fused LEMON optimizer step at LLaMA-2-7B -> LEMON-1.3B sizes (bf16).

    .venv/bin/python bench/gpu_check.py [--layers-source 4] [--layers-target 3] [--seq-len 4096]
                                        [--micro 1] [--steps 3] [--json out.json]
    .venv/bin/python bench/gpu_check.py --device cpu --tiny   # debugging: tiny fp32 shapes on the CPU

Needs a CUDA GPU (exits 2 without one, unless ``--device cpu --tiny``). Parts, each timed as the
median of ``--steps`` runs after a warm-up, one optimizer step = 4 micro-batches of micro x seq_len:
  fused   one LemonFusionModel step with fuse-once (fuse, 4 x (target + teacher + loss), backward, AdamW)
  plain   one step of a plain LlamaForCausalLM of the target's size (gradient checkpointing, AdamW)
  teacher 4 teacher forwards (the frozen source, no grad)
  fusion  the fusion alone (fused_state_dict forward + backward into the operators), once
Ratios: fused / (plain + teacher + fusion) is the overhead of running the parts together (~1 is
ideal); fused / plain is what fusion training costs against training the target directly.
Peak memory (torch.cuda.max_memory_allocated, reset before each part) is also extrapolated to the
full 32 -> 24 layer model by a per-layer linear fit through a second run at doubled layer counts.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lemon_composer.models.fusion_model import LemonFusionModel
from lemon_composer.models.target import resolve_attn_implementation

N_MICRO = 4
FULL = (32, 24)  # LLaMA-2-7B layers -> LEMON-1.3B layers
NO_GPU = "bench/gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False); CPU CI never runs it"
SIZES = {False: ({"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "vocab_size": 32000},
                 {"hidden_size": 2048, "intermediate_size": 5504, "num_attention_heads": 16}),
         True: ({"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "vocab_size": 101},
                {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 2})}
Result = dict[str, tuple[float, float | None]]  # part -> (median seconds, peak bytes or None on CPU)


def attn_for(tiny: bool) -> str:
    return "sdpa" if tiny else resolve_attn_implementation("auto")  # auto: flash-attn when installed


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def measure(fn: Callable[[], None], steps: int, device: str) -> tuple[float, float | None]:
    """Median seconds of ``steps`` runs after a warm-up, and the peak memory over those runs."""
    sync: Callable[[], None] = torch.cuda.synchronize if device == "cuda" else lambda: None
    fn()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), (float(torch.cuda.max_memory_allocated()) if device == "cuda" else None)


def save_source(cfg: LlamaConfig, path: str, device: str, dtype: torch.dtype) -> None:
    """A random LLaMA (N(0, 0.02), norms 1) built on the meta device, filled in place and saved."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02)
    model.save_pretrained(path)


def run_parts(args: argparse.Namespace, layers_source: int, layers_target: int, steps: int) -> Result:
    """Build source, fusion model and plain target at these layer counts and measure every part."""
    device, dtype = args.device, torch.float32 if args.tiny else torch.bfloat16
    src_sizes, tgt_sizes = SIZES[args.tiny]
    src_cfg = LlamaConfig(**src_sizes, num_hidden_layers=layers_source, num_key_value_heads=None,
                          max_position_embeddings=max(4096, args.seq_len), tie_word_embeddings=False)
    attn = attn_for(args.tiny)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    ids = [torch.randint(0, src_cfg.vocab_size, (args.micro, args.seq_len), device=device) for _ in range(N_MICRO)]
    with tempfile.TemporaryDirectory() as tmp:
        save_source(src_cfg, tmp, device, dtype)
        free(device)
        model = LemonFusionModel(source_path=tmp, target={**tgt_sizes, "num_hidden_layers": layers_target},
                                 receptive_field={"r_h": 2, "r_a": 2, "r_i": 2},
                                 source_dtype="float32" if args.tiny else "bfloat16",
                                 attn_implementation=attn, activation_checkpointing=True, loss_chunk_tokens=1024)
    model.to(device)  # the source (not a submodule) follows at the first fusion (_place_source)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def fused_step() -> None:
        model.train()
        model.begin_step(N_MICRO)
        for x in ids:
            batch = {"input_ids": x}
            with autocast:
                loss = model.loss(model(batch), batch)["total"]
            (loss / N_MICRO).backward()
        model.end_step()
        opt.step()
        opt.zero_grad()

    def teacher() -> None:
        with torch.no_grad(), autocast:
            for x in ids:
                model.source.model(input_ids=x, use_cache=False)

    def fusion_alone() -> None:
        ws = list({id(w): w for w in model.fused_state_dict().values() if w.requires_grad}.values())
        torch.autograd.backward(ws, [torch.ones_like(w) for w in ws])
        opt.zero_grad()

    out: Result = {"fused": measure(fused_step, steps, device), "teacher": measure(teacher, steps, device),
                   "fusion": measure(fusion_alone, steps, device)}
    tgt_cfg = model.plan.target_config(src_cfg)
    del model, opt, fused_step, teacher, fusion_alone
    free(device)
    tgt_cfg._attn_implementation = attn
    with torch.device(device):
        plain = LlamaForCausalLM._from_config(tgt_cfg, torch_dtype=dtype)
    plain.config.use_cache = False
    plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plain.train()
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-5)

    def plain_step() -> None:
        for x in ids:
            with autocast:
                loss = plain(input_ids=x, labels=x).loss
            (loss / N_MICRO).backward()
        plain_opt.step()
        plain_opt.zero_grad()

    out["plain"] = measure(plain_step, steps, device)
    del plain, plain_opt, plain_step
    free(device)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers-source", type=int, default=4)
    p.add_argument("--layers-target", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=None, help="default 4096 (128 with --tiny)")
    p.add_argument("--micro", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per part (median)")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: debugging only, with --tiny")
    p.add_argument("--tiny", action="store_true", help="debugging: hidden 64, ffn 96, 4 heads, vocab 101, fp32, sdpa")
    args = p.parse_args()
    if args.device == "cpu" and not args.tiny:
        p.error("--device cpu is a debugging option for --tiny shapes only")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        sys.exit(2)
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny shapes: extra threads only add OpenMP sync (seconds on a busy CPU)
    args.seq_len = args.seq_len or (128 if args.tiny else 4096)
    ls, lt = args.layers_source, args.layers_target
    ls2, lt2 = (2 * ls, 2 * lt) if 2 * ls <= FULL[0] else (ls // 2, max(1, lt // 2))
    res = run_parts(args, ls, lt, args.steps)
    fit = run_parts(args, ls2, lt2, 1) if (ls, lt) != FULL else res  # memory only: the fit's second point
    device_name, attn = torch.cuda.get_device_name() if args.device == "cuda" else "cpu", attn_for(args.tiny)
    print(f"\n{device_name}, attn={attn}, {ls} -> {lt} layers, {N_MICRO} micro-batches x {args.micro} x "
          f"{args.seq_len} tokens per step, median of {args.steps}{', TINY shapes (debug)' if args.tiny else ''}")
    if lt * FULL[0] != ls * FULL[1]:
        print(f"note: {ls} -> {lt} is not the 32 -> 24 ratio; the full-model column follows the source's layers")
    gib = 2.0 ** 30
    rows, fmt = {}, lambda v: "n/a" if v is None else f"{v:.2f}"
    print(f"{'part':<8} {'ms':>10} {'peak GiB':>9} {'GiB @32->24 (per-layer linear fit, ' + f'{ls}->{lt} & {ls2}->{lt2})':>44}")
    for part, (sec, mem) in res.items():
        full = None
        if mem is not None and (mem2 := fit[part][1]) is not None:
            full = (mem if (ls, lt) == FULL else mem + (mem2 - mem) / (ls2 - ls) * (FULL[0] - ls)) / gib
        rows[part] = {"ms": sec * 1e3, "peak_gib": None if mem is None else mem / gib, "peak_gib_full": full}
        print(f"{part:<8} {sec * 1e3:>10.1f} {fmt(rows[part]['peak_gib']):>9} {fmt(full):>44}")
    t = {k: v[0] for k, v in res.items()}
    ratios = {"fused/(plain+teacher+fusion)": t["fused"] / (t["plain"] + t["teacher"] + t["fusion"]),
              "fused/plain": t["fused"] / t["plain"]}
    for name, value in ratios.items():
        print(f"{name:<30} {value:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**vars(args), "device_name": device_name, "attn_implementation": attn, "n_micro": N_MICRO,
                       "fit_layers": [ls2, lt2], "parts": rows, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
