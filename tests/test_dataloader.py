"""The ``lemon_domains`` dataloader: manifest checks before any data is read, and what it yields."""
from __future__ import annotations

import numpy as np
import pytest
from llmfoundry import registry
from transformers import AutoTokenizer

import llmfoundry_patches
from lemon_composer.data.prep import DataPrepConfig, prepare
from llmfoundry_patches.dataloaders import build_domain_text_dataloader
from test_data_prep import rows

LOADER = {"drop_last": False, "num_workers": 0, "prefetch_factor": None, "persistent_workers": False}


@pytest.fixture(scope="module")
def mds(tmp_path_factory, tiny_tokenizer):
    import random

    from conftest import random_docs, write_jsonl
    root = tmp_path_factory.mktemp("loader")
    rng = random.Random(3)
    for domain in ("a", "b"):
        write_jsonl(root / "corpus" / domain / "x.jsonl", random_docs(rng, 120, code=domain == "b"))
    prepare(DataPrepConfig(input=root / "corpus", out=root / "mds", tokenizer=str(tiny_tokenizer),
                           seq_len=32, num_workers=1))
    return root / "mds"


@pytest.fixture(scope="module")
def tok(mds):
    return AutoTokenizer.from_pretrained(str(mds / "tokenizer"))


def build(tok, mds, **kw):
    kw = {"dataset": {"max_seq_len": 32, "shuffle": False}, **LOADER, **kw}
    return build_domain_text_dataloader(tok, 4, str(mds), **kw)


def test_registered_by_entry_point_and_by_register():
    llmfoundry_patches.register()
    assert registry.dataloaders.get("lemon_domains") is build_domain_text_dataloader
    from importlib.metadata import entry_points
    eps = {ep.name: ep.value for ep in entry_points(group="llmfoundry_dataloaders")}
    assert eps["lemon_domains"] == "llmfoundry_patches.dataloaders:build_domain_text_dataloader"


def test_eval_loader_yields_exactly_the_domain_rows(tok, mds):
    spec = build(tok, mds, split="eval", domains=["b"])
    got = np.concatenate([batch["input_ids"].numpy() for batch in spec.dataloader])
    expected = rows(mds, "eval", "b")
    assert got.shape == expected.shape and len(got) > 0
    assert sorted(map(tuple, got)) == sorted(map(tuple, expected.astype(np.int64)))


def test_train_loader_draws_from_every_domain(tok, mds):
    spec = build(tok, mds, split="train")
    seen = {tuple(r) for batch in spec.dataloader for r in batch["input_ids"].numpy()}
    for domain in ("a", "b"):
        assert {tuple(r) for r in rows(mds, "train", domain).astype(np.int64)} <= seen


@pytest.mark.parametrize("kw,match", [
    ({"data_dir_override": "nowhere"}, r"data_dir=nowhere: no manifest.json"),
    ({"domains": ["c"]}, r"domains=\['c'\]: \['c'\]; .* holds \['a', 'b'\]"),
    ({"proportions": [1.0]}, r"proportions=\[1.0\]: expected 2 values, one per domain \['a', 'b'\]"),
    ({"split": "test"}, r"split=test: expected one of"),
    ({"dataset": {"max_seq_len": 64}}, r"dataset.max_seq_len=64 exceeds the rows of .* \(32 tokens\)"),
    ({"dataset": {"max_seq_len": 32, "local": "x"}}, r"dataset.streams/local/remote are derived from data_dir"),
])
def test_bad_config_is_named(tok, mds, kw, match):
    data_dir = kw.pop("data_dir_override", mds)
    with pytest.raises(ValueError, match=match):
        build(tok, data_dir, **kw)


def test_tokenizer_mismatch_is_named(mds):
    other = AutoTokenizer.from_pretrained(str(mds / "tokenizer"))
    other.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match=r"tokenizer: its vocabulary .* differs .* tokenizer.name, the data and the model must all share"):
        build(other, mds)


@pytest.mark.parametrize("recipe", ["fuse/smollm2_cpu", "fuse/7b_to_1.3b", "fuse/7b_to_2.7b", "prune/smollm2_cpu"])
def test_recipe_eval_subset_sees_every_domain(tok, mds, recipe):
    """The recipes whose one evaluator holds every domain cut it to eval_subset_num_batches: its first batches
    must mix the domains (unshuffled they are the first domain's rows only) and be the same rows in every run,
    whatever its seed (the 7B prune and the CPT recipes evaluate each domain on its own)."""
    from omegaconf import OmegaConf as om

    from conftest import REPO
    y = om.load(REPO / "yamls" / f"{recipe}.yaml")
    assert y.eval_subset_num_batches >= 1

    def first_rows(seed: int) -> list[tuple[int, ...]]:
        y.seed = seed
        cfg = om.to_container(y.eval_loader, resolve=False)
        assert cfg.pop("name") == "lemon_domains" and cfg.pop("split") == "eval"
        cfg.pop("data_dir")
        cfg["dataset"] = {**om.to_container(y.eval_loader.dataset, resolve=True), "max_seq_len": 32}
        spec = build(tok, mds, split="eval", **{**cfg, **LOADER})
        return [tuple(r) for batch in [next(iter(spec.dataloader))] for r in batch["input_ids"].numpy()]
    got = first_rows(17)
    by_domain = {d: {tuple(r) for r in rows(mds, "eval", d).astype(np.int64)} for d in ("a", "b")}
    assert all(any(r in by_domain[d] for r in got) for d in ("a", "b")), "the first eval batch misses a domain"
    assert first_rows(18) == got
