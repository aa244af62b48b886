from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gradflow.flow import (
    FlowRule,
    active_rms,
    depth_order,
    end_to_end_ratio,
    flow_ratios,
    layer_path,
    parameter_layers,
    update_streaks,
)
from lightning_gradflow.stats import tensor_stats


def layer_stats(rms: list[float], numel: int = 100) -> torch.Tensor:
    return tensor_stats([torch.full((numel,), r) for r in rms])


def test_layer_paths_and_grouping() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.Linear(3, 3)))
    model[0].bias.requires_grad_(False)
    assert layer_path("encoder.layers.0") == "encoder/layers/0"
    assert parameter_layers(model) == {"0.weight": "0", "1.0.weight": "1/0", "1.0.bias": "1/0"}
    assert parameter_layers(model, "parameter")["1.0.bias"] == "1/0/bias"
    root = nn.Linear(2, 2)
    assert set(parameter_layers(root).values()) == {"root"}


def test_depth_order_reverses_first_ready_order() -> None:
    ready = ["head", "block/1", "block/0", "head", "embed"]  # head re-used: first sighting counts
    assert depth_order(ready, ["embed", "block/0", "block/1", "head", "frozen"]) == [
        "embed",
        "block/0",
        "block/1",
        "head",
        "frozen",
    ]


def test_depth_order_from_a_real_backward() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 1)  # registered first, runs last
            self.body = nn.Linear(4, 4)
            self.stem = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            return self.head(self.body(h) + h)

    net = Net()
    names = parameter_layers(net)
    ready: list[str] = []
    for name, p in net.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _p, n=name: ready.append(names[n]))
    net(torch.randn(2, 3)).sum().backward()
    assert depth_order(ready, names.values()) == ["stem", "body", "head"]


def test_active_rms_ignores_zeros_and_non_finite() -> None:
    s = tensor_stats([torch.tensor([0.0, 0.0, 3.0, -4.0, float("nan")]), torch.zeros(3)])
    torch.testing.assert_close(active_rms(s), torch.tensor([12.5**0.5, 0.0]))


def test_flow_ratios() -> None:
    rms = torch.tensor([1e-6, 1e-3, 1.0])
    torch.testing.assert_close(flow_ratios(rms), torch.tensor([1e-3, 1e-3, 1.0]))
    torch.testing.assert_close(end_to_end_ratio(rms), torch.tensor(1e-6))


def test_rule_flags_decay_growth_and_floors() -> None:
    rule = FlowRule(vanishing_ratio=1e-3, exploding_ratio=1e3, min_grad_rms=1e-10, max_grad_rms=1e2)
    vanishing, exploding = rule.conditions(layer_stats([1e-9, 1e-6, 1e-2, 50.0, 1e-2]))
    assert vanishing.tolist() == [True, True, False, False, False]
    assert exploding.tolist() == [False, False, False, True, False]  # 5000x the output layer
    v, e = rule.conditions(layer_stats([1e3, 1e3]))  # uniform but above the absolute ceiling
    assert e.tolist() == [True, True] and not v.any()
    v, e = rule.conditions(layer_stats([1e-11, 1e-11]))  # uniform but below the absolute floor
    assert v.tolist() == [True, True]


def test_rule_on_healthy_layers_and_missing_rows() -> None:
    rule = FlowRule()
    v, e = rule.conditions(layer_stats([0.3, 1.0, 2.0, 0.5]))
    assert not v.any() and not e.any()
    stats = tensor_stats([torch.full((10,), 1e-6), torch.empty(0), torch.full((10,), 1.0), torch.empty(0)])
    v, e = rule.conditions(stats)  # empty rows are neither flagged nor taken as the output layer
    assert v.tolist() == [True, False, False, False] and not e.any()


def test_rule_non_finite_is_exploding_unless_told_otherwise() -> None:
    stats = tensor_stats([torch.tensor([1.0, float("inf")]), torch.ones(2)])
    assert FlowRule().conditions(stats)[1].tolist() == [True, False]
    assert FlowRule().conditions(stats, count_nonfinite=False)[1].tolist() == [False, False]


def test_all_zero_gradient_is_vanishing() -> None:
    v, _ = FlowRule().conditions(tensor_stats([torch.zeros(5), torch.ones(5)]))
    assert v.tolist() == [True, False]


def test_streaks() -> None:
    s = torch.zeros(3)
    for flags in [[1, 1, 0], [1, 0, 1], [1, 1, 1]]:
        s = update_streaks(s, torch.tensor(flags, dtype=torch.bool))
    assert s.tolist() == [3.0, 1.0, 2.0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vanishing_ratio": 2.0}, "vanishing_ratio"),
        ({"exploding_ratio": 0.5}, "exploding_ratio"),
        ({"min_grad_rms": 1.0, "max_grad_rms": 0.1}, "min_grad_rms"),
        ({"patience": 0}, "patience"),
    ],
)
def test_rule_validation(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FlowRule(**kwargs)  # type: ignore[arg-type]
