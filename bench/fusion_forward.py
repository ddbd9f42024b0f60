"""Block operators vs the dense Kronecker product they stand for (Eq. 3).

    .venv/bin/python bench/fusion_forward.py [--device cpu|cuda]

Ratio against a baseline measured in the same run: ``block_rows`` (a matmul on a reshaped view)
vs multiplying by the dense ``b ⊗ I_r``. Whole fusion steps: ``bench/fusion_step.py``.
"""
from __future__ import annotations

import argparse
import time

import torch

from lemon_composer.fusion.operators import block_rows


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def bench_block(device: str) -> list[tuple[str, float, float]]:
    rows = []
    for n1, n2, m, r in ((1536, 1024, 576, 2), (1536, 1024, 576, 8), (4096, 2048, 1024, 2)):
        b = torch.randn(n2 // r, n1 // r, device=device)
        w = torch.randn(n1, m, device=device)
        dense = torch.kron(b, torch.eye(r, device=device))
        t_block = timed(lambda: block_rows(b, w, r), 5)
        t_dense = timed(lambda: dense @ w, 5)
        rows.append((f"block_rows {n2}x{n1}, r={r}", t_block, t_dense))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = p.parse_args().device
    print(f"device: {device}, torch threads: {torch.get_num_threads()}")
    print(f"{'case':<42} {'ours ms':>9} {'baseline ms':>12} {'ratio':>6}")
    for name, ours, base in bench_block(device):
        print(f"{name:<42} {ours * 1e3:>9.2f} {base * 1e3:>12.2f} {base / ours:>6.2f}  (dense Kronecker / block)")


if __name__ == "__main__":
    main()
