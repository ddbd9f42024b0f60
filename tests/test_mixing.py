"""The domain-mixed stream: determinism, wrap-around, proportion updates across workers, resume."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import random_docs, write_jsonl
from lemon_composer.data.mixing import DomainMixture, collate_rows
from lemon_composer.data.prep import DataPrepConfig, prepare


@pytest.fixture(scope="module")
def mds(tmp_path_factory, tiny_tokenizer):
    """Three domains of very different sizes; 'tiny' holds only a few rows."""
    root = tmp_path_factory.mktemp("mix")
    rng = random.Random(0)
    for domain, n in (("big", 300), ("mid", 120), ("tiny", 6)):
        write_jsonl(root / "corpus" / domain / "a.jsonl", random_docs(rng, n))
        write_jsonl(root / "corpus" / domain / "b.jsonl", random_docs(rng, max(2, n // 10)))
    prepare(DataPrepConfig(input=root / "corpus", out=root / "mds", tokenizer=str(tiny_tokenizer),
                           seq_len=16, num_workers=1, eval_fraction=0.3))
    return root / "mds"


def stream(ds: DomainMixture, n_batches: int, *, workers=0, update=None) -> list[tuple[int, tuple]]:
    """(domain, row tokens) of the first n batches, through a real DataLoader; ``update`` = (batch, p)."""
    loader = DataLoader(ds, batch_size=ds.device_batch_size, num_workers=workers, collate_fn=collate_rows,
                        prefetch_factor=2 if workers else None)
    out = []
    for b, batch in enumerate(loader):
        if b == n_batches:
            break
        out += [(int(d), tuple(r.tolist())) for d, r in zip(batch["domain"], batch["input_ids"])]
        if update is not None and b + 1 == update[0]:
            ds.set_proportions(update[1], at_batch=b + 1)
    return out


def make(mds, **kw):
    kw = {"device_batch_size": 8, "seed": 5, **kw}
    return DomainMixture(str(mds), **kw)


def test_same_stream_for_any_number_of_workers(mds):
    one = stream(make(mds), 12)
    assert one == stream(make(mds), 12)
    two = stream(make(mds, update_delay=2 * 2 + 1), 12, workers=2)
    assert one == two and len(one) == 96


def test_tiny_domain_wraps_around_through_fresh_permutations(mds):
    ds = make(mds, domains=["tiny"], proportions=[1.0])
    n = ds.sizes[0]
    rows = [r for _, r in stream(ds, -(-3 * n // 8))]
    passes = [rows[i:i + n] for i in range(0, 3 * n, n)]
    assert len(passes) == 3 and passes[0] != passes[1]  # three passes, in different orders
    distinct = {r for r in rows}
    assert len(distinct) == n  # every row of the domain, and only those
    assert all(len(set(p)) == n for p in passes)  # each pass is a permutation, no row repeated inside


def test_frequencies_follow_proportions_after_an_update_with_two_workers(mds):
    ds = make(mds, device_batch_size=16, proportions=[0.8, 0.1, 0.1], update_delay=2 * 2 + 1)
    new = np.array([0.1, 0.2, 0.7])
    out = stream(ds, 60, workers=2, update=(4, new))
    doms = np.array([d for d, _ in out]).reshape(60, 16)
    effective = 4 + ds.update_delay
    before, after = doms[:4].ravel(), doms[effective:].ravel()
    freq_before = np.bincount(before, minlength=3) / before.size
    freq_after = np.bincount(after, minlength=3) / after.size
    assert freq_before[0] > 0.6
    # binomial standard error at n ~ 800 is < 0.02; allow 4 of them
    assert np.abs(freq_after - new).max() < 0.07, freq_after


def test_update_takes_effect_at_a_fixed_batch_whatever_the_timing(mds):
    """The same update recorded at the same batch gives the same stream, 0 or 2 workers."""
    p = [0.2, 0.2, 0.6]
    a = stream(make(mds, update_delay=5), 16, update=(3, p))
    b = stream(make(mds, update_delay=5), 16, workers=2, update=(3, p))
    assert a == b


def test_resume_continues_the_exact_stream(mds):
    full_ds = make(mds, update_delay=1)
    full = stream(full_ds, 20, update=(5, [0.3, 0.3, 0.4]))
    first_ds = make(mds, update_delay=1)
    stream(first_ds, 10, update=(5, [0.3, 0.3, 0.4]))
    state = first_ds.state_dict(num_samples=10 * 8, from_beginning=True)
    assert set(state) == {"domains", "seed", "global_batch_size", "batching_method", "sample", "counts", "history"}
    assert len(state["history"]) == 2 and sum(state["counts"]) == 80  # small: no sample ids
    resumed_ds = make(mds, update_delay=1)
    resumed_ds.load_state_dict(state)
    assert stream(resumed_ds, 10, workers=2) == full[80:]


def test_ranks_split_the_global_stream(mds):
    whole = stream(make(mds, device_batch_size=8), 6)
    parts = [stream(make(mds, device_batch_size=4, world_size=2, rank=r), 6) for r in (0, 1)]
    for step in range(6):
        assert whole[step * 8:step * 8 + 4] == parts[0][step * 4:step * 4 + 4]
        assert whole[step * 8 + 4:step * 8 + 8] == parts[1][step * 4:step * 4 + 4]


def test_absent_domain_batches_stay_finite(mds):
    """A domain with a tiny proportion is missing from most batches; nothing becomes NaN."""
    ds = make(mds, proportions=[0.998, 0.001, 0.001])
    batch = next(iter(DataLoader(ds, batch_size=8, collate_fn=collate_rows)))
    assert set(batch["domain"].tolist()) == {0}
    assert torch.isfinite(batch["input_ids"].float()).all() and batch["labels"].equal(batch["input_ids"])


@pytest.mark.parametrize("kw,match", [
    ({"proportions": [0.5, 0.5]}, r"proportions=\[0.5, 0.5\]: expected 3 values, one per domain \['big', 'mid', 'tiny'\]"),
    ({"proportions": [1.0, -1.0, 1.0]}, r"every proportion must be positive"),
    ({"domains": ["big", "nope"]}, r"domains=\['big', 'nope'\]: \['nope'\]"),
    ({"max_seq_len": 64}, r"max_seq_len=64 exceeds the rows"),
    ({"batching_method": "per_stream"}, r"batching_method='per_stream': expected one of \('random', 'stratified'\)"),
])
def test_bad_configuration_is_named(mds, kw, match):
    with pytest.raises(ValueError, match=match):
        make(mds, **kw)


def step_counts(rows: list[tuple[int, tuple]], batch: int) -> np.ndarray:
    """(steps, 3) rows per domain in each global batch."""
    doms = np.array([d for d, _ in rows]).reshape(-1, batch)
    return np.stack([np.bincount(s, minlength=3) for s in doms])


def test_stratified_batches_divide_every_batch_in_proportion(mds):
    """Every batch holds floor or ceil of G p_d rows of each domain, and the mean over steps is G p (unbiased);
    random batches break the floor / ceil bounds (the check can fail)."""
    p = np.array([0.5, 0.3, 0.2])
    counts = step_counts(stream(make(mds, proportions=p, batching_method="stratified"), 300), 8)
    assert (counts >= np.floor(8 * p)).all() and (counts <= np.ceil(8 * p)).all() and (counts.sum(1) == 8).all()
    assert np.abs(counts.mean(0) - 8 * p).max() < 0.1  # the 0.4 / 0.6 extra rows: std 0.49 / sqrt(300) = 0.03
    shuffled = np.array([d for d, _ in stream(make(mds, proportions=p, batching_method="stratified"), 50)])
    assert len({tuple(shuffled[i:i + 8]) for i in range(0, 400, 8)}) > 10  # the order inside a batch is drawn
    rand = step_counts(stream(make(mds, proportions=p), 300), 8)
    assert ((rand < np.floor(8 * p)) | (rand > np.ceil(8 * p))).any()


def test_stratified_stream_splits_over_ranks_workers_and_resume(mds):
    """One global stream: two ranks' slices, two workers through an update, and a resumed run all give it."""
    make_s = lambda **kw: make(mds, batching_method="stratified", **kw)  # noqa: E731
    update = (5, [0.2, 0.2, 0.6])
    whole = stream(make_s(update_delay=5), 20, update=update)
    assert stream(make_s(update_delay=5), 20, workers=2, update=update) == whole
    after = step_counts(whole, 8)[10:]
    assert (after >= np.floor(8 * np.array(update[1]))).all() and (after[:, 2] >= 4).all()
    parts = [stream(make_s(device_batch_size=4, world_size=2, rank=r), 6) for r in (0, 1)]
    first = stream(make_s(), 6)
    for step in range(6):
        assert first[step * 8:step * 8 + 4] == parts[0][step * 4:step * 4 + 4]
        assert first[step * 8 + 4:step * 8 + 8] == parts[1][step * 4:step * 4 + 4]
    head = make_s(update_delay=5)
    stream(head, 8, update=update)
    resumed = make_s(update_delay=5)
    resumed.load_state_dict(head.state_dict(num_samples=8 * 8, from_beginning=True))
    assert stream(resumed, 12) == whole[64:]
    with pytest.raises(ValueError, match=r"has batching_method=stratified, this run random"):
        make(mds).load_state_dict(head.state_dict(num_samples=8 * 8, from_beginning=True))


def test_resume_with_another_domain_list_is_refused(mds):
    state = make(mds).state_dict(num_samples=0, from_beginning=True)
    with pytest.raises(ValueError, match=r"resume: the checkpoint's data stream has domains="):
        make(mds, domains=["big", "mid"]).load_state_dict(state)


def loader_stream(mds, tokenizer, workers: int, n_batches: int = 16, update_at: int = 3) -> list[tuple[int, tuple]]:
    """The stream of ``lemon_mixture`` as llm-foundry builds it, with a proportion update at ``update_at``."""
    from llmfoundry_patches.dataloaders import build_mixture_dataloader
    spec = build_mixture_dataloader(tokenizer, 8, str(mds), seed=5, num_workers=workers,
                                    prefetch_factor=2 if workers else None, update_delay=9)
    out = []
    for b, batch in enumerate(spec.dataloader):
        if b == n_batches:
            break
        out += [(int(d), tuple(r.tolist())) for d, r in zip(batch["domain"], batch["input_ids"])]
        if b + 1 == update_at:
            spec.dataloader.dataset.set_proportions([0.1, 0.1, 0.8], at_batch=b + 1)
    return out


def test_loader_stream_is_the_same_for_0_1_and_4_workers_through_an_update(mds, tiny_tokenizer):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer))
    zero = loader_stream(mds, tok, 0)
    assert loader_stream(mds, tok, 1) == zero and loader_stream(mds, tok, 4) == zero
    before, after = zero[:12 * 8], zero[12 * 8:]                        # the update is in force from batch 12
    share = lambda rows: sum(d == 2 for d, _ in rows) / len(rows)      # noqa: E731  (domain 'tiny')
    assert share(after) > 0.5 > share(before)


def test_update_delay_must_cover_what_the_loader_prefetches(mds, tiny_tokenizer):
    from transformers import AutoTokenizer
    from llmfoundry_patches.dataloaders import build_mixture_dataloader
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer))
    with pytest.raises(ValueError, match=r"train_loader.update_delay=5: expected an integer of at least "
                                         r"num_workers \* prefetch_factor \+ 1 = 9"):
        build_mixture_dataloader(tok, 8, str(mds), num_workers=4, prefetch_factor=2, update_delay=5)
    with pytest.raises(ValueError, match=r"train_loader.batching_method='balanced': expected one of"):
        build_mixture_dataloader(tok, 8, "/no/such/folder", batching_method="balanced")  # named before any data
