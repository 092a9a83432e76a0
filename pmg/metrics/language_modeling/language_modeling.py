"""Language-modelling metrics from summed token losses: mean loss, perplexity and bits per byte.

Bits per byte divides the loss in bits by the bytes each token covers on average, so runs with different tokenizers
compare on the same scale. Inputs are per-sequence sums rather than logits, so evaluation loops stream through any
amount of text and `accelerate`'s `gather_for_metrics` can drop the duplicates of uneven last batches.
"""

import math

import datasets
import evaluate

_DESCRIPTION = """
Token-weighted mean negative log-likelihood (nats), perplexity exp(loss), and bits per byte
loss / ln(2) / bytes_per_token, over sequences given as (sum of token losses, number of predicted tokens).
"""

_KWARGS_DESCRIPTION = """
Args:
    loss_sums: per sequence, the sum of next-token negative log-likelihoods in nats.
    token_counts: per sequence, the number of predicted tokens in that sum.
    bytes_per_token: UTF-8 bytes of raw text per token of the evaluated corpus; omit it to skip bits per byte.
Returns:
    loss, perplexity, and bits_per_byte (when bytes_per_token is given).
Example:
    >>> metric = pmg.metrics.load_metric("language_modeling")
    >>> metric.compute(loss_sums=[6.0, 2.0], token_counts=[3, 1], bytes_per_token=4.0)["loss"]
    2.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LanguageModeling(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"loss_sums": datasets.Value("float64"), "token_counts": datasets.Value("int64")}
            ),
        )

    def _compute(self, loss_sums, token_counts, bytes_per_token: float | None = None) -> dict[str, float]:
        tokens = sum(token_counts)
        if tokens == 0:
            raise ValueError("No predicted tokens to evaluate: every sequence was empty or fully masked.")
        loss = math.fsum(loss_sums) / tokens
        results = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
        if bytes_per_token is not None:
            results["bits_per_byte"] = loss / math.log(2) / bytes_per_token
        return results
