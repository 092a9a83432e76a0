"""The memory benchmark: task generators build what their docstrings say, models are matched in size, ablations
freeze what they claim, and scripts/memory_benchmark.py writes a well-formed report (no timing or score assertions)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script
from PIL import Image

from pmg.memory_tasks import (
    RECALL_TOKEN,
    adding_problem,
    digit_permutation,
    multi_query_associative_recall,
    selective_copying,
    sequential_digits,
)
from pmg.sequence_models import GATE_SHAPE, MODEL_NAMES, build_backbone, build_model, matched_width, pmg_layers

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "memory_benchmark.py"
GENERATORS = {
    "mqar": lambda seed: multi_query_associative_recall(64, 32, 4, num_train=20, num_test=10, seed=seed),
    "selective_copy": lambda seed: selective_copying(24, 4, 8, num_train=20, num_test=10, seed=seed),
    "adding": lambda seed: adding_problem(30, num_train=20, num_test=10, seed=seed),
}


@pytest.mark.parametrize("name", GENERATORS)
def test_generators_are_deterministic_in_the_seed_with_aligned_train_and_test_shapes(name):
    task, same, other = GENERATORS[name](0), GENERATORS[name](0), GENERATORS[name](1)
    assert (len(task.train), len(task.test)) == (20, 10)
    for split in (task.train, task.test):
        assert split.targets.shape == split.mask.shape == split.inputs.shape[:2] and split.mask.any(dim=1).all()
    assert torch.equal(task.train.inputs, same.train.inputs) and torch.equal(task.test.targets, same.test.targets)
    assert not torch.equal(task.train.inputs, other.train.inputs)


def test_mqar_targets_are_exactly_the_values_paired_with_the_queried_keys():
    num_pairs, length = 8, 64
    task = multi_query_associative_recall(128, length, num_pairs, num_train=200, num_test=50, seed=3)
    for inputs, targets, mask in zip(task.train.inputs, task.train.targets, task.train.mask, strict=True):
        keys, values = inputs[0 : 2 * num_pairs : 2], inputs[1 : 2 * num_pairs : 2]
        assert len(set(keys.tolist())) == num_pairs and (keys >= 1).all() and (keys < 64).all() and (values >= 64).all()
        queries = mask.nonzero().squeeze(1)
        assert (queries >= 2 * num_pairs).all() and (queries % 2 == 0).all()
        assert sorted(inputs[queries].tolist()) == sorted(keys.tolist())  # every key queried once
        paired = dict(zip(keys.tolist(), values.tolist(), strict=True))
        assert targets[queries].tolist() == [paired[key] for key in inputs[queries].tolist()]


def test_selective_copy_targets_are_the_memorised_tokens_in_order():
    num_memorize = 4
    task = selective_copying(32, num_memorize, 8, num_train=50, num_test=10, seed=0)
    for inputs, targets, mask in zip(task.train.inputs, task.train.targets, task.train.mask, strict=True):
        body = inputs[:-num_memorize]
        assert (inputs[-num_memorize:] == RECALL_TOKEN).all()
        assert mask.nonzero().squeeze(1).tolist() == list(range(32 - num_memorize, 32))
        assert targets[mask].tolist() == body[body >= 2].tolist()


def test_adding_problem_targets_are_the_sum_of_the_two_marked_values():
    task = adding_problem(40, num_train=100, num_test=10, seed=0)
    values, markers = task.train.inputs.unbind(dim=-1)
    assert (markers.sum(dim=1) == 2).all() and (markers[:, :20].sum(dim=1) == 1).all()
    assert task.train.mask[:, -1].all() and task.train.mask.sum() == 100
    torch.testing.assert_close(task.train.targets[:, -1], (values * markers).sum(dim=1))


def test_permuted_digits_are_one_fixed_permutation_of_the_plain_digits():
    plain, permuted, permutation = sequential_digits("plain"), sequential_digits("permuted"), digit_permutation()
    assert plain.train.inputs.shape[1:] == (64, 1) and len(plain.train) + len(plain.test) == 1797
    assert not torch.equal(permutation, torch.arange(64))
    for ordered, shuffled in ((plain.train, permuted.train), (plain.test, permuted.test)):
        assert torch.equal(shuffled.inputs, ordered.inputs[:, permutation])
        assert torch.equal(shuffled.targets, ordered.targets)
    assert set(plain.test.targets[:, -1].tolist()) == set(range(10))


@pytest.mark.parametrize("nominal", [32, 64])
def test_matched_widths_keep_backbone_parameter_counts_within_15_percent(nominal):
    target = sum(p.numel() for p in build_backbone("pmg", nominal).parameters())
    for name in MODEL_NAMES:
        count = sum(p.numel() for p in build_backbone(name, matched_width(name, target, 2 * nominal)).parameters())
        assert abs(count / target - 1) < 0.15, (name, count, target)


def gate_parameters(model: torch.nn.Module) -> dict[tuple[int, str], torch.Tensor]:
    """A copy of the gate-shape and floor parameters of every PMG layer, keyed by (layer, name)."""
    return {
        (i, name): value.detach().clone()
        for i, layer in enumerate(pmg_layers(model))
        for name, value in layer.named_parameters(recurse=False)
    }


def trained_gate_parameters(name: str) -> tuple[dict, dict]:
    """Gate parameters of model `name` before and after four training steps of the benchmark (the zero-initialised
    output projections must open before any gradient reaches the gates)."""
    task = GENERATORS["mqar"](0)
    model = build_model(name, 32, task)
    before = gate_parameters(model)
    load_script("memory_benchmark").train(
        model, task, learning_rate=1e-2, steps=4, batch_size=8, seed=0, device=torch.device("cpu")
    )
    return before, gate_parameters(model)


def changed(before: dict, after: dict, names: tuple[str, ...]) -> list[bool]:
    return [not torch.equal(before[key], after[key]) for key in before if key[1] in names]


def test_sigmoid_ablation_keeps_the_gate_shape_at_k_n_1_m_0_through_training():
    before, after = trained_gate_parameters("pmg-sigmoid")
    assert not any(changed(before, after, GATE_SHAPE)) and all(changed(before, after, ("floor_logit",)))
    for (_, name), value in after.items():
        if name in ("sharpness_raw", "asymmetry_raw"):
            torch.testing.assert_close(torch.nn.functional.softplus(value), torch.ones_like(value))
        elif name == "shift":
            assert not value.any()
    control_before, control_after = trained_gate_parameters("pmg")
    assert all(changed(control_before, control_after, GATE_SHAPE))


def test_no_floor_ablation_keeps_the_memory_floor_at_zero_through_training():
    before, after = trained_gate_parameters("pmg-no-floor")
    assert not any(changed(before, after, ("floor_logit",))) and all(changed(before, after, GATE_SHAPE))
    floors = torch.cat([torch.sigmoid(value) for (_, name), value in after.items() if name == "floor_logit"])
    assert floors.max() < 1e-12


def test_report_flags_rows_where_pmg_loses():
    script = load_script("memory_benchmark")
    row = {"pmg": {"value": 0.5}, "llama": {"value": 0.9}, "lstm": {"value": 0.4}}
    assert script.comparison(row, ("llama", "lstm", "gru"), "accuracy") == "**loses to llama** (0.500 vs 0.900)"
    assert script.comparison(row, ("lstm",), "accuracy").startswith("wins")
    assert script.comparison(row, ("lstm",), "mse").startswith("**loses to lstm**")  # lower MSE is better


def test_a_diverged_run_never_counts_as_a_models_best_or_a_tie():
    """A NaN run seen first stayed the best before (better(x, nan) was False), and two NaNs tied."""
    script = load_script("memory_benchmark")
    results = [("pmg", 1e6, math.nan), ("pmg", 1e-2, 0.16), ("gru", 1e6, math.nan), ("gru", 1e-2, 0.17)]
    runs = [
        {"task": "adding", "setting_label": "T=50", "model": model, "learning_rate": rate, "value": value}
        for model, rate, value in [*results, ("llama", 1e6, math.inf)]
    ]
    best = script.best_runs({"runs": runs, "tasks": {"adding": {"metric": "mse"}}})[("adding", "T=50")]
    assert {model: run["value"] for model, run in best.items()} == {"pmg": 0.16, "gru": 0.17, "llama": math.inf}
    assert script.comparison(best, ("llama", "gru"), "mse").startswith("wins (best rival gru")
    assert script.winners(best, "mse") == "pmg"
    diverged = {"pmg": {"value": math.nan}, "gru": {"value": math.inf}}
    assert script.comparison(diverged, ("gru",), "accuracy") == "all diverged"
    assert script.winners(diverged, "accuracy") == "none (all diverged)"
    assert script.comparison({**diverged, "gru": {"value": 0.5}}, ("gru",), "accuracy").startswith("**loses to gru**")


def test_script_refuses_bad_arguments_and_a_folder_that_holds_a_report(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    for arguments, message in (
        (["--learning_rates", "-1"], "--learning_rates must be positive"),
        (["--models", "gru,gru"], "--models lists ['gru'] more than once"),
        (["--output_dir", str(tmp_path)], "pass --overwrite_output_dir to replace it"),
    ):
        result = subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert (tmp_path / "results.json").read_text() == "{}"


def test_script_writes_json_markdown_and_plots(tmp_path):
    command = [sys.executable, str(SCRIPT), "--quick", "--tasks", "mqar,digits", "--models", "pmg,lstm"]
    command += ["--steps", "3", "--learning_rates", "0.003,0.01", "--workers", "2", "--output_dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "results.json").read_text())
    settings = {name: task["settings"] for name, task in report["tasks"].items()}
    assert len(settings["mqar"]) == 3 and len(settings["digits"]) == 2
    assert report["tasks"]["digits"]["test_sequences"] == 359 and report["tasks"]["mqar"]["metric"] == "accuracy"
    runs = report["runs"]
    assert len(runs) == (3 + 2) * 2 * 2
    assert {(run["model"], run["learning_rate"]) for run in runs} == {
        (model, lr) for model in ("pmg", "lstm") for lr in (0.003, 0.01)
    }
    for run in runs:
        assert 0 <= run["value"] <= 1 and run["backbone_parameters"] > 0 and run["train_seconds"] >= 0
    table = (tmp_path / "results.md").read_text()
    assert table.count("| T=") == 3 and table.count("| order=") == 2 and "vs baselines" in table
    for name in ("mqar_vs_length", "mqar_vs_width", "digits_vs_order"):
        assert Image.open(tmp_path / f"{name}.png").size[0] > 0


def test_script_refuses_zero_steps():
    result = subprocess.run([sys.executable, str(SCRIPT), "--steps", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--steps must be at least 1, got 0" in result.stderr
