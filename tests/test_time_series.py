"""Time-series models: shapes, scaling, observed masks, probabilistic sampling, checkpoints, data and the benchmark."""

import json
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import load_script, perturbed, run_remote_code
from transformers import AutoModelForTimeSeriesPrediction

from pmg import PMGConfig, PMGForTimeSeriesClassification, PMGForTimeSeriesForecasting
from pmg.modeling_pmg_time_series import PMGTimeSeriesScaler
from pmg.time_series_data import (
    ForecastingWindows,
    calendar_feature_names,
    load_series_table,
    load_ucr,
    prepare_forecasting_splits,
    season_length,
)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_timeseries.py"
BATCH, LENGTH, CHANNELS, HORIZON = 3, 20, 2, 5


def ts_config(**overrides) -> PMGConfig:
    """A 2-layer, 16-wide time-series config (PMG then attention with `hybrid=True` layer types)."""
    settings = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        gate_rank=4,
        chunk_size=8,
        num_input_channels=CHANNELS,
        context_length=LENGTH,
        prediction_length=HORIZON,
    )
    settings.update(overrides)
    return PMGConfig(**settings)


def forecaster(**overrides) -> PMGForTimeSeriesForecasting:
    return perturbed(PMGForTimeSeriesForecasting(ts_config(**overrides))).eval()


def series(*shape: int) -> torch.Tensor:
    """Random walks with channel-dependent offsets and scales."""
    scale = torch.arange(1, shape[-1] + 1, dtype=torch.float) * 3
    return torch.randn(*shape).cumsum(dim=1) * scale + 10 * scale


@pytest.mark.parametrize("channel_independent", [True, False])
@pytest.mark.parametrize("layers", [["linear_attention"] * 2, ["linear_attention", "full_attention"]])
def test_forecaster_outputs_have_the_documented_shapes(channel_independent, layers):
    model = forecaster(channel_independent=channel_independent, layer_types=layers, num_time_features=3)
    past, time_features = series(BATCH, LENGTH, CHANNELS), torch.randn(BATCH, LENGTH, 3)
    outputs = model(
        past_values=past,
        past_time_features=time_features,
        future_values=series(BATCH, HORIZON, CHANNELS),
        output_hidden_states=True,
        output_gates=True,
    )
    assert outputs.prediction_outputs.shape == (BATCH, HORIZON, CHANNELS)
    assert outputs.loc.shape == outputs.scale.shape == (BATCH, 1, CHANNELS)
    assert outputs.loss.dim() == 0 and torch.isfinite(outputs.loss)
    rows = BATCH * CHANNELS if channel_independent else BATCH
    assert outputs.hidden_states[-1].shape == (rows, LENGTH, 16)
    assert len(outputs.gates) == layers.count("linear_attention")
    as_tuple = model(past_values=past, past_time_features=time_features, return_dict=False)
    assert torch.equal(as_tuple[0], outputs.prediction_outputs)


def test_any_context_length_is_accepted():
    model = forecaster()
    for length in (1, 7, 3 * LENGTH):
        assert model(past_values=series(BATCH, length, CHANNELS)).prediction_outputs.shape == (BATCH, HORIZON, CHANNELS)


@pytest.mark.parametrize("scaling", ["std", "mean"])
def test_scaler_statistics_come_from_observed_values_only(scaling):
    values = series(BATCH, LENGTH, CHANNELS)
    observed = torch.rand(BATCH, LENGTH, CHANNELS) > 0.3
    observed[0, :, 1] = False  # a channel with nothing observed
    garbage = torch.where(observed, values, torch.tensor(float("nan")))
    scaled, loc, scale = PMGTimeSeriesScaler(scaling)(garbage, observed)
    for b in range(BATCH):
        for c in range(CHANNELS):
            seen = values[b, observed[b, :, c], c].double()
            if len(seen) == 0:
                expected_loc, expected_scale = 0.0, 1.0
            elif scaling == "std":
                expected_loc, expected_scale = seen.mean(), (seen.var(unbiased=False) + 1e-5).sqrt()
            else:
                expected_loc, expected_scale = 0.0, seen.abs().mean()
            torch.testing.assert_close(loc[b, 0, c].double(), torch.as_tensor(expected_loc).double())
            torch.testing.assert_close(scale[b, 0, c].double(), torch.as_tensor(expected_scale).double())
    assert torch.equal(scaled[~observed], torch.zeros_like(scaled[~observed]))
    torch.testing.assert_close(scaled * scale + loc, torch.where(observed, values, loc.expand_as(values)))


def test_forecasts_follow_an_affine_change_of_the_inputs_back_to_their_scale():
    """std scaling: f(a x + b) = a f(x) + b per channel, so the network sees scaled inputs and predicts in units."""
    model = forecaster()
    past = series(BATCH, LENGTH, CHANNELS)
    a, b = torch.tensor([7.0, 0.5]), torch.tensor([-300.0, 5.0])
    forecasts = model(past_values=past).prediction_outputs
    shifted = model(past_values=past * a + b).prediction_outputs
    torch.testing.assert_close(shifted, forecasts * a + b, rtol=1e-4, atol=1e-3)
    # mean-absolute scaling: f(a x) = a f(x)
    model = forecaster(scaling="mean")
    torch.testing.assert_close(
        model(past_values=past * a).prediction_outputs,
        model(past_values=past).prediction_outputs * a,
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("loss", ["mse", "nll"])
def test_unobserved_values_change_neither_the_forecast_nor_the_loss(loss):
    model = forecaster(loss=loss, layer_types=["linear_attention", "full_attention"])
    past, future = series(BATCH, LENGTH, CHANNELS), series(BATCH, HORIZON, CHANNELS)
    past_observed = torch.rand_like(past) > 0.25
    future_observed = torch.rand_like(future) > 0.25

    def run(fill: float):
        return model(
            past_values=torch.where(past_observed, past, fill),
            past_observed_mask=past_observed,
            future_values=torch.where(future_observed, future, fill),
            future_observed_mask=future_observed,
        )

    reference, with_garbage, with_nan = run(0.0), run(1e6), run(float("nan"))
    for outputs in (with_garbage, with_nan):
        for expected, got in zip(reference.prediction_outputs, outputs.prediction_outputs, strict=True):
            assert torch.equal(expected, got)
        assert torch.equal(reference.loss, outputs.loss)
    # NaN as the missing marker: the default mask finds it, and no NaN reaches the gradient
    model.train()
    default_mask = model(past_values=torch.where(past_observed, past, float("nan")), future_values=future)
    default_mask.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_time_features_of_steps_without_observations_change_nothing_even_when_nan():
    """A NaN-padded batch may carry NaN calendar features on its padding: those steps are absent for the stack."""
    model = forecaster(num_time_features=2, layer_types=["linear_attention", "full_attention"])
    past, features = series(BATCH, LENGTH, CHANNELS), torch.randn(BATCH, LENGTH, 2)
    past[1, :6] = float("nan")  # a shorter series, left-padded
    reference = model(past_values=past, past_time_features=features).prediction_outputs
    features[1, :6] = float("nan")
    assert torch.equal(model(past_values=past, past_time_features=features).prediction_outputs, reference)


def test_a_window_without_observations_in_a_hybrid_stack_gives_finite_forecasts_and_gradients():
    """A channel never observed in its window is a fully padded row for the attention block."""
    model = forecaster(layer_types=["linear_attention", "full_attention"]).train()
    past = series(BATCH, LENGTH, CHANNELS)
    observed = torch.ones_like(past, dtype=torch.bool)
    observed[0, :, 1] = False
    observed[1, :7] = False  # left padding of a shorter series
    outputs = model(past_values=past, past_observed_mask=observed, future_values=series(BATCH, HORIZON, CHANNELS))
    outputs.loss.backward()
    assert torch.isfinite(outputs.prediction_outputs).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_mse_loss_is_the_mean_squared_error_over_observed_future_values():
    model = forecaster()
    past, future = series(BATCH, LENGTH, CHANNELS), series(BATCH, HORIZON, CHANNELS)
    observed = torch.rand_like(future) > 0.5
    outputs = model(past_values=past, future_values=future, future_observed_mask=observed)
    expected = ((outputs.prediction_outputs - future)[observed] ** 2).mean()
    torch.testing.assert_close(outputs.loss, expected)


def test_nll_loss_is_the_negative_log_likelihood_of_the_predictive_distribution():
    model = forecaster(loss="nll", distribution_output="normal")
    past, future = series(BATCH, LENGTH, CHANNELS), series(BATCH, HORIZON, CHANNELS)
    outputs = model(past_values=past, future_values=future)
    distribution = model.output_distribution(outputs.prediction_outputs, outputs.loc, outputs.scale)
    assert distribution.batch_shape == (BATCH, HORIZON, CHANNELS)
    torch.testing.assert_close(outputs.loss, -distribution.log_prob(future).mean())
    # the distribution lives in the scale of the inputs: its mean is the scaled-space mean unscaled
    loc_scaled = outputs.prediction_outputs[0]
    torch.testing.assert_close(distribution.mean, loc_scaled * outputs.scale + outputs.loc)


@pytest.mark.parametrize("distribution_output", ["student_t", "normal"])
def test_generate_draws_num_parallel_samples_paths_per_series(distribution_output):
    model = forecaster(loss="nll", distribution_output=distribution_output, num_parallel_samples=7)
    past = series(BATCH, LENGTH, CHANNELS)
    assert model.generate(past_values=past).sequences.shape == (BATCH, 7, HORIZON, CHANNELS)
    samples = model.generate(past_values=past, num_parallel_samples=4000).sequences
    assert samples.shape == (BATCH, 4000, HORIZON, CHANNELS)
    outputs = model(past_values=past)
    distribution = model.output_distribution(outputs.prediction_outputs, outputs.loc, outputs.scale)
    median = samples.median(dim=1).values  # Student-t means need df > 1; medians always exist and equal loc
    spread = distribution.base_dist.scale * outputs.scale  # scale in units; 4000 samples: median error ~0.03 spread
    assert ((median - distribution.base_dist.loc * outputs.scale - outputs.loc).abs() < 0.15 * spread).all()
    point = forecaster().generate(past_values=past).sequences
    assert point.shape == (BATCH, 1, HORIZON, CHANNELS)


def test_forecaster_checkpoint_reloads_through_the_auto_class_with_identical_forecasts(tmp_path):
    model = forecaster(loss="nll", layer_types=["linear_attention", "full_attention"], num_time_features=2)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForTimeSeriesPrediction"] == (
        "modeling_pmg_time_series.PMGForTimeSeriesForecasting"
    )
    for module in ("configuration_pmg.py", "modeling_pmg.py", "scan_pmg.py", "modeling_pmg_time_series.py"):
        assert (tmp_path / module).exists(), module
    assert not any("embed_tokens" in name for name in model.state_dict())
    reloaded = AutoModelForTimeSeriesPrediction.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, PMGForTimeSeriesForecasting)
    inputs = {"past_values": series(BATCH, LENGTH, CHANNELS), "past_time_features": torch.randn(BATCH, LENGTH, 2)}
    for expected, got in zip(model(**inputs).prediction_outputs, reloaded(**inputs).prediction_outputs, strict=True):
        assert torch.equal(expected, got)


def test_forecasting_body_initialises_a_classifier_whose_new_head_is_reported(tmp_path):
    forecaster().save_pretrained(tmp_path)
    classifier, info = PMGForTimeSeriesClassification.from_pretrained(tmp_path, num_labels=3, output_loading_info=True)
    assert set(info["missing_keys"]) == {"score.weight", "score.bias"}
    assert classifier(past_values=series(BATCH, LENGTH, CHANNELS)).prediction_logits.shape == (BATCH, 3)


REMOTE_CODE_LOADER = textwrap.dedent(
    """
    import sys
    sys.modules["pmg"] = None  # as if pmg were not installed: any import of it fails
    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTimeSeriesPrediction
    folder = sys.argv[1]
    inputs = torch.load(folder + "/inputs.pt")
    outputs = {}
    for name, auto_class in (("forecaster", AutoModelForTimeSeriesPrediction),
                             ("classifier", AutoModelForSequenceClassification)):
        model = auto_class.from_pretrained(f"{folder}/{name}", trust_remote_code=True).eval()
        assert "transformers_modules" in type(model).__module__, type(model).__module__
        outputs[name] = model(past_values=inputs)[0]
    torch.save(outputs, folder + "/outputs.pt")
    """
)


def test_trust_remote_code_loads_both_heads_in_a_fresh_process_without_pmg(tmp_path):
    models = {
        "forecaster": forecaster(layer_types=["linear_attention", "full_attention"]),
        "classifier": perturbed(PMGForTimeSeriesClassification(ts_config(num_labels=4))).eval(),
    }
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
    inputs = series(BATCH, LENGTH, CHANNELS)
    torch.save(inputs, tmp_path / "inputs.pt")
    run_remote_code(REMOTE_CODE_LOADER, str(tmp_path), workdir=tmp_path)
    outputs = torch.load(tmp_path / "outputs.pt")
    assert torch.equal(outputs["forecaster"], models["forecaster"](past_values=inputs).prediction_outputs)
    assert torch.equal(outputs["classifier"], models["classifier"](past_values=inputs).prediction_logits)


@pytest.mark.parametrize("pooling_type", ["mean", "last"])
@pytest.mark.parametrize("channel_independent", [True, False])
def test_classifier_gives_logits_and_cross_entropy(pooling_type, channel_independent):
    config = ts_config(num_labels=3, pooling_type=pooling_type, channel_independent=channel_independent)
    model = perturbed(PMGForTimeSeriesClassification(config)).eval()
    past, labels = series(BATCH, LENGTH, CHANNELS), torch.tensor([0, 2, 1])
    observed = torch.rand_like(past) > 0.2
    outputs = model(past_values=past, past_observed_mask=observed, target_values=labels)
    assert outputs.prediction_logits.shape == (BATCH, 3)
    torch.testing.assert_close(outputs.loss, F.cross_entropy(outputs.prediction_logits, labels))
    int32_ids = model(past_values=past, past_observed_mask=observed, target_values=labels.int())
    assert torch.equal(int32_ids.loss, outputs.loss)  # class ids of any integer dtype
    garbage = model(past_values=torch.where(observed, past, 1e6), past_observed_mask=observed)
    assert torch.equal(garbage.prediction_logits, outputs.prediction_logits)


def test_classifier_loss_follows_the_problem_type_as_transformers_classifiers_do():
    past = series(BATCH, LENGTH, CHANNELS)
    regression = perturbed(PMGForTimeSeriesClassification(ts_config(num_labels=1))).eval()
    targets = torch.tensor([0.2, 0.7, 0.4])  # truncated to class 0 before, for a loss of exactly 0
    outputs = regression(past_values=past, target_values=targets)
    assert regression.config.problem_type == "regression"
    torch.testing.assert_close(outputs.loss, F.mse_loss(outputs.prediction_logits.squeeze(-1), targets))
    config = ts_config(num_labels=3, problem_type="multi_label_classification")
    multi_label = perturbed(PMGForTimeSeriesClassification(config)).eval()
    multi_hot = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    outputs = multi_label(past_values=past, target_values=multi_hot)
    torch.testing.assert_close(outputs.loss, F.binary_cross_entropy_with_logits(outputs.prediction_logits, multi_hot))


@pytest.mark.parametrize("pooling_type", ["mean", "last"])
def test_classifier_ignores_padding_after_a_shorter_series(pooling_type):
    """UCR sets pad shorter series with NaN at the end: the logits are those of the series without it."""
    model = perturbed(PMGForTimeSeriesClassification(ts_config(num_labels=3, pooling_type=pooling_type))).eval()
    past = series(BATCH, LENGTH, CHANNELS)
    padded = torch.cat([past, torch.full((BATCH, 2, CHANNELS), float("nan"))], dim=1)
    torch.testing.assert_close(
        model(past_values=padded).prediction_logits, model(past_values=past).prediction_logits, rtol=1e-5, atol=1e-5
    )


def test_classifier_learns_to_tell_sines_from_noise():
    grid = torch.linspace(0, 6.28, LENGTH)

    def sines_and_noise(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        sines = torch.sin(grid * torch.rand(count, 1) * 3 + 1)[..., None].expand(-1, -1, CHANNELS)
        values = torch.cat([sines, torch.randn(count, LENGTH, CHANNELS)])
        return values, torch.cat([torch.zeros(count), torch.ones(count)]).long()

    values, labels = sines_and_noise(16)
    model = PMGForTimeSeriesClassification(ts_config(num_labels=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = model(past_values=values, target_values=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    held_out, held_out_labels = sines_and_noise(16)
    accuracy = (model.eval()(past_values=held_out).prediction_logits.argmax(-1) == held_out_labels).float().mean()
    assert accuracy >= 0.9, accuracy


def test_zero_width_time_features_are_the_same_as_none():
    model = forecaster()  # num_time_features = 0
    past = series(BATCH, LENGTH, CHANNELS)
    expected = model(past_values=past).prediction_outputs
    torch.testing.assert_close(model(past_values=past, past_time_features=past[..., :0]).prediction_outputs, expected)
    with pytest.raises(ValueError, match=r"past_time_features must have shape \(3, 20, 0\)"):
        model(past_values=past, past_time_features=torch.randn(BATCH, LENGTH, 1))


def test_wrong_input_shapes_and_config_fields_raise_clear_errors():
    model = forecaster(num_time_features=2)
    past = series(BATCH, LENGTH, CHANNELS)
    with pytest.raises(ValueError, match="num_input_channels=2"):
        model(past_values=series(BATCH, LENGTH, 3), past_time_features=torch.randn(BATCH, LENGTH, 2))
    with pytest.raises(ValueError, match="past_time_features must have shape"):
        model(past_values=past)
    with pytest.raises(ValueError, match="past_observed_mask"):
        model(past_values=past, past_observed_mask=torch.ones(BATCH, LENGTH), past_time_features=torch.randn(3, 20, 2))
    with pytest.raises(ValueError, match="future_values must have shape"):
        model(past_values=past, past_time_features=torch.randn(BATCH, LENGTH, 2), future_values=past)
    future = series(BATCH, HORIZON, CHANNELS)
    with pytest.raises(ValueError, match=r"future_observed_mask must have the shape of future_values \(3, 5, 2\)"):
        # (B, P) for (B, P, C) targets broadcast to (B, P, P) before, and the loss was silently wrong
        model(
            past_values=past,
            past_time_features=torch.randn(BATCH, LENGTH, 2),
            future_values=future,
            future_observed_mask=torch.ones(BATCH, HORIZON),
        )
    with pytest.raises(ValueError, match="length >= 1"):
        model(past_values=past[:, :0], past_time_features=torch.randn(BATCH, 0, 2))
    with pytest.raises(TypeError, match="labels"):  # the targets are future_values; a misspelt argument is no no-op
        model(past_values=past, past_time_features=torch.randn(BATCH, LENGTH, 2), labels=future)
    with pytest.raises(ValueError, match="output_distribution needs"):
        model.output_distribution((past,), past, past)
    for field, value in (
        ("scaling", "minmax"),
        ("loss", "mae"),
        ("distribution_output", "gamma"),
        ("pooling_type", "max"),
    ):
        with pytest.raises(ValueError, match=rf"PMGConfig\.{field} must be"):
            ts_config(**{field: value})
    with pytest.raises(ValueError, match=r"PMGConfig\.prediction_length must be"):
        ts_config(prediction_length=0)


def test_benchmark_splits_follow_the_70_10_20_protocol_with_training_statistics():
    dates = pd.date_range("2020-01-01", periods=100, freq="h")
    table = pd.DataFrame({"date": dates, "a": np.arange(100.0), "b": np.sin(np.arange(100.0))})
    splits = prepare_forecasting_splits(table, context_length=10)
    assert {split: len(values) for split, values in splits.values.items()} == {
        "train": 70,
        "validation": 20,
        "test": 30,
    }
    train = splits.values["train"]
    np.testing.assert_allclose(train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(train.std(axis=0), 1.0, atol=1e-5)
    # validation and test start context_length steps before their own part: same rows as the full normalised table
    np.testing.assert_array_equal(splits.values["validation"][:10], train[-10:])
    assert splits.feature_names == ["hour_of_day", "day_of_week", "day_of_month", "day_of_year"]
    assert splits.time_features["train"].shape == (70, 4) and np.abs(splits.time_features["train"]).max() <= 0.5
    windows = ForecastingWindows(splits.values["test"], splits.time_features["test"], 10, 5)
    assert len(windows) == 30 - 10 - 5 + 1
    np.testing.assert_array_equal(windows[0]["future_values"], splits.values["test"][10:15])
    assert season_length(dates) == 24 and calendar_feature_names(pd.date_range("2000", periods=9, freq="QS")) == [
        "month_of_year"
    ]


def test_embedded_data_sets_load_with_their_published_shapes():
    macro = load_series_table()
    assert macro.shape == (203, 13) and macro.columns[0] == "date"
    splits = prepare_forecasting_splits(macro, context_length=24)
    assert len(splits.channels) == 12 and splits.season_length == 4
    italy = load_ucr()
    assert italy.train_values.shape == (67, 24, 1) and italy.test_values.shape == (1029, 24, 1)
    assert italy.label_names == ["1", "2"] and set(italy.test_labels.tolist()) == {0, 1}


def test_ucr_files_of_different_widths_load_to_one_width(tmp_path):
    """Variable-length UCR problems pad each file to its own longest series."""
    (tmp_path / "TRAIN.tsv").write_text("1\t0.5\t1.5\t2.5\n2\t1.0\t2.0\tNaN\n")
    (tmp_path / "TEST.tsv").write_text("2\t3.0\t4.0\t5.0\t6.0\n")
    data = load_ucr(str(tmp_path / "TRAIN.tsv"), str(tmp_path / "TEST.tsv"))
    assert data.train_values.shape == (2, 4, 1) and data.test_values.shape == (1, 4, 1)
    np.testing.assert_array_equal(data.train_values[0, :, 0], [0.5, 1.5, 2.5, np.nan])
    np.testing.assert_array_equal(data.test_values[0, :, 0], [3.0, 4.0, 5.0, 6.0])


def run_script(arguments: list[str]) -> dict:
    return load_script("train_timeseries").main(arguments)


@pytest.mark.parametrize("task", ["forecasting", "classification"])
def test_benchmark_script_reports_every_model_on_the_embedded_real_data(tmp_path, task):
    short = ["--hidden_size", "16", "--max_steps", "2", "--num_train_epochs", "1", "--seeds", "0", "1"]
    report = run_script(["--task", task, "--output_dir", str(tmp_path), *short])
    expected = (
        ["last_value", "seasonal_naive", "dlinear", "lstm", "gru", "pmg", "pmg_hybrid"]
        if task == "forecasting"
        else ["majority_class", "1nn_euclidean", "lstm", "gru", "pmg", "pmg_hybrid"]
    )
    assert [row["model"] for row in report["results"]] == expected
    metrics = ("mse", "mae", "crps") if task == "forecasting" else ("accuracy", "error_rate")
    assert all(np.isfinite(row[metric]) for row in report["results"] for metric in metrics)
    runs = {row["model"]: len(row["runs"]) for row in report["results"]}
    assert runs == {name: 2 if name in ("dlinear", "lstm", "gru", "pmg", "pmg_hybrid") else 1 for name in expected}
    assert json.loads((tmp_path / "results.json").read_text())["results"] == report["results"]
    assert (tmp_path / "results.md").read_text().count("\n") == len(expected) + 2
    model_class = PMGForTimeSeriesForecasting if task == "forecasting" else PMGForTimeSeriesClassification
    assert isinstance(model_class.from_pretrained(tmp_path / "pmg"), model_class)
    if task == "forecasting":  # deterministic forecasts: the CRPS of a point is its absolute error
        assert all(row["crps"] == pytest.approx(row["mae"], rel=1e-6) for row in report["results"])
    if task == "classification":  # 1-NN Euclidean on ItalyPowerDemand: error 0.045 in the UCR archive's table
        assert report["results"][1]["error_rate"] == pytest.approx(0.045, abs=0.0005)


def test_benchmark_script_refuses_bad_sizes_and_a_folder_that_holds_results(tmp_path):
    refusals = {
        "--moving_average must be an odd number": ["--moving_average", "24"],
        "--prediction_length must be at least 1": ["--prediction_length", "0"],
        "--context_length must be at least 1": ["--context_length", "-2"],
    }
    for message, arguments in refusals.items():
        with pytest.raises(ValueError, match=message):
            run_script(["--output_dir", str(tmp_path / "new"), *arguments])
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is not empty: choose a new folder"):
        run_script(["--output_dir", str(tmp_path), "--models", "last_value"])
    assert (tmp_path / "results.json").read_text() == "{}"


def test_sample_crps_matches_the_closed_form_of_a_gaussian():
    sample_crps = load_script("train_timeseries").sample_crps
    mean, std = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 0.5, 2.0])
    targets = torch.tensor([0.3, 2.0, -2.5])
    samples = torch.distributions.Normal(mean, std).sample((100_000,))
    # CRPS(N(mu, sigma^2), y) = sigma * (z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi)), z = (y - mu) / sigma
    normal, z = torch.distributions.Normal(0.0, 1.0), (targets - mean) / std
    exact = std * (z * (2 * normal.cdf(z) - 1) + 2 * normal.log_prob(z).exp() - 1 / torch.pi**0.5)
    torch.testing.assert_close(sample_crps(samples, targets), exact, rtol=0.02, atol=1e-3)
    point = torch.tensor([[0.5, -1.0, 4.0]])  # a single sample: the absolute error
    torch.testing.assert_close(sample_crps(point, targets), (point[0] - targets).abs())


@pytest.mark.parametrize("steps", [14, 3])
def test_a_split_too_short_for_one_window_is_named(steps):
    with pytest.raises(ValueError, match=rf"A split of {steps} steps holds no window of context_length=10"):
        ForecastingWindows(np.zeros((steps, 2), np.float32), np.zeros((steps, 0), np.float32), 10, 5)


def test_tables_that_cannot_be_split_chronologically_are_refused_by_name():
    dates = pd.date_range("2020-01-01", periods=100, freq="h")
    table = pd.DataFrame({"date": dates, "a": np.arange(100.0), "name": ["x"] * 100})
    cases = {
        r"\['name'\] are not numeric": dict(table=table),
        r"'date' cannot be a target column": dict(table=table, target_columns=["a", "date"]),
        r"must increase strictly": dict(table=table.iloc[::-1], target_columns=["a"]),
        r"must increase strictly ": dict(table=pd.concat([table, table.iloc[-1:]]), target_columns=["a"]),
    }
    for message, arguments in cases.items():
        with pytest.raises(ValueError, match=message):
            prepare_forecasting_splits(context_length=10, **arguments)
