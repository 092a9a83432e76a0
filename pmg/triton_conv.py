"""PMG's short causal depthwise convolution as two Triton kernels, padding mask and document resets fused in.

    u_t = b + sum_{l=0}^{K-1} c_{K-1-l} x_{t-l},    x_s = v_s * mask_s (window rows for s < 0),
    where a tap is left out if a document starts after its source (a reset at any of s+1 .. t).

In PyTorch this is a mask multiply, a concatenation with the window and one multiply-add pass per tap forward, and
about thirty activation-sized passes backward (a zero-filled padded gradient, a multiply-add per tap into it, a product
and a sum per tap for the weight). On a GPU each pass is a kernel reading and writing the whole activation. Here the
forward kernel reads v once (the K shifted rows of a tile come from cache) and writes u once, in v's dtype; the
backward kernel reads the output gradient and v once and writes the gradient of v, summing the weight and bias
gradients in registers into one partial per program. Both sum in fp32 and round once, where the PyTorch path, under
autocast, rounds after every tap.

A forward program owns a tile of BLOCK_T positions x BLOCK_D channels of one batch row, a backward program ROW_TILES
such tiles in a row. The new convolution window (the last K-1 inputs) is small and left to the caller. Triton is
optional; with TRITON_INTERPRET=1 set when this module is imported, the kernels run on CPU tensors (tests).
"""

import torch

from .scan_pmg import check_shapes
from .triton_scan import (
    _column_sums,
    _jit,
    _on_device_of,
    cdiv,
    check_runs_here,
    contiguous,
    next_power_of_2,
    operator_with_eager_path,
    tl,
)

# Tiles of 4 positions x 128 channels with 4 warps: rows of 128 bf16 channels are whole 256-byte lines, and few
# registers leave an SM many programs to keep loads in flight. Compiled for sm_90 by Triton 3.6 (ptxas, K = 4, bf16,
# 2026-11-27), registers per thread without / with window, mask and resets: forward 32 / 61 and backward 48 / 114
# with 4 positions; 40 / 159 and 122 / 188 with 8; 123 / 255 and 197 / 255 with 16, which spills.
# A backward program walks ROW_TILES tiles one after another, and its partial sums of the parameters' gradients (fp32,
# K + 1 rows) take 1 / (BLOCK_T * ROW_TILES) of the positions. With 32 tiles (128 positions) an H100 spent 387 us per
# backward call at 8 x 2048 x 768 bf16 (2026-11-27), where reading and writing those bytes takes ~30 us: 816 programs
# of 32 dependent steps each leave the GPU waiting on memory latency, and in training, tiles of 8 and 16 positions
# (fewer, longer programs) were slower still. 8 tiles make four times as many programs for 8 MB of partial sums;
# not yet timed (the op section of `scripts/benchmark.py` compares the tile shapes).
BLOCK_T = 4
BLOCK_D = 128
ROW_TILES = 8
NUM_WARPS = 4


@_jit
def _load_inputs(
    values_ptr,
    window_ptr,
    mask_ptr,
    batch,
    source,
    cols,
    length,
    channels,
    TAPS,
    HAS_WINDOW,
    HAS_MASK,
):
    """The convolution inputs x_s of a tile in fp32: v * mask for 0 <= s < T, the window for s < 0 (s >= 1 - K
    always; zeros without a window), zeros past the sequence."""
    in_channels = cols < channels
    from_values = (source >= 0) & (source < length)
    x = tl.load(
        values_ptr + (batch * length + source)[:, None] * channels + cols[None, :],
        mask=from_values[:, None] & in_channels[None, :],
        other=0.0,
    ).to(tl.float32)
    if HAS_MASK:
        keep = tl.load(mask_ptr + batch * length + source, mask=from_values, other=0) != 0
        x = tl.where(keep[:, None], x, 0.0)
    if HAS_WINDOW:
        from_window = source < 0
        x += tl.load(
            window_ptr + (batch * (TAPS - 1) + source + TAPS - 1)[:, None] * channels + cols[None, :],
            mask=from_window[:, None] & in_channels[None, :],
            other=0.0,
        ).to(tl.float32)
    return x


@_jit
def _blocks_of_program(channels, BLOCK_D):
    """(block of positions, block of channels) of this program: both on grid axis 0, which has no 65535 limit."""
    channel_blocks = (channels + BLOCK_D - 1) // BLOCK_D
    return tl.program_id(0) // channel_blocks, tl.program_id(0) % channel_blocks


@_jit
def _reset_at(resets_ptr, batch, position, valid, length):
    """Whether a document starts at `position` (False outside the sequence)."""
    inside = valid & (position >= 0) & (position < length)
    return tl.load(resets_ptr + batch * length + position, mask=inside, other=0) != 0


@_jit
def _short_conv_forward_kernel(
    values_ptr,
    window_ptr,
    weight_ptr,
    bias_ptr,
    mask_ptr,
    resets_ptr,
    output_ptr,
    length,
    channels,
    TAPS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_RESETS: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)
    time_block, channel_block = _blocks_of_program(channels, BLOCK_D)
    rows = time_block * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = channel_block * BLOCK_D + tl.arange(0, BLOCK_D)
    in_rows = rows < length
    in_channels = cols < channels
    bias = tl.load(bias_ptr + cols, mask=in_channels, other=0.0)
    output = tl.full((BLOCK_T, BLOCK_D), 0.0, tl.float32) + bias[None, :]
    blocked = tl.full((BLOCK_T,), False, tl.int1)  # whether a document starts after the tap's source, up to the row
    for lag in tl.static_range(TAPS):
        if HAS_RESETS and lag > 0:
            blocked = blocked | _reset_at(resets_ptr, batch, rows - lag + 1, in_rows, length)
        x = _load_inputs(
            values_ptr,
            window_ptr,
            mask_ptr,
            batch,
            rows - lag,
            cols,
            length,
            channels,
            TAPS,
            HAS_WINDOW,
            HAS_MASK,
        )
        weight = tl.load(weight_ptr + cols * TAPS + TAPS - 1 - lag, mask=in_channels, other=0.0)
        output += tl.where(blocked[:, None], 0.0, x) * weight[None, :]
    offsets = (batch * length + rows)[:, None] * channels + cols[None, :]
    tl.store(output_ptr + offsets, output.to(output_ptr.dtype.element_ty), mask=in_rows[:, None] & in_channels[None, :])


@_jit
def _short_conv_backward_kernel(
    values_ptr,
    window_ptr,
    weight_ptr,
    mask_ptr,
    resets_ptr,
    grad_output_ptr,
    grad_values_ptr,
    grad_window_ptr,
    grad_parameters_ptr,
    length,
    channels,
    TAPS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROW_TILES: tl.constexpr,
    SUM_ROWS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_RESETS: tl.constexpr,
):
    """Rows are the window-padded inputs s = -(K-1) .. T-1; each gathers the output gradients of the K rows s .. s+K-1
    that read it. A program walks ROW_TILES tiles of rows and writes one partial sum of the parameters' gradients,
    (TAPS + 1, channels): the weight's taps in order, then the bias (SUM_ROWS, a power of two, holds them)."""
    batch = tl.program_id(1).to(tl.int64)
    row_group, channel_block = _blocks_of_program(channels, BLOCK_D)
    cols = channel_block * BLOCK_D + tl.arange(0, BLOCK_D)
    in_channels = cols < channels
    sum_rows = tl.arange(0, SUM_ROWS)
    sums = tl.full((SUM_ROWS, BLOCK_D), 0.0, tl.float32)
    for tile in range(ROW_TILES):
        source = (row_group * ROW_TILES + tile) * BLOCK_T + tl.arange(0, BLOCK_T) - (TAPS - 1)
        in_rows = source < length
        x = _load_inputs(
            values_ptr,
            window_ptr,
            mask_ptr,
            batch,
            source,
            cols,
            length,
            channels,
            TAPS,
            HAS_WINDOW,
            HAS_MASK,
        )
        grad_x = tl.full((BLOCK_T, BLOCK_D), 0.0, tl.float32)
        blocked = tl.full((BLOCK_T,), False, tl.int1)  # whether a document starts after the row, up to the reader
        for lag in tl.static_range(TAPS):
            target = source + lag
            reads = in_rows & (target >= 0) & (target < length)
            if HAS_RESETS and lag > 0:
                blocked = blocked | _reset_at(resets_ptr, batch, target, reads, length)
            grad = tl.load(
                grad_output_ptr + (batch * length + target)[:, None] * channels + cols[None, :],
                mask=(reads & ~blocked)[:, None] & in_channels[None, :],
                other=0.0,
            ).to(tl.float32)
            weight = tl.load(weight_ptr + cols * TAPS + TAPS - 1 - lag, mask=in_channels, other=0.0)
            grad_x += grad * weight[None, :]
            sums += tl.where(sum_rows[:, None] == TAPS - 1 - lag, _column_sums(grad * x)[None, :], 0.0)
            if lag == 0:  # every output row once
                sums += tl.where(sum_rows[:, None] == TAPS, _column_sums(grad)[None, :], 0.0)
        in_sequence = in_rows & (source >= 0)
        grad_values = grad_x
        if HAS_MASK:  # padding reads as zeros; the window is not masked
            keep = tl.load(mask_ptr + batch * length + source, mask=in_sequence, other=0) != 0
            grad_values = tl.where(keep[:, None], grad_x, 0.0)
        offsets = (batch * length + source)[:, None] * channels + cols[None, :]
        tl.store(
            grad_values_ptr + offsets,
            grad_values.to(grad_values_ptr.dtype.element_ty),
            mask=in_sequence[:, None] & in_channels[None, :],
        )
        if HAS_WINDOW:
            window_offsets = (batch * (TAPS - 1) + source + TAPS - 1)[:, None] * channels + cols[None, :]
            tl.store(
                grad_window_ptr + window_offsets,
                grad_x.to(grad_window_ptr.dtype.element_ty),
                mask=(source < 0)[:, None] & in_channels[None, :],
            )
    groups = tl.num_programs(0) // ((channels + BLOCK_D - 1) // BLOCK_D)
    partials = grad_parameters_ptr + (batch * groups + row_group) * (TAPS + 1) * channels
    tl.store(
        partials + sum_rows[:, None] * channels + cols[None, :],
        sums,
        mask=(sum_rows < TAPS + 1)[:, None] & in_channels[None, :],
    )


# Custom operators under torch.compile and tracing, their functions without dispatch in eager mode, as in
# `triton_scan`; the operators live in a namespace named after this module, so a checkpoint's copy never replaces them
_NAMESPACE = "".join(character if character.isalnum() else "_" for character in __name__)


def _run_conv_forward(
    values: torch.Tensor,
    window: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor | None,
    resets: torch.Tensor | None,
    block_t: int,
    block_d: int,
    row_tiles: int,
) -> torch.Tensor:
    values, window, weight, bias, mask, resets = contiguous(values, window, weight, bias, mask, resets)
    output = values.new_empty(values.shape)
    batch, length, channels = values.shape
    with _on_device_of(values):
        _short_conv_forward_kernel[(cdiv(length, block_t) * cdiv(channels, block_d), batch)](
            values,
            values if window is None else window,
            weight,
            bias,
            values if mask is None else mask,
            values if resets is None else resets,
            output,
            length,
            channels,
            TAPS=weight.shape[1],
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            HAS_WINDOW=window is not None,
            HAS_MASK=mask is not None,
            HAS_RESETS=resets is not None,
            num_warps=NUM_WARPS,
        )
    return output


_conv_forward = torch.library.custom_op(f"{_NAMESPACE}::short_conv_forward", _run_conv_forward, mutates_args=())


@_conv_forward.register_fake
def _conv_forward_fake(values, window, weight, bias, mask, resets, *tiles):
    return values.new_empty(values.shape)


def _run_conv_backward(
    values: torch.Tensor,
    window: torch.Tensor | None,
    weight: torch.Tensor,
    mask: torch.Tensor | None,
    resets: torch.Tensor | None,
    grad_output: torch.Tensor,
    block_t: int,
    block_d: int,
    row_tiles: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the values, the window (empty without one), the weight (D, K) and the bias (D,)."""
    values, window, weight, mask, resets, grad_output = contiguous(values, window, weight, mask, resets, grad_output)
    grad_values, grad_window, grad_parameters = _allocate_backward_outputs(values, window, weight, block_t * row_tiles)
    batch, length, channels = values.shape
    with _on_device_of(values):
        _short_conv_backward_kernel[(grad_parameters.shape[1] * cdiv(channels, block_d), batch)](
            values,
            values if window is None else window,
            weight,
            values if mask is None else mask,
            values if resets is None else resets,
            grad_output,
            grad_values,
            grad_window,
            grad_parameters,
            length,
            channels,
            TAPS=weight.shape[1],
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            ROW_TILES=row_tiles,
            SUM_ROWS=next_power_of_2(weight.shape[1] + 1),
            HAS_WINDOW=window is not None,
            HAS_MASK=mask is not None,
            HAS_RESETS=resets is not None,
            num_warps=NUM_WARPS,
        )
    sums = grad_parameters.sum((0, 1))  # (K + 1, D)
    return grad_values, grad_window, sums[:-1].T.contiguous(), sums[-1].clone()


_conv_backward = torch.library.custom_op(f"{_NAMESPACE}::short_conv_backward", _run_conv_backward, mutates_args=())


def _allocate_backward_outputs(
    values: torch.Tensor, window: torch.Tensor | None, weight: torch.Tensor, rows_per_program: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The values' and window's gradients and the fp32 partial sums (B, programs, K + 1, D) of the parameters'."""
    batch, length, channels = values.shape
    taps = weight.shape[1]
    return (
        values.new_empty(values.shape),
        values.new_empty((0,) if window is None else window.shape),
        values.new_empty((batch, cdiv(length + taps - 1, rows_per_program), taps + 1, channels), dtype=torch.float32),
    )


@_conv_backward.register_fake
def _conv_backward_fake(values, window, weight, mask, resets, grad_output, block_t, block_d, row_tiles):
    grad_values, grad_window, _ = _allocate_backward_outputs(values, window, weight, block_t * row_tiles)
    return grad_values, grad_window, weight.new_empty(weight.shape), weight.new_empty(weight.shape[:1])


def _save_for_backward(ctx, inputs: tuple, output: torch.Tensor) -> None:
    values, window, weight, _bias, mask, resets, *tiles = inputs
    ctx.save_for_backward(values, window, weight, mask, resets)
    ctx.tiles = tiles


def _backward(ctx, grad_output: torch.Tensor, run_backward=_conv_backward) -> tuple:
    """The gradients of `_conv_forward`'s inputs, computed by `run_backward`: the backward operator, or in eager mode
    its function itself."""
    values, window, weight, mask, resets = ctx.saved_tensors
    grad_values, grad_window, grad_weight, grad_bias = run_backward(
        values, window, weight, mask, resets, grad_output, *ctx.tiles
    )
    return grad_values, grad_window if window is not None else None, grad_weight, grad_bias, *[None] * 5


_convolve = operator_with_eager_path(
    "short_conv", _conv_forward, _run_conv_forward, _run_conv_backward, _save_for_backward, _backward
)


def triton_short_conv(
    values: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    window: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    resets: torch.Tensor | None = None,
    block_t: int = BLOCK_T,
    block_d: int = BLOCK_D,
    row_tiles: int = ROW_TILES,
) -> torch.Tensor:
    """The causal depthwise convolution of `PMGLayer` over values (B, T, D), with autograd.

    Args:
        weight: (D, K), tap K-1 multiplying the current position. bias: (D,).
        window: the K-1 inputs before the first position (B, K-1, D), zeros if None.
        mask: (B, T), False at padding, whose values count as zeros. resets: (B, T), True where a document starts:
            no tap reaches back across it.
        block_t, block_d: tile sizes (powers of two), row_tiles: tiles per backward program; only for speed.

    Returns u (B, T, D) in v's dtype. The weight and bias are read in fp32 and get fp32 gradients.
    """
    check_runs_here(values, "The Triton short convolution")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (D, K), got {tuple(weight.shape)}.")
    batch, length, channels = values.shape
    taps = weight.shape[1]
    check_shapes(
        ("values", values),
        weight=(weight, (channels, taps)),
        bias=(bias, (channels,)),
        window=(window, (batch, taps - 1, channels)),
        mask=(mask, (batch, length)),
        resets=(resets, (batch, length)),
    )
    return _convolve(
        values,
        None if window is None else window.to(values.dtype),
        weight.float(),
        bias.float(),
        None if mask is None else mask.to(torch.uint8),
        None if resets is None else resets.to(torch.uint8),
        block_t,
        block_d,
        min(row_tiles, cdiv(length + taps - 1, block_t)),  # no program of empty tiles
    )
