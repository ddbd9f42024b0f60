"""``lemon_dynamic_loading``: dynamic batch loading, Sheared-LLaMA's DoReMi variant (design.md sec. 2).

At every update the per-domain losses ``l`` are compared with reference losses ``l_ref`` and the
train mixture's domain proportions ``w`` are moved towards the domains that lag behind their
reference (Xia et al. 2023, "Sheared LLaMA", Alg. 1; after DoReMi, Xie et al. 2023)::

    d     = max(l - l_ref, 0)              (clamp=True, the paper; clamp=False: d = l - l_ref)
    alpha = softmax(log w + eta * d)
    w'    = (1 - c) * alpha + c / k        (c = smoothing, k = number of domains)

``signal: eval`` (continued pre-training, pruning): at every evaluation, ``l`` are the per-domain
eval losses and ``l_ref`` given or measured once. ``signal: train`` (fusion, beyond the paper): every
``interval`` batches, ``l`` and ``l_ref`` are the fused model's and the frozen source's mean
cross-entropy per domain on the training batches since the last update (``train_excess.py``).

This callback changes training: it pushes ``w'`` into the train dataset (``lemon_mixture``), which
owns the proportions and their checkpointed state. The callback keeps only the domain list, the
reference losses, the number of updates and (``signal: train``) the current window's sums.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from composer.core import Callback, DataSpec, State
from composer.loggers import Logger
from numpy.typing import ArrayLike

from lemon_composer.callbacks.train_excess import DomainExcess

log = logging.getLogger(__name__)

_KEY = "callbacks.lemon_dynamic_loading"


def _check_inputs(weights: ArrayLike, losses: ArrayLike,
                  ref_losses: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate one update's inputs and return them as float64 arrays."""
    w = np.asarray(weights, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    ref = np.asarray(ref_losses, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"train_loader.proportions={w.tolist()} must be a non-empty 1-D list, one per domain")
    if loss.shape != w.shape:
        raise ValueError(f"eval losses {loss.tolist()} ({loss.size} values; eval_loaders, one per domain) must "
                         f"match the {w.size} train_loader.proportions")
    if ref.shape != w.shape:
        raise ValueError(f"{_KEY}.reference_losses={ref.tolist()} has {ref.size} values; expected "
                         f"{w.size}, one per domain")
    for name, values in (("eval loss (eval_loaders)", loss), (f"{_KEY}.reference_losses", ref)):
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise ValueError(f"{name}: non-finite value {values[bad[0]]} for domain index {int(bad[0])}")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"train_loader.proportions={w.tolist()} must all be positive and finite")
    if abs(w.sum() - 1.0) > 1e-6:
        raise ValueError(f"train_loader.proportions={w.tolist()} sum to {w.sum()!r}, not 1 (tolerance 1e-6)")
    return w, loss, ref


def doremi_update(weights: ArrayLike, losses: ArrayLike, ref_losses: ArrayLike, *, eta: float = 1.0,
                  smoothing: float = 1e-4, clamp: bool = True) -> np.ndarray:
    """Sheared-LLaMA's dynamic batch loading step (design.md sec. 2), in float64.

    ``alpha = softmax(log w + eta * d)`` with ``d = max(l - l_ref, 0)`` if ``clamp`` (the paper)
    else ``d = l - l_ref``; returns ``(1 - c) * alpha + c / k`` with ``c = smoothing``.

    Args:
        weights: current proportions ``w``, shape (k,), positive, summing to 1.
        losses: per-domain eval losses ``l``, shape (k,).
        ref_losses: per-domain reference losses ``l_ref``, shape (k,).

    Raises:
        ValueError: wrong lengths, a non-finite loss (naming the domain index), a non-positive
            weight, or weights not summing to 1 within 1e-6.
    """
    w, loss, ref = _check_inputs(weights, losses, ref_losses)
    d = loss - ref
    if clamp:
        d = np.maximum(d, 0.0)
    z = np.log(w) + eta * d                # (k,)
    alpha = np.exp(z - z.max())            # stable softmax: the largest term is exp(0) = 1
    alpha /= alpha.sum()
    return (1.0 - smoothing) * alpha + smoothing / w.size


def constant_update(weights: ArrayLike, losses: ArrayLike, ref_losses: ArrayLike, *, eta: float = 1.0,
                    smoothing: float = 1e-4, clamp: bool = True) -> np.ndarray:
    """``update_type: constant``: validate like :func:`doremi_update`, keep the weights (a baseline)."""
    del eta, smoothing, clamp  # same signature as doremi_update, unused
    return _check_inputs(weights, losses, ref_losses)[0].copy()


UPDATES: dict[str, Callable[..., np.ndarray]] = {"doremi": doremi_update, "constant": constant_update}
SIGNALS = ("eval", "train")


class DynamicLoading(Callback):
    """Update the train mixture's domain proportions from per-domain losses (design.md sec. 2).

    Args (the yaml keys under ``callbacks.lemon_dynamic_loading``):
        domains: domain names, in the train dataset's order; ``null`` = the dataset's ``domains``.
        signal: ``eval`` (default): per-domain eval losses at every evaluation. ``train`` (fusion
            only, ``model.name: lemon_fusion``): the fused and the source model's per-domain
            cross-entropy on the training batches, every ``interval`` batches (see module doc).
        interval: with ``signal: train``, batches between updates (the paper's Table 6 evaluates
            fusion every 40); not used with ``signal: eval``, whose updates follow ``eval_interval``.
        reference_losses: ``l_ref`` for ``signal: eval``, a list (one per domain) or a ``{domain: loss}``
            mapping. ``null`` measures it once, at the first evaluation, from the model's own per-domain
            eval losses (the model before training has moved it much). For continued pre-training
            of a fused model, set ``eval_first: true`` so that evaluation happens at step 0.
            Must stay ``null`` with ``signal: train``: the source's loss on the same tokens is ``l_ref``.
        update_type: ``doremi`` (:func:`doremi_update`) or ``constant`` (log only, weights kept).
        eta: step size of the exponentiated update.
        smoothing: ``c``, the mass spread uniformly over the ``k`` domains.
        clamp: clamp ``l - l_ref`` at 0 (the Sheared-LLaMA paper) or not.
        metric: the eval metric read as the loss, ``state.eval_metrics[label][metric]``.
        eval_label_format: the evaluator label of each domain's eval loader. llm-foundry labels an
            ``eval_loaders`` entry with ``label: X`` as ``eval/X``, hence the default.

    With ``signal: eval`` every domain needs its own eval loader, all on the same eval interval.
    Updates happen at ``Event.EVAL_AFTER_ALL`` (evaluation during ``fit``) and
    ``Event.EVAL_STANDALONE_END`` (a ``trainer.eval()`` call, which is how llm-foundry runs
    ``eval_first``). With ``signal: train`` they happen at ``Event.BATCH_END`` of every ``interval``-th
    batch; a domain without a token in the window keeps its last measured losses. Every rank reads
    the same all-reduced values, so every rank computes the same proportions.

    +-----------------------------------------+--------------------------------------------+
    | Key                                     | Logged value                               |
    +=========================================+============================================+
    | ``dynamic_loading/proportion/<domain>`` | the new proportion ``w'`` pushed to data   |
    | ``dynamic_loading/loss/<domain>``       | the loss ``l`` (eval, or fused on train)   |
    | ``dynamic_loading/ref_loss/<domain>``   | the reference loss ``l_ref``               |
    | ``dynamic_loading/excess/<domain>``     | ``l - l_ref`` (before clamping)            |
    +-----------------------------------------+--------------------------------------------+

    Raises:
        ValueError: naming the yaml key, for an unknown ``update_type`` or ``signal``, a bad
            ``interval``, ``smoothing`` or ``eval_label_format``, reference losses that do not match
            the domains (or any with ``signal: train``), a train dataset that is not ``lemon_mixture``
            or has other domains, a missing eval label, ``signal: train`` with a model that does not
            report the source's loss.
    """

    def __init__(self, domains: Sequence[str] | None = None,
                 reference_losses: Sequence[float] | Mapping[str, float] | None = None,
                 update_type: str = "doremi", eta: float = 1.0, smoothing: float = 1e-4, clamp: bool = True,
                 metric: str = "LanguageCrossEntropy", eval_label_format: str = "eval/{domain}",
                 signal: str = "eval", interval: int | None = None) -> None:
        if update_type not in UPDATES:
            raise ValueError(f"{_KEY}.update_type={update_type!r}: expected one of {sorted(UPDATES)}")
        if signal not in SIGNALS:
            raise ValueError(f"{_KEY}.signal={signal!r}: expected one of {SIGNALS}")
        if signal == "train":
            if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
                raise ValueError(f"{_KEY}.interval={interval!r}: signal: train needs a positive number of "
                                 f"batches between updates, e.g. 40")
            if reference_losses is not None:
                raise ValueError(f"{_KEY}.reference_losses: must be null with signal: train (the source "
                                 f"model's loss on the same training tokens is the reference)")
        elif interval is not None:
            raise ValueError(f"{_KEY}.interval={interval!r}: only for signal: train; with signal: eval the "
                             f"updates follow eval_interval")
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"{_KEY}.smoothing={smoothing} must lie in [0, 1]")
        if not math.isfinite(eta):
            raise ValueError(f"{_KEY}.eta={eta} must be finite")
        if "{domain}" not in eval_label_format:
            raise ValueError(f"{_KEY}.eval_label_format={eval_label_format!r} must contain '{{domain}}'")
        if domains is not None and len(set(domains)) != len(domains):
            raise ValueError(f"{_KEY}.domains={list(domains)} has duplicates")
        self.domains: list[str] | None = None if domains is None else list(domains)
        self.update_type, self.eta, self.smoothing, self.clamp = update_type, eta, smoothing, clamp
        self.metric, self.eval_label_format = metric, eval_label_format
        self.signal, self.interval = signal, interval
        self._reference_spec = reference_losses
        self.reference_losses: np.ndarray | None = None
        self.updates = 0
        self.excess: DomainExcess | None = None       # signal: train, built once the domains are known
        self._last: np.ndarray | None = None          # signal: train, (2, k) last measured l, l_ref
        if reference_losses is not None and (self.domains is not None or not isinstance(reference_losses, Mapping)):
            self.reference_losses = self._reference_array(reference_losses)

    def _reference_array(self, spec: Sequence[float] | Mapping[str, float]) -> np.ndarray:
        """``reference_losses`` in domain order; a list's length is checked once the domains are known."""
        if isinstance(spec, Mapping):
            assert self.domains is not None, "a mapping is resolved only once the domains are known"
            unknown, missing = sorted(set(spec) - set(self.domains)), [d for d in self.domains if d not in spec]
            if unknown or missing:
                raise ValueError(f"{_KEY}.reference_losses names unknown domains {unknown} and lacks {missing}; "
                                 f"the domains are {self.domains}")
            return np.array([spec[d] for d in self.domains], dtype=np.float64)
        ref = np.asarray(spec, dtype=np.float64)
        if ref.ndim != 1 or (self.domains is not None and ref.size != len(self.domains)):
            raise ValueError(f"{_KEY}.reference_losses={list(spec)} has {ref.size} values; expected one per "
                             f"domain {self.domains}")
        return ref

    def _dataset(self, state: State) -> Any:
        """The train dataset, bound to this callback: domains and reference losses checked against it."""
        loader = state.train_dataloader
        if isinstance(loader, DataSpec):
            loader = loader.dataloader
        dataset = getattr(loader, "dataset", None)
        if not all(hasattr(dataset, a) for a in ("domains", "proportions", "set_proportions")):
            raise ValueError(f"{_KEY} needs a train dataset with domains, proportions and set_proportions: "
                             f"the train_loader must be `name: lemon_mixture`, got {type(dataset).__name__}")
        if self.domains is None:
            self.domains = list(dataset.domains)
        elif self.domains != list(dataset.domains):
            raise ValueError(f"{_KEY}.domains={self.domains} (from the yaml or the resumed checkpoint) must equal "
                             f"the train_loader's domains {list(dataset.domains)}, in order")
        if self.reference_losses is None and self._reference_spec is not None:
            self.reference_losses = self._reference_array(self._reference_spec)
        if self.reference_losses is not None and self.reference_losses.size != len(self.domains):
            raise ValueError(f"{_KEY}.reference_losses={self.reference_losses.tolist()} has "
                             f"{self.reference_losses.size} values; expected one per domain {self.domains}")
        return dataset

    def _eval_losses(self, state: State) -> np.ndarray:
        """Each domain's ``metric`` from its evaluator (already all-reduced across ranks)."""
        assert self.domains is not None, "bound by _dataset"
        labels = [self.eval_label_format.format(domain=d) for d in self.domains]
        missing = [lb for lb in labels if self.metric not in state.eval_metrics.get(lb, {})]
        if missing:
            raise ValueError(f"{_KEY}: no {self.metric} for eval labels {missing} (eval_label_format="
                             f"{self.eval_label_format!r}); the evaluators have {sorted(state.eval_metrics)}; "
                             f"add one eval_loaders entry per domain")
        losses = np.array([float(state.eval_metrics[lb][self.metric].compute()) for lb in labels])
        for domain, label, loss in zip(self.domains, labels, losses):
            if not math.isfinite(loss):
                raise ValueError(f"{_KEY}: eval {self.metric} of domain {domain!r} (label {label!r}) is {loss}; "
                                 f"does that eval loader hold any data?")
        return losses

    def _train_losses(self) -> tuple[np.ndarray, np.ndarray]:
        """``signal: train``: the window's fused and source cross-entropy per domain; a domain without
        a token in it keeps its last ones (never measured: ``l = l_ref = 0``, no excess)."""
        assert self.excess is not None, "built at fit_start"
        fused, source, tokens = self.excess.take()
        last = np.zeros((2, fused.size)) if self._last is None else self._last
        seen = tokens > 0
        self._last = np.where(seen, np.stack([fused, source]), last)  # (2, k)
        return self._last[0].copy(), self._last[1].copy()

    def fit_start(self, state: State, logger: Logger) -> None:
        del logger  # unused
        self._dataset(state)
        if self.signal == "train":
            model = getattr(state.model, "module", state.model)  # DDP wraps the ComposerModel
            if not getattr(model, "REPORTS_SOURCE_LOSS", False):
                raise ValueError(f"{_KEY}.signal=train needs the fusion model (model.name: lemon_fusion), whose "
                                 f"loss reports each token's source cross-entropy; got {type(model).__name__}")
            if self.excess is None:  # else resumed from a checkpoint's window
                assert self.domains is not None, "bound by _dataset"
                self.excess = DomainExcess(len(self.domains))

    def after_loss(self, state: State, logger: Logger) -> None:
        del logger  # unused
        if self.signal != "train":
            return
        assert self.excess is not None, "built at fit_start"
        stats, batch = state.outputs["stats"], state.batch  # set by LemonFusionModel.loss (Eq. 4)
        self.excess.add(stats.ce, stats.source_ce, stats.mask, batch["domain"])

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.signal != "train":
            return
        assert self.excess is not None, "built at fit_start"
        self.excess.end_batch(state.device.tensor_to_device)
        if int(state.timestamp.batch) % self.interval == 0:
            self._update(state, logger)

    def eval_after_all(self, state: State, logger: Logger) -> None:
        if self.signal == "eval":
            self._update(state, logger)

    def eval_standalone_end(self, state: State, logger: Logger) -> None:
        if self.signal == "eval":
            self._update(state, logger)

    def _update(self, state: State, logger: Logger) -> None:
        """Read the losses, compute the new proportions and push them to the train dataset."""
        dataset = self._dataset(state)
        if self.signal == "train":
            losses, self.reference_losses = self._train_losses()
        else:
            losses = self._eval_losses(state)
        if self.reference_losses is None:
            self.reference_losses = losses.copy()
            log.info("dynamic loading: reference losses measured at batch %d: %s",
                     int(state.timestamp.batch), dict(zip(self.domains, losses.tolist())))
        update = UPDATES[self.update_type]
        weights = update(dataset.proportions, losses, self.reference_losses, eta=self.eta,
                         smoothing=self.smoothing, clamp=self.clamp)
        dataset.set_proportions(weights, at_batch=int(state.timestamp.batch))
        self.updates += 1
        excess = losses - self.reference_losses
        metrics: dict[str, float] = {}
        for i, d in enumerate(self.domains):
            metrics[f"dynamic_loading/proportion/{d}"] = float(weights[i])
            metrics[f"dynamic_loading/loss/{d}"] = float(losses[i])
            metrics[f"dynamic_loading/ref_loss/{d}"] = float(self.reference_losses[i])
            metrics[f"dynamic_loading/excess/{d}"] = float(excess[i])
        logger.log_metrics(metrics)
        log.info("dynamic loading update %d at batch %d: %s", self.updates, int(state.timestamp.batch),
                 {d: round(float(p), 4) for d, p in zip(self.domains, weights)})

    def state_dict(self) -> dict[str, Any]:
        ref = None if self.reference_losses is None else self.reference_losses.tolist()
        state: dict[str, Any] = {"domains": self.domains, "reference_losses": ref, "updates": self.updates}
        if self.signal == "train":
            state["train_window"] = None if self.excess is None else self.excess.state_dict()
            state["train_last"] = None if self._last is None else self._last.tolist()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse another domain list; keep measured reference losses (yaml-given ones win)."""
        saved = None if state["domains"] is None else list(state["domains"])
        if self.domains is not None and saved is not None and saved != self.domains:
            raise ValueError(f"{_KEY}.domains={self.domains} differ from the resumed checkpoint's {saved}; "
                             f"dynamic loading cannot resume with another domain list")
        if self.domains is None:
            self.domains = saved
        if self._reference_spec is None and state["reference_losses"] is not None:
            self.reference_losses = np.asarray(state["reference_losses"], dtype=np.float64)
        self.updates = int(state["updates"])
        if self.signal == "train":
            window = state.get("train_window")
            if window is not None:  # its domains are the saved ones, checked against the loader at fit_start
                self.excess = DomainExcess(len(window["window"][0]))
                self.excess.load_state_dict(window)
            last = state.get("train_last")
            self._last = None if last is None else np.asarray(last, dtype=np.float64)
