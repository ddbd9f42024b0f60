"""A domain-mixed stream of data prep rows whose proportions may change during training (design.md sec. 2).

Every global sample index t (t = step * global_batch + rank * device_batch + i) gets a domain drawn
from the proportions in force at its step, with uniform numbers that depend only on (seed, step):
``batching_method: random`` draws each row's domain on its own; ``stratified`` (streaming's name for
the same idea) divides every global batch among the domains in proportion, each domain getting the floor
or the ceiling of G * p_d rows (systematic sampling), in a seeded random order. The k-th
row drawn from domain d is row ``perm(seed, d, k // N_d)[k % N_d]`` of that domain, so a domain that
runs out wraps around into a fresh permutation. The stream is therefore a pure function of the
seed and the proportions history, the same for any number of dataloader workers.

Proportions change through ``set_proportions(p, at_batch)`` (the dynamic loading callback calls it on
every rank with the same values). The change takes effect at a batch no worker can have started
yet (``at_batch`` + every batch the DataLoader may have prefetched), so when it happens does not
depend on process timing. The history lives in shared memory that dataloader workers read.

Checkpoint state (Composer's dataset-state protocol): the sample index, the per-domain row counts at
it, and the proportions history: a few numbers per evaluation, never a list of consumed samples.

Why not streaming's StreamingDataset with per-stream proportions: its proportions are fixed when the
dataset is built, and its workers cannot be told about a change.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from streaming import LocalDataset
from torch.utils.data import IterableDataset, get_worker_info

from lemon_composer.data.manifest import domain_dirs, read_manifest


def check_proportions(proportions: Sequence[float], domains: Sequence[str], *, key: str) -> np.ndarray:
    """Positive, finite, one per domain; returned normalised to sum 1."""
    p = np.asarray(proportions, dtype=np.float64)
    if p.shape != (len(domains),):
        raise ValueError(f"{key}={list(proportions)}: expected {len(domains)} values, one per domain {list(domains)}")
    if not np.all(np.isfinite(p)) or np.any(p <= 0):
        raise ValueError(f"{key}={list(proportions)}: every proportion must be positive and finite")
    return p / p.sum()


BATCHING_METHODS = ("random", "stratified")


class _Draws:
    """Domain choices and per-domain row permutations; a pure function of the seed and the history."""

    def __init__(self, seed: int, sizes: Sequence[int], global_batch_size: int, batching_method: str) -> None:
        self.seed, self.sizes, self.G, self.batching_method = seed, list(sizes), global_batch_size, batching_method
        self._perm: dict[tuple[int, int], np.ndarray] = {}

    def step_domains(self, step: int, history: list[tuple[int, np.ndarray]]) -> np.ndarray:
        """(G,) domains of the global samples of one step, under the proportions in force at it."""
        starts = [s for s, _ in history]
        p = history[bisect.bisect_right(starts, step * self.G) - 1][1]
        cdf = np.cumsum(p)
        rng = np.random.default_rng([self.seed, 0, step])
        if self.batching_method == "stratified":  # G evenly spaced points from one offset, in a seeded order
            u = rng.permutation(np.arange(self.G) + rng.random()) / self.G  # floor / ceil of G p_d points per domain
        else:
            u = rng.random(self.G)
        return np.minimum(np.searchsorted(cdf, u * cdf[-1], side="right"), len(p) - 1)

    def row(self, d: int, k: int) -> int:
        """The k-th row drawn from domain d: a fresh seeded permutation every pass (wrap-around)."""
        epoch, pos = divmod(k, self.sizes[d])
        if (d, epoch) not in self._perm:
            self._perm = {key: v for key, v in self._perm.items() if key[0] != d}  # keep one pass per domain
            self._perm[(d, epoch)] = np.random.default_rng([self.seed, 1, d, epoch]).permutation(self.sizes[d])
        return int(self._perm[(d, epoch)][pos])


class DomainMixture(IterableDataset):
    """Rows of data prep's per-domain shards, mixed by proportions that can change (see module doc).

    Args:
        data_dir: data prep's ``--out`` folder.
        split: ``train`` (usual) or ``eval``.
        domains: a subset of the manifest's domains (default: all, sorted).
        proportions: initial proportions, one per domain (default: by row count).
        seed: the stream's seed (the same on every rank).
        batching_method: ``random`` (each row's domain drawn on its own) or ``stratified`` (every global
            batch divided among the domains in proportion; less gradient noise from the domain mix).
        device_batch_size, world_size, rank: how global sample indices map onto this rank.
        max_seq_len: truncate rows to this length (default: full rows).
        update_delay: batches after which new proportions take effect; at least what a DataLoader
            may have prefetched (num_workers * prefetch_factor + 1), the same for any worker count.
        max_updates: capacity of the shared proportions history.
    """

    def __init__(self, data_dir: str, *, device_batch_size: int, split: str = "train",
                 domains: Sequence[str] | None = None, proportions: Sequence[float] | None = None, seed: int = 17,
                 world_size: int = 1, rank: int = 0, max_seq_len: int | None = None, update_delay: int = 0,
                 max_updates: int = 4096, batching_method: str = "random") -> None:
        if batching_method not in BATCHING_METHODS:
            raise ValueError(f"batching_method={batching_method!r}: expected one of {BATCHING_METHODS}")
        manifest = read_manifest(data_dir)
        self.dirs = domain_dirs(data_dir, split, None if domains is None else list(domains))
        self.domains = list(self.dirs)
        self.sizes = [manifest["domains"][d][split]["rows"] for d in self.domains]
        if max_seq_len is not None and max_seq_len > manifest["seq_len"]:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the rows of {data_dir} ({manifest['seq_len']} tokens)")
        initial = check_proportions(self.sizes if proportions is None else proportions, self.domains,
                                    key="proportions")
        self.seed, self.max_seq_len, self.update_delay = seed, max_seq_len, update_delay
        self.batching_method = batching_method
        self.device_batch_size, self.world_size, self.rank = device_batch_size, world_size, rank
        self.global_batch_size = device_batch_size * world_size
        k = len(self.domains)
        self._history = torch.zeros(max_updates, 1 + k, dtype=torch.float64).share_memory_()
        self._n_updates = torch.zeros(1, dtype=torch.long).share_memory_()
        self._history[0, 1:] = torch.from_numpy(initial)
        self._n_updates[0] = 1
        self._start_sample, self._start_counts = 0, np.zeros(k, dtype=np.int64)
        self._cursor = (0, self._start_counts)

    # ---- proportions ----
    def history(self) -> list[tuple[int, np.ndarray]]:
        n = int(self._n_updates[0])
        rows = self._history[:n].numpy()
        return [(int(r[0]), r[1:].copy()) for r in rows]

    @property
    def proportions(self) -> np.ndarray:
        """The latest proportions (in force from their effective batch on)."""
        return self.history()[-1][1]

    def set_proportions(self, proportions: Sequence[float], *, at_batch: int) -> int:
        """Record new proportions, effective from the first batch not yet prefetched; returns that batch."""
        p = check_proportions(proportions, self.domains, key="set_proportions")
        n = int(self._n_updates[0])
        if n >= self._history.shape[0]:
            raise ValueError(f"max_updates={self._history.shape[0]} proportion updates used up; raise max_updates")
        effective = max(at_batch + self.update_delay, int(self._history[n - 1, 0]) // self.global_batch_size)
        self._history[n, 0] = effective * self.global_batch_size
        self._history[n, 1:] = torch.from_numpy(p)
        self._n_updates[0] = n + 1
        return effective

    # ---- the stream ----
    def _rows(self, worker: int, n_workers: int) -> Iterator[tuple[int, int]]:
        """(domain, row) for this rank and worker, in order; counts every draw of every rank."""
        draws = _Draws(self.seed, self.sizes, self.global_batch_size, self.batching_method)
        counts = self._start_counts.copy()
        B, lo = self.device_batch_size, self.rank * self.device_batch_size
        first = step = self._start_sample // self.global_batch_size
        while True:
            domains = draws.step_domains(step, self.history())  # updates arrive through shared memory
            if (step - first) % n_workers == worker:
                seen = counts + np.bincount(domains[:lo], minlength=len(counts))
                for d in domains[lo:lo + B]:
                    yield int(d), draws.row(int(d), int(seen[d]))
                    seen[d] += 1
            counts += np.bincount(domains, minlength=len(counts))
            step += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        readers = [LocalDataset(str(p)) for p in self.dirs.values()]
        for d, row in self._rows(worker, n_workers):
            tokens = np.asarray(readers[d][row]["tokens"], dtype=np.int64)[: self.max_seq_len]
            yield {"input_ids": torch.from_numpy(tokens), "domain": d}

    # ---- Composer's dataset-state protocol ----
    def counts_at(self, sample: int) -> np.ndarray:
        """Per-domain rows drawn before global sample index ``sample`` (a step boundary)."""
        if sample % self.global_batch_size:
            raise ValueError(f"sample {sample} is not a multiple of the global batch size {self.global_batch_size}")
        draws = _Draws(self.seed, self.sizes, self.global_batch_size, self.batching_method)
        step, counts = self._cursor
        if sample < step * self.global_batch_size:
            step, counts = self._start_sample // self.global_batch_size, self._start_counts
        counts, history = counts.copy(), self.history()
        for s in range(step, sample // self.global_batch_size):
            counts += np.bincount(draws.step_domains(s, history), minlength=len(counts))
        self._cursor = (sample // self.global_batch_size, counts.copy())  # checkpoints only move forward
        return counts

    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        sample = num_samples if from_beginning else self._start_sample + num_samples
        return {"domains": self.domains, "seed": self.seed, "global_batch_size": self.global_batch_size,
                "batching_method": self.batching_method,
                "sample": sample, "counts": self.counts_at(sample).tolist(),
                "history": [[s, *p.tolist()] for s, p in self.history()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = {"batching_method": "random", **state}  # checkpoints from before the key drew at random
        for key, mine in (("domains", self.domains), ("seed", self.seed),
                          ("global_batch_size", self.global_batch_size), ("batching_method", self.batching_method)):
            if state[key] != mine:
                raise ValueError(f"resume: the checkpoint's data stream has {key}={state[key]}, this run {mine}; "
                                 f"a resumed run must keep domains, seed, global batch size and batching method")
        history = np.asarray(state["history"], dtype=np.float64)
        if len(history) > self._history.shape[0]:
            raise ValueError(f"resume: {len(history)} proportion updates exceed max_updates={self._history.shape[0]}")
        self._history[: len(history)] = torch.from_numpy(history)
        self._n_updates[0] = len(history)
        self._start_sample, self._start_counts = int(state["sample"]), np.asarray(state["counts"], dtype=np.int64)
        self._cursor = (self._start_sample // self.global_batch_size, self._start_counts)


def collate_rows(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Fixed-length rows -> a causal LM batch (labels = inputs; the model shifts) plus each row's domain."""
    ids = torch.stack([s["input_ids"] for s in samples])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "domain": torch.tensor([s["domain"] for s in samples])}
