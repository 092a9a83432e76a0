"""A PMG decoding step (one token) as one fused Triton kernel: padding mask, short convolution, gates and memory.

Generating a token runs every layer on a single position, where the work is a few thousand multiply-adds and the cost
is launching it: in PyTorch the part between the value and gate projections and the output norm is seventeen operator
calls per layer (the convolution window's concatenation and its taps, the gate shape, the write weight and retention,
the memory update), each with its Python and launch overhead. This kernel does all of it in one launch:

    v' = b + sum_i c_i u_i      over the window u = (previous K-1 values, v * mask)
    w  = (1 - f) * sigmoid(k * (z - m)) ** n         (0 at a padded step, which leaves memory and window as they were)
    h  = w * v' + (1 - w) * h_prev

with k, n = softplus of the stored parameters and f = sigmoid of the floor logit (`scan_pmg.constrain_gate_shape`).

Each program owns one batch row and a block of channels. It reads z, v, the conv window and the memory once and
writes the new memory (fp32), the output h (in v's dtype) and the shifted window. The convolution sums in fp32 and
rounds to v's dtype once, where PyTorch rounds after every tap, so bf16 results can differ by a rounding step.
Inference only (no autograd): `PMGLayer` uses it for single-token calls without gradients on CUDA.
"""

import torch

from .scan_pmg import check_shapes
from .triton_scan import _jit, _load_gate_shape, _on_device_of, _write_weights, cdiv, check_runs_here, tl

BLOCK_D = 128
NUM_WARPS = 4


@_jit
def _pmg_decoding_step_kernel(
    z_ptr,
    v_ptr,
    mask_ptr,
    state_ptr,
    window_ptr,
    window_batch_stride,
    window_step_stride,
    window_channel_stride,
    new_window_batch_stride,
    new_window_step_stride,
    new_window_channel_stride,
    conv_weight_ptr,
    conv_bias_ptr,
    sharpness_raw_ptr,
    shift_ptr,
    asymmetry_raw_ptr,
    floor_logit_ptr,
    output_ptr,
    final_ptr,
    new_window_ptr,
    write_ptr,
    channels,
    TAPS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_STATE: tl.constexpr,
    HAS_CONV: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    OUTPUT_WRITE: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_channels = cols < channels
    row = batch * channels + cols
    value = tl.load(v_ptr + row, mask=in_channels, other=0.0).to(tl.float32)
    keep = tl.full([BLOCK_D], True, tl.int1)
    if HAS_MASK:
        keep = tl.load(mask_ptr + batch + cols * 0) != 0  # this row's flag in every lane
        value = tl.where(keep, value, 0.0)
    if HAS_CONV:
        # the taps, oldest first; tap TAPS - 1 multiplies the current value, and the window shifts by one step. Row
        # `tap` is read before row `tap - 1` is written, so the new window may be the old one, updated in place
        old_rows = batch * window_batch_stride + cols * window_channel_stride
        new_rows = batch * new_window_batch_stride + cols * new_window_channel_stride
        # (a padded step leaves the window as it was: row r keeps the old row r instead of taking row r + 1)
        convolved = tl.load(conv_bias_ptr + cols, mask=in_channels, other=0.0).to(tl.float32)
        previous = tl.full([BLOCK_D], 0.0, tl.float32)
        for tap in tl.static_range(TAPS - 1):
            earlier = tl.full([BLOCK_D], 0.0, tl.float32)
            if HAS_WINDOW:
                earlier = tl.load(window_ptr + old_rows + tap * window_step_stride, mask=in_channels, other=0.0)
                earlier = earlier.to(tl.float32)
            weight = tl.load(conv_weight_ptr + cols * TAPS + tap, mask=in_channels, other=0.0).to(tl.float32)
            convolved += weight * earlier
            if tap > 0:
                shifted = new_window_ptr + new_rows + (tap - 1) * new_window_step_stride
                kept = tl.where(keep, earlier, previous)
                tl.store(shifted, kept.to(new_window_ptr.dtype.element_ty), mask=in_channels)
            previous = earlier
        weight = tl.load(conv_weight_ptr + cols * TAPS + TAPS - 1, mask=in_channels, other=0.0).to(tl.float32)
        convolved += weight * value
        if TAPS > 1:
            newest = new_window_ptr + new_rows + (TAPS - 2) * new_window_step_stride
            tl.store(newest, tl.where(keep, value, previous).to(new_window_ptr.dtype.element_ty), mask=in_channels)
        value = convolved.to(v_ptr.dtype.element_ty).to(tl.float32)  # the scan sees values in v's dtype
    z = tl.load(z_ptr + row, mask=in_channels, other=0.0).to(tl.float32)
    k, m, n, f = _load_gate_shape(
        sharpness_raw_ptr, shift_ptr, asymmetry_raw_ptr, floor_logit_ptr, cols, in_channels, True
    )
    _, _, _, write = _write_weights(z, k, m, n, f)
    write = tl.where(keep, write, 0.0)
    if OUTPUT_WRITE:
        tl.store(write_ptr + row, write, mask=in_channels)
    state = tl.full([BLOCK_D], 0.0, tl.float32)
    if HAS_STATE:
        state = tl.load(state_ptr + row, mask=in_channels, other=0.0)
    state = write * value + (1.0 - write) * state
    tl.store(final_ptr + row, state, mask=in_channels)
    tl.store(output_ptr + row, state.to(output_ptr.dtype.element_ty), mask=in_channels)


def triton_decoding_step(
    z: torch.Tensor,
    v: torch.Tensor,
    sharpness_raw: torch.Tensor,
    shift: torch.Tensor,
    asymmetry_raw: torch.Tensor,
    floor_logit: torch.Tensor,
    state: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    conv_weight: torch.Tensor | None = None,
    conv_bias: torch.Tensor | None = None,
    window: torch.Tensor | None = None,
    return_write: bool = False,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One PMG step for every sequence of a batch, without autograd.

    Args:
        z: gate logits (B, 1, D). v: candidate values before the convolution and the mask (B, 1, D).
        sharpness_raw, shift, asymmetry_raw, floor_logit: `PMGLayer`'s gate-shape parameters (D,) each, as stored:
            the kernel applies softplus to the first and third and a sigmoid to the last, as
            `scan_pmg.constrain_gate_shape` does (three launches fewer per layer and token than passing the
            constrained shape).
        state: the memory before the step (B, D), zeros if None. mask: (B, 1), False at a padded step.
        conv_weight (D, K), conv_bias (D,): the short convolution, None without one.
        window: the K-1 previous convolution inputs (B, K-1, D), any strides (a transposed view of the cache's
            time-last tensor needs no copy); zeros if None.
        return_write: also return the write weights (B, 1, D) in fp32 (for a gate regulariser or `output_gates`).
        in_place: write the new memory over `state` and the new window over `window` (a cache's own tensors, which
            then keep their addresses and need no copies) and return them; `state` must be fp32 and contiguous.

    Returns:
        h (B, 1, D) in v's dtype, the new memory (B, D) in fp32, the new window (B, K-1, D) in v's dtype (None
        without a convolution) and the write weights (None unless asked for), as `PMGLayer`'s PyTorch path computes
        them, except that the convolution runs in fp32 from the stored weights where PyTorch (under autocast) first
        rounds weights and window to v's dtype.
    """
    check_runs_here(z, "The fused decoding step")
    batch, length, channels = v.shape
    if length != 1:
        raise ValueError(f"A decoding step takes v of shape (B, 1, D), got {tuple(v.shape)}.")
    taps = 1 if conv_weight is None else conv_weight.shape[1]
    channel_vector = (channels,)
    check_shapes(
        ("v", v),
        z=(z, (batch, 1, channels)),
        sharpness_raw=(sharpness_raw, channel_vector),
        shift=(shift, channel_vector),
        asymmetry_raw=(asymmetry_raw, channel_vector),
        floor_logit=(floor_logit, channel_vector),
        state=(state, (batch, channels)),
        mask=(mask, (batch, 1)),
        conv_bias=(conv_bias, channel_vector),
        window=(window, (batch, taps - 1, channels)),
    )
    v = v.contiguous()
    output = torch.empty_like(v)
    if in_place:
        if not can_update_in_place(state, window, needs_window=conv_weight is not None):
            described = None if state is None else f"{state.dtype}, contiguous={state.is_contiguous()}"
            raise ValueError(
                f"in_place needs a contiguous fp32 state (got {described}) and, with a convolution, the window to "
                f"write over (got {None if window is None else tuple(window.shape)})."
            )
        final, new_window = state, window
    else:
        final = v.new_empty((batch, channels), dtype=torch.float32)
        new_window = None if conv_weight is None else v.new_empty((batch, taps - 1, channels))
    write = v.new_empty((batch, 1, channels), dtype=torch.float32) if return_write else None
    with _on_device_of(v):
        _pmg_decoding_step_kernel[(cdiv(channels, BLOCK_D), batch)](
            z.contiguous(),
            v,
            v if mask is None else mask.reshape(batch).to(torch.uint8).contiguous(),  # bytes, as the scan reads masks
            v if state is None else state.float().contiguous(),
            v if window is None else window,
            *((0, 0, 0) if window is None else window.stride()),
            *((0, 0, 0) if new_window is None else new_window.stride()),
            v if conv_weight is None else conv_weight.contiguous(),
            v if conv_bias is None else conv_bias.contiguous(),
            sharpness_raw.contiguous(),  # (the layer's own parameters are; a caller's views need not be)
            shift.contiguous(),
            asymmetry_raw.contiguous(),
            floor_logit.contiguous(),
            output,
            final,
            v if new_window is None else new_window,
            v if write is None else write,
            channels,
            TAPS=taps,
            BLOCK_D=BLOCK_D,
            HAS_MASK=mask is not None,
            HAS_STATE=state is not None,
            HAS_CONV=conv_weight is not None,
            HAS_WINDOW=window is not None,
            OUTPUT_WRITE=return_write,
            num_warps=NUM_WARPS,
        )
    return output, final, new_window, write


def can_update_in_place(state: torch.Tensor | None, window: torch.Tensor | None, needs_window: bool) -> bool:
    """Whether a step can write over `state` and `window`: the memory as the kernel writes it (fp32, contiguous),
    and a window to shift where there is a convolution."""
    has_memory = state is not None and state.dtype == torch.float32 and state.is_contiguous()
    return has_memory and (window is not None or not needs_window)
