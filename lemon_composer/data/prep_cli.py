"""Command line of data prep: per-domain jsonl (RedPajama layout) -> token rows in MDS shards.

    python data_prep/jsonl_to_mds.py --input ../shared/data/redpajama-sample \
        --out data/redpajama-mds --tokenizer ../shared/data/llama-tokenizer.model --seq-len 4096

also installed as the console script ``lemon-data-prep``. Layout: ``lemon_composer/data/prep.py``.
"""
from __future__ import annotations

import argparse
import logging

from lemon_composer.cli import run_cli
from lemon_composer.data.prep import SPECIAL_TOKEN_MODES, SPLIT_MODES, DataPrepConfig, prepare


def parse_args(argv: list[str] | None = None) -> DataPrepConfig:
    d = DataPrepConfig.__dataclass_fields__
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="folder with one sub-folder of *.jsonl per domain")
    p.add_argument("--out", required=True, help="output folder (train/, eval/, tokenizer/, manifest.json)")
    p.add_argument("--tokenizer", required=True,
                   help="a local HF tokenizer folder or a SentencePiece .model file")
    p.add_argument("--seq-len", type=int, default=d["seq_len"].default, help="tokens per row")
    p.add_argument("--eval-fraction", type=float, default=d["eval_fraction"].default,
                   help="share of documents (or files, for a file split) held out for eval")
    p.add_argument("--split-by", choices=SPLIT_MODES, default=d["split_by"].default,
                   help="auto: by file where a domain has several files, by document hash otherwise")
    p.add_argument("--bos", choices=SPECIAL_TOKEN_MODES, default="auto",
                   help="BOS before every document (auto: as the tokenizer does)")
    p.add_argument("--eos", choices=SPECIAL_TOKEN_MODES, default="auto",
                   help="EOS after every document (auto: as the tokenizer does, or EOS if it adds neither)")
    p.add_argument("--num-workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--chunk-mb", type=float, default=d["chunk_mb"].default,
                   help="size of the file pieces handed to workers")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    a = p.parse_args(argv)
    kwargs = {k: v for k, v in vars(a).items() if v is not None}
    return DataPrepConfig(**kwargs)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def body() -> None:
        manifest = prepare(parse_args(argv))
        for name, counts in manifest["domains"].items():
            print(f"{name:>16}: train {counts['train']['rows']:>7} rows, eval {counts['eval']['rows']:>6} rows")
    return run_cli("data prep", body)
