"""Dataloaders over data prep's per-domain shards.

``lemon_mixture``: the domain-mixed stream of ``lemon_composer.data.mixing`` whose proportions the
dynamic loading callback changes during training (continued pre-training)::

    train_loader:
      name: lemon_mixture
      data_dir: ${variables.data_dir}
      split: train
      domains: null                     # default: all, sorted
      proportions: [0.67, 0.045, ...]   # initial, one per domain; null = by size
      seed: 17
      batching_method: random           # random (each row's domain drawn on its own) | stratified
                                        # (every global batch divided among the domains in proportion)
      max_seq_len: 4096                 # default: the rows' length
      num_workers: 8
      prefetch_factor: 2

``lemon_domains``: llm-foundry's ``text`` dataloader with one stream per data-prep domain.

Targets llm-foundry 0.22 (``llmfoundry.data.text_data.build_text_dataloader``). Instead of listing a
stream per domain by hand, the yaml names the data-prep output folder; the manifest there gives the
domains and is checked against the run's tokenizer and sequence length before any data is read::

    train_loader:
      name: lemon_domains
      data_dir: ${variables.data_dir}   # the --out folder of data_prep/jsonl_to_mds.py
      split: train                      # train | eval
      domains: null                     # a subset of the manifest's domains; null = all
      proportions: null                 # one per domain (streaming's Stream.proportion); null = by size
      dataset: {max_seq_len: 128, shuffle: true, shuffle_seed: 17}
      drop_last: true
      num_workers: 0
      prefetch_factor: null
"""
from __future__ import annotations

from typing import Any

from composer.core import DataSpec
from composer.utils import dist
from llmfoundry.data.text_data import build_text_dataloader
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lemon_composer.data.manifest import check_compatible, domain_dirs, read_manifest
from lemon_composer.data.mixing import BATCHING_METHODS, DomainMixture, check_proportions, collate_rows


def build_domain_text_dataloader(
    tokenizer: PreTrainedTokenizerBase,
    device_batch_size: int | float,
    data_dir: str,
    dataset: dict[str, Any],
    split: str = "train",
    domains: list[str] | None = None,
    proportions: list[float] | None = None,
    **loader_kwargs: Any,
) -> DataSpec:
    """Build the per-domain streams from ``data_dir``'s manifest, then llm-foundry's text loader.

    Raises:
        ValueError: naming the yaml key, for a missing manifest or domain, a proportions list of
            the wrong length, a tokenizer or ``max_seq_len`` that does not match the data.
    """
    manifest = read_manifest(data_dir)
    dirs = domain_dirs(data_dir, split, domains)
    if "streams" in dataset or "local" in dataset or "remote" in dataset:
        raise ValueError("lemon_domains: dataset.streams/local/remote are derived from data_dir; remove them")
    if "max_seq_len" not in dataset:
        raise ValueError("lemon_domains: dataset.max_seq_len is required")
    check_compatible(manifest, tokenizer=tokenizer, max_seq_len=dataset["max_seq_len"], data_dir=data_dir)
    if proportions is not None:
        check_proportions(proportions, list(dirs), key="train_loader.proportions")
    streams = {}
    for i, (name, path) in enumerate(dirs.items()):
        streams[name] = {"local": str(path), "split": None}
        if proportions is not None:
            streams[name]["proportion"] = float(proportions[i])
    return build_text_dataloader(tokenizer=tokenizer, device_batch_size=device_batch_size,
                                 dataset={**dataset, "streams": streams}, **loader_kwargs)


def build_mixture_dataloader(
    tokenizer: PreTrainedTokenizerBase,
    device_batch_size: int | float,
    data_dir: str,
    split: str = "train",
    domains: list[str] | None = None,
    proportions: list[float] | None = None,
    seed: int = 17,
    max_seq_len: int | None = None,
    num_workers: int = 0,
    prefetch_factor: int | None = 2,
    max_updates: int = 4096,
    update_delay: int = 32,
    batching_method: str = "random",
    **loader_kwargs: Any,
) -> DataSpec:
    """``lemon_mixture``: a DataLoader over ``DomainMixture`` (checks run before any data is read).

    ``update_delay``: batches after which new proportions take effect. A fixed number, not derived
    from the workers, so the stream is the same for any ``num_workers``; it must cover what the
    DataLoader can have prefetched (``num_workers * prefetch_factor + 1``; 17 in the 7B recipes).
    """
    if batching_method not in BATCHING_METHODS:
        raise ValueError(f"train_loader.batching_method={batching_method!r}: expected one of {BATCHING_METHODS}")
    manifest = read_manifest(data_dir)
    check_compatible(manifest, tokenizer=tokenizer, max_seq_len=max_seq_len or manifest["seq_len"],
                     data_dir=data_dir)
    if int(device_batch_size) != device_batch_size:
        raise ValueError(f"lemon_mixture: device batch size {device_batch_size} must be a whole number")
    prefetch = prefetch_factor if num_workers > 0 else None
    prefetched = num_workers * (prefetch or 0) + 1
    if isinstance(update_delay, bool) or not isinstance(update_delay, int) or update_delay < prefetched:
        raise ValueError(f"train_loader.update_delay={update_delay!r}: expected an integer of at least "
                         f"num_workers * prefetch_factor + 1 = {prefetched} batches (what the DataLoader can "
                         f"have prefetched when new proportions arrive)")
    dataset = DomainMixture(data_dir, device_batch_size=int(device_batch_size), split=split, domains=domains,
                            proportions=proportions, seed=seed, world_size=dist.get_world_size(),
                            rank=dist.get_global_rank(), max_seq_len=max_seq_len, max_updates=max_updates,
                            update_delay=update_delay, batching_method=batching_method)
    loader = DataLoader(dataset, batch_size=int(device_batch_size), num_workers=num_workers,
                        prefetch_factor=prefetch, collate_fn=collate_rows, **loader_kwargs)
    return DataSpec(loader, get_num_tokens_in_batch=lambda batch: int(batch["input_ids"].numel()))

