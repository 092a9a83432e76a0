"""Time-series data for `scripts/train_timeseries.py`: benchmark CSVs, splits, windows, calendar features, UCR sets.

Forecasting follows the long-horizon benchmark protocol (Autoformer, DLinear, PatchTST): a table with a date column
and one column per channel, a chronological 70/10/20 split whose validation and test parts start `context_length`
steps early (so their first window has a full lookback), z-normalisation with the training part's statistics,
and sliding lookback/horizon windows. Without a file or Hub dataset, the embedded US macroeconomic data are used;
classification reads UCR-archive files (the embedded ItalyPowerDemand by default). See
`pmg/time_series_datasets/NOTICE.md` for the sources.
"""

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

DATASETS_DIR = Path(__file__).parent / "time_series_datasets"
MACRODATA = DATASETS_DIR / "macrodata.csv.gz"
ITALY_POWER_DEMAND = (
    DATASETS_DIR / "ItalyPowerDemand_TRAIN.tsv.gz",
    DATASETS_DIR / "ItalyPowerDemand_TEST.tsv.gz",
)

# calendar features in [-0.5, 0.5], as the benchmark code's "timeF" encoding (after GluonTS)
CALENDAR_FEATURES = {
    "minute_of_hour": lambda dates: dates.minute / 59.0 - 0.5,
    "hour_of_day": lambda dates: dates.hour / 23.0 - 0.5,
    "day_of_week": lambda dates: dates.day_of_week / 6.0 - 0.5,
    "day_of_month": lambda dates: (dates.day - 1) / 30.0 - 0.5,
    "day_of_year": lambda dates: (dates.day_of_year - 1) / 365.0 - 0.5,
    "week_of_year": lambda dates: (dates.isocalendar().week.to_numpy() - 1) / 52.0 - 0.5,
    "month_of_year": lambda dates: (dates.month - 1) / 11.0 - 0.5,
}


def load_series_table(
    csv_file: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
) -> pd.DataFrame:
    """A benchmark-layout table: a CSV file, a Hub dataset (its train split), or the embedded macro data."""
    if csv_file and dataset_name:
        raise ValueError("Pass either csv_file or dataset_name, not both.")
    if dataset_name:
        from datasets import load_dataset

        return load_dataset(dataset_name, dataset_config_name, split="train").to_pandas()
    return pd.read_csv(csv_file or MACRODATA)


class SeriesSplits(NamedTuple):
    """Normalised values (N, C) and calendar features (N, F) per split, with the names of channels and features."""

    values: dict[str, np.ndarray]
    time_features: dict[str, np.ndarray]
    channels: list[str]
    feature_names: list[str]
    season_length: int


def prepare_forecasting_splits(
    table: pd.DataFrame,
    context_length: int,
    date_column: str = "date",
    target_columns: list[str] | None = None,
    train_ratio: float = 0.7,
    test_ratio: float = 0.2,
) -> SeriesSplits:
    """Split chronologically (train_ratio / rest / test_ratio) and z-normalise with the training part's statistics.

    Borders as in the benchmark code (its `Dataset_Custom`): train = [0, n_train), validation = [n_train -
    context_length, n_train + n_validation), test = [N - n_test - context_length, N).
    """
    if date_column not in table.columns:
        raise ValueError(f"No date column {date_column!r}; the table's columns are {list(table.columns)}.")
    channels = target_columns or [column for column in table.columns if column != date_column]
    missing = sorted(set(channels) - set(table.columns))
    if missing:
        raise ValueError(f"No column(s) {missing}; the table's columns are {list(table.columns)}.")
    if date_column in channels:
        raise ValueError(f"The date column {date_column!r} cannot be a target column.")
    not_numeric = [name for name in channels if not pd.api.types.is_numeric_dtype(table[name])]
    if not_numeric:
        raise ValueError(f"Target column(s) {not_numeric} are not numeric.")
    dates = pd.DatetimeIndex(pd.to_datetime(table[date_column]))
    if not dates.is_monotonic_increasing or not dates.is_unique:
        raise ValueError(
            f"The dates of {date_column!r} must increase strictly from row to row (sort the table, "
            "drop duplicated rows)."
        )
    values = table[channels].to_numpy(dtype=np.float64)
    if np.isnan(values).any():
        columns = [name for name, column in zip(channels, values.T, strict=True) if np.isnan(column).any()]
        raise ValueError(f"Columns {columns} hold missing values; the benchmark protocol expects complete series.")
    total = len(values)
    n_train, n_test = int(total * train_ratio), int(total * test_ratio)
    n_validation = total - n_train - n_test
    if min(n_train, n_validation, n_test) <= 0 or n_train <= context_length:
        raise ValueError(
            f"{total} rows cannot be split {train_ratio}/{1 - train_ratio - test_ratio:.2f}/{test_ratio} "
            f"with context_length={context_length}."
        )
    borders = {
        "train": (0, n_train),
        "validation": (n_train - context_length, n_train + n_validation),
        "test": (total - n_test - context_length, total),
    }
    mean, std = values[:n_train].mean(axis=0), values[:n_train].std(axis=0)
    normalised = ((values - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)
    feature_names = calendar_feature_names(dates)
    features = calendar_features(dates, feature_names)
    return SeriesSplits(
        values={split: normalised[start:end] for split, (start, end) in borders.items()},
        time_features={split: features[start:end] for split, (start, end) in borders.items()},
        channels=channels,
        feature_names=feature_names,
        season_length=season_length(dates),
    )


def _median_step_days(dates: pd.DatetimeIndex) -> float:
    return pd.Series(dates).diff().median() / pd.Timedelta(days=1)


def calendar_feature_names(dates: pd.DatetimeIndex) -> list[str]:
    """The calendar features that vary at the sampling interval of `dates` (e.g. hourly: hour, weekday, ...)."""
    days = _median_step_days(dates)
    if days < 1 / 24:
        return ["minute_of_hour", "hour_of_day", "day_of_week", "day_of_month", "day_of_year"]
    if days < 1:
        return ["hour_of_day", "day_of_week", "day_of_month", "day_of_year"]
    if days < 7:
        return ["day_of_week", "day_of_month", "day_of_year"]
    if days < 28:
        return ["day_of_month", "week_of_year"]
    if days < 365:
        return ["month_of_year"]
    return []


def calendar_features(dates: pd.DatetimeIndex, names: list[str]) -> np.ndarray:
    """(N, len(names)) float32 calendar features in [-0.5, 0.5]."""
    columns = [np.asarray(CALENDAR_FEATURES[name](dates), dtype=np.float32) for name in names]
    return np.stack(columns, axis=1) if columns else np.zeros((len(dates), 0), dtype=np.float32)


def season_length(dates: pd.DatetimeIndex) -> int:
    """Steps per seasonal cycle for the seasonal-naive baseline: a day below daily sampling, else a week / year."""
    days = _median_step_days(dates)
    if days < 1:
        return round(1 / days)
    if days < 7:
        return 7
    if days < 28:
        return 52
    if days < 89:
        return 12
    if days < 365:
        return 4
    return 1


class ForecastingWindows(Dataset):
    """Sliding windows over one split: past_values (L, C), future_values (P, C) and past_time_features (L, F)."""

    def __init__(self, values: np.ndarray, time_features: np.ndarray, context_length: int, prediction_length: int):
        self.values = torch.from_numpy(values)
        self.time_features = torch.from_numpy(time_features)
        self.context_length = context_length
        self.prediction_length = prediction_length
        if len(values) < context_length + prediction_length:  # (len() would refuse a negative count itself)
            raise ValueError(
                f"A split of {len(values)} steps holds no window of context_length={context_length} + "
                f"prediction_length={prediction_length}."
            )

    def __len__(self) -> int:
        return len(self.values) - self.context_length - self.prediction_length + 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        middle = index + self.context_length
        return {
            "past_values": self.values[index:middle],
            "future_values": self.values[middle : middle + self.prediction_length],
            "past_time_features": self.time_features[index:middle],
        }


class ClassificationSplits(NamedTuple):
    """UCR train and test series (N, T, 1) as float32 (NaN pads variable-length series), labels as class ids."""

    train_values: np.ndarray
    train_labels: np.ndarray
    test_values: np.ndarray
    test_labels: np.ndarray
    label_names: list[str]


def load_ucr(train_file: str | None = None, test_file: str | None = None) -> ClassificationSplits:
    """A UCR-archive problem in its 2018 layout (tab-separated, label first, NaN padding); default ItalyPowerDemand."""
    if (train_file is None) != (test_file is None):
        raise ValueError("Pass both train_file and test_file, or neither (the embedded ItalyPowerDemand).")
    train_file, test_file = (train_file, test_file) if train_file else ITALY_POWER_DEMAND
    train, test = (pd.read_csv(path, sep="\t", header=None) for path in (train_file, test_file))
    label_names = sorted({str(label) for label in train[0]})
    unseen = sorted({str(label) for label in test[0]} - set(label_names))
    if unseen:
        raise ValueError(f"The test file has labels never seen in training: {unseen}; training labels: {label_names}.")
    index = {name: i for i, name in enumerate(label_names)}

    width = max(train.shape[1], test.shape[1]) - 1  # the files of a variable-length problem may differ in width

    def arrays(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        values = np.full((len(frame), width, 1), np.nan, dtype=np.float32)
        values[:, : frame.shape[1] - 1, 0] = frame.iloc[:, 1:].to_numpy(dtype=np.float32)
        return values, np.array([index[str(label)] for label in frame[0]], dtype=np.int64)

    return ClassificationSplits(*arrays(train), *arrays(test), label_names)
