"""Per-rank memory and FLOP planner for lemon_fusion runs and FSDP hf_causal_lm (continued pre-training) runs.

    python -m lemon_composer.planner yamls/fuse/7b_to_1.3b.yaml --source-config llama-2-7b \\
        [--gpus 8] [--gpu-mem 80] [key=value ...]
    python -m lemon_composer.planner yamls/cpt/1.3b.yaml [--model-config lemon-1.3b] [--gpus 8] ...

Prints the memory of one rank by component (GiB), the FLOPs of one optimizer step by part (TFLOP),
whether the run fits in ``--gpu-mem`` GiB and, when it does not, which yaml keys to change.
Sizes come from ``FusionPlan`` and from the models built on the meta device (no weights).
The fusion memory model is checked against measured peaks on the CPU by ``bench/planner_check.py``.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from lemon_composer.cli import run_cli
from lemon_composer.fusion.plan import FusionPlan, LlamaSizes, ReceptiveFields, TargetShape
from lemon_composer.models.fuse_config import FuseConfig
from lemon_composer.sources.load import read_source_config

GIB = 2**30
CUDA_OVERHEAD = 1.5 * GIB   # CUDA context, NCCL and allocator fragmentation
MARGIN = 0.10               # shown separately; ``fits`` requires total * (1 + MARGIN) <= limit


def _llama(hidden: int, ffn: int, heads: int, layers: int) -> dict[str, Any]:
    """A LLaMA-2-style config: MHA, head_dim 128, vocab 32000, untied."""
    return dict(hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads, num_key_value_heads=heads,
                num_hidden_layers=layers, vocab_size=32000, head_dim=128, tie_word_embeddings=False,
                max_position_embeddings=4096, rms_norm_eps=1e-5)


BUILTIN_CONFIGS = {"llama-2-7b": _llama(4096, 11008, 32, 32), "lemon-1.3b": _llama(2048, 5504, 16, 24),
                   "lemon-2.7b": _llama(2560, 6912, 20, 32)}
CPT_BUILTINS = {"lemon-cpt-1.3b": "lemon-1.3b", "lemon-cpt-2.7b": "lemon-2.7b"}   # shipped run_name -> builtin
SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")
FSDP_MIXED = ("PURE", "DEFAULT", "FULL")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
PRECISIONS = ("fp32", "amp_bf16", "amp_fp16", "amp_fp8")
FUSION_PARALLEL = ("replicated", "sharded")
# (chunk, V) fp32 blocks alive at once in the fused loss (models/distill_loss.py): the student and
# teacher logits while their log-softmaxes are formed, then log p, log q and their difference; the
# loss runs with autocast disabled, so amp_* adds none
LOSS_BLOCKS = 3


@dataclass
class Estimate:
    """One rank's memory (bytes per component) and FLOPs (per optimizer step per part)."""
    memory: dict[str, float]
    flops: dict[str, float]
    peak: str = ""              # when the peak happens
    advice: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> float:
        return sum(self.memory.values())

    @property
    def margin_bytes(self) -> float:
        return MARGIN * self.total_bytes

    def fits(self, limit_bytes: float) -> bool:
        return self.total_bytes + self.margin_bytes <= limit_bytes


@dataclass(frozen=True)
class RunShape:
    """The yaml keys the planner reads, checked."""
    plan: FusionPlan
    s: int                      # bytes per source / fused weight element
    a: int                      # bytes per activation element
    amp: bool                   # precision amp_*: autocast
    seq: int
    micro: int                  # device_train_microbatch_size
    micro_per_step: int         # micro-batches per optimizer step on one rank
    ckpt: bool
    sharded: bool
    chunk: int                  # loss_chunk_tokens
    flash: bool                 # flash-attn (no KV repeat) vs SDPA (K, V repeated to the query width)
    fuse_once: bool             # algorithms.lemon_fuse_once: fuse once per optimizer step
    joint: bool                 # dimension and layer operators train together at some point (not layers_then_dims)


def source_config(name_or_path: str, *, key: str = "--source-config", flag: str = "--source-config") -> LlamaConfig:
    """A builtin config (``BUILTIN_CONFIGS``) or a local folder with config.json."""
    if name_or_path in BUILTIN_CONFIGS:
        return LlamaConfig(**BUILTIN_CONFIGS[name_or_path])
    if not (Path(name_or_path) / "config.json").is_file():
        raise ValueError(f"{key}={name_or_path}: no config.json there; pass {flag} with one of "
                         f"{sorted(BUILTIN_CONFIGS)} or a folder holding the model's config.json")
    return read_source_config(name_or_path, key=key)


def cpt_model_config(cfg: dict[str, Any], name_or_path: str | None = None) -> tuple[LlamaConfig, str]:
    """The config of an hf_causal_lm run and where it came from: ``name_or_path`` (--model-config), else
    model.pretrained_model_name_or_path's config.json, else the builtin for a shipped run_name."""
    if name_or_path:
        return source_config(name_or_path, key="--model-config", flag="--model-config"), name_or_path
    key = "model.pretrained_model_name_or_path"
    path = str((cfg.get("model") or {}).get("pretrained_model_name_or_path"))
    builtin = CPT_BUILTINS.get(cfg.get("run_name", ""))
    if (Path(path) / "config.json").is_file() or builtin is None:
        return source_config(path, key=key, flag="--model-config"), path
    return source_config(builtin), f"builtin {builtin} for run_name {cfg['run_name']}: {path} has no config.json"


def load_config(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """The yaml with ``key=value`` overrides applied and ``${...}`` resolved."""
    if not Path(path).is_file():
        raise ValueError(f"yaml={path}: no such file")
    cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.to_container(cfg, resolve=True)


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r}: expected a positive integer")
    return value


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r}: expected true or false")
    return value


def _precision(cfg: dict[str, Any]) -> str:
    precision = cfg.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    return precision


def _batch(cfg: dict[str, Any], gpus: int) -> tuple[int, int, int]:
    """(sequence length, micro-batch size, micro-batches per optimizer step on one rank), checked."""
    seq = _positive_int(cfg.get("max_seq_len") or (cfg.get("variables") or {}).get("seq_len"), "max_seq_len")
    micro = _positive_int(cfg.get("device_train_microbatch_size"), "device_train_microbatch_size")
    global_batch = _positive_int(cfg.get("global_train_batch_size"), "global_train_batch_size")
    _positive_int(gpus, "--gpus")
    if global_batch % (gpus * micro):
        raise ValueError(f"global_train_batch_size={global_batch} must be a multiple of --gpus x "
                         f"device_train_microbatch_size = {gpus} x {micro}")
    return seq, micro, global_batch // gpus // micro


def _sub(model: dict[str, Any], key: str, kind: type) -> Any:
    try:
        return kind(**(model.get(key) or {}))
    except TypeError as e:
        raise ValueError(f"model.{key}: {e}") from None


def run_shape(cfg: dict[str, Any], source_cfg: LlamaConfig, *, gpus: int, device: str) -> RunShape:
    """Read and check the keys of ``cfg`` (the resolved yaml) that the planner needs."""
    model = cfg.get("model") or {}
    if model.get("name") != "lemon_fusion":
        raise ValueError(f"model.name={model.get('name')!r}: expected lemon_fusion (hf_causal_lm: plan_cpt)")
    if "target" not in model:
        raise ValueError("model.target is required for lemon_fusion")
    plan = FusionPlan.build(source_cfg, _sub(model, "target", TargetShape),
                            _sub(model, "receptive_field", ReceptiveFields),
                            shared_gamma=bool(model.get("shared_gamma", FuseConfig.shared_gamma)),
                            attention=model.get("attention_operator", FuseConfig.attention_operator),
                            fold_norms=bool(model.get("fold_norms", FuseConfig.fold_norms)),
                            **{key: _flag(model.get(key, False), f"model.{key}")
                               for key in ("norm_gains", "output_gains", "layer_maps")})
    dtype = model.get("source_dtype", "auto")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"model.source_dtype={dtype!r}: expected auto or one of {sorted(DTYPE_BYTES)}")
    precision = _precision(cfg)
    ckpt = _flag(model.get("activation_checkpointing", False), "model.activation_checkpointing")
    parallel = model.get("fusion_parallel", "replicated")
    if parallel not in FUSION_PARALLEL:
        raise ValueError(f"model.fusion_parallel={parallel!r}: expected one of {FUSION_PARALLEL}")
    algorithms = cfg.get("algorithms") or {}
    fuse_once = "lemon_fuse_once" in algorithms
    if parallel == "sharded" and gpus > 1 and not fuse_once:
        raise ValueError("model.fusion_parallel=sharded needs algorithms.lemon_fuse_once (every rank must "
                         "fuse at the same points)")
    # only layers_then_dims never trains gamma and the dimension operators together
    staged = "lemon_fusion_stages" in algorithms and \
        (algorithms["lemon_fusion_stages"] or {}).get("schedule", "dims_then_layers") == "layers_then_dims"
    seq, micro, micro_per_step = _batch(cfg, gpus)
    s = DTYPE_BYTES[dtype]
    amp = precision.startswith("amp")
    flash = device == "cuda" and model.get("attn_implementation", "auto") in ("auto", "flash_attention_2")
    return RunShape(plan=plan, s=s, a=2 if amp or s == 2 else s, amp=amp, seq=seq, micro=micro,
                    micro_per_step=micro_per_step, ckpt=ckpt, sharded=parallel == "sharded",
                    chunk=_positive_int(model.get("loss_chunk_tokens", 1024), "model.loss_chunk_tokens"),
                    flash=flash, fuse_once=fuse_once, joint=not staged)


def _numel(cfg: LlamaConfig) -> int:
    """Parameters of ``LlamaForCausalLM(cfg)`` built on the meta device (tied weights once)."""
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())


def _kinds(plan: FusionPlan) -> list[tuple[int, int, int, int, int]]:
    """Per weight kind: (n1, m1, n2, m2, r) with n the operator side (rows; o/down transposed).

    The rope attention operator mixes whole heads per coordinate: as cheap as a block operator with
    r = head_dim (2 n2 n1 m / head_dim FLOPs).
    """
    s, t, rf = plan.source, plan.target, plan.rf
    r_a = s.head_dim if plan.attention == "rope" else rf.r_a
    attn = (s.attn, s.hidden, t.attn, t.hidden, r_a)
    kv = (s.kv, s.hidden, t.kv, t.hidden, r_a)
    ffn = (s.ffn, s.hidden, t.ffn, t.hidden, rf.r_i)
    return [attn, kv, kv, attn, ffn, ffn, ffn]  # q, k, v, o, up, gate, down


def _mapped_weights(plan: FusionPlan) -> int:
    """Elements of the decoder weights that ``layer_maps`` maps (every q, k, v, o, up, gate, down of the
    target); 0 without it. Each map costs 2 x these x D2 / r_h FLOPs forward and saves the unmapped copy."""
    t = plan.target
    return t.layers * t.hidden * (2 * t.attn + 2 * t.kv + 3 * t.ffn) if plan.layer_maps else 0


def layer_activation_bytes(t: LlamaSizes, a: int, flash: bool) -> int:
    """Bytes autograd saves per token in one transformers ``LlamaDecoderLayer`` (a: activation bytes).

    RMSNorm (x2): the fp32 input x32 (pow, mul) 4*D, the normalised x in a (weight * x) a*D,
    its output (input of q/k/v resp. gate/up linears) a*D -> 2 * (4 + 2a) * D.
    Attention: RoPE saves only cos/sin; SDPA saves contiguous q, k, v, out and the fp32 logsumexp
    (4 * heads); SDPA repeats K/V to the query width (flash-attn does not); out is copied
    (transpose().contiguous()) as o_proj's input -> a * (3 * attn + 2 * kv_saved) + 4 * heads.
    MLP: gate output (SiLU input), SiLU output, up output (both for the product), the product
    (down_proj's input) -> 4 * a * ffn. No T^2 term (SDPA / flash keep no attention matrix).
    """
    kv_saved = t.kv if flash else t.attn
    return 2 * (4 + 2 * a) * t.hidden + a * (3 * t.attn + 2 * kv_saved) + 4 * t.heads + 4 * a * t.ffn


def activation_bytes(t: LlamaSizes, a: int, flash: bool, ckpt: bool, tokens: int) -> int:
    """Bytes autograd saves for ``tokens`` tokens through the decoder and its final norm. With activation
    checkpointing: every layer's input plus one layer's activations (the one recomputed in backward)."""
    per_layer = layer_activation_bytes(t, a, flash)
    layers = t.layers * t.hidden * a + per_layer if ckpt else t.layers * per_layer
    return tokens * (layers + (4 + 2 * a) * t.hidden)


def memory(r: RunShape, *, gpus: int, device: str, p_source: int, p_target: int) -> tuple[dict[str, float], str]:
    """Bytes per component alive at one rank's peak in the steady state, and where that peak is.

    Alive throughout: the source, the operators, AdamW's moments (and DDP's gradient buckets), the
    fused weights, and what autograd saves of the fusion. Per kind (n the operator side, o/down
    transposed): X = A_j W_j (L1, n2, m1), saved for B_emb's gradient (as a copy the matmul folds), and
    F = X B_emb^T (L1, n2, m2), saved for gamma's; the embedding (and untied head) product is
    recomputed in backward, so nothing of vocab size is saved. ``layers_then_dims`` never keeps X and F
    together (layer stage: the cached F; dims stage: X), so the larger, X, counts; ``dims_then_layers``
    trains both in its second stage, like ``joint``. ``layer_maps`` also saves the unmapped target
    weights. Sharded: L1 is this
    rank's share; the partial mixes are summed during the fusion's forward and are gone by the peak.
    With lemon_fuse_once the fused weights' leaves accumulate gradients over micro-batches 1..n-1;
    without it every micro-batch fuses and back-propagates into the operators, whose gradients then
    stay from the first micro-batch on. Then the larger of two moments of the last micro-batch:
    - its loss: the target's saved activations, the teacher's final hidden states, and the chunked
      loss: LOSS_BLOCKS (chunk, V) blocks at once, the fp32 gradients it keeps
      for the head and the student hidden states, an fp32 copy of a bf16 head (or the teacher's
      one-layer transient, 4 D1 + 3 ffn1 per token, when that is larger);
    - its backward through the fusion (activations freed by then): the fused weights' gradients,
      the operators' gradients, and the gradients of one kind's X and F.
    """
    plan, s, a = r.plan, r.s, r.a
    src, tgt = plan.source, plan.target
    p_ops = sum(math.prod(shape) for shape in plan.operator_shapes().values())
    tokens = r.micro * r.seq
    l1 = math.ceil(src.layers / gpus) if r.sharded else src.layers
    x = sum(l1 * n2 * m1 for _, m1, n2, _, _ in _kinds(plan))
    f = sum(l1 * n2 * m2 for _, _, n2, m2, _ in _kinds(plan))
    act = activation_bytes(tgt, a, r.flash, r.ckpt, tokens)
    acc = max(s, 4)                                                         # the loss computes in fp32 at least
    loss = (LOSS_BLOCKS * min(r.chunk, r.micro * (r.seq - 1)) * src.vocab * acc
            + src.vocab * tgt.hidden * acc * (1 if s == acc else 2) + tokens * tgt.hidden * acc)
    ddp = gpus > 1
    accumulating = r.micro_per_step > 1
    common = {
        "source": p_source * s,
        "operators (fp32)": p_ops * 4,
        "AdamW moments" + (" + DDP buckets" if ddp else ""): p_ops * (12 if ddp else 8),
        "fused weights": p_target * s,
        "fused-weight grads (leaves)": p_target * s if r.fuse_once and accumulating else 0,
        "operator grads (fp32)": p_ops * 4 if not r.fuse_once and accumulating else 0,
        "fusion intermediates": (x + (f if r.joint else 0) + _mapped_weights(plan)) * s,
        "CUDA context": CUDA_OVERHEAD if device == "cuda" else 0.0,
    }
    loss_peak = {
        "target activations": act,
        "teacher hidden states": tokens * src.hidden * s,
        "loss": max(loss, tokens * (4 * src.hidden + 3 * src.ffn) * s),
    }
    backward_peak = {
        "fused-weight grads (last micro-batch)": p_target * s,
        "operator grads (fp32)": p_ops * 4,
        "fusion backward (one kind)": max(l1 * n2 * (m1 + m2) for _, m1, n2, m2, _ in _kinds(plan)) * s,
    }
    if sum(loss_peak.values()) >= sum(backward_peak.values()):
        return {**common, **loss_peak}, "the last micro-batch's loss"
    return {**common, **backward_peak}, "the backward through the fusion"


def flops(r: RunShape, *, gpus: int, p_source: int, p_target: int) -> dict[str, float]:
    """FLOPs of one optimizer step on one rank: fusion (every operator training), teacher, student.

    Fusion: a block operator (n2/r, n1/r) applied to W (n1, m) costs 2 n2 n1 m / r; per source layer
    and kind A_j on the rows (m = m1), then B_emb on the columns (2 n2 m1 m2 / r_h), then gamma's mix
    2 L2 L1 n2 m2; with layer_maps each target weight's map (``_mapped_weights``); embedding (and head)
    2 V D1 D2 / r_h; backward twice the forward (the vocabulary products once more: recomputed). Sharded: L1 is this
    rank's share. Once per step with lemon_fuse_once, else once per micro-batch.
    Teacher: one pass of ``_lm_flops``; student: training passes (3, or 4 with activation checkpointing).
    """
    plan = r.plan
    src, tgt, rh = plan.source, plan.target, plan.rf.r_h
    tokens = r.micro_per_step * r.micro * r.seq
    l1 = math.ceil(src.layers / gpus) if r.sharded else src.layers
    fwd = sum(l1 * (2 * n2 * n1 * m1 / rr + 2 * n2 * m1 * m2 / rh) + 2 * tgt.layers * l1 * n2 * m2
              for n1, m1, n2, m2, rr in _kinds(plan))
    fwd += 2 * _mapped_weights(plan) * tgt.hidden / rh                      # layer_maps, after the mix
    vocab = (1 if src.tied else 2) * 2 * src.vocab * src.hidden * tgt.hidden / rh
    return {  # the vocabulary products are recomputed in backward when r_h > 1 (fuse._vocab_product)
        "fusion": (3 * fwd + (4 if rh > 1 else 3) * vocab) * (1 if r.fuse_once else r.micro_per_step),
        "teacher": tokens * sum(_lm_flops(p_source, src, r.seq, 1, 1).values()),
        "student": tokens * sum(_lm_flops(p_target, tgt, r.seq, 4 if r.ckpt else 3, 3).values()),
    }


def _lm_flops(p: int, t: LlamaSizes, seq: int, passes: int, head_passes: int) -> dict[str, int]:
    """FLOPs per token of a LlamaForCausalLM over seq-token sequences; a pass costs 2 per non-embedding
    parameter, causal attention 2 L T attn (QK^T and PV, half the square) and the head 2 V D. Training
    is 3 passes (4 with activation checkpointing; the head is never recomputed: head_passes 3)."""
    return {"linear layers": passes * 2 * _nonembedding(p, t), "attention": passes * 2 * t.layers * seq * t.attn,
            "lm head": head_passes * 2 * t.vocab * t.hidden}


def _nonembedding(p: int, sizes: LlamaSizes) -> int:
    """Parameters outside the embedding and the lm_head."""
    return p - (1 if sizes.tied else 2) * sizes.vocab * sizes.hidden


def plan_run(cfg: dict[str, Any], *, gpus: int, source_cfg: LlamaConfig, device: str = "cuda",
             limit_bytes: float | None = None) -> Estimate:
    """Estimate one rank of the run ``cfg`` (resolved yaml); with ``limit_bytes``, advice when it does not fit."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: expected cuda or cpu")
    r = run_shape(cfg, source_cfg, gpus=gpus, device=device)
    p_source, p_target = _numel(source_cfg), _numel(r.plan.target_config(source_cfg))
    mem, peak = memory(r, gpus=gpus, device=device, p_source=p_source, p_target=p_target)
    est = Estimate(mem, flops(r, gpus=gpus, p_source=p_source, p_target=p_target), peak)
    if limit_bytes is not None and not est.fits(limit_bytes):
        sharded = {"model.fusion_parallel": "sharded"}
        if gpus > 1 and "lemon_fuse_once" not in (cfg.get("algorithms") or {}):
            sharded["algorithms.lemon_fuse_once"] = {}                    # sharded fusion needs it
        est.advice = _advice(cfg, [sharded, {"model.activation_checkpointing": True}], limit_bytes,
                             lambda c: plan_run(c, gpus=gpus, source_cfg=source_cfg, device=device),
                             "use a smaller max_seq_len or target, or more memory per GPU")
    return est


def _advice(cfg: dict[str, Any], steps: list[dict[str, Any]], limit_bytes: float,
            replan: Callable[[dict[str, Any]], Estimate], last: str) -> list[str]:
    """Changes (dotted key -> value) tried in order, then halving device_train_microbatch_size, each on
    top of the ones before and with the total it reaches, until the run fits."""
    micro = cfg["device_train_microbatch_size"]
    while micro > 1:
        micro //= 2
        steps = [*steps, {"device_train_microbatch_size": micro}]
    lines = []
    for step in steps:
        step = {k: v for k, v in step.items() if _get(cfg, k) != v}
        if not step:
            continue
        cfg = dict(cfg)
        for key, value in step.items():
            section, _, name = key.rpartition(".")
            if section:
                cfg[section] = {**(cfg.get(section) or {}), name: value}
            else:
                cfg[name] = value
        est = replan(cfg)
        change = " with ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in step.items())
        lines.append(f"{change} -> {(est.total_bytes + est.margin_bytes) / GIB:.1f} GiB")
        if est.fits(limit_bytes):
            return lines
    return [*lines, f"still does not fit: {last}"]


def _get(cfg: dict[str, Any], key: str) -> Any:
    section, _, name = key.rpartition(".")
    return ((cfg.get(section) or {}) if section else cfg).get(name)


@dataclass(frozen=True)
class CptShape:
    """The keys of an hf_causal_lm yaml that the planner reads, checked."""
    sizes: LlamaSizes
    strategy: str               # fsdp_config.sharding_strategy
    mixed: str                  # fsdp_config.mixed_precision
    g: int                      # bytes per gathered (compute) parameter
    a: int                      # bytes per activation element
    seq: int
    micro: int
    micro_per_step: int
    ckpt: bool                  # fsdp_config.activation_checkpointing
    attn: str                   # model.attn_implementation


def cpt_shape(cfg: dict[str, Any], model_cfg: LlamaConfig, *, gpus: int) -> CptShape:
    """Read and check the keys of ``cfg`` (the resolved hf_causal_lm yaml) that the planner needs."""
    model = cfg.get("model") or {}
    if model.get("name") != "hf_causal_lm":
        raise ValueError(f"model.name={model.get('name')!r}: expected hf_causal_lm (lemon_fusion: plan_run)")
    fsdp = cfg.get("fsdp_config")
    if not isinstance(fsdp, dict):
        raise NotImplementedError("fsdp_config is missing: the planner models FSDP runs only, not DDP")
    strategy = str(fsdp.get("sharding_strategy", "FULL_SHARD")).upper()
    if strategy in ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"):
        raise NotImplementedError(f"fsdp_config.sharding_strategy={strategy}: not modelled; use one of {SHARDING}")
    if strategy not in SHARDING:
        raise ValueError(f"fsdp_config.sharding_strategy={strategy!r}: expected one of {SHARDING}")
    mixed = str(fsdp.get("mixed_precision", "DEFAULT")).upper()
    if mixed not in FSDP_MIXED:
        raise ValueError(f"fsdp_config.mixed_precision={mixed!r}: expected one of {FSDP_MIXED}")
    attn = model.get("attn_implementation", "eager")            # llm-foundry's default
    if attn not in ("flash_attention_2", "sdpa"):
        raise NotImplementedError(f"model.attn_implementation={attn!r}: only flash_attention_2 and sdpa are "
                                  "modelled (eager keeps T x T attention probabilities)")
    amp = _precision(cfg) != "fp32"
    seq, micro, micro_per_step = _batch(cfg, gpus)
    # Composer casts parameters to the autocast dtype for compute with PURE and DEFAULT, not with FULL
    return CptShape(sizes=LlamaSizes.from_config(model_cfg), strategy=strategy, mixed=mixed,
                    g=2 if amp and mixed != "FULL" else 4, a=2 if amp else 4, seq=seq, micro=micro,
                    micro_per_step=micro_per_step, attn=attn,
                    ckpt=_flag(fsdp.get("activation_checkpointing", False), "fsdp_config.activation_checkpointing"))


def cpt_memory(r: CptShape, *, gpus: int, p: int) -> dict[str, float]:
    """Bytes per component of one rank at its peak, the backward through the loss (a conservative sum).

    FSDP state: fp32 parameters and gradients, AdamW's two fp32 moments, split over the ranks unless
    NO_SHARD. Gathered compute copies: FULL_SHARD two decoder layers (limit_all_gathers) plus the
    embedding and head (llm-foundry leaves both in the root unit, gathered throughout); SHARD_GRAD_OP
    keeps every layer gathered from forward to backward; NO_SHARD a low-precision copy of everything
    (none when computing in fp32). Activations: ``activation_bytes`` (flash: no K/V repeat).
    Logits and loss (LlamaForCausalLM, ForCausalLMLoss: logits.float(), cross_entropy = log_softmax +
    nll_loss), per (token, vocab) element: forward a (logits, kept by the outputs Composer holds) +
    4 (fp32 copy, freed after the loss) + 4 (log-probs, saved); the peak is later, in
    LogSoftmaxBackward: a (logits) + 4 (saved log-probs) + 4 (their gradient) + 4 (the fp32 logits'
    gradient), i.e. a + 12 (fp32 logits: 16); the steps after it hold less (the cast back: a + 4 + a).
    """
    t, tokens = r.sizes, r.micro * r.seq
    n = 1 if r.strategy == "NO_SHARD" else gpus
    shard = "" if n == 1 else f" (1/{n} shard)"
    embed = t.vocab * t.hidden * (1 if t.tied else 2)
    per_layer = (_nonembedding(p, t) - t.hidden) // t.layers            # less the final norm
    gathered = {"FULL_SHARD": 2 * per_layer + embed, "SHARD_GRAD_OP": p, "NO_SHARD": p if r.g < 4 else 0}
    return {
        f"fp32 parameters{shard}": p * 4 / n,
        f"fp32 gradients{shard}": p * 4 / n,
        f"AdamW moments{shard}": p * 8 / n,
        f"gathered parameters ({'bf16' if r.g == 2 else 'fp32'})": gathered[r.strategy] * r.g,
        "activations" + (" (checkpointed)" if r.ckpt else ""):
            activation_bytes(t, r.a, r.attn == "flash_attention_2", r.ckpt, tokens),
        "logits and loss": tokens * t.vocab * (r.a + 12),
        "CUDA context": CUDA_OVERHEAD,
    }


def plan_cpt(cfg: dict[str, Any], *, gpus: int, model_cfg: LlamaConfig,
             limit_bytes: float | None = None) -> Estimate:
    """Estimate one rank of the hf_causal_lm run ``cfg`` (resolved yaml) on CUDA; with ``limit_bytes``,
    advice when it does not fit."""
    r = cpt_shape(cfg, model_cfg, gpus=gpus)
    p = _numel(model_cfg)
    tokens = r.micro_per_step * r.micro * r.seq
    est = Estimate(cpt_memory(r, gpus=gpus, p=p),
                   {k: tokens * v for k, v in _lm_flops(p, r.sizes, r.seq, 4 if r.ckpt else 3, 3).items()},
                   "the backward through the loss" + (" (one layer recomputed: an upper bound)" if r.ckpt else ""))
    if limit_bytes is not None and not est.fits(limit_bytes):
        est.advice = _advice(cfg, [{"fsdp_config.sharding_strategy": "FULL_SHARD"},
                                   {"fsdp_config.activation_checkpointing": True}], limit_bytes,
                             lambda c: plan_cpt(c, gpus=gpus, model_cfg=model_cfg),
                             "use a smaller max_seq_len, more GPUs or more memory per GPU")
    return est


def report(est: Estimate, limit_gib: float) -> str:
    """The tables the CLI prints."""
    rows = [f"memory of one rank at its peak, {est.peak}:", f"{'component':<40}{'GiB':>9}"]
    rows += [f"{name:<40}{b / GIB:>9.2f}" for name, b in est.memory.items() if b]
    rows += [f"{'total':<40}{est.total_bytes / GIB:>9.2f}", f"{'margin 10%':<40}{est.margin_bytes / GIB:>9.2f}"]
    need = (est.total_bytes + est.margin_bytes) / GIB
    rows.append(f"fits in {limit_gib:g} GiB: {'yes' if est.fits(limit_gib * GIB) else 'no'} ({need:.1f} GiB needed)")
    rows += [f"  try {line}" if "->" in line else f"  {line}" for line in est.advice]
    rows += ["", f"{'part':<40}{'TFLOP/step':>11}"]
    rows += [f"{name:<40}{f / 1e12:>11.1f}" for name, f in est.flops.items()]
    rows.append(f"{'total':<40}{sum(est.flops.values()) / 1e12:>11.1f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """The planner's command line: the table, or one line and exit 2 for a user error."""
    return run_cli("planner", lambda: _main(argv))


def _main(argv: list[str] | None) -> None:
    p = argparse.ArgumentParser(prog="python -m lemon_composer.planner", description=__doc__.splitlines()[0])
    p.add_argument("yaml")
    p.add_argument("overrides", nargs="*", help="key=value yaml overrides")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--source-config", help="lemon_fusion: llama-2-7b or a folder with config.json "
                                           "(default: model.source_path)")
    p.add_argument("--model-config", help="hf_causal_lm: lemon-1.3b, lemon-2.7b or a folder with config.json "
                                          "(default: model.pretrained_model_name_or_path, else the shipped "
                                          "run_name's builtin)")
    args = p.parse_intermixed_args(argv)
    cfg = load_config(args.yaml, args.overrides)
    name, limit = (cfg.get("model") or {}).get("name"), args.gpu_mem * GIB
    if name == "hf_causal_lm":
        if args.source_config:
            p.error("--source-config is for lemon_fusion runs; use --model-config")
        model_cfg, origin = cpt_model_config(cfg, args.model_config)
        est = plan_cpt(cfg, gpus=args.gpus, model_cfg=model_cfg, limit_bytes=limit)
        c = cpt_shape(cfg, model_cfg, gpus=args.gpus)
        print(f"{args.yaml}: hf_causal_lm {c.sizes.layers}x{c.sizes.hidden}, {_numel(model_cfg) / 1e9:.2f}B "
              f"params (config: {origin}), per rank of {args.gpus}: {c.micro_per_step} micro-batches of "
              f"{c.micro}x{c.seq} tokens a step, {c.strategy}, mixed_precision={c.mixed}, "
              f"activation_checkpointing={str(c.ckpt).lower()}, {c.attn}")
    elif name == "lemon_fusion":
        if args.model_config:
            p.error("--model-config is for hf_causal_lm runs; use --source-config")
        src = args.source_config or (cfg.get("model") or {}).get("source_path")
        if src is None:
            raise ValueError("model.source_path is missing; pass --source-config")
        source_cfg = source_config(src, key="--source-config" if args.source_config else "model.source_path")
        est = plan_run(cfg, gpus=args.gpus, source_cfg=source_cfg, limit_bytes=limit)
        r = run_shape(cfg, source_cfg, gpus=args.gpus, device="cuda")
        print(f"{args.yaml}: {r.plan.source.layers}x{r.plan.source.hidden} -> "
              f"{r.plan.target.layers}x{r.plan.target.hidden}, per rank of {args.gpus}: "
              f"{r.micro_per_step} micro-batches of {r.micro}x{r.seq} tokens a step, "
              f"fusion_parallel={'sharded' if r.sharded else 'replicated'}, "
              f"activation_checkpointing={str(r.ckpt).lower()}, lemon_fuse_once={str(r.fuse_once).lower()}, "
              f"{'joint' if r.joint else 'staged'} operator training")
    else:
        raise ValueError(f"model.name={name!r}: the planner plans lemon_fusion and hf_causal_lm runs")
    print(report(est, args.gpu_mem))


if __name__ == "__main__":
    sys.exit(main())
