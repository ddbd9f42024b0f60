"""The operator plan for LLaMA (Table 1): sizes of source and target, receptive fields, operator shapes.

Operators (all trainable; the source is frozen):
- ``B_emb``  (D2/r_h, D1/r_h): hidden width, shared by the embedding, lm_head, every residual-side
  weight and every RMSNorm weight;
- ``A_attn``: per source layer, query width (q rows, o columns). ``attention_operator: rope`` (default):
  (L1, F/r_a, heads2, heads1), for each group of r_a of the F = head_dim/2 rotary frequencies one
  heads2 x heads1 matrix shared by both coordinates (i, i + F) of every rotation pair, so fusing
  commutes with RoPE for any values. ``block`` (the paper's Eq. 3, Table 4): (L1, attn2/r_a, attn1/r_a)
  on contiguous blocks of r_a coordinates; with r_a < head_dim a learned value moves coordinates
  across rotary frequencies, so it is exact only at selections;
- ``A_kv``: the same for the key/value width, only when source or target uses grouped-query
  attention; otherwise k and v use ``A_attn`` (one operator per layer as in the paper);
- ``A_ffn``  (L1, H2/r_i, H1/r_i): per source layer, FFN width (up/gate rows, down columns);
- ``gamma``  (L2, L1): the layer operator, one per parameter kind (Algorithm 1) or one shared;
- ``G_norm`` (L2, 2, D2) and ``G_final`` (D2), only with ``norm_gains`` (beyond the paper): each target
  RMSNorm gain is the fused one times (1 + G); zero at every init, so every init stays exact;
- ``G_out`` (L2, 2, D2), only with ``output_gains`` (beyond the paper): each output channel (row) of the
  fused o and down of target layer i times (1 + G_out[i]); zero at every init.
- ``M_read``, ``M_write`` (L2, D2/r_h, D2/r_h), only with ``layer_maps`` (beyond the paper): per target
  layer, the dense generalisation of the gains: q, k, v, up, gate of layer i read through
  (I + M_read[i]) ⊗ I_{r_h} (W' = W ((I + M_read[i]) ⊗ I)^T, B_emb's form), o and down write through
  (I + M_write[i]) ⊗ I_{r_h}; zero at every init.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from transformers import LlamaConfig

from lemon_composer.fusion.operators import check_receptive_field

GAMMA_KINDS = ("q", "k", "v", "o", "up", "gate", "down", "ln1", "ln2")
ATTENTION_OPERATORS = ("rope", "block")


@dataclass(frozen=True)
class LlamaSizes:
    """The sizes of a LLaMA model that fusion needs."""
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    layers: int
    head_dim: int
    vocab: int
    tied: bool = False

    @property
    def attn(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    @classmethod
    def from_config(cls, cfg: LlamaConfig) -> "LlamaSizes":
        kv = cfg.num_key_value_heads or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(hidden=cfg.hidden_size, ffn=cfg.intermediate_size, heads=cfg.num_attention_heads,
                   kv_heads=kv, layers=cfg.num_hidden_layers, head_dim=head_dim, vocab=cfg.vocab_size,
                   tied=bool(cfg.tie_word_embeddings))


@dataclass(frozen=True)
class TargetShape:
    """The target architecture (yaml ``model.target``); head_dim and vocab come from the source."""
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    num_key_value_heads: int | None = None  # default: keep the source's query-per-KV grouping
    vocab_size: int | None = None           # must equal the source's when given


@dataclass(frozen=True)
class ReceptiveFields:
    """Table 1's receptive fields (yaml ``model.receptive_field``)."""
    r_h: int = 1  # hidden (B_emb)
    r_a: int = 1  # attention (A_attn, A_kv): rotary frequencies per operator (rope) or coordinates per block
    r_i: int = 1  # intermediate (A_ffn)


@dataclass(frozen=True)
class FusionPlan:
    """Validated source/target sizes and receptive fields; all shape arithmetic lives here.

    Raises:
        ValueError: naming the yaml key, for a target larger than the source, heads that do not
            divide the hidden size, a receptive field that does not divide a size, a vocab mismatch,
            or a KV grouping that cannot be selected from the source's.
    """
    source: LlamaSizes
    target: LlamaSizes
    rf: ReceptiveFields = field(default_factory=ReceptiveFields)
    shared_gamma: bool = False
    attention: str = "rope"
    fold_norms: bool = False  # RMSNorm gains folded into the weights (``fusion/fold.py``): target norms are 1
    norm_gains: bool = False  # trainable per-target-layer gain corrections G_norm, G_final (``fuse.apply_gains``)
    output_gains: bool = False  # trainable per-target-layer output-channel scales G_out of o, down (``fuse.apply_gains``)
    layer_maps: bool = False  # trainable per-target-layer read / write maps M_read, M_write (``fuse.apply_gains``)

    @classmethod
    def build(cls, source_cfg: LlamaConfig, target: TargetShape, rf: ReceptiveFields, *,
              shared_gamma: bool = False, attention: str = "rope", fold_norms: bool = False,
              norm_gains: bool = False, output_gains: bool = False, layer_maps: bool = False) -> "FusionPlan":
        src = LlamaSizes.from_config(source_cfg)
        t = target
        if t.vocab_size is not None and t.vocab_size != src.vocab:
            raise ValueError(f"target.vocab_size={t.vocab_size} must equal the source's vocab {src.vocab} "
                             f"(fusion keeps the tokenizer)")
        for key, value in (("hidden_size", t.hidden_size), ("intermediate_size", t.intermediate_size),
                           ("num_attention_heads", t.num_attention_heads),
                           ("num_hidden_layers", t.num_hidden_layers)):
            if value < 1:
                raise ValueError(f"target.{key}={value} must be positive")
        if t.hidden_size % t.num_attention_heads:
            raise ValueError(f"target.num_attention_heads={t.num_attention_heads} must divide "
                             f"target.hidden_size={t.hidden_size}")
        head_dim = t.hidden_size // t.num_attention_heads
        if head_dim != src.head_dim:
            raise ValueError(f"target.hidden_size / num_attention_heads = {head_dim} must equal the source's "
                             f"head_dim {src.head_dim} (the target keeps the source's head size and rotary "
                             f"frequencies)")
        kv_heads = t.num_key_value_heads or max(1, t.num_attention_heads // src.group)
        if t.num_attention_heads % kv_heads:
            raise ValueError(f"target.num_key_value_heads={kv_heads} must divide "
                             f"target.num_attention_heads={t.num_attention_heads}")
        tgt = LlamaSizes(hidden=t.hidden_size, ffn=t.intermediate_size, heads=t.num_attention_heads,
                         kv_heads=kv_heads, layers=t.num_hidden_layers, head_dim=head_dim,
                         vocab=src.vocab, tied=src.tied)
        for key, s, g in (("hidden_size", src.hidden, tgt.hidden), ("intermediate_size", src.ffn, tgt.ffn),
                          ("num_attention_heads", src.heads, tgt.heads),
                          ("num_key_value_heads", src.kv_heads, tgt.kv_heads),
                          ("num_hidden_layers", src.layers, tgt.layers)):
            if g > s:
                raise ValueError(f"target.{key}={g} is larger than the source's {s}; LEMON maps a larger "
                                 f"model onto a smaller one")
        if tgt.group > src.group:
            raise ValueError(f"target has {tgt.group} query heads per KV head, the source {src.group}: "
                             f"set target.num_key_value_heads to at least "
                             f"{-(-tgt.heads // src.group)} so whole KV groups can be kept")
        check_receptive_field(rf.r_h, src.hidden, tgt.hidden, name="receptive_field.r_h")
        if attention not in ATTENTION_OPERATORS:
            raise ValueError(f"attention_operator={attention}: expected one of {ATTENTION_OPERATORS}")
        freqs = src.head_dim // 2
        if attention == "rope" and (rf.r_a < 1 or freqs % rf.r_a):  # r_a frequencies share one head mixing
            raise ValueError(f"receptive_field.r_a={rf.r_a} must be a positive divisor of {freqs}, the rotary "
                             f"frequencies per head (attention_operator: rope; block takes divisors of "
                             f"head_dim {src.head_dim})")
        check_receptive_field(rf.r_a, src.head_dim, name="receptive_field.r_a")
        check_receptive_field(rf.r_i, src.ffn, tgt.ffn, name="receptive_field.r_i")
        return cls(source=src, target=tgt, rf=rf, shared_gamma=shared_gamma, attention=attention,
                   fold_norms=fold_norms, norm_gains=norm_gains, output_gains=output_gains, layer_maps=layer_maps)

    def matches_saved(self, saved: str) -> bool:
        """Whether ``saved``, a checkpoint's ``repr`` of its plan, describes this plan.

        An option added to FusionPlan after the checkpoint was written is absent from its repr; the
        checkpoint was made without it, so it matches only where this plan leaves it at its default.
        """
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                 if re.search(rf"[(, ]{f.name}=", saved) or getattr(self, f.name) != f.default]
        return saved == f"{type(self).__name__}({', '.join(parts)})"

    @property
    def separate_kv(self) -> bool:
        """GQA anywhere: k/v need their own operator (their width differs from the query width)."""
        return self.source.kv_heads != self.source.heads or self.target.kv_heads != self.target.heads

    @property
    def fused_kinds(self) -> tuple[str, ...]:
        """The decoder weight kinds fusion computes (folded norms are constant 1, not fused)."""
        return tuple(k for k in GAMMA_KINDS if not (self.fold_norms and k in ("ln1", "ln2")))

    @property
    def gamma_kinds(self) -> tuple[str, ...]:
        return ("shared",) if self.shared_gamma else self.fused_kinds

    def operator_shapes(self) -> dict[str, tuple[int, ...]]:
        s, t, rf = self.source, self.target, self.rf
        if self.attention == "rope":
            groups = s.head_dim // 2 // rf.r_a                  # frequency groups per head
            attn, kv = (s.layers, groups, t.heads, s.heads), (s.layers, groups, t.kv_heads, s.kv_heads)
        else:
            attn, kv = (s.layers, t.attn // rf.r_a, s.attn // rf.r_a), (s.layers, t.kv // rf.r_a, s.kv // rf.r_a)
        shapes = {"B_emb": (t.hidden // rf.r_h, s.hidden // rf.r_h), "A_attn": attn,
                  "A_ffn": (s.layers, t.ffn // rf.r_i, s.ffn // rf.r_i)}
        if self.separate_kv:
            shapes["A_kv"] = kv
        for kind in self.gamma_kinds:
            shapes[f"gamma.{kind}"] = (t.layers, s.layers)
        if self.norm_gains:
            shapes["G_norm"], shapes["G_final"] = (t.layers, 2, t.hidden), (t.hidden,)  # (L2, ln1|ln2, D2)
        if self.output_gains:
            shapes["G_out"] = (t.layers, 2, t.hidden)  # (L2, o|down, D2)
        if self.layer_maps:
            shapes["M_read"] = shapes["M_write"] = (t.layers, t.hidden // rf.r_h, t.hidden // rf.r_h)
        return shapes

    def target_config(self, source_cfg: LlamaConfig) -> LlamaConfig:
        """The source's config with the target's sizes (same vocab, RoPE, norms, tying)."""
        cfg = LlamaConfig.from_dict(source_cfg.to_dict())
        cfg.hidden_size, cfg.intermediate_size = self.target.hidden, self.target.ffn
        cfg.num_attention_heads, cfg.num_key_value_heads = self.target.heads, self.target.kv_heads
        cfg.num_hidden_layers, cfg.head_dim = self.target.layers, self.target.head_dim
        return cfg
