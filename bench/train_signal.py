"""Cost of dynamic loading's ``signal: train`` bookkeeping against the fusion loss it reads from.

    .venv/bin/python bench/train_signal.py [--tokens 8x128] [--domains 7] [--repeat 20]

Per micro-batch the callback sums the per-token stats of Eq. 4's loss by domain (``DomainExcess.add``);
per batch it all-reduces the (3, domains) sums (a no-op in one process). The baseline is the distill
loss of the same micro-batch at SmolLM2-135M's sizes (hidden 576, vocab 49152), forward only, in the
same run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lemon_composer.callbacks.train_excess import DomainExcess
from lemon_composer.models.distill_loss import distill_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fusion_step import SOURCE, timed  # noqa: E402

HIDDEN, VOCAB = SOURCE["hidden_size"], SOURCE["vocab_size"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="8x128", help="micro-batch: sequences x length")
    p.add_argument("--domains", type=int, default=7)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    b, t = map(int, args.tokens.split("x"))
    g = torch.Generator().manual_seed(0)
    h_s, h_t = torch.randn(b, t, HIDDEN, generator=g), torch.randn(b, t, HIDDEN, generator=g)
    w_s, w_t = torch.randn(VOCAB, HIDDEN, generator=g) / 24, torch.randn(VOCAB, HIDDEN, generator=g) / 24
    labels = torch.randint(0, VOCAB, (b, t), generator=g)
    domain = torch.randint(0, args.domains, (b,), generator=g)

    def loss():
        with torch.no_grad():
            return distill_loss(h_s, w_s, h_t, w_t, labels, lam=0.0, temperature=1.0, chunk_tokens=4096)[3]

    stats = loss()
    excess = DomainExcess(args.domains)

    def bookkeeping():
        excess.add(stats.ce, stats.source_ce, stats.mask, domain)
        excess.end_batch(lambda x: x)

    base, extra = timed(loss, args.repeat), timed(bookkeeping, args.repeat)
    print(f"torch threads {torch.get_num_threads()}; micro-batch {args.tokens}; {args.domains} domains; "
          f"best of {args.repeat} after a warm-up")
    print(f"{'part':22} {'ms':>9} {'/ loss':>8}")
    print(f"{'distill loss (fwd)':22} {base * 1e3:9.2f} {1.0:8.1e}")
    print(f"{'signal: train':22} {extra * 1e3:9.3f} {extra / base:8.1e}")


if __name__ == "__main__":
    main()
