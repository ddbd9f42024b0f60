"""Analysis CLI: layer similarity, operator heatmaps and training curves (paper Sec. 2, 4.4, App. A.5-A.7).

    python -m lemon_composer.analysis cka --model HF_FOLDER --out DIR [--data MDS_DIR --num-batches N]
    python -m lemon_composer.analysis operators --checkpoint CKPT.pt --out DIR
    python -m lemon_composer.analysis curves --log cut=runs/cut.log --log lemon=runs/lemon.log --out loss.png

``cka`` writes, per parameter kind (q, k, v, o, up, gate, down) and for ``attention`` / ``ffn``,
``param_cka_<kind>.{png,json,csv}`` (Fig. 2a, 6, 7-9), ``adjacent_similarity.{png,json}`` (Fig. 2b)
and, with ``--data`` (a data prep output), ``hidden_cka.{png,json,csv}`` on rows of its eval split.
``operators`` writes the heatmaps of ``operator_figures`` (Fig. 5, 10). ``curves`` plots a held-out
metric read from Composer console logs against step (Fig. 4, middle).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from lemon_composer.analysis.cka_report import cka_report
from lemon_composer.analysis.curves import DEFAULT_METRIC, read_eval_curve
from lemon_composer.analysis.operators import operator_figures
from lemon_composer.analysis.plots import training_curves
from lemon_composer.cli import run_cli
from lemon_composer.fusion.init_cka import CKA_KINDS

log = logging.getLogger("lemon_composer.analysis")


def parse_runs(specs: Sequence[str]) -> dict[str, Path]:
    """``["NAME=PATH", ...]`` -> ``{NAME: PATH}``; names must be unique."""
    runs: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--log {spec}: expected NAME=PATH")
        if name in runs:
            raise ValueError(f"--log {spec}: run name '{name}' given twice")
        runs[name] = Path(path)
    return runs


def run_curves(specs: Sequence[str], out: str, *, metric: str = DEFAULT_METRIC, title: str | None = None) -> Path:
    """The ``curves`` subcommand; returns the PNG written."""
    runs = {name: read_eval_curve(path, metric) for name, path in parse_runs(specs).items()}
    for name, points in runs.items():
        log.info("%s: %s", name, points)
    if not any(runs.values()):
        raise ValueError(f"--metric={metric}: no values in any --log")
    return training_curves(runs, out, title=title or f"held-out {metric}", ylabel=metric.rsplit("/", 1)[-1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lemon_composer.analysis", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cka", help="layer-by-layer parameter (and hidden-state) CKA of an HF LLaMA folder")
    c.add_argument("--model", required=True, help="a local Hugging Face LLaMA folder")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--data", help="data prep output: hidden-state CKA on rows of its eval split")
    c.add_argument("--num-batches", type=int, default=4)
    c.add_argument("--batch-size", type=int, default=4)
    c.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: whole rows)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--kinds", default=",".join(CKA_KINDS), help="comma-separated parameter kinds")
    c.add_argument("--drop-first-tokens", type=int, default=0,
                   help="leave the first positions of each row out of hidden-state CKA (attention-sink tokens)")
    c.add_argument("--name", help="model name in figure titles (default: the folder name)")
    o = sub.add_parser("operators", help="heatmaps of the operators of a fusion checkpoint")
    o.add_argument("--checkpoint", required=True)
    o.add_argument("--out", required=True, help="output folder")
    k = sub.add_parser("curves", help="held-out metric vs step from Composer console logs")
    k.add_argument("--log", action="append", required=True, metavar="NAME=PATH", help="repeat for several runs")
    k.add_argument("--out", required=True, help="output .png")
    k.add_argument("--metric", default=DEFAULT_METRIC)
    k.add_argument("--title")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def body() -> None:
        if a.command == "cka":
            kinds = tuple(k for k in a.kinds.split(",") if k)
            written = cka_report(a.model, a.out, data=a.data, num_batches=a.num_batches, batch_size=a.batch_size,
                                 seq_len=a.seq_len, device=a.device, kinds=kinds,
                                 drop_first_tokens=a.drop_first_tokens, name=a.name)
        elif a.command == "operators":
            written = operator_figures(a.checkpoint, a.out)
        else:
            written = [run_curves(a.log, a.out, metric=a.metric, title=a.title)]
        log.info("wrote %d files under %s", len(written), a.out)
    return run_cli("analysis", body)


if __name__ == "__main__":
    sys.exit(main())
