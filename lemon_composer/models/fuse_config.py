"""``FuseConfig``: the yaml ``model:`` section of a fusion run (``name: lemon_fusion``), checked up front."""
from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from typing import Any

from lemon_composer.config_types import check_section, check_types
from lemon_composer.fusion.init import CALIBRATED_INITS, INITS
from lemon_composer.fusion.init_pca import check_pca
from lemon_composer.fusion.plan import ATTENTION_OPERATORS, ReceptiveFields, TargetShape


FUSION_PARALLEL = ("replicated", "sharded")


@dataclass
class CalibrationConfig:
    """Calibration rows for ``init: prune`` (``model.calibration``), read from data prep's shards."""
    data_dir: str
    split: str = "train"
    num_batches: int = 8
    batch_size: int = 4
    seq_len: int | None = None  # default: the rows' full length


def allowed_keys(kind: type) -> set[str]:
    return {f.name for f in fields(kind)}


@dataclass
class FuseConfig:
    """Keys of ``model:`` for ``name: lemon_fusion`` (Sec. 3, Eq. 4, Table 1).

    source_path: local HF folder of the frozen source LLaMA.
    target: hidden_size, intermediate_size, num_attention_heads, num_hidden_layers
        [, num_key_value_heads, vocab_size].
    receptive_field: r_h (hidden), r_a (attention), r_i (FFN); default 1. r_a divides head_dim / 2
        (rope: rotary frequencies that share one head-mixing matrix) or head_dim (block).
    attention_operator: rope (default: per rotary frequency, heads2 x heads1, commutes with RoPE for
        any values) | block (the paper's Eq. 3 blocks of r_a coordinates; Table 4 fidelity; with
        r_a < head_dim a learned value splits RoPE's rotation pairs).
    fold_norms: fold the RMSNorm gains into q/k/v, up/gate (and an untied head) before fusion, so the
        fused weights are consistent for any B_emb (``fusion/fold.py``); the target's norms are then 1.
        Default true: exact at every selection init, and lower held-out loss on all 7 domains in the
        measured width run (docs/results/redpajama_width_fold); false gives the paper's fused gains B_emb w.
    shared_gamma: one layer operator for all parameter kinds instead of one per kind.
    norm_gains: beyond the paper, train per-target-layer RMSNorm gain corrections G_norm (L2, 2, D2) and
        G_final (D2): each fused gain times (1 + G), zero at init (``fuse.apply_gains``). They train
        with the dimension operators. Default false (the paper's operators only).
    output_gains: beyond the paper, train per-target-layer output-channel scales G_out (L2, 2, D2): each row
        of the fused o and down of target layer i times (1 + G_out[i]), zero at init (``fuse.apply_gains``);
        they train with the dimension operators. Default false.
    layer_maps: beyond the paper, train per-target-layer maps M_read, M_write (L2, D2/r_h, D2/r_h), the dense
        form of the gains in B_emb's Kronecker form: q, k, v, up, gate of layer i read the residual stream
        through (I + M_read[i]) ⊗ I_{r_h}, o and down write to it through (I + M_write[i]) ⊗ I_{r_h}; zero at
        init (``fuse.apply_gains``), they train with the dimension operators. Default false.
    init: cut | identity | random | avg | prune | lsq | pca | shear; init_seed for random; calibration
        for prune, lsq and pca; shear: source_path is a pruning run's folded source (``lemon-export
        --folded-source``), the operators select what its masks kept (r_h = r_i = 1).
    lam: lambda of Eq. 4 (LM weight; KL gets 1 - lambda); temperature: of the KL term.
    source_dtype: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16 | float64 (exactness tests).
    attn_implementation: auto (flash-attn on GPU when installed, else sdpa) | sdpa | eager | flash_attention_2.
    init_device: cpu (load the source) | meta (shapes only, no weights read: for checking recipes).
    activation_checkpointing: recompute each target layer in backward (HF gradient checkpointing);
        saves the target's activations at about one extra target forward.
    fusion_parallel: replicated (every rank fuses everything) | sharded (each data-parallel rank fuses
        1/N of the source layers; one all-reduce; needs the lemon_fuse_once algorithm).
    loss_chunk_tokens: tokens per chunk of the fused LM + KL loss (memory ~ 3 x chunk x vocab x 4 bytes).
    """
    source_path: str
    target: TargetShape
    receptive_field: ReceptiveFields = field(default_factory=ReceptiveFields)
    attention_operator: str = "rope"
    fold_norms: bool = True
    shared_gamma: bool = False
    norm_gains: bool = False
    output_gains: bool = False
    layer_maps: bool = False
    init: str = "cut"
    init_seed: int = 0
    calibration: CalibrationConfig | None = None
    lam: float = 0.5
    temperature: float = 1.0
    source_dtype: str = "auto"
    attn_implementation: str = "auto"
    init_device: str = "cpu"
    activation_checkpointing: bool = False
    fusion_parallel: str = "replicated"
    loss_chunk_tokens: int = 1024

    @classmethod
    def from_yaml(cls, cfg: dict[str, Any]) -> "FuseConfig":
        """Build from the yaml dict; unknown keys are errors that list what is accepted."""
        cfg = dict(cfg)
        sub = {"target": TargetShape, "receptive_field": ReceptiveFields, "calibration": CalibrationConfig}
        check_section(cls, cfg, key="model", owner="lemon_fusion", required=("source_path", "target"), nested=sub)
        for key, kind in sub.items():
            value = cfg.get(key)
            if isinstance(value, dict):
                allowed = allowed_keys(kind)
                bad = sorted(set(value) - allowed)
                if bad:
                    raise ValueError(f"model.{key}: unknown keys {bad}; accepted: {sorted(allowed)}")
                check_types(value, typing.get_type_hints(kind), f"model.{key}")
                cfg[key] = kind(**value)
            elif value is not None and not isinstance(value, kind):
                raise ValueError(f"model.{key}={value!r}: expected a mapping of {sorted(allowed_keys(kind))}")
        return cls(**cfg)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"model.init={self.init}: expected one of {INITS}")
        if self.init in CALIBRATED_INITS and self.calibration is None and self.init_device != "meta":
            raise ValueError(f"model.init={self.init} needs model.calibration.data_dir (data prep output to score "
                             f"heads, neurons and channels on)")
        if self.init == "pca":
            check_pca(self.fold_norms, self.receptive_field.r_h)
        if self.init == "shear" and (self.receptive_field.r_h, self.receptive_field.r_i) != (1, 1):
            raise ValueError(f"model.init=shear needs model.receptive_field r_h=1 and r_i=1 (got r_h="
                             f"{self.receptive_field.r_h}, r_i={self.receptive_field.r_i}): the channels and "
                             f"neurons pruning keeps are single units, not aligned blocks")
        if self.init == "shear" and self.init_device != "meta":
            from lemon_composer.pruning.export import read_kept
            read_kept(self.source_path)  # a folded source of a pruning run, before any weight loads
        if self.init == "lsq" and self.shared_gamma:
            raise ValueError("model.init=lsq sets gamma.o and gamma.down apart from the other kinds: it needs "
                             "model.shared_gamma=false")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"model.lam={self.lam}: must lie in [0, 1] (Eq. 4)")
        if self.temperature <= 0:
            raise ValueError(f"model.temperature={self.temperature}: must be positive")
        for key in ("fold_norms", "norm_gains", "output_gains", "layer_maps", "activation_checkpointing"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"model.{key}={getattr(self, key)!r}: expected true or false")
        if self.attention_operator not in ATTENTION_OPERATORS:
            raise ValueError(f"model.attention_operator={self.attention_operator}: expected one of "
                             f"{ATTENTION_OPERATORS}")
        if self.fusion_parallel not in FUSION_PARALLEL:
            raise ValueError(f"model.fusion_parallel={self.fusion_parallel}: expected one of {FUSION_PARALLEL}")
        if not isinstance(self.loss_chunk_tokens, int) or isinstance(self.loss_chunk_tokens, bool) \
                or self.loss_chunk_tokens < 1:
            raise ValueError(f"model.loss_chunk_tokens={self.loss_chunk_tokens!r}: expected a positive integer")
        if self.init_device not in ("cpu", "meta"):
            raise ValueError(f"model.init_device={self.init_device}: expected cpu or meta")
