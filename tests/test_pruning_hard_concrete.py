"""Hard-concrete gates (Louizos et al. 2018) against closed forms, numerical integration and
Monte Carlo; expected sizes of a tiny mask set against hand computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from lemon_composer.pruning.hard_concrete import (deterministic_gates, expected_gates, init_log_alpha,
                                                  sample_gates)
from lemon_composer.pruning.masks import PruneShape, PruningMasks

BETA, LOW, HIGH = 2 / 3, -0.1, 1.1


def s_cdf(x: np.ndarray, log_alpha: float) -> np.ndarray:
    """P(s < x) for s = sigmoid((logistic + log_alpha) / beta), written from the definition."""
    return 1 / (1 + np.exp(-(BETA * np.log(x / (1 - x)) - log_alpha)))


def reference_stats(log_alpha: float) -> tuple[float, float, float]:
    """E[z], P(z = 0), P(z = 1) of z = clamp(s (r - l) + l, 0, 1), by integration of P(z > x)."""
    p0 = s_cdf(np.array(-LOW / (HIGH - LOW)), log_alpha)
    p1 = 1 - s_cdf(np.array((1 - LOW) / (HIGH - LOW)), log_alpha)
    x = np.linspace(0, 1, 200001)[1:-1]
    survival = 1 - s_cdf((x - LOW) / (HIGH - LOW), log_alpha)          # P(z > x) on (0, 1)
    mean = float(np.trapezoid(survival, x))
    return mean, float(p0), float(p1)


@pytest.mark.parametrize("log_alpha", [-2.0, 0.0, 1.5, 4.0])
def test_sample_statistics_match_integration(log_alpha):
    torch.manual_seed(0)
    z = sample_gates(torch.full((400_000,), log_alpha))
    mean, p0, p1 = reference_stats(log_alpha)
    assert float(z.mean()) == pytest.approx(mean, abs=3e-3)
    assert float((z == 0).float().mean()) == pytest.approx(p0, abs=3e-3)
    assert float((z == 1).float().mean()) == pytest.approx(p1, abs=3e-3)
    assert float(z.min()) >= 0 and float(z.max()) <= 1


@pytest.mark.parametrize("log_alpha", [-3.0, -0.5, 0.0, 2.0])
def test_expected_gate_is_probability_of_nonzero(log_alpha):
    torch.manual_seed(1)
    z = sample_gates(torch.full((400_000,), log_alpha))
    monte_carlo = float((z > 0).float().mean())
    _, p0, _ = reference_stats(log_alpha)
    e = float(expected_gates(torch.tensor(log_alpha)))
    assert e == pytest.approx(monte_carlo, abs=3e-3)
    assert e == pytest.approx(1 - p0, abs=1e-6)


def test_samples_are_differentiable():
    log_alpha = torch.zeros(1000, requires_grad=True)
    sample_gates(log_alpha).sum().backward()
    assert log_alpha.grad is not None and float(log_alpha.grad.abs().sum()) > 0


def test_init_mean_and_noise():
    torch.manual_seed(0)
    a = init_log_alpha((20000,), 0.5)
    assert float(a.mean()) == pytest.approx(0.0, abs=1e-3) and float(a.std()) == pytest.approx(0.01, rel=0.05)
    assert float(init_log_alpha((2000,), 0.01).mean()) == pytest.approx(math.log(99), abs=1e-3)


def test_deterministic_gates_keep_top_k_with_soft_values():
    a = torch.tensor([[0.5, -1.0, 3.0, 2.0], [-4.0, -3.0, -2.0, -1.0]])
    z = deterministic_gates(a, 2)
    soft = lambda v: 1 / (1 + math.exp(-v / BETA * 0.8))  # noqa: E731
    expected = [0, 0, soft(3.0), soft(2.0), 0, 0, soft(-2.0), soft(-1.0)]
    assert z.flatten().tolist() == pytest.approx(expected)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_expected_sizes_by_hand():
    """2 layers, 2 KV groups of 2 query heads, target 1 head per group (query gates), FFN 3, hidden 4."""
    src = LlamaConfig(vocab_size=10, hidden_size=4, intermediate_size=3, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=2, head_dim=1)
    shape = PruneShape.build(src, dict(hidden_size=2, intermediate_size=2, num_attention_heads=2,
                                       num_key_value_heads=2, num_hidden_layers=1), "target")
    masks = PruningMasks(shape, 0.5)
    shift = BETA * math.log(11)  # E[z] = sigmoid(log_alpha + beta log(1.1 / 0.1))
    probs = {"layer": [0.9, 0.2], "kv": [[0.5, 0.25], [1.0 - 1e-9, 0.1]],
             "query": [[[0.5, 0.5], [0.8, 0.4]], [[0.3, 0.6], [0.2, 0.2]]],
             "ffn": [[0.1, 0.2, 0.3], [0.9, 0.9, 0.9]], "hidden": [0.5, 0.5, 0.25, 0.75]}
    with torch.no_grad():
        for k, p in probs.items():
            masks.log_alpha[k].copy_(torch.tensor(p, dtype=torch.float64).apply_(_logit).float() - shift)
    e = masks.expected_sizes()
    assert float(e["layers"]) == pytest.approx(1.1, abs=1e-5)
    assert float(e["hidden"]) == pytest.approx(2.0, abs=1e-5)
    assert e["kv_heads"].tolist() == pytest.approx([0.75, 1.1], abs=1e-5)
    # heads[i] = sum_k E[kv_ik] * sum_g E[q_ikg]
    assert e["heads"].tolist() == pytest.approx([0.5 * 1.0 + 0.25 * 1.2, 1.0 * 0.9 + 0.1 * 0.4], abs=1e-5)
    assert e["ffn"].tolist() == pytest.approx([0.6, 2.7], abs=1e-5)
    assert masks.constrained_kinds() == ("layers", "kv_heads", "heads", "ffn", "hidden")
