"""Configuration of PMG (Parametric Memory Gate) models."""

from collections.abc import Iterable
from typing import ClassVar

from transformers import PreTrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

PMG_LAYER_TYPE = "linear_attention"
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
LAYER_TYPES = (PMG_LAYER_TYPE, *ATTENTION_LAYER_TYPES)
SCAN_IMPLS = ("auto", "chunked", "recurrent", "triton")
TIME_SERIES_SCALINGS = ("std", "mean", None)
TIME_SERIES_LOSSES = ("mse", "nll")
DISTRIBUTION_OUTPUTS = ("student_t", "normal")
POOLING_TYPES = ("mean", "last")


class PMGConfig(PreTrainedConfig):
    r"""
    Configuration of a PMG language model: a stack of parametric-memory-gate blocks, optionally interleaved with
    causal attention blocks.

    Layer types use transformers' vocabulary: `"linear_attention"` is a PMG block, `"full_attention"` and
    `"sliding_attention"` are attention blocks (rotary positions, grouped-query heads). The default is all PMG.

    PMG-specific fields:
        expand: inner width of the PMG memory as a multiple of `hidden_size`.
        gate_rank: bottleneck of the gating network `z = W_2 silu(W_1 x)`; 0 makes it a single linear map.
        use_short_conv / conv_size: short causal depthwise convolution on the candidate values.
        memory_floor_init: initial memory floor (minimum retention) of the deepest PMG layer; shallower layers start
            lower, linearly, so deeper layers keep memory longer.
        gate_l1: weight of the L1 penalty `mean(write weight)` added to the loss (sparse writes keep memory).
        gate_lr_ratio: learning-rate multiplier of the gating network and gate-shape parameters in
            `pmg.optimizer_param_groups`.
        scan_impl: scan backend, one of "auto", "chunked", "recurrent", "triton" (see `pmg.scan_pmg`).
        chunk_size: chunk length of the chunked scan.
        fuse_linear_cross_entropy: in training mode with labels, `PMGForCausalLM` never materialises the logits: the
            LM head runs inside the chunked loss (`pmg.linear_cross_entropy`), a chunk of tokens at a time. Less
            memory than the default (which keeps the logits and chunks only the loss), same loss and gradients; its
            output's `logits` is then None.

    Time-series fields (`PMGForTimeSeriesForecasting`, `PMGForTimeSeriesClassification`; names as in PatchTST):
        num_input_channels: channels C of `past_values` (B, T, C).
        context_length: lookback window T the model is trained on (the recurrence accepts any length).
        prediction_length: future steps predicted at once.
        num_time_features: features per step in `past_time_features` (0: none).
        scaling: per-series, per-channel scaling from observed values only: "std" (mean and standard deviation),
            "mean" (mean absolute value) or None.
        channel_independent: every channel runs through the stack as its own series with shared weights (as in
            PatchTST); False projects all channels of a step into one input vector.
        loss: "mse" (point forecasts) or "nll" (negative log-likelihood of `distribution_output`).
        distribution_output: "student_t" or "normal", the predictive distribution when `loss="nll"`.
        num_parallel_samples: sample paths per series drawn by `PMGForTimeSeriesForecasting.generate`.
        pooling_type: how classification pools the steps: "mean" (over observed steps) or "last" (observed step).

    Example:
        >>> from pmg import PMGConfig, PMGForCausalLM
        >>> layer_types = ["linear_attention"] * 3 + ["full_attention"]
        >>> config = PMGConfig(hidden_size=256, num_hidden_layers=4, layer_types=layer_types)
        >>> model = PMGForCausalLM(config)
    """

    model_type = "pmg"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["cache", "gate_loss"]  # not predictions

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int | None = None
    num_hidden_layers: int = 12
    layer_types: list[str] | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    # PMG layers
    expand: int = 1
    gate_rank: int = 64
    use_short_conv: bool = True
    conv_size: int = 4
    memory_floor_init: float = 0.9
    gate_l1: float = 0.0
    gate_lr_ratio: float = 0.1
    scan_impl: str = "auto"
    chunk_size: int = 64
    fuse_linear_cross_entropy: bool = False
    # attention layers
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # tokens and heads
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # time series (names as in transformers' PatchTST)
    num_input_channels: int = 1
    context_length: int = 32
    prediction_length: int = 24
    num_time_features: int = 0
    scaling: str | None = "std"
    channel_independent: bool = True
    loss: str = "mse"
    distribution_output: str = "student_t"
    num_parallel_samples: int = 100
    pooling_type: str = "mean"

    def __post_init__(self, **kwargs):
        # the fields the defaults below derive from, checked first so that a bad one is named, not divided by
        for field in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
            value = getattr(self, field)
            optional = field == "num_attention_heads"  # None: one head per 64 channels
            _require((optional and value is None) or (_is_int(value) and value >= 1), field, "an integer >= 1", value)
        if self.intermediate_size is None:
            # SwiGLU width of about 8/3 * hidden, rounded up to a multiple of 64 (as Llama does)
            self.intermediate_size = 64 * -(-8 * self.hidden_size // 3 // 64)
        if self.layer_types is None:
            self.layer_types = [PMG_LAYER_TYPE] * self.num_hidden_layers
        elif isinstance(self.layer_types, Iterable) and not isinstance(self.layer_types, str):
            self.layer_types = list(self.layer_types)  # a tuple, an array, a generator; a string is refused below
        if self.num_attention_heads is None:
            self.num_attention_heads = max(1, self.hidden_size // 64)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.pad_token_id == -1:  # how some Hub configs say "no pad token" (transformers warns too)
            logger.warning("pad_token_id=-1 read as no pad token (None).")
            self.pad_token_id = None
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        self.validate_architecture()
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Type and range checks of every field; each error names the field and what it accepts."""
        for field, minimum in _POSITIVE_INTS.items():
            value = getattr(self, field)
            _require(_is_int(value) and value >= minimum, field, f"an integer >= {minimum}", value)
        for field, (low, high) in _BOUNDED_FLOATS.items():
            value = getattr(self, field)
            _require(_is_number(value) and low <= value < high, field, f"a number in [{low}, {high})", value)
        for field in ("rms_norm_eps", "initializer_range", "gate_lr_ratio"):
            value = getattr(self, field)
            _require(_is_number(value) and value > 0, field, "a positive number", value)
        pad = self.pad_token_id
        vocab = self.vocab_size
        _require(pad is None or (_is_int(pad) and 0 <= pad < vocab), "pad_token_id", f"None or in [0, {vocab})", pad)
        _require(self.hidden_act == "silu", "hidden_act", '"silu"', self.hidden_act)
        _require(self.scaling in TIME_SERIES_SCALINGS, "scaling", f"one of {TIME_SERIES_SCALINGS}", self.scaling)
        _require(self.loss in TIME_SERIES_LOSSES, "loss", f"one of {TIME_SERIES_LOSSES}", self.loss)
        _require(
            self.distribution_output in DISTRIBUTION_OUTPUTS,
            "distribution_output",
            f"one of {DISTRIBUTION_OUTPUTS}",
            self.distribution_output,
        )
        _require(self.pooling_type in POOLING_TYPES, "pooling_type", f"one of {POOLING_TYPES}", self.pooling_type)
        for field in ("use_short_conv", "channel_independent", "fuse_linear_cross_entropy"):
            _require(isinstance(getattr(self, field), bool), field, "a bool", getattr(self, field))
        _require(self.scan_impl in SCAN_IMPLS, "scan_impl", f"one of {SCAN_IMPLS}", self.scan_impl)
        _require(
            isinstance(self.layer_types, list) and len(self.layer_types) == self.num_hidden_layers,
            "layer_types",
            f"a list of num_hidden_layers={self.num_hidden_layers} entries",
            self.layer_types,
        )
        for layer_type in self.layer_types:
            _require(layer_type in LAYER_TYPES, "layer_types", f"entries from {LAYER_TYPES}", layer_type)
        if "sliding_attention" in self.layer_types:
            _require(
                _is_int(self.sliding_window) and self.sliding_window > 0,
                "sliding_window",
                'a positive integer when layer_types contains "sliding_attention"',
                self.sliding_window,
            )
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        _require(heads % kv_heads == 0, "num_key_value_heads", f"a divisor of num_attention_heads={heads}", kv_heads)
        _require(self.head_dim % 2 == 0, "head_dim", "an even integer (rotary positions)", self.head_dim)
        _require(
            isinstance(self.rope_parameters, dict)
            and self.rope_parameters.get("rope_type", "default") == "default"
            and self.rope_parameters.get("rope_theta", 0) > 0,
            "rope_parameters",
            'a dict with rope_type "default" and a positive rope_theta',
            self.rope_parameters,
        )

    @property
    def pmg_inner_size(self) -> int:
        """Channels of every PMG layer's memory and write weights: expand x hidden_size."""
        return self.expand * self.hidden_size

    @property
    def pmg_layer_indices(self) -> list[int]:
        """Indices of the PMG (linear-attention) blocks in the stack."""
        return [i for i, layer_type in enumerate(self.layer_types) if layer_type == PMG_LAYER_TYPE]


_POSITIVE_INTS = {
    "vocab_size": 1,
    "hidden_size": 1,
    "intermediate_size": 1,
    "num_hidden_layers": 1,
    "expand": 1,
    "gate_rank": 0,
    "conv_size": 2,
    "chunk_size": 1,
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "head_dim": 2,
    "max_position_embeddings": 1,
    "num_input_channels": 1,
    "context_length": 1,
    "prediction_length": 1,
    "num_time_features": 0,
    "num_parallel_samples": 1,
}
_BOUNDED_FLOATS = {
    "memory_floor_init": (0.0, 1.0),
    "gate_l1": (0.0, float("inf")),
    "attention_dropout": (0.0, 1.0),
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(condition: bool, field: str, allowed: str, value) -> None:
    if not condition:
        raise ValueError(f"PMGConfig.{field} must be {allowed}, got {value!r}.")


__all__ = ["PMGConfig"]
