"""Regression metrics: mean squared error, and Pearson and Spearman correlation (as GLUE's STS-B reports them)."""

import datasets
import evaluate
import numpy as np
from scipy.stats import rankdata

_DESCRIPTION = """
Mean squared error; Pearson's r between predictions and references; Spearman's rho, Pearson's r of their ranks (ties
share their mean rank). A correlation is NaN where predictions or references are all equal: it is undefined there.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted scores.
    references: true scores.
Returns:
    mse, pearson, spearman.
Example:
    >>> metric = pmg.metrics.load_metric("regression")
    >>> metric.compute(predictions=[1.0, 2.0, 4.0], references=[1.0, 2.0, 3.0])["spearman"]
    1.0
"""


def correlation(first: np.ndarray, second: np.ndarray) -> float:
    """Pearson's r; NaN where either side is constant."""
    first, second = first - first.mean(), second - second.mean()
    scale = np.sqrt((first**2).sum() * (second**2).sum())
    return float((first * second).sum() / scale) if scale > 0 else float("nan")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Regression(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        if len(references) == 0:
            raise ValueError("No examples to evaluate.")
        predicted, true = np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64)
        return {
            "mse": float(((predicted - true) ** 2).mean()),
            "pearson": correlation(predicted, true),
            "spearman": correlation(rankdata(predicted), rankdata(true)),
        }
