"""PMG models: parametric-memory-gate blocks, optionally interleaved with attention, in the transformers API.

Read top to bottom: norms and rotary positions, attention, the PMG layer, the MLP, the decoder block, the pretrained
base, the model, and the heads. The recurrence itself lives in `scan_pmg.py`.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, LinearAttentionCacheLayerMixin
from transformers.loss.loss_utils import LOSS_MAPPING
from transformers.masking_utils import create_masks_for_generate, packed_sequence_mask_function
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_pmg import PMG_LAYER_TYPE, PMGConfig
from .linear_cross_entropy import IGNORE_INDEX, causal_lm_linear_cross_entropy, causal_lm_logits_and_loss
from .scan_pmg import auto_runs_triton, check_shapes, constrain_gate_shape, pmg_scan

logger = logging.get_logger(__name__)


class PMGRMSNorm(nn.Module):
    """Root-mean-square norm, statistics in fp32, output in the input's dtype, or in the autocast dtype under autocast.

    `F.rms_norm` is one fused kernel forward and backward on CUDA, and runs the forward pass everywhere else; CPU
    training uses `_RMSNormFunction`, as PyTorch's CPU norm is a composite that autograd differentiates op by op.
    Every consumer of a norm is a matrix product (or the output gate before one), which autocast would feed a copy
    cast to bf16 of its own: casting once here saves two to four activation-sized copies per norm, forward and back.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        device_type = hidden_states.device.type
        # (devices without autocast, such as "meta" for shape tracing, raise when asked whether it is on)
        autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
        output_dtype = torch.get_autocast_dtype(device_type) if autocast else hidden_states.dtype
        if device_type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return _RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon, output_dtype)
        weight = self.weight.to(hidden_states.dtype)
        output = F.rms_norm(hidden_states, (hidden_states.shape[-1],), weight, self.variance_epsilon)
        return output.to(output_dtype) if autocast else output


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward pass, computed in at least fp32, for CPU training. Autograd through the
    CPU composite keeps the normalised activations besides the input and takes ~12 elementwise passes backward; this
    keeps the input and the (B, T, 1) inverse RMS and recomputes the rest in 7. A 6-layer model at 1 x 4096 tokens:
    peak step memory 0.944 -> 0.869 GiB fp32 and 0.781 -> 0.695 GiB under bf16 autocast, steps 3% faster."""

    @staticmethod
    def forward(ctx, hidden_states, weight, eps, output_dtype):
        x = hidden_states.to(torch.promote_types(hidden_states.dtype, torch.float32))
        inverse_rms = torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(hidden_states, weight, inverse_rms)
        return (x * inverse_rms).mul_(weight).to(output_dtype)

    @staticmethod
    def backward(ctx, grad):
        hidden_states, weight, inverse_rms = ctx.saved_tensors
        normalised = hidden_states.to(inverse_rms.dtype) * inverse_rms
        grad = grad.to(inverse_rms.dtype)
        grad_weight = (grad * normalised).sum(tuple(range(grad.dim() - 1)))
        grad_normalised = grad * weight
        # y = weight * x / rms(x): dL/dx = (g' - x_hat * mean(g' * x_hat)) / rms(x), with g' = dL/dy * weight
        projection = (grad_normalised * normalised).mean(-1, keepdim=True)
        grad_input = torch.addcmul(grad_normalised, normalised, projection, value=-1).mul_(inverse_rms)
        return grad_input.to(hidden_states.dtype), grad_weight.to(weight.dtype), None, None


class PMGRotaryEmbedding(nn.Module):
    """Rotary position angles (default RoPE) for the attention layers."""

    def __init__(self, config: PMGConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.rope_theta = float(config.rope_parameters["rope_theta"])
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device) / self.head_dim
        return 1.0 / (self.rope_theta**exponents)

    def _apply(self, fn, recurse: bool = True):
        """Moves follow the module, casts do not: `model.to(torch.bfloat16)` would round the frequencies (by up to
        0.4%, a phase error that grows with the position), and a reload, which computes them in fp32 again, would
        then give other logits. The buffer is not saved, so it is recomputed in fp32 on its new device."""
        super()._apply(fn, recurse)
        self.inv_freq = self.compute_inv_freq(self.inv_freq.device)
        return self

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(hidden_states.device)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(hidden_states.dtype), angles.sin().to(hidden_states.dtype)


def residual_output(linear: nn.Linear) -> nn.Linear:
    """Mark the last projection of a residual branch: `_init_weights` starts it at zero (see there)."""
    linear.is_residual_output = True
    return linear


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate (B, heads, T, head_dim) queries and keys by the (B, T, head_dim) angles."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin


def repeat_kv(hidden_states: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, kv_heads, T, d) -> (B, kv_heads * groups, T, d) for grouped-query attention."""
    if groups == 1:
        return hidden_states
    return hidden_states.repeat_interleave(groups, dim=1)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention; `attention_mask` is the additive 4D mask from transformers' mask helpers."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


class PMGAttention(nn.Module):
    """Causal multi-head attention with rotary positions and grouped-query heads (full or sliding window)."""

    def __init__(self, config: PMGConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if sliding else None
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = residual_output(nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention output and its weights (B, heads, T, keys), which only eager attention computes."""
        batch, length, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
        )
        return self.o_proj(output.reshape(batch, length, -1)), weights


class _SiluGated(torch.autograd.Function):
    """x * silu(gate), keeping x and gate for the backward pass and recomputing silu(gate) there (autograd would also
    keep silu(gate), an activation as large as the gate: in the MLP that is 2.75 times the hidden states). Each
    product is written over a temporary of its own, so a call allocates one activation-sized tensor forward and two
    backward instead of two and four: fresh pages cost CPU steps 1.4% here (1 x 4096, 12 rounds, 2026-11-27)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, gate)
        return _silu_gated_product(x, gate)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, gate = ctx.saved_tensors
        grad_x = _silu_gated_product(grad, gate).to(x.dtype)
        grad_gate = (grad * x).to(gate.dtype)
        # the kernel autograd would use, written over its own input
        grad_gate = torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return grad_x, grad_gate


def _silu_gated_product(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x * silu(gate) in the promoted dtype, the product written over silu(gate)."""
    return F.silu(gate).to(torch.promote_types(x.dtype, gate.dtype)).mul_(x)


def silu_gated(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x * silu(gate): the SwiGLU product and the PMG output gate. In training it keeps only its inputs (a training
    step's peak memory fell by 6% on CPU at the same speed); without autograd, the product alone. A Triton kernel
    each way (3 and 5 activation passes instead of 5 and 11) made H100 training slower, 182-207k tokens/s against
    221-245k (2026-11-27): the step is bound by the host, and a custom operator's dispatch cost more host time than
    its passes saved on the GPU."""
    return _SiluGated.apply(x, gate) if torch.is_grad_enabled() else _silu_gated_product(x, gate)


class PMGState(NamedTuple):
    """State of a PMG layer between calls: the memory (B, D) in fp32 and the short-conv window (B, K-1, D)."""

    recurrent: torch.Tensor
    conv: torch.Tensor | None = None


class PMGGateNetwork(nn.Module):
    """Gate logits z = W_2 silu(W_1 x) through a `rank` bottleneck, or z = W x when `rank` is 0."""

    def __init__(self, hidden_size: int, inner_size: int, rank: int):
        super().__init__()
        if rank > 0:
            self.down_proj = nn.Linear(hidden_size, rank, bias=False)
            self.up_proj = nn.Linear(rank, inner_size, bias=True)
        else:
            self.down_proj = None
            self.up_proj = nn.Linear(hidden_size, inner_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down_proj is not None:
            x = F.silu(self.down_proj(x))
        return self.up_proj(x)


def softplus_inverse(value: float) -> float:
    """The raw parameter whose softplus is `value`."""
    return value + math.log(-math.expm1(-value))


class PMGLayer(nn.Module):
    """The parametric memory gate: a gated recurrence with a learnable gate shape and a memory floor.

    Input x (B, T, hidden_size); inner width D = expand * hidden_size.

        v = conv(W_v x)                       candidate values (short causal depthwise convolution, optional)
        z = W_2 silu(W_1 x)                   gating network
        w = (1 - f) * sigmoid(k (z - m))^n     write weight: sharpness k, shift m, asymmetry n, floor f per channel
        h_t = w_t * v_t + (1 - w_t) * h_{t-1}  memory
        y = W_o(RMSNorm(h) * silu(W_r x))      output

    Called like `nn.GRU` (batch first): `y, state = layer(x, state)`, where `state` is a `PMGState` (or a plain
    (B, D) memory tensor on input) and the returned state continues the sequence exactly.
    """

    def __init__(
        self,
        hidden_size: int,
        expand: int = 1,
        gate_rank: int = 64,
        use_short_conv: bool = True,
        conv_size: int = 4,
        memory_floor_init: float = 0.5,
        rms_norm_eps: float = 1e-6,
        scan_impl: str = "auto",
        chunk_size: int = 64,
    ):
        super().__init__()
        inner_size = expand * hidden_size
        self.inner_size = inner_size
        self.memory_floor_init = memory_floor_init
        self.scan_impl = scan_impl
        self.chunk_size = chunk_size
        self.value_proj = nn.Linear(hidden_size, inner_size, bias=False)
        self.conv = nn.Conv1d(inner_size, inner_size, conv_size, groups=inner_size) if use_short_conv else None
        self.gate_net = PMGGateNetwork(hidden_size, inner_size, gate_rank)
        self.sharpness_raw = nn.Parameter(torch.full((inner_size,), softplus_inverse(1.0)))
        self.shift = nn.Parameter(torch.zeros(inner_size))
        self.asymmetry_raw = nn.Parameter(torch.full((inner_size,), softplus_inverse(1.0)))
        self.floor_logit = nn.Parameter(torch.full((inner_size,), self.floor_logit_init))
        self.output_gate_proj = nn.Linear(hidden_size, inner_size, bias=False)
        self.norm = PMGRMSNorm(inner_size, eps=rms_norm_eps)
        self.out_proj = residual_output(nn.Linear(inner_size, hidden_size, bias=False))

    @property
    def floor_logit_init(self) -> float:
        floor = min(max(self.memory_floor_init, 1e-4), 1 - 1e-4)
        return math.log(floor / (1 - floor))

    def gate_shape(self) -> dict[str, torch.Tensor]:
        """The per-channel gate parameters in their constrained form (k, n > 0, f in (0, 1)). The layer itself passes
        the stored parameters to `pmg_scan(raw_shape=True)` and the fused decoding kernel, which constrain them the
        same way (`constrain_gate_shape`)."""
        values = constrain_gate_shape(self.sharpness_raw, self.shift, self.asymmetry_raw, self.floor_logit)
        return dict(zip(("sharpness", "shift", "asymmetry", "floor"), values, strict=True))

    def forward(
        self,
        x: torch.Tensor,
        state: PMGState | torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        resets: torch.Tensor | None = None,
        output_gates: bool = False,
        return_state: bool = True,
        update_state: bool = False,
    ) -> tuple[torch.Tensor, PMGState | None] | tuple[torch.Tensor, PMGState | None, torch.Tensor]:
        """Run the layer over x (B, T, hidden_size).

        Args:
            state: memory (and conv window) before the first step; zeros if None.
            attention_mask: (B, T), 1 at real tokens and 0 at padding, anywhere in a row: a padded step is as if
                absent (the memory and the conv window skip it).
            resets: (B, T) booleans, True where a new document starts (the memory and conv window restart).
            output_gates: also return the write weights w (B, T, D) in fp32.
            return_state: False returns None for the state, without building the next conv window (a few small
                operations that a model training without a cache would throw away).
            update_state: `state` belongs to a cache and may be overwritten: where the fused decoding step runs
                and the state allows it, the new memory and window are written over its tensors (fixed addresses,
                no copies into the cache) and `state` itself is returned. Otherwise the state is left as it was.

        Returns:
            y (B, T, hidden_size), the state after the last step, and the write weights if asked for.
        """
        if isinstance(state, torch.Tensor):
            state = PMGState(state)
        mask = attention_mask.bool() if attention_mask is not None else None
        resets = resets.bool() if resets is not None else None
        values = self.value_proj(x)
        if self._fuses_decoding_step(values, resets):  # (the kernel's launcher checks its inputs' shapes)
            memory, new_state, write = self._fused_decoding_step(x, values, state, mask, output_gates, update_state)
        else:
            self._check_inputs(x, state, mask, resets)
            memory, new_state, write = self._scan(x, values, state, mask, resets, output_gates, return_state)
        output = self.out_proj(silu_gated(self.norm(memory), self.output_gate_proj(x)))
        return (output, new_state, write) if output_gates else (output, new_state)

    def _check_inputs(
        self, x: torch.Tensor, state: PMGState | None, mask: torch.Tensor | None, resets: torch.Tensor | None
    ) -> None:
        """Name the input of the wrong shape before the PyTorch convolution would fail on it with a broadcasting
        error (compared directly first: this runs for every layer call outside the fused decoding step)."""
        if x.dim() != 3:
            raise ValueError(f"x must be (B, T, hidden_size), got shape {tuple(x.shape)}.")
        batch, length, _ = x.shape
        steps, channels = (batch, length), (batch, self.inner_size)
        window = state.conv if state is not None and state.conv is not None and self.conv is not None else None
        window_shape = (batch, self.conv.kernel_size[0] - 1, self.inner_size) if window is not None else None
        expected = {
            "attention_mask": (mask, steps),
            "resets": (resets, steps),
            "state.recurrent": (state.recurrent if state is not None else None, channels),
            "state.conv": (window, window_shape),
        }
        if any(tensor is not None and tensor.shape != shape for tensor, shape in expected.values()):
            check_shapes(("x", x), **expected)

    def _scan(
        self,
        x: torch.Tensor,
        values: torch.Tensor,
        state: PMGState | None,
        mask: torch.Tensor | None,
        resets: torch.Tensor | None,
        output_gates: bool,
        return_state: bool = True,
    ) -> tuple[torch.Tensor, PMGState | None, torch.Tensor | None]:
        """The memory over the sequence (`pmg_scan` picks the backend), the state after it (if asked for) and the
        write weights."""
        conv_window = None
        if self.conv is not None:  # the scan leaves padded values out; only the convolution needs them masked
            window = state.conv if state is not None else None
            values, conv_window = self._short_conv(values, window, mask, resets, return_window=return_state)
        memory, final_memory, write = pmg_scan(
            self.gate_net(x),
            values,
            sharpness=self.sharpness_raw,
            shift=self.shift,
            asymmetry=self.asymmetry_raw,
            floor=self.floor_logit,
            initial_state=state.recurrent if state is not None else None,
            mask=mask,
            resets=resets,
            impl=self.scan_impl,
            chunk_size=self.chunk_size,
            return_write=output_gates,
            raw_shape=True,
        )
        return memory, PMGState(final_memory, conv_window) if return_state else None, write

    def _fuses_decoding_step(self, values: torch.Tensor, resets: torch.Tensor | None) -> bool:
        """Whether this call runs as the fused decoding-step kernel (`pmg.triton_decoding`): one token, without
        autograd or resets, outside torch.compile (which fuses the PyTorch path itself) and tracing, for scan_impl
        "triton", or "auto" on CUDA with Triton installed."""
        if values.shape[1] != 1 or resets is not None:
            return False
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return False
        return self._runs_triton(values)

    def _runs_triton(self, values: torch.Tensor) -> bool:
        """Whether this layer's Triton kernels run on `values`: scan_impl "triton", or "auto" on CUDA (eager)."""
        return self.scan_impl == "triton" or (self.scan_impl == "auto" and auto_runs_triton(values))

    def _fused_decoding_step(
        self,
        x: torch.Tensor,
        values: torch.Tensor,
        state: PMGState | None,
        mask: torch.Tensor | None,
        output_gates: bool,
        update_state: bool = False,
    ) -> tuple[torch.Tensor, PMGState, torch.Tensor | None]:
        """`_scan` for one token in one kernel launch: mask, short conv, gates and memory update; over `state`'s
        own tensors if `update_state` and they are as the kernel writes them (an fp32 memory, a window if needed)."""
        from .triton_decoding import can_update_in_place, triton_decoding_step  # imported here: Triton is optional

        conv_weight, conv_bias = self._conv_parameters() if self.conv is not None else (None, None)
        in_place = (
            update_state
            and state is not None
            and can_update_in_place(state.recurrent, state.conv, needs_window=self.conv is not None)
        )
        memory, final_memory, conv_window, write = triton_decoding_step(
            self.gate_net(x),
            values,
            self.sharpness_raw,
            self.shift,
            self.asymmetry_raw,
            self.floor_logit,
            state=state.recurrent if state is not None else None,
            mask=mask,
            conv_weight=conv_weight,
            conv_bias=conv_bias,
            window=state.conv if state is not None else None,
            return_write=output_gates,
            in_place=in_place,
        )
        return memory, state if in_place else PMGState(final_memory, conv_window), write

    def _conv_parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The short conv's weight (D, K), tap K-1 multiplying the current token, and bias (D,)."""
        if hasattr(self.conv, "base_layer"):  # an adapter layer (peft LoRA) wrapping the conv would be skipped
            raise NotImplementedError(
                "Adapters on PMGLayer.conv are not supported: the short conv runs from conv.weight. Leave 'conv' out "
                "of target_modules, or train it whole with modules_to_save=['conv']."
            )
        return self.conv.weight.squeeze(1), self.conv.bias  # a view: its backward launches nothing (indexing's does)

    def _short_conv(
        self,
        values: torch.Tensor,
        window: torch.Tensor | None,
        mask: torch.Tensor | None,
        resets: torch.Tensor | None,
        return_window: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Causal depthwise convolution of the values continuing from `window`, where padded steps do not exist: the
        taps of a real step reach the K-1 real steps before it (across any padding), and never across a document
        reset. Returns the convolved values (padded steps hold values the scan ignores) and (if `return_window`) the
        window for the next call: the last K-1 real inputs, zeros before the last document's start. A padded batch
        is reordered so that every row's real steps come first, convolved as right-padded, and put back."""
        weight, bias = self._conv_parameters()
        taps = weight.shape[1]
        if values.shape[1] == 1 and resets is None:  # a decoding step: the window times the taps, in two operations
            return _decoding_conv_step(values, weight, bias, window, mask)
        order = None
        if mask is not None:
            order, restore = _real_steps_first(mask)
            values, mask = _gather_steps(values, order), _gather_steps(mask, order)
            resets = _gather_steps(resets, order) if resets is not None else None
        convolved = self._convolve(values, weight, bias, window, mask, resets)
        if order is not None:
            convolved = _gather_steps(convolved, restore)
        return convolved, _next_conv_window(values, window, mask, resets, taps) if return_window else None

    def _convolve(
        self,
        values: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        window: torch.Tensor | None,
        mask: torch.Tensor | None,
        resets: torch.Tensor | None,
    ) -> torch.Tensor:
        """The convolution itself, padded steps entering it as zeros: one Triton kernel each way where the scan runs
        Triton (`pmg.triton_conv`), else a pass per tap."""
        batch, length, channels = values.shape
        taps = weight.shape[1]
        if self._runs_triton(values):
            from .triton_conv import triton_short_conv  # imported here: Triton is optional

            return triton_short_conv(values, weight, bias, window, mask, resets)
        weight, bias = weight.to(values.dtype), bias.to(values.dtype)
        if mask is not None:
            values = values * mask.unsqueeze(-1).to(values.dtype)
        if window is None:
            window = values.new_zeros(batch, taps - 1, channels)
        padded = torch.cat([window.to(values.dtype), values], dim=1)
        same_document = None
        if resets is not None:
            segment = F.pad(resets.long().cumsum(dim=1), (taps - 1, 0))  # document index of every padded position
            same_document = torch.stack([segment[:, i : i + length] == segment[:, taps - 1 :] for i in range(taps)], -1)
        return _CausalDepthwiseConv.apply(padded, weight, bias, same_document)


def _decoding_conv_step(
    values: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    window: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The short conv of one step (B, 1, D) and the next window; a padded step leaves the window as it was."""
    batch, _, channels = values.shape
    weight, bias = weight.to(values.dtype), bias.to(values.dtype)
    if window is None:
        window = values.new_zeros(batch, weight.shape[1] - 1, channels)
    if mask is not None:  # a padded value enters the taps as zero (as in the kernel), and never the window
        values = values * mask.view(batch, 1, 1).to(values.dtype)
    padded = torch.cat([window.to(values.dtype), values], dim=1)
    next_window = padded[:, 1:]
    if mask is not None:
        next_window = torch.where(mask.view(batch, 1, 1), next_window, padded[:, :-1])
    return (padded * weight.T).sum(dim=1, keepdim=True) + bias, next_window


def _real_steps_first(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a (B, T) padding mask, the order of steps that puts each row's real steps first (in their order, then
    the padded ones) and the order that puts them back, as (B, T) indices for `_gather_steps`. No device sync."""
    real = mask.long()
    real_steps = real.sum(1, keepdim=True)
    place = torch.where(mask, real.cumsum(1) - 1, (1 - real).cumsum(1) - 1 + real_steps)
    steps = torch.arange(mask.shape[1], device=mask.device).expand_as(place)
    return torch.empty_like(place).scatter_(1, place, steps), place


def _gather_steps(tensor: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The steps of `tensor` (B, T, ...) at the indices `order` (B, S), in that order."""
    index = order.view(*order.shape, *(1,) * (tensor.dim() - 2)).expand(*order.shape, *tensor.shape[2:])
    return tensor.gather(1, index)


def _next_conv_window(
    values: torch.Tensor,
    window: torch.Tensor | None,
    mask: torch.Tensor | None,
    resets: torch.Tensor | None,
    taps: int,
) -> torch.Tensor:
    """The last K-1 real convolution inputs after `values` (B, T, D), whose real steps come first where `mask` is
    given (`_real_steps_first`): taken from the previous window where a row has fewer than K-1 real steps, zeros
    for those before a later document start."""
    batch, _, channels = values.shape
    if taps == 1:  # no window (and values[:, -0:] would be all of them)
        return values.new_zeros(batch, 0, channels)
    if window is None:
        window = values.new_zeros(batch, taps - 1, channels)
    if mask is None:  # the last K-1 steps, from the last K-1 rows alone
        recent = torch.cat([window.to(values.dtype), values[:, -(taps - 1) :]], dim=1)[:, -(taps - 1) :]
        if resets is not None:
            resets = F.pad(resets[:, -(taps - 1) :].long(), (taps - 1, 0))[:, -(taps - 1) :]
    else:  # rows real_steps .. real_steps + K-2 of window + values
        last = mask.long().sum(1, keepdim=True) + torch.arange(taps - 1, device=values.device)
        recent = _gather_steps(torch.cat([window.to(values.dtype), values], dim=1), last)
        if resets is not None:
            resets = F.pad(resets.long(), (taps - 1, 0)).gather(1, last)
    if resets is None:
        return recent
    starts_after = resets.flip(1).cumsum(1).flip(1) - resets  # document starts after each of the recent rows
    return recent * (starts_after == 0).unsqueeze(-1).to(values.dtype)


class _CausalDepthwiseConv(torch.autograd.Function):
    """y_t = b + sum_i w_i x_{t+i} over the window-padded input (B, T + K - 1, D), weight (D, K), bias (D,), each tap
    optionally masked per position by `tap_mask` (B, T, K). Written out because autograd through K shifted slices
    zero-fills and adds a padded-size gradient per tap: this takes about half the elementwise passes, 35% less time
    forward + backward on CPU, and keeps only the padded input."""

    @staticmethod
    def forward(ctx, padded, weight, bias, tap_mask):
        ctx.save_for_backward(padded, weight, tap_mask)
        first, *later = _conv_taps(padded, weight.shape[1], tap_mask)
        output = torch.addcmul(bias, first, weight[:, 0])
        for i, tap in enumerate(later, start=1):
            output.addcmul_(tap, weight[:, i])
        return output

    @staticmethod
    def backward(ctx, grad):
        padded, weight, tap_mask = ctx.saved_tensors
        length = grad.shape[1]
        grad_padded, grad_weight = torch.zeros_like(padded), torch.empty_like(weight)
        for i, tap in enumerate(_conv_taps(padded, weight.shape[1], tap_mask)):
            tap_grad = grad if tap_mask is None else grad * tap_mask[..., i, None]
            grad_padded[:, i : i + length].addcmul_(tap_grad, weight[:, i])
            grad_weight[:, i] = (grad * tap).sum((0, 1))
        return grad_padded, grad_weight, grad.sum((0, 1)), None


def _conv_taps(padded: torch.Tensor, taps: int, tap_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """The K shifted (B, T, D) views of the padded input, masked where `tap_mask` says a tap does not apply."""
    length = padded.shape[1] - taps + 1
    shifted = [padded[:, i : i + length] for i in range(taps)]
    return shifted if tap_mask is None else [tap * tap_mask[..., i, None] for i, tap in enumerate(shifted)]


class PMGMLP(nn.Module):
    """SwiGLU feed-forward block."""

    def __init__(self, config: PMGConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = residual_output(nn.Linear(config.intermediate_size, config.hidden_size, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_gated(self.up_proj(x), self.gate_proj(x)))


def read_pmg_state(cache: Cache | None, layer_idx: int) -> PMGState | None:
    """The PMG state stored for `layer_idx` in a transformers linear-attention cache layer, if any."""
    if cache is None:
        return None
    layer = cache.layers[layer_idx]
    if not layer.is_recurrent_states_initialized[0]:
        return None
    conv = layer.conv_states[0].transpose(1, 2) if layer.is_conv_states_initialized[0] else None
    return PMGState(layer.recurrent_states[0], conv)


def write_pmg_state(cache: Cache, layer_idx: int, state: PMGState) -> None:
    """Store a PMG state; the cache keeps conv windows time-last, (B, D, K-1), as its other conv layers do. A state
    that the decoding step wrote over the cache's own tensors needs no copies, only the record that the layer now
    has a previous state (which `update_conv_state` would have made, and `reset()` clears)."""
    layer = cache.layers[layer_idx]
    if state.recurrent is layer.recurrent_states[0]:
        layer.has_previous_state[0] = True
        return
    cache.update_recurrent_state(state.recurrent, layer_idx)
    if state.conv is not None:
        cache.update_conv_state(state.conv.transpose(1, 2), layer_idx)


class PMGDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual block: x + mixer(norm(x)), then x + MLP(norm(x)); the mixer is PMG or attention."""

    def __init__(self, config: PMGConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        if self.layer_type == PMG_LAYER_TYPE:
            pmg_indices = config.pmg_layer_indices
            depth = (pmg_indices.index(layer_idx) + 1) / len(pmg_indices)
            self.pmg = PMGLayer(
                config.hidden_size,
                expand=config.expand,
                gate_rank=config.gate_rank,
                use_short_conv=config.use_short_conv,
                conv_size=config.conv_size,
                memory_floor_init=config.memory_floor_init * depth,
                rms_norm_eps=config.rms_norm_eps,
                scan_impl=config.scan_impl,
                chunk_size=config.chunk_size,
            )
        else:
            self.self_attn = PMGAttention(config, layer_idx)
        self.input_layernorm = PMGRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = PMGRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = PMGMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        resets: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_gates: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the new hidden states and the mixer's weights where asked for: a PMG layer's write weights
        (`output_gates`), an attention layer's attention weights (`output_attentions`, eager attention only)."""
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        weights = None
        if self.layer_type == PMG_LAYER_TYPE:
            state = read_pmg_state(cache, self.layer_idx)
            hidden_states, new_state, *gates = self.pmg(
                hidden_states,
                state,
                attention_mask,
                resets,
                output_gates=output_gates,
                return_state=cache is not None,
                update_state=state is not None,
            )
            if cache is not None:
                write_pmg_state(cache, self.layer_idx, new_state)
            weights = gates[0] if gates else None
        else:
            hidden_states, attention_weights = self.self_attn(hidden_states, position_embeddings, attention_mask, cache)
            weights = attention_weights if output_attentions else None
        hidden_states = residual + hidden_states
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, weights


class PMGPreTrainedModel(PreTrainedModel):
    config: PMGConfig
    config_class = PMGConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PMGDecoderLayer"]  # noqa: RUF012 (transformers convention)
    _supports_sdpa = True
    _supports_flash_attn = False
    _is_stateful = True
    # heads average their loss over the batch, so Trainer must scale it for gradient accumulation; the causal LM,
    # whose loss follows Trainer's token count (`num_items_in_batch`), says otherwise
    accepts_loss_kwargs = False
    _can_compile_fullgraph = True  # training and decoding forwards compile without graph breaks (tested)
    # task heads that may legitimately be missing from (or extra in) a checkpoint of another head
    _head_prefixes = ("lm_head.", "score.")
    # the classes of this modeling file a saved checkpoint maps for `trust_remote_code`, whichever one was saved
    _remote_code_classes = {  # noqa: RUF012 (read only)
        "AutoModel": "PMGModel",
        "AutoModelForCausalLM": "PMGForCausalLM",
        "AutoModelForSequenceClassification": "PMGForSequenceClassification",
    }

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, with every class of `_remote_code_classes` in the config's `auto_map`
        (transformers maps only the saved one): where pmg is not installed, a published language model then also
        loads with `trust_remote_code` as the bare model, or as a sequence classifier to fine-tune."""
        module = type(self).__module__.rsplit(".", 1)[-1]
        mapped = {auto_class: f"{module}.{name}" for auto_class, name in self._remote_code_classes.items()}
        # entries of another family (a config taken from a time-series checkpoint, say) would name files not copied
        previous = getattr(self.config, "auto_map", None) or {}
        self.config.auto_map = {**{k: v for k, v in previous.items() if k == "AutoConfig"}, **mapped}
        super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, but a checkpoint whose body does not match the config is an error.

        transformers already refuses shape mismatches; here missing or unexpected body weights (e.g. a config with
        more or fewer layers than the checkpoint) raise too, instead of silently running with random weights.
        A task head that the checkpoint lacks is created and reported, as transformers does.
        """
        return_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        mismatched = {
            kind: sorted(key for key in info[kind] if not key.startswith(cls._head_prefixes))
            for kind in ("missing_keys", "unexpected_keys")
        }
        if any(mismatched.values()):
            raise ValueError(
                f"The checkpoint does not match the model config: missing weights {mismatched['missing_keys'][:8]}, "
                f"unexpected weights {mismatched['unexpected_keys'][:8]}. Check num_hidden_layers, layer_types and "
                "the PMG options (expand, gate_rank, use_short_conv) against the checkpoint."
            )
        return (model, info) if return_info else model

    def _init_weights(self, module: nn.Module) -> None:
        """Standard init, plus the gate shape (k = n = 1, m = 0), the depth-dependent floors, and zero residual outputs.

        The last projection of every residual branch (PMG `out_proj`, attention `o_proj`, MLP `down_proj`) starts at
        zero, so a fresh stack of any depth is exactly the identity map through its residual branches; these
        projections receive gradients from the first step and open the branches as training needs them.
        """
        super()._init_weights(module)
        if isinstance(module, PMGLayer):
            init.constant_(module.sharpness_raw, softplus_inverse(1.0))
            init.zeros_(module.shift)
            init.constant_(module.asymmetry_raw, softplus_inverse(1.0))
            init.constant_(module.floor_logit, module.floor_logit_init)
        elif getattr(module, "is_residual_output", False):
            init.zeros_(module.weight)
        elif isinstance(module, PMGRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(module.inv_freq.device))


@dataclass
class PMGModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus the PMG write weights and the gate regulariser.

    gates: one (B, T, D) fp32 tensor of write weights per PMG layer, when `output_gates=True`.
    gate_loss: `config.gate_l1 * mean(write weight)` over PMG layers and real tokens, when `config.gate_l1 > 0`.
    """

    gates: tuple[torch.Tensor, ...] | None = None
    gate_loss: torch.Tensor | None = None


@dataclass
class PMGCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `gates` and `gate_loss` (see `PMGModelOutputWithPast`)."""

    gates: tuple[torch.Tensor, ...] | None = None
    gate_loss: torch.Tensor | None = None


@dataclass
class PMGSequenceClassifierOutputWithPast(SequenceClassifierOutputWithPast):
    """`SequenceClassifierOutputWithPast` plus `gates` and `gate_loss` (see `PMGModelOutputWithPast`)."""

    gates: tuple[torch.Tensor, ...] | None = None
    gate_loss: torch.Tensor | None = None


class PMGModel(PMGPreTrainedModel):
    """The bare PMG stack: token embeddings, decoder blocks, final norm."""

    def __init__(self, config: PMGConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(PMGDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = PMGRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.has_attention = any(t != PMG_LAYER_TYPE for t in config.layer_types)
        self.rotary_emb = PMGRotaryEmbedding(config) if self.has_attention else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @deprecate_kwarg("past_key_values", version="5.40.0", new_name="cache", raise_if_both_names=True)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_gates: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> PMGModelOutputWithPast | tuple:
        """
        Args:
            input_ids / inputs_embeds: (B, T) token ids or (B, T, hidden_size) embeddings, exactly one of them.
            attention_mask: (B, past + T), 1 at real tokens and 0 at padding (left or right); or a dict of masks
                already prepared per layer type, as `generate` passes them with a static cache.
            position_ids: (B, T) positions; where they restart at 0 inside a row (packed documents), every PMG
                memory resets and attention stays inside each document.
            cache: a `DynamicCache(config=...)` to continue from and update (`past_key_values` is accepted with a
                deprecation warning, as in transformers' own models).
            use_cache: return the cache (default: `config.use_cache`, off in training).
            output_hidden_states: return the input of every block and the final normed output.
            output_gates: return the write weights of every PMG layer as `gates`.
            output_attentions: return the attention weights of every attention layer as `attentions` (with
                `attn_implementation="eager"`; other implementations compute none, and the tuple stays empty).
        """
        if cache is not None:
            self._check_cache(cache)
        output_hidden_states = _default(output_hidden_states, self.config.output_hidden_states)
        output_gates = bool(output_gates)
        output_attentions = _default(output_attentions, self.config.output_attentions)
        if output_attentions and self.has_attention and self.config._attn_implementation != "eager":
            logger.warning_once(
                f"{self.config._attn_implementation} attention computes no attention weights for "
                "output_attentions=True: load the model with attn_implementation='eager' to get them."
            )
        return_dict = _default(return_dict, self.config.return_dict)
        use_cache = _default(use_cache, self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training and use_cache:
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing; setting use_cache=False.")
            use_cache = False

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if input_ids is not None:
            self._check_token_ids(input_ids)
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        self._check_mask_and_positions(attention_mask, position_ids, batch, length, cache)

        # resets where positions restart inside a row (packed documents)
        resets = None
        if position_ids is not None and length > 1:  # a single step never starts a document inside the row
            resets = F.pad(position_ids[:, 1:] == 0, (1, 0)).expand(batch, length)
        position_embeddings = None
        if self.has_attention:
            if position_ids is None:
                past_length = cache.get_seq_length() if cache is not None else 0
                position_ids = torch.arange(past_length, past_length + length, device=inputs_embeds.device)[None]
            position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        # one mask per layer type: the 2D padding mask of the current tokens for PMG layers (None without padding),
        # transformers' causal masks for attention (padding, windows, packed documents); `generate` passes them
        # prepared with the same helper when it compiles with a static cache
        masks = attention_mask
        if not isinstance(masks, dict):
            # transformers finds packed documents in position_ids only without a padding mask or cache; the PMG
            # memories reset at them regardless, so with a padding mask attention is kept inside them here
            same_document = None
            if resets is not None and self.has_attention and attention_mask is not None and cache is None:
                # (a reset on a padded step starts nothing, for the memories either)
                starts = resets & attention_mask[:, -length:].bool()
                same_document = packed_sequence_mask_function(starts.long().cumsum(dim=1))
            masks = create_masks_for_generate(
                self.config, inputs_embeds, attention_mask, cache, position_ids, and_mask_function=same_document
            )
        # a new cache is created after the masks: an empty cache changes no mask, but it would hide packed documents
        # (position_ids restarting at 0) from transformers' mask helpers
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        hidden_states = inputs_embeds
        all_hidden_states, gates, attentions = [], [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            hidden_states, weights = layer(
                hidden_states,
                attention_mask=masks[layer.layer_type],
                position_embeddings=position_embeddings,
                resets=resets,
                cache=cache,
                output_gates=output_gates or self.config.gate_l1 > 0,
                output_attentions=output_attentions,
            )
            if weights is not None:
                (gates if layer.layer_type == PMG_LAYER_TYPE else attentions).append(weights)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)

        gate_loss = None
        if self.config.gate_l1 > 0 and gates:
            gate_loss = self.config.gate_l1 * _mean_write_weight(gates, masks[PMG_LAYER_TYPE])
        output = PMGModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            gates=tuple(gates) if output_gates else None,
            gate_loss=gate_loss,
            cache=cache if use_cache else None,
        )
        return output if return_dict else output.to_tuple()

    def _check_token_ids(self, input_ids: torch.Tensor) -> None:
        """Token ids outside the vocabulary raise a ValueError naming them instead of an index error deep in the
        embedding. On CUDA the check is a device-side assertion instead, fatal to the CUDA context as the
        embedding's own would be, but naming the problem: reading the ids back would wait for the device on every
        forward, and a training step that waits there can no longer queue its kernels ahead of the GPU."""
        if torch.compiler.is_compiling() or input_ids.numel() == 0:
            return
        vocab_size = self.config.vocab_size
        problem = f"input_ids must lie in [0, vocab_size={vocab_size})"
        hint = "Does the tokenizer match the model (see resize_token_embeddings)?"
        low, high = torch.aminmax(input_ids)
        if input_ids.is_cuda:
            torch._assert_async((low >= 0) & (high < vocab_size), f"{problem}. {hint}")
            return
        low, high = low.item(), high.item()
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{problem}, got values in [{low}, {high}]. {hint}")

    def _check_cache(self, cache: Cache) -> None:
        """A cache must hold a linear-attention layer at every PMG layer (what `DynamicCache(config=...)` builds;
        a `DynamicCache()` without config has none, and fails deep in the cache otherwise), and must not record past
        states for `crop`: a PMG memory cannot be rolled back, which assisted decoding would need."""
        if not isinstance(cache, Cache):
            raise TypeError(f"cache must be a transformers Cache (e.g. DynamicCache), got {type(cache).__name__}.")
        layers = cache.layers
        for index in self.config.pmg_layer_indices:
            if index >= len(layers) or not isinstance(layers[index], LinearAttentionCacheLayerMixin):
                raise ValueError(
                    f"The cache has no linear-attention layer for PMG layer {index} (a DynamicCache() built without "
                    "a config creates only attention layers): pass DynamicCache(config=model.config), or none with "
                    "use_cache=True and the model creates it."
                )
            if getattr(layers[index], "record_past", False):
                raise NotImplementedError(
                    "The cache records past states so that it can be cropped back (assisted or speculative "
                    "decoding), but a PMG memory cannot be rolled back: use a model without PMG layers as the "
                    "assistant."
                )

    def _check_mask_and_positions(
        self,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        batch: int,
        length: int,
        cache: Cache | None,
    ) -> None:
        if isinstance(attention_mask, dict):
            # set - set: torch 2.11's dynamo cannot trace set - dict_keys (the static-cache step compiles this)
            if missing := sorted(set(self.config.layer_types) - set(attention_mask)):
                raise ValueError(f"attention_mask is a dict of masks per layer type, but it lacks {missing}.")
        elif attention_mask is not None:
            if attention_mask.dim() != 2:
                shape = tuple(attention_mask.shape)
                raise ValueError(f"attention_mask must be 2D (batch, sequence) for PMG models, got shape {shape}.")
            expected = "at least" if cache is not None else "exactly"
            too_short = attention_mask.shape[1] < length
            wrong = attention_mask.shape[1] != length if cache is None else too_short
            if attention_mask.shape[0] != batch or wrong:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but the inputs are (batch={batch}, "
                    f"length={length}): it needs batch rows and {expected} {length} columns."
                )
        if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[1] != length):
            raise ValueError(
                f"position_ids must have shape (batch, {length}) or (1, {length}), got {tuple(position_ids.shape)}."
            )


def _default(value, fallback):
    return fallback if value is None else value


def _gate_loss_share(gate_loss: torch.Tensor, labels: torch.Tensor, loss_kwargs: dict) -> torch.Tensor:
    """The gate penalty of one micro-batch, weighted as its cross-entropy is. Under gradient accumulation Trainer
    passes the whole batch's count of counted labels (`num_items_in_batch`) and no longer divides the loss by the
    number of micro-batches: each micro-batch's mean penalty then weighs by its share of the counted labels, and the
    shares add up to one penalty for the whole batch instead of one per micro-batch. The penalty averages over
    tokens, not labels, whose whole-batch count Trainer does not pass: the result is exactly the whole batch's
    penalty where micro-batches hold as many tokens per counted label, and close to it otherwise."""
    total = loss_kwargs.get("num_items_in_batch")
    if total is None:
        return gate_loss
    shift_labels = loss_kwargs.get("shift_labels")
    shifted = labels[:, 1:] if shift_labels is None else shift_labels
    counted = (shifted != loss_kwargs.get("ignore_index", IGNORE_INDEX)).sum().to(gate_loss.device)
    return gate_loss * counted / torch.as_tensor(total, device=gate_loss.device)


def _mean_write_weight(gates: list[torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
    """Mean write weight over PMG layers, channels and real (unpadded) tokens."""
    per_token = torch.stack([write.mean(dim=-1) for write in gates]).mean(dim=0)  # (B, T)
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


class PMGForCausalLM(PMGPreTrainedModel, GenerationMixin):
    """PMG language model: the stack plus a (tied or untied) LM head; generates with transformers' caches."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012 (transformers convention)
    accepts_loss_kwargs = True

    def __init__(self, config: PMGConfig):
        super().__init__(config)
        self.model = PMGModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ) -> dict:
        """transformers' inputs, with a warning where `generate` cannot tell new tokens from seen ones. With attention
        layers the cache counts the tokens it holds, and `generate` feeds only the rest; a stack without attention
        keeps no count (as transformers' Mamba), so a continued cache gets every token it is given as new."""
        continued = is_first_iteration and cache is not None and not self.model.has_attention
        if continued and cache.layers and cache.has_previous_state():
            given = (inputs_embeds if inputs_embeds is not None else input_ids).shape[1]
            if given > 1:
                logger.warning_once(
                    f"generate() continues a cache that already holds PMG memories with {given} tokens, all read as "
                    "new: this stack has no attention layer, so its cache keeps no count of the tokens it has seen "
                    "and cannot skip them. Right if they are only tokens the cache has not seen; if they repeat "
                    "the sequence so far, pass only the rest."
                )
        return super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )

    @deprecate_kwarg("past_key_values", version="5.40.0", new_name="cache", raise_if_both_names=True)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_gates: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> PMGCausalLMOutputWithPast | tuple:
        """
        Same arguments as `PMGModel.forward`, plus:
            labels: (B, T) token ids; the shift by one happens inside, -100 is ignored. The loss adds the gate
                regulariser when `config.gate_l1 > 0`.
            logits_to_keep: compute logits only for the last `logits_to_keep` positions (0: all), or for the
                positions in a 1D index tensor.
        With labels, the loss is computed a chunk of tokens at a time from the hidden states
        (`pmg.linear_cross_entropy`: same values and gradients as transformers' loss on the logits, which are still
        returned and differentiable), unless the head is wrapped or hooked (an adapter, accelerate's offload) or
        `loss_function` was replaced. With `config.fuse_linear_cross_entropy`, training with labels returns the loss
        and no logits.
        """
        return_dict = _default(return_dict, self.config.return_dict)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_gates=output_gates,
            output_attentions=output_attentions,
            return_dict=True,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden_states = outputs.last_hidden_state[:, keep, :]
        loss = logits = None
        if labels is not None and self._chunks_the_loss(hidden_states, kwargs):
            loss_inputs = (self.lm_head.weight, labels, kwargs.get("num_items_in_batch"), kwargs.get("shift_labels"))
            if self.config.fuse_linear_cross_entropy and self.training:
                loss = causal_lm_linear_cross_entropy(hidden_states, *loss_inputs)
            else:
                logits, loss = causal_lm_logits_and_loss(hidden_states, *loss_inputs)
        else:
            logits = self.lm_head(hidden_states)
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if loss is not None and outputs.gate_loss is not None:
            loss = loss + _gate_loss_share(outputs.gate_loss, labels, kwargs)
        output = PMGCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            gates=outputs.gates,
            gate_loss=outputs.gate_loss,
            cache=outputs.cache,
        )
        return output if return_dict else output.to_tuple()

    def _chunks_the_loss(self, hidden_states: torch.Tensor, loss_kwargs: dict) -> bool:
        """The chunked loss reads the head's weight itself instead of calling the head, so it stands in for the head and
        transformers' causal-LM loss only for a plain bias-free linear head that nothing hooks into (an adapter,
        accelerate's offload and device hooks, an FSDP or DeepSpeed unit, a user's forward hook), on the hidden
        states' device, with `loss_function` not replaced and the default ignored label."""
        head = self.lm_head
        return (
            type(head) is nn.Linear
            and head.bias is None
            and not (head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook"))
            and head.weight.device == hidden_states.device
            and self.loss_function is LOSS_MAPPING["ForCausalLM"]
            and loss_kwargs.get("ignore_index", IGNORE_INDEX) == IGNORE_INDEX
        )


class PMGForSequenceClassification(PMGPreTrainedModel):
    """PMG stack with a linear head on the last real token: single-label, multi-label or regression."""

    def __init__(self, config: PMGConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = PMGModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", version="5.40.0", new_name="cache", raise_if_both_names=True)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_gates: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> PMGSequenceClassifierOutputWithPast | tuple:
        """
        Same arguments as `PMGModel.forward`, plus `labels`: (B,) class ids, (B, num_labels) multi-hot floats, or
        (B,) floats for regression (`config.problem_type` is inferred as transformers does when unset).
        """
        return_dict = _default(return_dict, self.config.return_dict)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_gates=output_gates,
            output_attentions=output_attentions,
            return_dict=True,
        )
        logits = self.score(outputs.last_hidden_state)
        last = self._last_token_index(input_ids, attention_mask, logits)
        pooled_logits = logits[torch.arange(logits.shape[0], device=logits.device), last]
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=pooled_logits, config=self.config)
            if outputs.gate_loss is not None:
                loss = loss + outputs.gate_loss
        output = PMGSequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            gates=outputs.gates,
            gate_loss=outputs.gate_loss,
            cache=outputs.cache,
        )
        return output if return_dict else output.to_tuple()

    def _last_token_index(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, logits: torch.Tensor
    ) -> torch.Tensor:
        """Index of the last real token per row: from the attention mask, else from pad tokens, else the end."""
        batch, length = logits.shape[:2]
        positions = torch.arange(length, device=logits.device)
        if attention_mask is not None:
            real = attention_mask[:, -length:].to(logits.device).bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids.to(logits.device) != self.config.pad_token_id
        elif batch == 1 or input_ids is None:
            return torch.full((batch,), length - 1, device=logits.device)
        else:
            raise ValueError(
                "Cannot find the last token of padded rows: pass attention_mask or set config.pad_token_id."
            )
        return (positions * real).argmax(dim=-1)


__all__ = [
    "PMGForCausalLM",
    "PMGForSequenceClassification",
    "PMGLayer",
    "PMGModel",
    "PMGPreTrainedModel",
    "PMGState",
]
