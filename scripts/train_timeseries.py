"""Benchmark PMG on real time series against the usual baselines, offline by default.

Forecasting (default): the long-horizon benchmark protocol (chronological 70/10/20 split, z-normalisation with the
training statistics, lookback/horizon windows, MSE and MAE on the normalised scale) on the embedded US macroeconomic
data (12 quarterly series, 1959-2009), or any table with a date column and one column per channel (ETTh1, Weather,
Electricity, ...). Models: last value, seasonal naive, DLinear, LSTM, GRU, PMG and a PMG/attention hybrid.

Classification (`--task classification`): a UCR-archive problem (the embedded ItalyPowerDemand by default), trained
on its training file and scored on its test file. Models: majority class, 1-NN Euclidean, LSTM, GRU, PMG, hybrid.

    python scripts/train_timeseries.py
    python scripts/train_timeseries.py --task classification
    python scripts/train_timeseries.py --csv_file ETTh1.csv --context_length 96 --prediction_length 96
    python scripts/train_timeseries.py --dataset_name ORG/NAME --date_column date
    python scripts/train_timeseries.py --task classification --train_file X_TRAIN.tsv --test_file X_TEST.tsv

LSTM and GRU see exactly PMG's inputs (per-series scaling, observed flags, calendar features, channels as separate
series) and predict through the same kind of head: only the sequence model differs. Every trained model runs once
per seed (default 0, 1, 2; reported as mean ± std), with early stopping on validation MSE (forecasting) or for a
fixed number of epochs (classification: UCR has no validation split). Writes results.json, results.md and the PMG
models of the first seed (save_pretrained) to --output_dir.
"""

import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from pmg import (
    PMGConfig,
    PMGForTimeSeriesClassification,
    PMGForTimeSeriesForecasting,
    PMGTimeSeriesPreTrainedModel,
    optimizer_param_groups,
)
from pmg.modeling_pmg_time_series import PMGTimeSeriesScaler, time_series_features
from pmg.time_series_data import ForecastingWindows, load_series_table, load_ucr, prepare_forecasting_splits

FORECASTING_MODELS = ("last_value", "seasonal_naive", "dlinear", "lstm", "gru", "pmg", "pmg_hybrid")
CLASSIFICATION_MODELS = ("majority_class", "1nn_euclidean", "lstm", "gru", "pmg", "pmg_hybrid")


@dataclass
class TimeSeriesArguments:
    task: str = field(default="forecasting", metadata={"help": "forecasting | classification"})
    output_dir: str | None = field(
        default=None, metadata={"help": "Where results and PMG models go; default outputs/timeseries-TASK."}
    )
    models: list[str] | None = field(
        default=None, metadata={"help": f"Models to run; default all: {FORECASTING_MODELS} / {CLASSIFICATION_MODELS}"}
    )
    # forecasting data
    csv_file: str | None = field(default=None, metadata={"help": "A CSV: a date column, then one column per channel."})
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset in the same layout."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    date_column: str = field(default="date", metadata={"help": "Column holding the timestamps."})
    target_columns: list[str] | None = field(default=None, metadata={"help": "Channels; default all but the date."})
    train_ratio: float = field(default=0.7, metadata={"help": "Share of the steps for training (first part)."})
    test_ratio: float = field(default=0.2, metadata={"help": "Share of the steps for testing (last part)."})
    context_length: int = field(default=24, metadata={"help": "Lookback window (steps)."})
    prediction_length: int = field(default=8, metadata={"help": "Forecast horizon (steps)."})
    season_length: int | None = field(
        default=None, metadata={"help": "Seasonal naive period; default from the sampling interval (quarterly: 4)."}
    )
    time_features: bool = field(default=True, metadata={"help": "Give calendar features to PMG, LSTM and GRU."})
    moving_average: int = field(default=25, metadata={"help": "DLinear's trend kernel (odd), as in its paper."})
    loss: str = field(default="mse", metadata={"help": "PMG forecasting loss: mse | nll (Student-t likelihood)."})
    # classification data
    train_file: str | None = field(default=None, metadata={"help": "UCR training file (.tsv, label first)."})
    test_file: str | None = field(default=None, metadata={"help": "UCR test file."})
    # models and training
    hidden_size: int = field(default=64, metadata={"help": "Width of PMG, LSTM and GRU."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Layers of PMG, LSTM and GRU."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of every trained model."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Windows (or series) per step."})
    num_train_epochs: int = field(
        default=200,
        metadata={
            "help": "Epochs; default 200: at most, for forecasting (early stopping on validation MSE decides), "
            "and exactly, for classification (UCR has no validation split; 200 epochs bring every model's training "
            "loss close to 0 on ItalyPowerDemand)."
        },
    )
    max_steps: int = field(default=-1, metadata={"help": "Stop every model after this many steps (> 0)."})
    early_stopping_patience: int = field(
        default=10, metadata={"help": "Forecasting: stop after this many epochs without a better validation MSE."}
    )
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, ...; default cuda when available."})
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata={"help": "One run of every trained model per seed (initialisation, data order); mean and std."},
    )


# ---------------------------------------------------------------------------------------------------- baselines


class LastValue(nn.Module):
    """Repeat the last observed value over the horizon."""

    def __init__(self, prediction_length: int):
        super().__init__()
        self.prediction_length = prediction_length

    def forward(self, past_values: torch.Tensor, past_time_features: torch.Tensor | None = None) -> torch.Tensor:
        return past_values[:, -1:].expand(-1, self.prediction_length, -1)


class SeasonalNaive(nn.Module):
    """Repeat the last full season: y[T + h] = y[T + h - m * ceil(h / m)] for h = 1..P."""

    def __init__(self, prediction_length: int, season_length: int):
        super().__init__()
        self.prediction_length = prediction_length
        self.season_length = season_length

    def forward(self, past_values: torch.Tensor, past_time_features: torch.Tensor | None = None) -> torch.Tensor:
        if past_values.shape[1] < self.season_length:
            raise ValueError(f"season_length={self.season_length} exceeds the lookback of {past_values.shape[1]}.")
        last_season = past_values[:, -self.season_length :]
        repeats = math.ceil(self.prediction_length / self.season_length)
        return last_season.repeat(1, repeats, 1)[:, : self.prediction_length]


class DLinear(nn.Module):
    """DLinear (Zeng et al., AAAI 2023): a moving-average trend and the remainder, each mapped to the horizon by a
    linear layer over time, shared by all channels (the paper's default, individual=False)."""

    def __init__(self, context_length: int, prediction_length: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.trend = nn.Linear(context_length, prediction_length)
        self.remainder = nn.Linear(context_length, prediction_length)

    def forward(self, past_values: torch.Tensor, past_time_features: torch.Tensor | None = None) -> torch.Tensor:
        series = past_values.transpose(1, 2)  # (B, C, L)
        half = (self.kernel_size - 1) // 2
        padded = torch.cat([series[..., :1].expand(-1, -1, half), series, series[..., -1:].expand(-1, -1, half)], -1)
        trend = F.avg_pool1d(padded, self.kernel_size, stride=1)
        return (self.trend(trend) + self.remainder(series - trend)).transpose(1, 2)


class RecurrentForecaster(nn.Module):
    """LSTM or GRU forecaster with PMG's inputs and head: scaled channels as separate series, last state -> horizon."""

    def __init__(self, kind: str, config: PMGConfig):
        super().__init__()
        self.scaler = PMGTimeSeriesScaler(config.scaling)
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[kind]
        self.rnn = rnn(2 + config.num_time_features, config.hidden_size, config.num_hidden_layers, batch_first=True)
        self.head = nn.Linear(config.hidden_size, config.prediction_length)

    def forward(self, past_values: torch.Tensor, past_time_features: torch.Tensor | None = None) -> torch.Tensor:
        features, _, loc, scale = time_series_features(past_values, None, past_time_features, self.scaler, True)
        hidden, _ = self.rnn(features)
        batch, _, channels = past_values.shape
        scaled = self.head(hidden[:, -1]).view(batch, channels, -1).transpose(1, 2)
        return scaled * scale + loc


class RecurrentClassifier(nn.Module):
    """LSTM or GRU classifier with PMG's inputs and pooling: mean over observed steps, channels concatenated."""

    def __init__(self, kind: str, config: PMGConfig):
        super().__init__()
        self.scaler = PMGTimeSeriesScaler(config.scaling)
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[kind]
        self.rnn = rnn(2, config.hidden_size, config.num_hidden_layers, batch_first=True)
        self.head = nn.Linear(config.num_input_channels * config.hidden_size, config.num_labels)

    def forward(self, past_values: torch.Tensor) -> torch.Tensor:
        features, steps, _, _ = time_series_features(past_values, None, None, self.scaler, True)
        hidden, _ = self.rnn(features)
        weights = steps.unsqueeze(-1)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.head(pooled.reshape(past_values.shape[0], -1))


class MajorityClass(nn.Module):
    """Always the most frequent training class."""

    def __init__(self, labels: torch.Tensor, num_labels: int):
        super().__init__()
        self.register_buffer("logits", F.one_hot(labels.bincount(minlength=num_labels).argmax(), num_labels).float())

    def forward(self, past_values: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(past_values), -1)


class NearestNeighbour(nn.Module):
    """1-NN with Euclidean distance on the raw series: the UCR archive's reference classifier."""

    def __init__(self, values: torch.Tensor, labels: torch.Tensor, num_labels: int):
        super().__init__()
        self.num_labels = num_labels
        self.register_buffer("values", values.nan_to_num().flatten(1))
        self.register_buffer("labels", labels)

    def forward(self, past_values: torch.Tensor) -> torch.Tensor:
        distances = torch.cdist(past_values.nan_to_num().flatten(1), self.values)
        return F.one_hot(self.labels[distances.argmin(dim=1)], self.num_labels).float()


# ---------------------------------------------------------------------------------------------------- training


def pmg_config(args: TimeSeriesArguments, hybrid: bool, **fields) -> PMGConfig:
    """A small PMG config; the hybrid replaces the last block by causal attention."""
    layers = args.num_hidden_layers
    layer_types = ["linear_attention"] * (layers - 1) + ["full_attention" if hybrid else "linear_attention"]
    return PMGConfig(
        hidden_size=args.hidden_size,
        num_hidden_layers=layers,
        layer_types=layer_types,
        gate_rank=max(1, args.hidden_size // 4),
        num_attention_heads=max(1, args.hidden_size // 32),
        **fields,
    )


def device_of(model: nn.Module) -> torch.device:
    """Where the model's weights (or buffers) are; CPU for the naive baselines, which hold none."""
    tensors = [*model.parameters(), *model.buffers()]
    return tensors[0].device if tensors else torch.device("cpu")


def forecast(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Point forecasts (B, P, C) and the training loss (MSE, or PMG's configured loss)."""
    device = device_of(model)
    batch = {key: value.to(device) for key, value in batch.items()}
    if isinstance(model, PMGForTimeSeriesForecasting):
        outputs = model(**batch)
        predictions = outputs.prediction_outputs
        if model.distribution_output is not None:  # the mean of the predictive distribution
            predictions = model.output_distribution(predictions, outputs.loc, outputs.scale).mean
        return predictions, outputs.loss
    predictions = model(batch["past_values"], batch["past_time_features"])
    return predictions, F.mse_loss(predictions, batch["future_values"])


def forecast_with_samples(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Point forecasts (B, P, C) and sample paths (S, B, P, C) from one forward pass: S = num_parallel_samples draws
    from PMG's predictive distribution (as `generate` draws them), or the point forecast as the single sample of a
    deterministic model."""
    if isinstance(model, PMGForTimeSeriesForecasting) and model.distribution_output is not None:
        device = device_of(model)
        outputs = model(**{key: value.to(device) for key, value in batch.items() if key != "future_values"})
        distribution = model.output_distribution(outputs.prediction_outputs, outputs.loc, outputs.scale)
        return distribution.mean, distribution.sample((model.config.num_parallel_samples,))
    predictions, _ = forecast(model, batch)
    return predictions, predictions.unsqueeze(0)


def sample_crps(samples: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Continuous ranked probability score of each target under the empirical distribution of `samples` (S, ...):
    E|X - y| - E|X - X'| / 2, with the pairwise term from the sorted samples in O(S log S). With one sample (a
    point forecast) it is the absolute error."""
    count = samples.shape[0]
    ranks = torch.arange(1, count + 1, device=samples.device, dtype=samples.dtype).view(-1, *[1] * targets.dim())
    spread = 2 * ((2 * ranks - count - 1) * samples.sort(dim=0).values).sum(dim=0) / count**2  # E|X - X'|
    return (samples - targets).abs().mean(dim=0) - spread / 2


def classify(model: nn.Module, values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, K) and the cross-entropy loss."""
    device = device_of(model)
    values, labels = values.to(device), labels.to(device)
    if isinstance(model, PMGForTimeSeriesClassification):
        outputs = model(past_values=values, target_values=labels)
        return outputs.prediction_logits, outputs.loss
    logits = model(values)
    return logits, F.cross_entropy(logits, labels)


@torch.no_grad()
def forecast_errors(model: nn.Module, windows: ForecastingWindows) -> dict[str, float]:
    """MSE and MAE of the point forecasts and the CRPS of the sampled ones, over every window, step and channel (the
    normalised scale). A point forecast's CRPS is its MAE."""
    model.eval()
    totals = {"mse": 0.0, "mae": 0.0, "crps": 0.0}
    count = 0
    for batch in DataLoader(windows, batch_size=256):
        predictions, samples = forecast_with_samples(model, batch)
        targets = batch["future_values"].to(predictions.device)
        error = predictions - targets
        totals["mse"] += error.pow(2).sum().item()
        totals["mae"] += error.abs().sum().item()
        totals["crps"] += sample_crps(samples, targets).sum().item()
        count += error.numel()
    return {name: total / count for name, total in totals.items()}


@torch.no_grad()
def classification_errors(model: nn.Module, values: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and error rate (the UCR archive reports error rates)."""
    model.eval()
    batches = DataLoader(TensorDataset(values, labels), batch_size=256)
    predictions = torch.cat([classify(model, batch, targets)[0].argmax(dim=-1).cpu() for batch, targets in batches])
    accuracy = (predictions == labels).float().mean().item()
    return {"accuracy": accuracy, "error_rate": 1.0 - accuracy}


def train(
    model: nn.Module,
    batches: DataLoader,
    loss_of: Callable[[nn.Module, object], torch.Tensor],
    args: TimeSeriesArguments,
    validate: Callable[[nn.Module], float] | None,
    name: str,
) -> dict[str, float]:
    """AdamW (PMG's parameter groups for PMG models), clipping at 1.0; with `validate`, early stopping on it and the
    best epoch's weights restored. Returns the steps taken (and the best validation score)."""
    if isinstance(model, PMGTimeSeriesPreTrainedModel):
        optimizer = torch.optim.AdamW(optimizer_param_groups(model, args.learning_rate, args.weight_decay))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    best, best_state, stale, steps = math.inf, None, 0, 0
    progress = tqdm(range(args.num_train_epochs), desc=name, leave=False)
    for _ in progress:
        model.train()
        for batch in batches:
            loss = loss_of(model, batch)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            steps += 1
            if steps == args.max_steps:
                break
        progress.set_postfix(loss=f"{loss.item():.4f}")
        if validate is not None:
            score = validate(model)
            if score < best or best_state is None:
                best, best_state, stale = score, {key: value.clone() for key, value in model.state_dict().items()}, 0
            else:
                stale += 1
        if stale >= args.early_stopping_patience or steps == args.max_steps:
            break
    if best_state is None:
        return {"steps": steps}
    model.load_state_dict(best_state)
    return {"steps": steps, "validation_mse": best}


def benchmark(
    names: list[str],
    builders: dict[str, Callable[[], nn.Module]],
    fit: Callable[[nn.Module, int, str], dict[str, float]],
    score: Callable[[nn.Module], dict[str, float]],
    args: TimeSeriesArguments,
    output_dir: Path,
) -> list[dict]:
    """Every model once per seed (models without parameters once): test metrics as mean and std over the runs.
    PMG models of the first seed are saved with save_pretrained to output_dir/NAME."""
    results = []
    for name in names:
        runs = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = builders[name]().to(args.device)
            parameters = sum(p.numel() for p in model.parameters())
            start = time.perf_counter()
            training = fit(model, seed, name) if parameters else {}
            runs.append({"seed": seed, **score(model), **training, "seconds": round(time.perf_counter() - start, 1)})
            if seed == args.seeds[0] and isinstance(model, PMGTimeSeriesPreTrainedModel):
                model.save_pretrained(output_dir / name)
            if not parameters:
                break  # deterministic
        metrics = [key for key in runs[0] if key not in ("seed", "steps", "validation_mse", "seconds")]
        row = {"model": name, "parameters": parameters, "runs": runs}
        for key in metrics:
            values = np.array([run[key] for run in runs])
            row[key], row[f"{key}_std"] = float(values.mean()), float(values.std())
        results.append(row)
        print(json.dumps({key: value for key, value in row.items() if key != "runs"}))
    return results


# ---------------------------------------------------------------------------------------------------- tasks


def run_forecasting(args: TimeSeriesArguments, output_dir: Path) -> tuple[list[dict], dict]:
    table = load_series_table(args.csv_file, args.dataset_name, args.dataset_config_name)
    splits = prepare_forecasting_splits(
        table, args.context_length, args.date_column, args.target_columns, args.train_ratio, args.test_ratio
    )
    if not args.time_features:
        splits = splits._replace(
            time_features={split: features[:, :0] for split, features in splits.time_features.items()},
            feature_names=[],
        )
    windows = {
        split: ForecastingWindows(
            splits.values[split], splits.time_features[split], args.context_length, args.prediction_length
        )
        for split in splits.values
    }
    season = args.season_length or splits.season_length
    config_fields = dict(
        num_input_channels=len(splits.channels),
        context_length=args.context_length,
        prediction_length=args.prediction_length,
        num_time_features=len(splits.feature_names),
        loss=args.loss,
    )
    builders = {
        "last_value": lambda: LastValue(args.prediction_length),
        "seasonal_naive": lambda: SeasonalNaive(args.prediction_length, season),
        "dlinear": lambda: DLinear(args.context_length, args.prediction_length, args.moving_average),
        "lstm": lambda: RecurrentForecaster("lstm", pmg_config(args, False, **config_fields)),
        "gru": lambda: RecurrentForecaster("gru", pmg_config(args, False, **config_fields)),
        "pmg": lambda: PMGForTimeSeriesForecasting(pmg_config(args, False, **config_fields)),
        "pmg_hybrid": lambda: PMGForTimeSeriesForecasting(pmg_config(args, True, **config_fields)),
    }

    def fit(model: nn.Module, seed: int, name: str) -> dict[str, float]:
        generator = torch.Generator().manual_seed(seed)
        batches = DataLoader(windows["train"], args.per_device_train_batch_size, shuffle=True, generator=generator)

        def validation_mse(model: nn.Module) -> float:
            return forecast_errors(model, windows["validation"])["mse"]

        return train(model, batches, lambda model, batch: forecast(model, batch)[1], args, validation_mse, name)

    results = benchmark(
        args.models or list(FORECASTING_MODELS),
        builders,
        fit,
        lambda model: forecast_errors(model, windows["test"]),
        args,
        output_dir,
    )
    data = {
        "channels": splits.channels,
        "time_features": splits.feature_names,
        "season_length": season,
        "windows": {split: len(rows) for split, rows in windows.items()},
    }
    return results, data


def run_classification(args: TimeSeriesArguments, output_dir: Path) -> tuple[list[dict], dict]:
    data = load_ucr(args.train_file, args.test_file)
    train_values, test_values = torch.from_numpy(data.train_values), torch.from_numpy(data.test_values)
    train_labels, test_labels = torch.from_numpy(data.train_labels), torch.from_numpy(data.test_labels)
    num_labels = len(data.label_names)
    config_fields = dict(
        num_input_channels=train_values.shape[-1], context_length=train_values.shape[1], num_labels=num_labels
    )
    builders = {
        "majority_class": lambda: MajorityClass(train_labels, num_labels),
        "1nn_euclidean": lambda: NearestNeighbour(train_values, train_labels, num_labels),
        "lstm": lambda: RecurrentClassifier("lstm", pmg_config(args, False, **config_fields)),
        "gru": lambda: RecurrentClassifier("gru", pmg_config(args, False, **config_fields)),
        "pmg": lambda: PMGForTimeSeriesClassification(pmg_config(args, False, **config_fields)),
        "pmg_hybrid": lambda: PMGForTimeSeriesClassification(pmg_config(args, True, **config_fields)),
    }

    def fit(model: nn.Module, seed: int, name: str) -> dict[str, float]:
        generator = torch.Generator().manual_seed(seed)
        rows = TensorDataset(train_values, train_labels)
        batches = DataLoader(rows, args.per_device_train_batch_size, shuffle=True, generator=generator)
        return train(model, batches, lambda model, batch: classify(model, *batch)[1], args, None, name)

    results = benchmark(
        args.models or list(CLASSIFICATION_MODELS),
        builders,
        fit,
        lambda model: classification_errors(model, test_values, test_labels),
        args,
        output_dir,
    )
    summary = {
        "labels": data.label_names,
        "train_series": len(train_labels),
        "test_series": len(test_labels),
        "length": train_values.shape[1],
    }
    return results, summary


# ---------------------------------------------------------------------------------------------------- report


def markdown_table(results: list[dict], metrics: tuple[str, ...]) -> str:
    """One row per model: metrics as mean ± std over seeds (a single value for deterministic baselines)."""
    header = ["model", *metrics, "parameters", "runs", "steps per run", "seconds per run"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in results:
        runs = row["runs"]
        cells = [row["model"]]
        for metric in metrics:
            cells.append(f"{row[metric]:.4f}" + (f" ± {row[metric + '_std']:.4f}" if len(runs) > 1 else ""))
        steps = f"{np.mean([run['steps'] for run in runs]):.0f}" if "steps" in runs[0] else ""
        seconds = f"{np.mean([run['seconds'] for run in runs]):.1f}"
        cells += [str(row["parameters"]), str(len(runs)), steps, seconds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(TimeSeriesArguments).parse_args_into_dataclasses(args=argv)
    if args.task not in ("forecasting", "classification"):
        raise ValueError(f"task must be forecasting or classification, got {args.task!r}.")
    allowed = FORECASTING_MODELS if args.task == "forecasting" else CLASSIFICATION_MODELS
    unknown = sorted(set(args.models or ()) - set(allowed))
    if unknown:
        raise ValueError(f"Unknown models {unknown} for {args.task}; choose from {allowed}.")
    for name in (
        "context_length",
        "prediction_length",
        "hidden_size",
        "num_hidden_layers",
        "per_device_train_batch_size",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.moving_average < 1 or args.moving_average % 2 == 0:
        raise ValueError(
            f"--moving_average must be an odd number of steps (a centred kernel), got {args.moving_average}."
        )
    output_dir = Path(args.output_dir or f"outputs/timeseries-{args.task}")
    if output_dir.exists() and any(output_dir.iterdir()):  # nothing saved before is overwritten
        raise ValueError(f"output_dir {output_dir} is not empty: choose a new folder.")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    output_dir.mkdir(parents=True, exist_ok=True)

    run = run_forecasting if args.task == "forecasting" else run_classification
    results, data = run(args, output_dir)
    report = {
        "task": args.task,
        "arguments": asdict(args),
        "data": data,
        "results": results,
        "environment": {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "device": (
                torch.cuda.get_device_name(args.device)
                if args.device.startswith("cuda")
                else f"CPU, {torch.get_num_threads()} threads ({platform.processor() or platform.machine()})"
            ),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    (output_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    metrics = ("mse", "mae", "crps") if args.task == "forecasting" else ("accuracy", "error_rate")
    table = markdown_table(results, metrics)
    (output_dir / "results.md").write_text(table)
    print(table)
    return report


if __name__ == "__main__":
    main()
