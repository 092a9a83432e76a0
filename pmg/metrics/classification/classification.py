"""Classification metrics: accuracy and macro-averaged F1 (every class weighs the same, however rare)."""

import datasets
import evaluate

_DESCRIPTION = """
Accuracy, and macro-F1: the unweighted mean over classes of 2 * precision * recall / (precision + recall), with F1 0
for a class that is never predicted correctly. Classes are those seen in `references` or `predictions`, plus any
given as `labels`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class ids.
    references: true class ids.
    labels: optional, every class id of the task, so classes absent from this evaluation still count in macro-F1.
Returns:
    accuracy, macro_f1.
Example:
    >>> metric = pmg.metrics.load_metric("classification")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 2])["accuracy"]
    0.6666666666666666
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Classification(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, labels: list[int] | None = None) -> dict[str, float]:
        if len(references) == 0:
            raise ValueError("No examples to evaluate.")
        pairs = list(zip(predictions, references, strict=True))
        classes = set(references) | set(predictions) | set(labels or [])
        f1_scores = []
        for label in classes:
            true_positives = sum(1 for predicted, true in pairs if predicted == true == label)
            predicted_count = sum(1 for predicted, _ in pairs if predicted == label)
            true_count = sum(1 for _, true in pairs if true == label)
            denominator = predicted_count + true_count
            f1_scores.append(2 * true_positives / denominator if denominator else 0.0)
        accuracy = sum(1 for predicted, true in pairs if predicted == true) / len(pairs)
        return {"accuracy": accuracy, "macro_f1": sum(f1_scores) / len(f1_scores)}
