"""Per-domain jsonl -> fixed-length token rows in streaming MDS shards.

Output layout (what llm-foundry's ``text`` dataloader and our per-domain loaders read)::

    <out>/train/<domain>/   MDS shards, column ``tokens`` (ndarray of uint16 or int32, seq_len)
    <out>/eval/<domain>/
    <out>/tokenizer/        the tokenizer the rows were made with (an HF folder)
    <out>/manifest.json     settings and per-domain, per-split counts

Documents are concatenated in file order with the tokenizer's own BOS/EOS conventions (special-token
strings inside the raw text stay plain text) and cut
into rows of ``seq_len`` tokens; the tail of each (domain, split) stream that does not fill a row
is dropped and counted. The whole output is written under a temporary name and renamed at the
end, so an interrupted run leaves nothing behind.

Why not llm-foundry's ``convert_dataset_json``: it reads one file set into one split, has no
per-domain layout, no leak-free eval split and runs tokenization on a single core.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from streaming import MDSWriter
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from lemon_composer.atomic import atomic_folder
from lemon_composer.data.corpus import (SPLITS, DomainFiles, chunk_offsets, discover, doc_hash,
                                        hash_is_eval, iter_texts)
from lemon_composer.data.manifest import MANIFEST
from lemon_composer.data.tokenizer import load_tokenizer, token_dtype, tokenizer_fingerprint

log = logging.getLogger(__name__)

SPECIAL_TOKEN_MODES = ("auto", "always", "never")
SPLIT_MODES = ("auto", "file", "document")


@dataclass
class DataPrepConfig:
    """Options of ``data_prep/jsonl_to_mds.py`` (each field is the ``--option`` of that name).

    bos / eos: ``auto`` follows the tokenizer (what ``tokenizer(text)`` adds); when no BOS is used,
    ``eos=auto`` appends EOS so documents stay separated. ``always`` / ``never`` force.
    """
    input: Path
    out: Path
    tokenizer: str
    seq_len: int = 4096
    eval_fraction: float = 0.05
    split_by: str = "auto"
    bos: str = "auto"
    eos: str = "auto"
    num_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    chunk_mb: float = 8.0
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.input, self.out = Path(self.input), Path(self.out)
        if self.seq_len < 2:
            raise ValueError(f"--seq-len={self.seq_len}: must be at least 2 (a row holds inputs and "
                             f"their next-token labels)")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"--eval-fraction={self.eval_fraction}: must lie strictly between 0 and 1")
        if self.split_by not in SPLIT_MODES:
            raise ValueError(f"--split-by={self.split_by}: expected one of {SPLIT_MODES}")
        for name in ("bos", "eos"):
            if getattr(self, name) not in SPECIAL_TOKEN_MODES:
                raise ValueError(f"--{name}={getattr(self, name)}: expected one of {SPECIAL_TOKEN_MODES}")
        if self.num_workers < 1:
            raise ValueError(f"--num-workers={self.num_workers}: must be at least 1")
        if self.chunk_mb <= 0:
            raise ValueError(f"--chunk-mb={self.chunk_mb}: must be positive")
        if self.out.exists() and not self.overwrite:
            raise ValueError(f"--out={self.out} already exists; pass --overwrite to replace it")


def special_token_ids(tok: PreTrainedTokenizerBase, bos: str, eos: str) -> tuple[int | None, int | None]:
    """Resolve the bos/eos modes to the ids put before / after every document (None = nothing)."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    adds_bos = tok.bos_token_id is not None and len(full) > len(plain) and full[0] == tok.bos_token_id
    adds_eos = tok.eos_token_id is not None and len(full) > len(plain) and full[-1] == tok.eos_token_id
    use_bos = adds_bos if bos == "auto" else bos == "always"
    if eos == "auto":  # as the tokenizer does, plus EOS whenever nothing else separates documents
        use_eos = adds_eos or (not use_bos and tok.eos_token_id is not None)
    else:
        use_eos = eos == "always"
    for used, name, tid in ((use_bos, "bos", tok.bos_token_id), (use_eos, "eos", tok.eos_token_id)):
        if used and tid is None:
            raise ValueError(f"--{name}=always: the tokenizer has no {name.upper()} token")
    return (tok.bos_token_id if use_bos else None), (tok.eos_token_id if use_eos else None)


# ---- worker side: state set once per process by the pool initializer ----
_W: dict = {}


def _init_worker(tok: PreTrainedTokenizerBase, bos_id: int | None, eos_id: int | None,
                 dtype: np.dtype, eval_fraction: float, eval_hashes: dict[str, frozenset[bytes]]) -> None:
    _W.update(tok=tok, bos=bos_id, eos=eos_id, dtype=dtype, eval_fraction=eval_fraction,
              eval_hashes=eval_hashes)


def _validate_file(task: tuple[str, Path, str]) -> tuple[int, list[bytes]]:
    """Parse every line of one file; return its document count and the hashes forced into eval.

    ``role`` is ``eval`` (an eval file: all its hashes), ``train`` (none) or ``document``
    (a hash-split domain: its smallest hash, so every such domain with two documents has eval data).
    """
    _domain, path, role = task
    n, hashes = 0, []
    for _, text in iter_texts(path):
        if not text:
            continue
        n += 1
        if role != "train":
            hashes.append(doc_hash(text))
    if role == "document" and hashes:
        hashes = [min(hashes)]
    return n, hashes


def _tokenize_chunk(task: tuple[str, Path, int, int, str | None]) -> dict:
    """Tokenize the documents of one byte range; route each to its split.

    ``fixed_split`` is the split of the whole file (file split), or None (document-hash split).
    Returns per split the concatenated ids and the document count, plus the train documents
    dropped because the same text is in eval.
    """
    domain, path, start, end, fixed_split = task
    texts: dict[str, list[str]] = {s: [] for s in SPLITS}
    dropped = 0
    eval_hashes = _W["eval_hashes"].get(domain, frozenset())
    for _, text in iter_texts(path, start, end):
        if not text:
            continue
        digest = doc_hash(text)
        if fixed_split is None:
            forced = digest in eval_hashes
            split = "eval" if forced or hash_is_eval(digest, _W["eval_fraction"]) else "train"
        else:
            split = fixed_split
            if split == "train" and digest in eval_hashes:
                dropped += 1
                continue
        texts[split].append(text)
    out = {"dropped": dropped}
    for split, docs in texts.items():
        # split_special_tokens: a literal "<s>" in raw text stays text, never a document boundary
        ids = _W["tok"](docs, add_special_tokens=False, split_special_tokens=True)["input_ids"] if docs else []
        pieces = []
        for doc in ids:
            if _W["bos"] is not None:
                pieces.append([_W["bos"]])
            pieces.append(doc)
            if _W["eos"] is not None:
                pieces.append([_W["eos"]])
        flat = np.fromiter((t for p in pieces for t in p), dtype=np.int64)
        out[split] = (flat.astype(_W["dtype"]), len(docs))
    return out


class _RowWriter:
    """Packs a token stream into rows of ``seq_len`` and writes them to one MDS folder."""

    def __init__(self, path: Path, seq_len: int, dtype: np.dtype) -> None:
        self.seq_len, self.dtype = seq_len, dtype
        self.writer = MDSWriter(out=str(path), columns={"tokens": f"ndarray:{dtype.name}:{seq_len}"},
                                compression=None)
        self.buffer = np.empty(0, dtype=dtype)
        self.documents = self.tokens = self.rows = 0

    def add(self, ids: np.ndarray, n_docs: int) -> None:
        self.documents += n_docs
        self.tokens += len(ids)
        self.buffer = np.concatenate([self.buffer, ids])
        n_rows = len(self.buffer) // self.seq_len
        for row in self.buffer[: n_rows * self.seq_len].reshape(n_rows, self.seq_len):
            self.writer.write({"tokens": row})
        self.rows += n_rows
        self.buffer = self.buffer[n_rows * self.seq_len:]

    def close(self) -> dict:
        self.writer.finish()
        return {"documents": self.documents, "tokens": self.tokens, "rows": self.rows,
                "tokens_written": self.rows * self.seq_len, "tokens_dropped": len(self.buffer)}


def prepare(cfg: DataPrepConfig) -> dict:
    """Run data prep; return the manifest. See the module docstring for the layout."""
    # Cheap checks first: folders, tokenizer, options. Then a validation pass over every line.
    domains = discover(cfg.input, split_by=cfg.split_by, eval_fraction=cfg.eval_fraction)
    tok = load_tokenizer(cfg.tokenizer)
    bos_id, eos_id = special_token_ids(tok, cfg.bos, cfg.eos)
    dtype = token_dtype(tok)
    log.info("data prep: %d domains %s, tokenizer %s (%d tokens, %s rows), seq_len %d, %d workers",
             len(domains), [d.name for d in domains], cfg.tokenizer, len(tok), dtype.name,
             cfg.seq_len, cfg.num_workers)

    eval_hashes = _validate(domains, cfg.num_workers)
    with atomic_folder(cfg.out, overwrite=cfg.overwrite) as tmp:
        counts = _tokenize_and_write(domains, cfg, tok, bos_id, eos_id, dtype, eval_hashes, tmp)
        if not any(c["train"]["rows"] for c in counts.values()):
            longest = max(c[split]["tokens"] for c in counts.values() for split in SPLITS)
            raise ValueError(f"--seq-len={cfg.seq_len}: no domain has a single full train row (the longest "
                             f"domain split holds {longest} tokens); lower --seq-len or add data")
        tok.save_pretrained(str(tmp / "tokenizer"))
        manifest = {
            "tokenizer": {"source": str(cfg.tokenizer), "class": type(tok).__name__,
                          "vocab_size": len(tok), "fingerprint": tokenizer_fingerprint(tok),
                          "bos_id": bos_id, "eos_id": eos_id},
            "seq_len": cfg.seq_len, "dtype": dtype.name, "column": "tokens",
            "eval_fraction": cfg.eval_fraction,
            "domains": {d.name: {"split_by": d.split_by,
                                 "eval_files": [f.name for f in d.eval_files],
                                 **counts[d.name]} for d in domains},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log.info("data prep: wrote %s", cfg.out)
    return manifest


@contextmanager
def _pool(workers: int, *initargs) -> Iterator[ProcessPoolExecutor]:
    """Worker processes from a forkserver: forked from a clean single-threaded process, so no lock
    held by a thread of the caller (logging, tokenizers, torch) can be inherited and deadlock them.

    concurrent.futures rather than ``multiprocessing.Pool``: a dead worker raises BrokenProcessPool
    instead of hanging, and on an error we cancel what is queued and wait for the (short) running
    chunks instead of ``Pool.terminate()``, which can deadlock while tasks are in flight.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=initargs)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _validate(domains: list[DomainFiles], workers: int) -> dict[str, frozenset[bytes]]:
    """Parse every line before tokenizing; collect per domain the hashes that must go to eval."""
    tasks = [(d.name, f, "document" if not d.eval_files else "eval" if f in d.eval_files else "train")
             for d in domains for f in d.files]
    eval_hashes: dict[str, set[bytes]] = {d.name: set() for d in domains}
    with _pool(workers, None, None, None, np.dtype(np.int32), 0.0, {}) as pool:
        results = pool.map(_validate_file, tasks)
        for (domain, path, _), (n_docs, hashes) in tqdm(zip(tasks, results), total=len(tasks),
                                                        desc="validating", unit="file"):
            if n_docs == 0:
                raise ValueError(f"{path}: holds no documents")
            eval_hashes[domain].update(hashes)
    by_name = {d.name: d for d in domains}
    return {k: frozenset([min(v)] if v and not by_name[k].eval_files else v)
            for k, v in eval_hashes.items()}


def _tokenize_and_write(domains, cfg, tok, bos_id, eos_id, dtype, eval_hashes, tmp) -> dict:
    chunk_bytes = int(cfg.chunk_mb * 2**20)
    total = sum(f.stat().st_size for d in domains for f in d.files)
    counts: dict[str, dict] = {}
    with _pool(cfg.num_workers, tok, bos_id, eos_id, dtype, cfg.eval_fraction, eval_hashes) as pool, \
            tqdm(total=total, desc="tokenizing", unit="B", unit_scale=True) as bar:
        for d in domains:
            writers = {s: _RowWriter(tmp / s / d.name, cfg.seq_len, dtype) for s in SPLITS}
            tasks = [(d.name, f, start, end, ("eval" if f in d.eval_files else "train") if d.eval_files else None)
                     for f in d.files for start, end in chunk_offsets(f, chunk_bytes)]
            dropped = 0
            for (_, _, start, end, _), res in zip(tasks, pool.map(_tokenize_chunk, tasks)):
                for s in SPLITS:
                    writers[s].add(*res[s])
                dropped += res["dropped"]
                bar.update(end - start)
                bar.set_postfix(domain=d.name)
            counts[d.name] = {s: w.close() for s, w in writers.items()}
            counts[d.name]["train"]["eval_duplicates_dropped"] = dropped
            for s in SPLITS:
                if counts[d.name][s]["rows"] == 0:
                    log.warning("domain '%s' has no full %s row of %d tokens", d.name, s, cfg.seq_len)
    return counts

