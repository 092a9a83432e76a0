"""Gate statistics: mean write weights and memory horizons per PMG layer, over real tokens only."""

import pytest
import torch
from conftest import HYBRID_LAYERS, tiny_model

from pmg import PMGForCausalLM
from pmg.gate_statistics import GateStatistics


def test_horizons_follow_the_geometric_mean_retention_and_ignore_padding():
    statistics = GateStatistics(layer_indices=[0, 2], channels=4, horizon=32)
    # channels 0-1 write 1% per step (horizon 100), channels 2-3 half (horizon 2); layer 2 writes 10% (horizon 10)
    slow_and_fast = torch.tensor([0.01, 0.01, 0.5, 0.5]).expand(2, 5, 4).clone()
    moderate = torch.full((2, 5, 4), 0.1)
    mask = torch.ones(2, 5)
    mask[1, :2] = 0  # left padding, whose write weights must not count
    slow_and_fast[1, :2], moderate[1, :2] = 1.0, 1.0
    statistics.update([slow_and_fast, moderate], mask)
    statistics.update([slow_and_fast[:1], moderate[:1]])
    first, second = statistics.summary()
    assert first == pytest.approx({"layer": 0, "mean_write": 0.255, "long_memory_fraction": 0.5})
    assert second == pytest.approx({"layer": 2, "mean_write": 0.1, "long_memory_fraction": 0.0})
    # a geometric mean: alternating retention 1 / 0.5 keeps 0.5 per two steps, a horizon of 1 / (1 - sqrt(0.5)) ≈ 3.41
    # (the arithmetic mean retention 0.75 would claim 4)
    alternating = GateStatistics([0], channels=1, horizon=3)
    alternating.update([torch.tensor([0.0, 0.5] * 4).view(1, 8, 1)])
    assert alternating.summary()[0]["long_memory_fraction"] == 1.0
    alternating.horizon = 3.5
    assert alternating.summary()[0]["long_memory_fraction"] == 0.0


def test_statistics_of_a_model_come_from_its_output_gates():
    model = tiny_model(PMGForCausalLM, layer_types=HYBRID_LAYERS, expand=2)  # memories twice as wide as hidden_size
    statistics = GateStatistics(model.config.pmg_layer_indices, model.config.pmg_inner_size, horizon=8)
    gates = model(torch.randint(1, 97, (2, 12)), output_gates=True).gates
    statistics.update(gates)
    rows = statistics.summary()
    assert [row["layer"] for row in rows] == [0, 2]
    assert all(0 < row["mean_write"] < 1 and 0 <= row["long_memory_fraction"] <= 1 for row in rows)
    assert rows[0]["mean_write"] == pytest.approx(gates[0].double().mean().item())
    with pytest.raises(ValueError, match="Expected write weights of 2 PMG layers, got 1"):
        statistics.update(gates[:1])
