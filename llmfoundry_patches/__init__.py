"""The seams between LEMON-Composer and llm-foundry 0.22: every registration lives here.

The same names are declared as setup entry points (``llmfoundry_<registry>`` groups), so an
installed plugin is found by llm-foundry's own scripts too; ``register()`` makes them available
from a bare checkout as well (``train.py`` calls it).
"""
from __future__ import annotations

from llmfoundry import registry

from lemon_composer.algorithms.fuse_once import FuseOnce
from lemon_composer.algorithms.fusion_stages import FusionStages
from lemon_composer.callbacks.dynamic_loading import DynamicLoading
from lemon_composer.callbacks.finite_guard import FiniteGuard
from lemon_composer.callbacks.hf_export import HFExport
from lemon_composer.models.fusion_model import LemonFusionModel
from lemon_composer.pruning.model import LemonPruneModel
from llmfoundry_patches.dataloaders import build_domain_text_dataloader, build_mixture_dataloader

#: registry -> {yaml name: builder}; mirrored by setup.py's entry points.
COMPONENTS = {
    registry.dataloaders: {"lemon_domains": build_domain_text_dataloader,
                           "lemon_mixture": build_mixture_dataloader},
    registry.models: {"lemon_fusion": LemonFusionModel, "lemon_prune": LemonPruneModel},
    registry.algorithms: {"lemon_fusion_stages": FusionStages, "lemon_fuse_once": FuseOnce},
    registry.callbacks: {"lemon_hf_export": HFExport, "lemon_dynamic_loading": DynamicLoading,
                         "lemon_finite_guard": FiniteGuard},
}


def register() -> None:
    """Register every plugin component with llm-foundry's registries (idempotent)."""
    for reg, items in COMPONENTS.items():
        for name, func in items.items():
            reg.register(name, func=func)
