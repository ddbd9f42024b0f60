"""Ablations in the layout of the paper's Tables 3-4: ``python -m lemon_composer.ablation <config.yaml> [key=value ...]``.

For one source, target shape and budget: the training-free baselines (cut, random, avg, prune)
exported straight from the source, and with ``prune_steps`` Sheared-LLaMA's pruned model ("Shear"); LEMON fusion from the cut and prune inits
(``yamls/fuse/smollm2_cpu.yaml`` as the template, run through ``composer train.py``); optionally a
short continued pre-training of every candidate with equal steps (``yamls/cpt/smollm2_cpu.yaml``);
then every candidate (and the source) evaluated the same way: held-out loss per domain on data
prep's eval split, and the local multiple-choice tasks when given. Writes ``results.json``,
``results.md`` (Tables 3-4 layout), the fusion runs' held-out loss curves, operator heatmaps, and
the layer-CKA reports of the source and of the LEMON models.

With ``lr_sweep`` (multipliers of both operator rates), each LEMON init first gets one short fusion
per multiplier (``lr_sweep_steps`` steps, ``out/sweep/<init>/x<mult>``), evaluated the same way;
the multiplier with the lowest held-out loss (mean over domains) sets that init's full run.

Settings (paper Sec. 4.4): ``depth`` trains only the layer operator (the target keeps every width;
Table 3), ``width`` only the dimension operators (the target keeps every layer; Table 4), ``both``
all of them; ``trained_operators`` (gamma | dims | all) overrides that choice, e.g. ``all`` in depth
lets the (identity-initialised) dimension operators adapt each layer as the 7B recipes do. The
generated yamls are kept beside the results as the record of what ran.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from omegaconf import OmegaConf as om

from lemon_composer.analysis.cka_report import cka_report
from lemon_composer.analysis.curves import read_eval_curve
from lemon_composer.analysis.operators import operator_figures
from lemon_composer.analysis.plots import training_curves
from lemon_composer.atomic import atomic_write_text
from lemon_composer.callbacks.dynamic_loading import DynamicLoading
from lemon_composer.cli import run_cli
from lemon_composer.config_types import check_arguments
from lemon_composer.data.manifest import read_manifest
from lemon_composer.data.mixing import BATCHING_METHODS, check_proportions
from lemon_composer.eval.perplexity import domain_perplexity
from lemon_composer.export import export_baseline, export_checkpoint
from lemon_composer.fusion.init import CALIBRATED_INITS, INITS
from lemon_composer.launch import REPO, run_composer
from lemon_composer.sources.load import read_source_config

log = logging.getLogger(__name__)

FUSE_TEMPLATE = REPO / "yamls" / "fuse" / "smollm2_cpu.yaml"
CPT_TEMPLATE = REPO / "yamls" / "cpt" / "smollm2_cpu.yaml"
PRUNE_TEMPLATE = REPO / "yamls" / "prune" / "smollm2_cpu.yaml"
SETTINGS = ("depth", "width", "both")
# llm-foundry's scheduler registry (a test checks it), for fusion_scheduler
SCHEDULERS = ("constant_with_warmup", "cosine_with_warmup", "linear_decay_with_warmup", "inv_sqrt_with_warmup")
FROZEN = {"gamma": r"operators\.(B_emb|A_|G_|M_)", "dims": r"operators\.gamma", "all": None}  # optimizer.disable_grad
TRAINED = ("auto", *FROZEN)  # trained_operators; auto: the setting's own (Sec. 4.4)
DEFAULT_TRAINED = {"depth": "gamma", "width": "dims", "both": "all"}
# fusion/fuse.py's parameter names
DIM_OPERATORS = ("B_emb", "A_attn", "A_kv", "A_ffn", "G_norm", "G_final", "G_out", "M_read", "M_write")
RUNNER_MODEL_KEYS = ("name", "source_path", "target", "receptive_field", "init")  # set from the runner's own keys


@dataclass
class AblationConfig:
    """The runner's yaml (``yamls/ablation/*.yaml``); every key is documented there.

    baselines, lemon_inits: inits from ``lemon_composer.fusion.init.INITS``.
    lr_sweep: null (off) or multipliers of lr_dims and lr_gamma, each tried for lr_sweep_steps fusion
        steps per LEMON init; the lowest held-out loss picks the rates of that init's full run.
    trained_operators: auto (the setting's: depth gamma, width dims, both all) | gamma | dims | all.
    prune_steps: > 0 runs Sheared-LLaMA pruning (``lemon_prune``, ``yamls/prune/smollm2_cpu.yaml``) to the
        target for this many steps first; ``shear`` in baselines is the pruned model ("Shear"), in
        lemon_inits a fusion from its folded source with r_h = r_i = 1 ("LEMON-Shear").
    model_overrides: extra ``model.<key>: <value>`` for every fusion run (sweep runs included) and
        every baseline export (e.g. fold_norms, which ``pca`` needs).
    lr_operators: per dimension operator (B_emb, A_attn, A_kv, A_ffn, G_norm, G_final, G_out, M_read, M_write) a peak
        rate in place of lr_dims, e.g. {A_attn: 5.0e-3}; one optimizer param group each, scaled like lr_dims in a sweep.
    train_proportions: null (the template's loader: rows in proportion to each domain's train rows),
        ``uniform`` or one number per domain (sorted names): the fusion runs' domain mixture (``lemon_mixture``),
        as the short CPT already mixes uniformly; the held-out loss is a mean over domains.
    fusion_scheduler: null (the template's cosine_with_warmup) or a scheduler mapping for every fusion run,
        e.g. {name: linear_decay_with_warmup, t_warmup: 0.05dur, alpha_f: 0.0}; ``name`` from llm-foundry's
        scheduler registry.
    seed: every fusion run's ``seed`` (Composer's seed and the train loaders' shuffle / mixture draws), so
        a configuration can be repeated on other fusion batches; inits and the eval split do not depend on it.
    fusion_dynamic_loading: null (off) or the keys of ``lemon_dynamic_loading`` for every fusion run, which
        then moves ``train_proportions`` by the fused model's excess loss over the source on its own
        training batches (``signal: train``), e.g. {interval: 40, eta: 1.0}; needs train_proportions.
    fusion_betas: null (the template's Adam betas, [0.9, 0.95]) or [beta1, beta2] for every fusion run. Small-batch
        advice (Marek et al. 2025) puts beta2 near 1 at 1K-token batches, but for LEMON-Cut 0.99 ended worse than
        0.95 on 3 seeds (docs/results/redpajama_depth_all/notes.md, round 14).
    fusion_batching: random (each row's domain drawn on its own) or stratified (every batch divided among the
        domains in proportion: with 8 rows and 7 uniform domains, each domain once plus one more); needs
        train_proportions. Stratified gave LEMON-Cut 4.979 / 4.997 / 5.004 on 3 seeds against 5.001 / 4.989 /
        5.040 with random batches (Prune 5.020; docs/results/redpajama_depth_all/notes.md, round 15).
    """
    source_path: str
    data_dir: str
    out: str
    setting: str
    target: dict[str, int]
    receptive_field: dict[str, int] = field(default_factory=lambda: {"r_h": 1, "r_a": 1, "r_i": 1})
    baselines: list[str] = field(default_factory=lambda: ["cut", "random", "avg", "prune"])
    lemon_inits: list[str] = field(default_factory=lambda: ["cut", "prune"])
    fusion_steps: int = 40
    lr_dims: float = 5.0e-4   # peak rates that trained stably from both inits on SmolLM2 (docs/results/)
    lr_gamma: float = 2.0e-3
    seq_len: int = 128
    batch_size: int = 8
    cpt_steps: int = 0
    cpt_lr: float = 5.0e-4
    eval_max_rows: int | None = 64
    mc_tasks: str | None = None
    mc_limit: int | None = 50
    lr_sweep: list[float] | None = None
    lr_sweep_steps: int = 10
    model_overrides: dict[str, Any] = field(default_factory=dict)
    prune_steps: int = 0
    trained_operators: str = "auto"
    lr_operators: dict[str, float] = field(default_factory=dict)
    train_proportions: str | list[float] | None = None
    fusion_scheduler: dict[str, Any] | None = None
    seed: int = 17
    fusion_dynamic_loading: dict[str, Any] | None = None
    fusion_betas: list[float] | None = None
    fusion_batching: str = "random"

    def __post_init__(self) -> None:
        self._check_run_keys()
        if self.setting not in SETTINGS:
            raise ValueError(f"setting={self.setting}: expected one of {SETTINGS}")
        src = read_source_config(self.source_path, key="source_path")
        keep = {"depth": ("hidden_size", "intermediate_size", "num_attention_heads"),
                "width": ("num_hidden_layers",), "both": ()}[self.setting]
        for key in keep:
            if self.target.get(key) != getattr(src, key):
                raise ValueError(f"setting={self.setting} keeps the source's {key}={getattr(src, key)}; "
                                 f"target.{key}={self.target.get(key)}")
        if self.lr_operators and trained_operators(self) == "gamma":
            raise ValueError(f"lr_operators={self.lr_operators}: the dimension operators are frozen here "
                             f"(trained_operators={self.trained_operators}, setting={self.setting}); set "
                             "trained_operators to dims or all")
        domains = sorted(read_manifest(self.data_dir, key="data_dir")["domains"])
        self._check_train_proportions(domains)
        if self.fusion_batching != "random" and self.train_proportions is None:
            raise ValueError(f"fusion_batching={self.fusion_batching}: needs train_proportions (uniform or one "
                             "number per domain), the mixture whose batches it divides")
        self._check_dynamic_loading()
        if self.mc_tasks is not None and not Path(self.mc_tasks).is_dir():
            raise ValueError(f"mc_tasks={self.mc_tasks}: no such folder of BIG-bench task.json files")

    def _check_run_keys(self) -> None:
        """Numbers, inits, sweep and model overrides: each bad value named with its key before anything loads."""
        for key, least, optional in (("fusion_steps", 1, False), ("cpt_steps", 0, False), ("prune_steps", 0, False),
                                     ("seq_len", 2, False), ("seed", 0, False),
                                     ("batch_size", 1, False), ("eval_max_rows", 1, True), ("mc_limit", 1, True)):
            value = getattr(self, key)
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{key}={value!r}: expected an integer >= {least}{' or null' if optional else ''}")
        for key in ("lr_dims", "lr_gamma", "cpt_lr"):
            if not _positive(getattr(self, key)):
                raise ValueError(f"{key}={getattr(self, key)!r}: expected a positive number")
        for key in ("baselines", "lemon_inits"):
            value = getattr(self, key)
            if not isinstance(value, (list, tuple)) or any(i not in INITS for i in value):
                raise ValueError(f"{key}={value!r}: expected a list of inits from {INITS}")
            if "shear" in value and self.prune_steps == 0:
                raise ValueError(f"{key}: shear needs a pruning run first: set prune_steps > 0")
        sweep = self.lr_sweep
        if sweep is not None:
            if not isinstance(sweep, (list, tuple)) or not sweep or not all(map(_positive, sweep)) \
                    or len(set(sweep)) != len(sweep):
                raise ValueError(f"lr_sweep={sweep!r}: expected null or a non-empty list of distinct positive "
                                 "numbers (multipliers of lr_dims and lr_gamma)")
            self.lr_sweep = [float(m) for m in sweep]
        if self.trained_operators not in TRAINED:
            raise ValueError(f"trained_operators={self.trained_operators!r}: expected one of {TRAINED}")
        steps = self.lr_sweep_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"lr_sweep_steps={steps!r}: expected a positive integer (fusion steps per sweep run)")
        rates = self.lr_operators
        if not isinstance(rates, dict) or set(rates) - set(DIM_OPERATORS) or not all(map(_positive, rates.values())):
            raise ValueError(f"lr_operators={rates!r}: expected a mapping of {DIM_OPERATORS} to positive rates, "
                             "e.g. {A_attn: 5.0e-3}")
        if not isinstance(self.model_overrides, dict):
            raise ValueError(f"model_overrides={self.model_overrides!r}: expected a mapping of model keys to "
                             "values, e.g. {attention_operator: block}")
        sched = self.fusion_scheduler
        if sched is not None and not (isinstance(sched, dict) and sched.get("name") in SCHEDULERS):
            raise ValueError(f"fusion_scheduler={sched!r}: expected null or a mapping whose name is one of "
                             f"{SCHEDULERS}, e.g. {{name: linear_decay_with_warmup, t_warmup: 0.05dur, alpha_f: 0.0}}")
        betas = self.fusion_betas
        if betas is not None:
            if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(
                    isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas):
                raise ValueError(f"fusion_betas={betas!r}: expected null or [beta1, beta2], each in [0, 1), "
                                 "e.g. [0.9, 0.99]")
            self.fusion_betas = [float(b) for b in betas]
        if self.fusion_batching not in BATCHING_METHODS:
            raise ValueError(f"fusion_batching={self.fusion_batching!r}: expected one of {BATCHING_METHODS}")
        owned = sorted(set(self.model_overrides) & set(RUNNER_MODEL_KEYS))
        if owned:
            raise ValueError(f"model_overrides: {owned} are set by the runner (from source_path, target, "
                             "receptive_field, lemon_inits); set those keys instead")

    def _check_dynamic_loading(self) -> None:
        """``fusion_dynamic_loading``: callback keys that ``lemon_dynamic_loading`` accepts with ``signal: train``."""
        value = self.fusion_dynamic_loading
        if value is None:
            return
        if not isinstance(value, dict) or {"signal", "domains"} & set(value):
            raise ValueError(f"fusion_dynamic_loading={value!r}: expected null or a mapping of lemon_dynamic_loading "
                             "keys (signal and domains are the runner's), e.g. {interval: 40, eta: 1.0}")
        if self.train_proportions is None:
            raise ValueError("fusion_dynamic_loading: needs train_proportions (uniform or one number per domain), "
                             "the mixture whose proportions it moves")
        try:
            DynamicLoading(signal="train", **value)
        except TypeError as err:
            raise ValueError(f"fusion_dynamic_loading={value!r}: {err}") from None
        except ValueError as err:
            raise ValueError(f"fusion_dynamic_loading: {err}") from None

    def _check_train_proportions(self, domains: list[str]) -> None:
        """null, ``uniform`` or one positive number per domain of ``data_dir``; ``uniform`` becomes 1/k each."""
        value = self.train_proportions
        if value is None:
            return
        if value == "uniform":
            self.train_proportions = [1.0 / len(domains)] * len(domains)
            return
        if not isinstance(value, (list, tuple)) or not all(map(_positive, value)):
            raise ValueError(f"train_proportions={value!r}: expected null, uniform or a list of positive numbers, "
                             f"one per domain {domains}")
        self.train_proportions = [float(v) for v in check_proportions(value, domains, key="train_proportions")]


def _positive(x: Any) -> bool:
    """A finite number > 0 (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _fusion_yaml(cfg: AblationConfig, init: str, out: Path, steps: int, mult: float) -> Path:
    """The fusion template with this ablation's source, target, init, ``steps``, both rates times ``mult``,
    frozen operators and model overrides."""
    y = om.load(FUSE_TEMPLATE)
    y.variables.data_dir, y.variables.source_path, y.variables.seq_len = cfg.data_dir, cfg.source_path, cfg.seq_len
    y.model.target = dict(cfg.target)
    y.model.receptive_field = dict(cfg.receptive_field)
    y.model.init = init
    if init == "shear":  # fuse from the pruning run's folded source; pruned units are single units
        y.variables.source_path = str(_shear_source(cfg))
        y.model.receptive_field = {**cfg.receptive_field, "r_h": 1, "r_i": 1}
    if init in CALIBRATED_INITS:
        y.model.calibration = {"data_dir": cfg.data_dir}
    y.merge_with({"model": cfg.model_overrides})
    if cfg.train_proportions is not None:
        y.train_loader = _mixture_loader(cfg)
    if cfg.fusion_dynamic_loading is not None:
        y.callbacks.lemon_dynamic_loading = {"signal": "train", **cfg.fusion_dynamic_loading}
    if cfg.fusion_scheduler is not None:
        y.scheduler = dict(cfg.fusion_scheduler)
    y.seed = cfg.seed
    y.max_duration = f"{steps}ba"
    y.eval_interval = f"{max(1, steps // 4)}ba"
    y.global_train_batch_size = y.device_train_microbatch_size = cfg.batch_size
    y.optimizer.lr = cfg.lr_dims * mult
    if cfg.fusion_betas is not None:
        y.optimizer.betas = list(cfg.fusion_betas)
    y.optimizer.param_groups[0].lr = cfg.lr_gamma * mult
    y.optimizer.param_groups += [{"param_str_match": rf"operators\.{name}$", "lr": rate * mult}
                                 for name, rate in cfg.lr_operators.items()]
    frozen = FROZEN[trained_operators(cfg)]
    if frozen:
        y.optimizer.disable_grad = frozen
    y.save_folder, y.save_interval, y.save_overwrite = str(out / f"ckpt-{init}"), y.max_duration, True
    path = out / f"fuse-{init}.yaml"
    atomic_write_text(path, om.to_yaml(y))
    return path


def _mixture_loader(cfg: AblationConfig) -> dict[str, Any]:
    """The fusion train loader for ``train_proportions``: every domain of ``data_dir`` at its proportion."""
    # no loader workers: new proportions (fusion_dynamic_loading) take effect from the next batch on
    return {"name": "lemon_mixture", "data_dir": "${variables.data_dir}", "split": "train",
            "domains": sorted(read_manifest(cfg.data_dir)["domains"]), "proportions": list(cfg.train_proportions),
            "seed": "${seed}", "max_seq_len": "${variables.seq_len}", "num_workers": 0, "update_delay": 1,
            "batching_method": cfg.fusion_batching}


def trained_operators(cfg: AblationConfig) -> str:
    """gamma | dims | all: ``trained_operators``, or with ``auto`` the setting's own."""
    return DEFAULT_TRAINED[cfg.setting] if cfg.trained_operators == "auto" else cfg.trained_operators


def _shear_source(cfg: AblationConfig) -> Path:
    """Where ``prune`` exports the folded source that ``init: shear`` fuses from."""
    return Path(cfg.out) / "models" / "shear-source"


def prune(cfg: AblationConfig, out: Path) -> Path | None:
    """``prune_steps`` of Sheared-LLaMA pruning to the target; export the pruned model ("Shear") and
    the folded source of ``init: shear``; return the pruned model's folder (None without pruning)."""
    if not cfg.prune_steps:
        return None
    y = om.load(PRUNE_TEMPLATE)
    y.variables.data_dir, y.variables.source_path, y.variables.seq_len = cfg.data_dir, cfg.source_path, cfg.seq_len
    y.model.target = dict(cfg.target)
    y.max_duration = y.eval_interval = f"{cfg.prune_steps}ba"
    y.global_train_batch_size = y.device_train_microbatch_size = cfg.batch_size
    y.save_folder, y.save_interval, y.save_overwrite = str(out / "ckpt-prune"), y.max_duration, True
    path = out / "prune.yaml"
    atomic_write_text(path, om.to_yaml(y))
    run_composer(path, [], out / "prune.log", echo=False)
    ckpt = out / "ckpt-prune" / f"ep0-ba{cfg.prune_steps}-rank0.pt"
    export_checkpoint(ckpt, _shear_source(cfg), overwrite=True, folded_source=True)
    return export_checkpoint(ckpt, out / "models" / "shear", overwrite=True)


def _cpt_yaml(cfg: AblationConfig, model_dir: Path, name: str, out: Path) -> Path:
    """The CPT template on this ablation's data: its domains, one labelled evaluator each."""
    y = om.load(CPT_TEMPLATE)
    domains = sorted(read_manifest(cfg.data_dir)["domains"])
    y.variables.model_path, y.variables.data_dir, y.variables.seq_len = str(model_dir), cfg.data_dir, cfg.seq_len
    y.train_loader.domains = domains
    y.train_loader.proportions = [1.0 / len(domains)] * len(domains)
    y.eval_loaders = [{**om.to_container(y.variables.eval_defaults), "label": d, "domains": [d]} for d in domains]
    y.max_duration = f"{cfg.cpt_steps}ba"
    y.eval_interval = y.max_duration
    y.optimizer.lr = cfg.cpt_lr
    y.global_train_batch_size = y.device_train_microbatch_size = cfg.batch_size
    y.save_folder, y.save_interval, y.save_overwrite = str(out / f"ckpt-cpt-{name}"), y.max_duration, True
    path = out / f"cpt-{name}.yaml"
    atomic_write_text(path, om.to_yaml(y))
    return path


def _fuse(cfg: AblationConfig, init: str, out: Path, steps: int, mult: float) -> tuple[Path, Path]:
    """One LEMON fusion through ``composer train.py`` in ``out``; return its final checkpoint and its log."""
    out.mkdir(parents=True, exist_ok=True)
    log_path = run_composer(_fusion_yaml(cfg, init, out, steps, mult), [], out / f"fuse-{init}.log", echo=False)
    return out / f"ckpt-{init}" / f"ep0-ba{steps}-rank0.pt", log_path


def pick_multiplier(losses: dict[float, float]) -> float:
    """The multiplier with the lowest held-out loss; ties go to the smaller one, NaN never wins."""
    return min(sorted(losses), key=lambda m: math.inf if math.isnan(losses[m]) else losses[m])


def _sweep_loss(cfg: AblationConfig, init: str, mult: float, out: Path) -> float:
    """Held-out loss (mean over domains) after ``lr_sweep_steps`` of fusion at ``mult`` times both rates.

    The run's yaml and log stay in ``out``; its checkpoint and exported model are removed once evaluated.
    """
    ckpt, _ = _fuse(cfg, init, out, cfg.lr_sweep_steps, mult)
    model = export_checkpoint(ckpt, out / "model", overwrite=True)
    losses = _domain_losses(cfg, model)
    shutil.rmtree(ckpt.parent)
    shutil.rmtree(model)
    return sum(losses.values()) / len(losses)


def sweep_learning_rates(cfg: AblationConfig, out: Path) -> list[dict[str, Any]]:
    """``lr_sweep``: one short fusion per LEMON init and multiplier; a row each, the lowest loss ``chosen``."""
    if not cfg.lr_sweep:
        return []
    rows = []
    for init in cfg.lemon_inits:
        losses = {m: _sweep_loss(cfg, init, m, out / "sweep" / init / f"x{m}") for m in cfg.lr_sweep}
        best = pick_multiplier(losses)
        rows += [{"init": init, "multiplier": m, "lr_dims": cfg.lr_dims * m, "lr_gamma": cfg.lr_gamma * m,
                  "loss": loss, "chosen": m == best} for m, loss in losses.items()]
    return rows


def build_candidates(cfg: AblationConfig, out: Path, mults: dict[str, float],
                     sheared: Path | None = None) -> tuple[dict[str, Path], dict[str, Path]]:
    """Export the baselines (``sheared``: the pruned model, the "Shear" row) and run LEMON fusion
    (rates times ``mults[init]``, default 1); return {method: HF folder} and {method: fusion log}."""
    models, logs = {}, {}
    for init in cfg.baselines:
        if init == "shear":
            models["Shear"] = sheared
            continue
        extra = {"calibration": {"data_dir": cfg.data_dir}} if init in CALIBRATED_INITS else {}
        models[init.capitalize()] = export_baseline(
            cfg.source_path, init, cfg.target, out / "models" / init, overwrite=True,
            receptive_field=cfg.receptive_field, **{"attn_implementation": "sdpa", **cfg.model_overrides, **extra})
    for init in cfg.lemon_inits:
        name = f"LEMON-{init.capitalize()}"
        ckpt, logs[name] = _fuse(cfg, init, out, cfg.fusion_steps, mults.get(init, 1.0))
        models[name] = export_checkpoint(ckpt, out / "models" / f"lemon-{init}", overwrite=True)
        operator_figures(ckpt, out / "figures" / f"operators-lemon-{init}")
    if cfg.cpt_steps:
        for name in list(models):
            slug = name.lower()
            run_composer(_cpt_yaml(cfg, models[name], slug, out), [], out / f"cpt-{slug}.log", echo=False)
            models[f"{name} + CPT"] = export_checkpoint(
                out / f"ckpt-cpt-{slug}" / f"ep0-ba{cfg.cpt_steps}-rank0.pt", out / "models" / f"{slug}-cpt",
                overwrite=True)
    return models, logs


def _domain_losses(cfg: AblationConfig, model: Path) -> dict[str, float]:
    """Held-out loss per domain on data prep's eval split (the first ``eval_max_rows`` rows of each)."""
    return {d: r["loss"] for d, r in domain_perplexity(model, cfg.data_dir, max_rows=cfg.eval_max_rows).items()}


def evaluate_candidates(cfg: AblationConfig, models: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Held-out loss per domain and, with mc_tasks, multiple-choice accuracy, for every model."""
    results = {}
    for name, path in models.items():
        row: dict[str, Any] = {"layers": read_source_config(path, key="model").num_hidden_layers,
                               "loss": _domain_losses(cfg, path)}
        if cfg.mc_tasks:
            from lemon_composer.evaluate import evaluate
            summary = evaluate(path, [f"all-local:{cfg.mc_tasks}"], limit=cfg.mc_limit)
            row["mc"] = {t.removeprefix("bigbench_"): r["value"] for t, r in summary["tasks"].items()}
        results[name] = row
    return results


def markdown_table(results: dict[str, dict[str, Any]], title: str) -> str:
    """Tables 3-4 layout: method, layers, task accuracies (%) and their average, held-out losses."""
    first = next(iter(results.values()))
    tasks, domains = list(first.get("mc", {})), list(first["loss"])
    head = ["Method", "L."] + tasks + (["AVG"] if tasks else []) + [f"loss {d}" for d in domains] + ["loss avg"]
    body = []
    for name, r in results.items():
        cells = [name, str(r["layers"])]
        if tasks:
            acc = [100 * r["mc"][t] for t in tasks]
            cells += [f"{a:.1f}" for a in acc] + [f"{sum(acc) / len(acc):.1f}"]
        losses = [r["loss"][d] for d in domains]
        cells += [f"{v:.3f}" for v in losses] + [f"{sum(losses) / len(losses):.3f}"]
        body.append(cells)
    return _table(title, head, body)


def sweep_table(rows: list[dict[str, Any]], steps: int) -> str:
    """The learning-rate sweep: one row per LEMON init and multiplier, the chosen one marked."""
    head = ["LEMON init", "multiplier", "lr_dims", "lr_gamma", "held-out loss", "chosen"]
    body = [[r["init"], f"{r['multiplier']:g}", f"{r['lr_dims']:.2e}", f"{r['lr_gamma']:.2e}", f"{r['loss']:.3f}",
             "yes" if r["chosen"] else ""] for r in rows]
    return _table(f"Learning-rate sweep ({steps} fusion steps per run, held-out loss averaged over domains)",
                  head, body)


def _table(title: str, head: list[str], body: list[list[str]]) -> str:
    """A markdown table under a ``###`` title."""
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body]) + "\n"


def _shape(c: dict[str, Any]) -> str:
    """``layers x hidden (ffn, heads)`` of a config dict, for table titles."""
    return (f"{c['num_hidden_layers']} layers x {c['hidden_size']} "
            f"(ffn {c['intermediate_size']}, {c['num_attention_heads']} heads)")


@contextlib.contextmanager
def output_folder(out: Path) -> Iterator[Path]:
    """``out``, created if needed, and removed again if a failure leaves it as it was made: empty."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield out
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()
        raise


def run(cfg: AblationConfig) -> dict[str, dict[str, Any]]:
    with output_folder(Path(cfg.out)) as out:
        return _run(cfg, out)


def _run(cfg: AblationConfig, out: Path) -> dict[str, dict[str, Any]]:
    sheared = prune(cfg, out)
    sweep = sweep_learning_rates(cfg, out)
    models, logs = build_candidates(cfg, out, {r["init"]: r["multiplier"] for r in sweep if r["chosen"]}, sheared)
    results = evaluate_candidates(cfg, {"Source": Path(cfg.source_path), **models})
    curves = {name: read_eval_curve(path) for name, path in logs.items()}
    if curves:
        training_curves(curves, out / "figures" / "fusion_heldout_loss.png", title="LEMON fusion: held-out loss",
                        ylabel="LM cross-entropy (nats/token)")
    cka_report(cfg.source_path, str(out / "figures" / "cka-source"), name="Source", data=cfg.data_dir)  # Fig. 2
    for name in logs:  # the fused models, before any CPT (Fig. 6)
        cka_report(str(models[name]), str(out / "figures" / f"cka-{name.lower()}"), name=name)
    title = f"{cfg.setting} ablation: {_shape(read_source_config(cfg.source_path).to_dict())} -> {_shape(cfg.target)}"
    tables = [markdown_table(results, title)] + ([sweep_table(sweep, cfg.lr_sweep_steps)] if sweep else [])
    atomic_write_text(out / "results.md", "\n".join(tables))
    atomic_write_text(out / "results.json", json.dumps({"config": asdict(cfg), "results": results,
                                                        "lr_sweep": sweep, "curves": curves}, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", help="yamls/ablation/<name>.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def body() -> None:
        if not Path(a.config).is_file():
            raise ValueError(f"{a.config}: no such yaml file")
        values = om.to_container(om.merge(om.load(a.config), om.from_cli(a.overrides)), resolve=True)
        check_arguments(AblationConfig, values, "")
        cfg = AblationConfig(**values)
        print(markdown_table(run(cfg), f"{cfg.setting} ablation"))
    return run_cli("ablation", body)


if __name__ == "__main__":
    sys.exit(main())
