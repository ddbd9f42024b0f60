"""The Lagrangian: target ramp, gradient reversal on the multipliers, warm-up parsing, config
checks, and a short plain-torch run that drives the expected sizes to the target."""
from __future__ import annotations

import pytest
import torch

from lemon_composer.pruning.lagrangian import Lagrangian, warmup_batches
from lemon_composer.pruning.model import LemonPruneModel
from test_pruning_equivalence import VOCAB, prune_model, tiny_source

TARGET = dict(hidden_size=16, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
              num_hidden_layers=1)


def test_ramp_and_reversed_gradient():
    lag = Lagrangian({"ffn": (10, 4)}, ("ffn",), warmup=4)
    assert [lag.target("ffn", s) for s in (0, 2, 4, 9)] == [10, 7, 4, 4]
    with torch.no_grad():
        lag.lambda_1["ffn"].fill_(0.5)
        lag.lambda_2["ffn"].fill_(2.0)
    expected = {"ffn": torch.tensor([9.0, 6.0], requires_grad=True)}
    loss = lag(expected, step=2)                       # target 7: errors (2, -1) / 10
    errors = torch.tensor([0.2, -0.1])
    assert float(loss) == pytest.approx(float((0.5 * errors + 2.0 * errors ** 2).mean()))
    loss.backward()
    assert float(lag.lambda_1["ffn"].grad) == pytest.approx(-float(errors.mean()))       # ascent
    assert float(lag.lambda_2["ffn"].grad) == pytest.approx(-float((errors ** 2).mean()))
    assert expected["ffn"].grad.tolist() == pytest.approx(((0.5 + 4.0 * errors) / 10 / 2).tolist())


def test_warmup_parsing():
    assert warmup_batches("320ba", None) == 320
    assert warmup_batches("0.1dur", "3200ba") == 320
    with pytest.raises(ValueError, match=r"model.max_duration must be the run's length in batches.*'2ep'"):
        warmup_batches("0.1dur", "2ep")
    with pytest.raises(ValueError, match="model.lagrangian_warmup='10tok'"):
        warmup_batches("10tok", "100ba")


def test_config_errors_name_key_and_value(tmp_path):
    source = tiny_source(tmp_path / "src", heads=4, kv=2, tied=False, layers=2)
    cases = {
        "model: unknown keys \\['lr'\\]": dict(lr=1.0),
        "model.query_per_kv='both'": dict(query_per_kv="both"),
        "model.droprate_init=1.5": dict(droprate_init=1.5),
        "model.target.num_attention_heads=3: query_per_kv=source": dict(
            target={**TARGET, "num_attention_heads": 3, "num_key_value_heads": 1, "hidden_size": 24}),
        "model.target.hidden_size=20: expected num_attention_heads": dict(target={**TARGET, "hidden_size": 20}),
        "model.target.num_hidden_layers=5 is larger": dict(target={**TARGET, "num_hidden_layers": 5}),
        "model.target: unknown keys \\['heads'\\]": dict(target={**TARGET, "heads": 2}),
        "model.source_dtype=fp8": dict(source_dtype="fp8"),
    }
    for message, change in cases.items():
        cfg = {"source_path": str(source), "target": TARGET, "lagrangian_warmup": "2ba", **change}
        with pytest.raises(ValueError, match=message):
            LemonPruneModel(**cfg)


def test_lagrangian_drives_expected_sizes_to_target(tmp_path):
    source = tiny_source(tmp_path / "src", heads=4, kv=2, tied=False, layers=3, ffn=32)
    target = dict(hidden_size=16, intermediate_size=12, num_attention_heads=2, num_key_value_heads=1,
                  num_hidden_layers=2)
    model = prune_model(source, target, "target")
    model.train()
    opt = torch.optim.AdamW([
        {"params": list(model.source.parameters()), "lr": 1e-3},
        {"params": list(model.masks.parameters()) + list(model.lagrangian.parameters()), "lr": 0.1,
         "weight_decay": 0.0}])
    torch.manual_seed(0)
    data = torch.randint(0, VOCAB, (8, 4, 16))
    for step in range(120):
        out = model({"input_ids": data[step % 8]})
        lm = model.loss(out, {"input_ids": data[step % 8]})["lm"]
        loss = lm + model.lagrangian(out["expected"], step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sizes = {k: v.detach() for k, v in model.masks.expected_sizes().items()}
    goal = {k: n2 for k, (_, n2) in model.shape.sizes().items()}
    start = {k: n1 for k, (n1, _) in model.shape.sizes().items()}
    for kind in model.masks.constrained_kinds():
        gap = abs(float(sizes[kind].float().mean()) - goal[kind])
        assert gap < 0.15 * (start[kind] - goal[kind]), (kind, sizes[kind], goal[kind])
