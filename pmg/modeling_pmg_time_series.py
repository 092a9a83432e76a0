"""PMG for continuous time series: forecasting (point or probabilistic) and classification.

Inputs and outputs use the names of transformers' time-series models (PatchTST): `past_values` (B, T, C) with
`past_observed_mask`, `future_values` (B, prediction_length, C), outputs `loss`, `prediction_outputs`, `loc`,
`scale`, and `generate()` for sample paths. Read top to bottom: the scaler, the shared body (scaling, a linear input
projection, the PMG stack of `modeling_pmg`), the forecasting head, the classification head.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Distribution
from transformers.time_series_utils import DistributionOutput, NormalOutput, StudentTOutput
from transformers.utils import ModelOutput

from .configuration_pmg import PMGConfig
from .modeling_pmg import PMGModel, PMGModelOutputWithPast, PMGPreTrainedModel

DISTRIBUTION_OUTPUT_CLASSES = {"student_t": StudentTOutput, "normal": NormalOutput}


class PMGTimeSeriesScaler(nn.Module):
    """Per-series, per-channel scaling computed from observed values only.

    `"std"`: loc = mean, scale = standard deviation; `"mean"`: loc = 0, scale = mean absolute value; None: loc = 0,
    scale = 1. A channel with no observed value in its window gets loc = 0, scale = 1. Unobserved values (which may
    be NaN) never enter the statistics, and come out of `forward` as 0.
    """

    def __init__(self, scaling: str | None, minimum_scale: float = 1e-5):
        super().__init__()
        self.scaling = scaling
        self.minimum_scale = minimum_scale

    def forward(self, values: torch.Tensor, observed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """values (B, T, C), observed (B, T, C) booleans -> scaled values (B, T, C), loc and scale (B, 1, C)."""
        values = torch.where(observed, values.float(), 0.0)
        count = observed.sum(dim=1, keepdim=True)
        seen = count > 0
        denominator = count.clamp(min=1)
        loc = torch.zeros_like(denominator, dtype=values.dtype)
        scale = torch.ones_like(loc)
        if self.scaling == "std":
            loc = values.sum(dim=1, keepdim=True) / denominator
            variance = (torch.where(observed, values - loc, 0.0) ** 2).sum(dim=1, keepdim=True) / denominator
            scale = torch.where(seen, torch.sqrt(variance + self.minimum_scale), 1.0)
        elif self.scaling == "mean":
            mean_absolute = values.abs().sum(dim=1, keepdim=True) / denominator
            scale = torch.where(seen, mean_absolute.clamp(min=self.minimum_scale), 1.0)
        scaled = torch.where(observed, (values - loc) / scale, 0.0)
        return scaled, loc, scale


def time_series_features(
    past_values: torch.Tensor,
    past_observed_mask: torch.Tensor | None,
    past_time_features: torch.Tensor | None,
    scaler: PMGTimeSeriesScaler,
    channel_independent: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scaled model inputs: per step the scaled values, the observed flags and the time features.

    Returns features (B', T, F), the steps that hold an observation (B', T), loc and scale (B, 1, C). With
    `channel_independent`, B' = B * C and every channel is its own univariate series (F = 2 + time features);
    otherwise B' = B and F = 2 * C + time features. Also used by the LSTM/GRU baselines of
    `scripts/train_timeseries.py`, so that they see exactly the inputs PMG sees.
    """
    observed = ~torch.isnan(past_values) if past_observed_mask is None else past_observed_mask.bool()
    scaled, loc, scale = scaler(past_values, observed)
    batch, length, channels = past_values.shape
    observed_float = observed.to(scaled.dtype)
    if channel_independent:
        scaled = scaled.transpose(1, 2).reshape(batch * channels, length, 1)
        observed_float = observed_float.transpose(1, 2).reshape(batch * channels, length, 1)
        if past_time_features is not None:
            past_time_features = past_time_features.repeat_interleave(channels, dim=0)
    parts = [scaled, observed_float]
    if past_time_features is not None:
        parts.append(past_time_features.to(scaled.dtype))
    steps = observed_float.amax(dim=-1)
    # a step without observation is padding, skipped by the stack; its inputs become exact zeros there, as padding
    # is masked by products in places, where a NaN time feature would still turn every output into NaN
    features = torch.where(steps.bool().unsqueeze(-1), torch.cat(parts, dim=-1), 0.0)
    return features, steps, loc, scale


class PMGTimeSeriesPreTrainedModel(PMGPreTrainedModel):
    """The body shared by the time-series heads: scaler, linear input projection, PMG stack (`PMGModel`).

    The stack is the language models' `PMGModel` (PMG blocks, optionally interleaved with attention blocks through
    `layer_types`), fed through `inputs_embeds`; its token embedding is removed, as continuous inputs enter through
    `input_projection`. Steps without any observed value are padding for the stack (PMG memories stay untouched
    there, attention ignores them).
    """

    main_input_name = "past_values"
    _head_prefixes = ("head.", "score.")  # the forecasting and classification heads
    _remote_code_classes = {  # noqa: RUF012 (read only; transformers has no Auto class for series classification)
        "AutoModelForTimeSeriesPrediction": "PMGForTimeSeriesForecasting",
        "AutoModelForSequenceClassification": "PMGForTimeSeriesClassification",
    }

    def __init__(self, config: PMGConfig):
        super().__init__(config)
        channels = 1 if config.channel_independent else config.num_input_channels
        self.scaler = PMGTimeSeriesScaler(config.scaling)
        self.input_projection = nn.Linear(2 * channels + config.num_time_features, config.hidden_size)
        self.model = PMGModel(config)
        self.model.embed_tokens = None

    def encode(
        self,
        past_values: torch.Tensor,
        past_observed_mask: torch.Tensor | None,
        past_time_features: torch.Tensor | None,
        output_hidden_states: bool | None,
        output_gates: bool | None,
    ) -> tuple[PMGModelOutputWithPast, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the stack over the scaled inputs; returns (stack outputs, step mask (B', T), loc, scale)."""
        self._check_inputs(past_values, past_observed_mask, past_time_features)
        features, steps, loc, scale = time_series_features(
            past_values, past_observed_mask, past_time_features, self.scaler, self.config.channel_independent
        )
        outputs = self.model(
            inputs_embeds=self.input_projection(features.to(self.input_projection.weight.dtype)),
            attention_mask=steps.long(),
            use_cache=False,
            output_hidden_states=output_hidden_states,
            output_gates=output_gates,
            return_dict=True,
        )
        return outputs, steps, loc, scale

    def _check_inputs(
        self,
        past_values: torch.Tensor,
        past_observed_mask: torch.Tensor | None,
        past_time_features: torch.Tensor | None,
    ) -> None:
        channels, time_features = self.config.num_input_channels, self.config.num_time_features
        if past_values.dim() != 3 or past_values.shape[-1] != channels or past_values.shape[1] == 0:
            raise ValueError(
                f"past_values must have shape (batch, length >= 1, num_input_channels={channels}), "
                f"got {tuple(past_values.shape)}."
            )
        if past_observed_mask is not None and past_observed_mask.shape != past_values.shape:
            raise ValueError(
                f"past_observed_mask must have the shape of past_values {tuple(past_values.shape)}, "
                f"got {tuple(past_observed_mask.shape)}."
            )
        expected = (*past_values.shape[:2], time_features)
        given = None if past_time_features is None else tuple(past_time_features.shape)
        if (given is not None or time_features > 0) and given != expected:  # (B, T, 0) is fine without features
            raise ValueError(f"past_time_features must have shape {expected} (config.num_time_features), got {given}.")


@dataclass
class PMGTimeSeriesForecastingOutput(ModelOutput):
    """Output of `PMGForTimeSeriesForecasting`.

    loss: MSE of the forecasts, or negative log-likelihood of `future_values`, over observed future values (plus
        the gate regulariser when `config.gate_l1 > 0`).
    prediction_outputs: `loss="mse"`: the forecasts (B, prediction_length, C) in the scale of the inputs;
        `loss="nll"`: the distribution parameters, a tuple of (B, prediction_length, C) tensors in the scaled space
        (`output_distribution` turns them into a distribution, `generate` into samples).
    loc, scale: (B, 1, C) per-series scaling statistics.
    hidden_states, gates, gate_loss: as in `PMGModelOutputWithPast`, batch B * C with `channel_independent`.
    """

    loss: torch.Tensor | None = None
    prediction_outputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None
    loc: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    gates: tuple[torch.Tensor, ...] | None = None
    gate_loss: torch.Tensor | None = None


@dataclass
class SamplePMGTimeSeriesOutput(ModelOutput):
    """Sample paths from `PMGForTimeSeriesForecasting.generate`: sequences (B, num_samples, prediction_length, C)."""

    sequences: torch.Tensor | None = None


class PMGForTimeSeriesForecasting(PMGTimeSeriesPreTrainedModel):
    """PMG forecaster: the last hidden state predicts all `prediction_length` future values of every channel at once.

    `config.loss="mse"` gives point forecasts; `"nll"` a Student-t or Gaussian per future value
    (`config.distribution_output`), sampled by `generate`.

    Example:
        >>> config = PMGConfig(num_input_channels=3, context_length=48, prediction_length=12, hidden_size=64,
        ...                    num_hidden_layers=2, loss="nll")
        >>> model = PMGForTimeSeriesForecasting(config)
        >>> outputs = model(past_values=torch.randn(8, 48, 3), future_values=torch.randn(8, 12, 3))
        >>> samples = model.generate(past_values=torch.randn(8, 48, 3)).sequences  # (8, 100, 12, 3)
    """

    def __init__(self, config: PMGConfig):
        super().__init__(config)
        self.distribution_output: DistributionOutput | None = None
        num_parameters = 1
        if config.loss == "nll":
            self.distribution_output = DISTRIBUTION_OUTPUT_CLASSES[config.distribution_output]()
            num_parameters = len(self.distribution_output.args_dim)
        channels = 1 if config.channel_independent else config.num_input_channels
        self.head = nn.Linear(config.hidden_size, config.prediction_length * channels * num_parameters)
        self.post_init()

    def forward(
        self,
        past_values: torch.Tensor,
        past_observed_mask: torch.Tensor | None = None,
        future_values: torch.Tensor | None = None,
        future_observed_mask: torch.Tensor | None = None,
        past_time_features: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_gates: bool | None = None,
        return_dict: bool | None = None,
    ) -> PMGTimeSeriesForecastingOutput | tuple:
        """
        Args:
            past_values: (B, T, C) context; any length T (the model is trained on `config.context_length`).
            past_observed_mask: (B, T, C), 1 where a value was observed and 0 where it is missing; missing values
                take no part in the scaling statistics nor in the inputs. Default: every non-NaN value.
            future_values: (B, prediction_length, C) targets for the loss.
            future_observed_mask: (B, prediction_length, C), 0 where a target is missing and must not count in the
                loss. Default: every non-NaN target.
            past_time_features: (B, T, config.num_time_features) covariates such as calendar features.
            output_hidden_states / output_gates: as in `PMGModel`.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs, _, loc, scale = self.encode(
            past_values, past_observed_mask, past_time_features, output_hidden_states, output_gates
        )
        batch, _, channels = past_values.shape
        parameters = self.head(outputs.last_hidden_state[:, -1]).float()
        if self.config.channel_independent:  # (B * C, P * k) -> (B, P, C, k)
            parameters = parameters.view(batch, channels, self.config.prediction_length, -1).transpose(1, 2)
        else:
            parameters = parameters.view(batch, self.config.prediction_length, channels, -1)
        if self.distribution_output is None:
            prediction_outputs = parameters[..., 0] * scale + loc
        else:
            prediction_outputs = self.distribution_output.domain_map(*parameters.split(1, dim=-1))

        loss = None
        if future_values is not None:
            loss = self._loss(prediction_outputs, loc, scale, future_values, future_observed_mask)
            if outputs.gate_loss is not None:
                loss = loss + outputs.gate_loss
        output = PMGTimeSeriesForecastingOutput(
            loss=loss,
            prediction_outputs=prediction_outputs,
            loc=loc,
            scale=scale,
            hidden_states=outputs.hidden_states,
            gates=outputs.gates,
            gate_loss=outputs.gate_loss,
        )
        return output if return_dict else output.to_tuple()

    def _loss(
        self,
        prediction_outputs: torch.Tensor | tuple[torch.Tensor, ...],
        loc: torch.Tensor,
        scale: torch.Tensor,
        future_values: torch.Tensor,
        future_observed_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Mean MSE or negative log-likelihood over the observed future values."""
        expected = (future_values.shape[0], self.config.prediction_length, self.config.num_input_channels)
        if tuple(future_values.shape) != expected:
            raise ValueError(f"future_values must have shape {expected}, got {tuple(future_values.shape)}.")
        if future_observed_mask is not None and future_observed_mask.shape != future_values.shape:
            raise ValueError(
                f"future_observed_mask must have the shape of future_values {expected}, "
                f"got {tuple(future_observed_mask.shape)}."
            )
        observed = ~torch.isnan(future_values) if future_observed_mask is None else future_observed_mask.bool()
        targets = torch.where(observed, future_values.float(), 0.0)  # no NaN may reach the gradient
        if self.distribution_output is None:
            per_value = (prediction_outputs - targets) ** 2
        else:
            per_value = -self.output_distribution(prediction_outputs, loc, scale).log_prob(targets)
        return torch.where(observed, per_value, 0.0).sum() / observed.sum().clamp(min=1)

    def output_distribution(
        self, prediction_outputs: tuple[torch.Tensor, ...], loc: torch.Tensor, scale: torch.Tensor
    ) -> Distribution:
        """The predictive distribution of every future value, in the scale of the inputs (batch shape (B, P, C))."""
        if self.distribution_output is None:
            raise ValueError('output_distribution needs a probabilistic model: config.loss="nll".')
        return self.distribution_output.distribution(prediction_outputs, loc=loc, scale=scale)

    @torch.no_grad()
    def generate(
        self,
        past_values: torch.Tensor,
        past_observed_mask: torch.Tensor | None = None,
        past_time_features: torch.Tensor | None = None,
        num_parallel_samples: int | None = None,
    ) -> SamplePMGTimeSeriesOutput:
        """Sample forecast paths, (B, num_parallel_samples, prediction_length, C), as PatchTST's `generate`.

        A point-forecast model (`loss="mse"`) returns its forecast as one sample, (B, 1, prediction_length, C).
        """
        outputs = self(past_values, past_observed_mask, past_time_features=past_time_features, return_dict=True)
        if self.distribution_output is None:
            return SamplePMGTimeSeriesOutput(sequences=outputs.prediction_outputs.unsqueeze(1))
        samples = num_parallel_samples or self.config.num_parallel_samples
        distribution = self.output_distribution(outputs.prediction_outputs, outputs.loc, outputs.scale)
        return SamplePMGTimeSeriesOutput(sequences=distribution.sample((samples,)).transpose(0, 1))


@dataclass
class PMGTimeSeriesClassificationOutput(ModelOutput):
    """Output of `PMGForTimeSeriesClassification`: loss, prediction_logits (B, num_labels), and as in `PMGModel`."""

    loss: torch.Tensor | None = None
    prediction_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    gates: tuple[torch.Tensor, ...] | None = None
    gate_loss: torch.Tensor | None = None


class PMGForTimeSeriesClassification(PMGTimeSeriesPreTrainedModel):
    """PMG classifier of continuous sequences (e.g. the UCR archive): pooled hidden states -> `num_labels` logits.

    Pooling (`config.pooling_type`): the mean over observed steps or the last step; with `channel_independent` the
    pooled states of the C channels are concatenated.
    """

    def __init__(self, config: PMGConfig):
        super().__init__(config)
        self.loss_type = "ForSequenceClassification"  # the loss of transformers' sequence classifiers (`problem_type`)
        channels = config.num_input_channels if config.channel_independent else 1
        self.score = nn.Linear(channels * config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        past_values: torch.Tensor,
        target_values: torch.Tensor | None = None,
        past_observed_mask: torch.Tensor | None = None,
        past_time_features: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_gates: bool | None = None,
        return_dict: bool | None = None,
    ) -> PMGTimeSeriesClassificationOutput | tuple:
        """
        Args:
            past_values, past_observed_mask, past_time_features: as in `PMGForTimeSeriesForecasting.forward`.
            target_values: the targets, with the loss of transformers' sequence classifiers (`config.problem_type`,
                inferred when unset): (B,) class ids in [0, num_labels) for cross-entropy, (B,) floats for
                regression (`num_labels=1`, MSE), or (B, num_labels) multi-hot floats for multi-label (BCE).
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs, steps, _, _ = self.encode(
            past_values, past_observed_mask, past_time_features, output_hidden_states, output_gates
        )
        hidden_states = outputs.last_hidden_state
        if self.config.pooling_type == "mean":
            weights = steps.unsqueeze(-1).to(hidden_states.dtype)
            pooled = (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        else:  # the last observed step (padding after it, e.g. a shorter series of a UCR set, is skipped)
            positions = torch.arange(steps.shape[1], device=steps.device)
            last = torch.where(steps.bool(), positions, 0).amax(dim=1)
            pooled = hidden_states[torch.arange(hidden_states.shape[0], device=steps.device), last]
        logits = self.score(pooled.reshape(past_values.shape[0], -1))

        loss = None
        if target_values is not None:
            if not target_values.is_floating_point():  # class ids of any integer dtype (cross-entropy wants int64)
                target_values = target_values.long()
            loss = self.loss_function(labels=target_values, pooled_logits=logits.float(), config=self.config)
            if outputs.gate_loss is not None:
                loss = loss + outputs.gate_loss
        output = PMGTimeSeriesClassificationOutput(
            loss=loss,
            prediction_logits=logits,
            hidden_states=outputs.hidden_states,
            gates=outputs.gates,
            gate_loss=outputs.gate_loss,
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "PMGForTimeSeriesClassification",
    "PMGForTimeSeriesForecasting",
    "PMGTimeSeriesPreTrainedModel",
    "PMGTimeSeriesScaler",
]
