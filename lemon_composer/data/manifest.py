"""The manifest data prep writes beside its shards, and the checks a training run makes against it."""
from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from lemon_composer.data.corpus import SPLITS
from lemon_composer.data.tokenizer import tokenizer_fingerprint

MANIFEST = "manifest.json"


def read_manifest(data_dir: str | Path, *, key: str = "data_dir") -> dict:
    """Load ``<data_dir>/manifest.json``; ``key`` names the yaml key in errors."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{key}={data_dir}: no {MANIFEST} there (expected the --out folder of "
                         f"data_prep/jsonl_to_mds.py)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{key}={data_dir}: {path} is damaged ({err}); prepare the data again") from None


def check_shards(folder: Path, *, domain: str, key: str, data_dir: str | Path) -> None:
    """Every shard MDS's index lists is there at its full size: a truncated copy is found at start-up,
    not as an IndexError in the middle of training."""
    index = folder / "index.json"
    try:
        shards = json.loads(index.read_text())["shards"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as err:
        raise ValueError(f"{key}={data_dir}: domain '{domain}': {index} is damaged ({err!r}); prepare the data "
                         f"again") from None
    for shard in shards:
        raw = shard["raw_data"]
        path = folder / raw["basename"]
        size = path.stat().st_size if path.is_file() else None
        if size != raw["bytes"]:
            raise ValueError(f"{key}={data_dir}: domain '{domain}': shard {path} is "
                             f"{'missing' if size is None else f'{size} bytes'}, its index says {raw['bytes']} "
                             f"(a truncated or partial copy); copy or prepare the data again")


def domain_dirs(data_dir: str | Path, split: str, domains: list[str] | None, *,
                key: str = "data_dir") -> dict[str, Path]:
    """The shard folder of each requested domain of one split, checked to exist."""
    manifest = read_manifest(data_dir, key=key)
    if split not in SPLITS:
        raise ValueError(f"split={split}: expected one of {SPLITS}")
    known = sorted(manifest["domains"])
    domains = known if domains is None else list(domains)
    unknown = [d for d in domains if d not in manifest["domains"]]
    if unknown or not domains:
        raise ValueError(f"domains={domains}: {unknown or 'empty'}; {data_dir} holds {known}")
    dirs = {d: Path(data_dir) / split / d for d in domains}
    for d, path in dirs.items():
        if not (path / "index.json").is_file():
            raise ValueError(f"{key}={data_dir}: domain '{d}' has no {split} shards at {path}")
        check_shards(path, domain=d, key=key, data_dir=data_dir)
        if manifest["domains"][d][split]["rows"] == 0:
            raise ValueError(f"{key}={data_dir}: domain '{d}' has no {split} rows of "
                             f"{manifest['seq_len']} tokens; prepare it with a smaller --seq-len")
    return dirs


def check_compatible(manifest: dict, *, tokenizer: PreTrainedTokenizerBase, max_seq_len: int,
                     data_dir: str | Path) -> None:
    """The training tokenizer and sequence length must match what the rows were made with."""
    if max_seq_len > manifest["seq_len"]:
        raise ValueError(f"dataset.max_seq_len={max_seq_len} exceeds the rows of {data_dir} "
                         f"({manifest['seq_len']} tokens)")
    fp = tokenizer_fingerprint(tokenizer)
    if fp != manifest["tokenizer"]["fingerprint"]:
        raise ValueError(f"tokenizer: its vocabulary (fingerprint {fp}) differs from the one {data_dir} "
                         f"was made with ({manifest['tokenizer']['source']}, "
                         f"{manifest['tokenizer']['fingerprint']}); tokenizer.name, the data and the model "
                         f"must all share the model's tokenizer")


def check_data_matches_model(manifest: dict, data_dir: str | Path, model_dir: str | Path, *,
                             data_key: str, model_key: str, trained: bool = True,
                             vocab_size: int | None = None) -> None:
    """The rows' token ids must mean what the model was trained on, whatever tokenizer a run names.

    Compared with the tokenizer saved beside a trained model when there is one (vocabulary
    fingerprint), and always with the model's ``vocab_size`` (``vocab_size`` overrides config.json,
    as llm-foundry's ``config_overrides`` do for a model trained from scratch, ``trained=False``).
    Reads only small files: config.json and the tokenizer's.
    """
    from transformers import AutoConfig, AutoTokenizer

    data_tok = manifest["tokenizer"]
    try:
        model_fp = tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)) \
            if trained else None
    except Exception:  # noqa: BLE001 - no tokenizer beside the model: fall back to its vocab_size
        model_fp = None
    if model_fp is not None and model_fp != data_tok["fingerprint"]:
        raise ValueError(f"{data_key}={data_dir}: made with the tokenizer {data_tok['source']} (vocabulary "
                         f"{data_tok['fingerprint']}, {data_tok['vocab_size']} tokens), but {model_key}={model_dir} "
                         f"uses another one ({model_fp}); prepare the data with the model's tokenizer "
                         f"(data prep --tokenizer {model_dir})")
    vocab = vocab_size or AutoConfig.from_pretrained(str(model_dir), local_files_only=True).vocab_size
    if data_tok["vocab_size"] > vocab:
        raise ValueError(f"{data_key}={data_dir}: made with the tokenizer {data_tok['source']} "
                         f"({data_tok['vocab_size']} tokens), more than {model_key}={model_dir} has "
                         f"({vocab}); prepare the data with the model's tokenizer")
