"""The PMG scan as two fused Triton kernels: gates, masks, resets and the recurrence in one pass over z and v.

    write  w_t = (1 - f) * sigmoid(k * (z_t - m)) ** n,   retain a_t = 1 - w_t (0 at a reset; w = 0, a = 1 at padding)
    state  h_t = w_t * v_t + a_t * h_{t-1}

Each program owns one batch row, a block of BLOCK_D channels and a segment of the sequence, which it walks in chunks
of BLOCK_T steps: a chunk is a (BLOCK_T, BLOCK_D) tile whose gates are computed in registers and scanned in parallel
with `tl.associative_scan` (affine maps h -> a h + b composed in the linear domain, as the chunked PyTorch scan does,
so nothing can overflow), then the fp32 state is carried to the next chunk. A step-by-step loop inside the kernel
would serialise T dependent steps per channel; the tiles give every program BLOCK_T * BLOCK_D independent elements
per step of the loop.

Segments: with few batch rows and channels there are too few programs to fill the GPU, each walking a long sequence
alone. Then the sequence is cut into segments, and each kernel runs twice. The summary pass scans every segment from
zero and keeps two (B, D) vectors per segment: the value it ends with and the product of its retentions, the affine
map the segment applies to the state it enters with. The main pass carries the state (forward) or dL/dh (backward)
across the segments before it through those maps, then runs as with one segment. With one segment there is no
summary pass.

Forward: reads z and v once, writes h once (in v's dtype), the fp32 final state and, per chunk, the fp32 state
entering it (1 / BLOCK_T of the state's size). The write weights are written only when asked for.
Backward: walks the chunks in reverse and recomputes everything from z, v and those checkpoints: the gates, and the
fp32 states h_{t-1} by the same in-chunk scan. It never reads h, so bf16 outputs cost no accuracy in the gradients,
and stores neither w nor a. dL/dh runs backwards as a reverse associative scan; the per-channel gradients of
k, m, n and f are summed over time in registers and written as one (B, D) partial per parameter and segment.

Triton is optional: without it this module still imports, `is_triton_available()` is False and `pmg_scan` keeps the
PyTorch backends. With TRITON_INTERPRET=1 set when this module is imported, the kernels run on CPU tensors (tests).
"""

import contextlib
import functools
import os
import types
from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels are never compiled then, but their signatures still name tl.constexpr
    triton = None
    tl = types.SimpleNamespace(constexpr=None)

# Tiles of 32 steps x 16 channels with 4 warps: 4 elements per thread and tile keep the backward kernel near 144
# registers per thread on sm_90 (32 x 32 tiles need 255), rows of 16 channels are whole 32-byte sectors in bf16, and
# B * D / 16 programs leave enough of them to fill the GPU at small batch sizes.
BLOCK_T = 32
BLOCK_D = 16
NUM_WARPS = 4
# One program per batch row and channel block walks its whole segment of the sequence, chunk after chunk: with few
# rows and channels (1 x 16384 tokens at width 768 makes 48 programs on 132 multiprocessors) the sequence is cut into
# segments scanned side by side, until there are PROGRAMS_PER_MULTIPROCESSOR programs per multiprocessor. Each extra
# segment costs a summary pass over z and v (forward) or z and dL/dh (backward), so none is shorter than
# MIN_CHUNKS_PER_SEGMENT chunks, and shapes with enough programs (8 x 2048 at width 768: 384) keep one segment.
PROGRAMS_PER_MULTIPROCESSOR = 2
MIN_CHUNKS_PER_SEGMENT = 4
# A program walks its chunks one after another, and the compiler issues no loads ahead (no cp.async in the sm_90 code):
# each chunk waits for its z and v to arrive from memory, then computes while nothing is in flight. With PREFETCH the
# kernels load the next chunk's tiles before working on this one (a few registers more), so the wait overlaps the work.
# Off until a GPU says it pays (the op section of scripts/benchmark.py times both).
PREFETCH = False
# Triton decides when the kernels below are decorated whether they run interpreted (on CPU tensors) or compiled
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def is_triton_available() -> bool:
    """Whether Triton imported; the kernels also need a CUDA device, or TRITON_INTERPRET=1 for CPU tensors."""
    return triton is not None


def check_runs_here(tensor: torch.Tensor, what: str, hint: str = "") -> None:
    """Refuse before a launch that cannot work: `what` needs Triton, and CUDA tensors (or CPU ones in the
    interpreter, TRITON_INTERPRET=1)."""
    if triton is None:
        raise ImportError(f"{what} needs Triton (pip install triton){hint}.")
    if not (tensor.is_cuda or (tensor.device.type == "cpu" and INTERPRETED)):
        raise ValueError(f"{what} runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1), got {tensor.device}{hint}.")


def _on_device_of(tensor: torch.Tensor):
    """Launch on the tensor's GPU, not the current one (layers spread over several GPUs)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _jit(fn):
    """`triton.jit` when Triton is installed; without it the kernels stay plain functions that nothing calls."""
    return fn if triton is None else triton.jit(fn)


# The kernels use Triton builtins only (no `tl.sum`, `tl.zeros`, ...): the standard-library helpers are compiled
# functions unless TRITON_INTERPRET=1 was set before Triton itself was imported, which a test process cannot promise.


@_jit
def _add(left, right):
    return left + right


@_jit
def _column_sums(tile):
    """Sum of a (BLOCK_T, BLOCK_D) tile over time."""
    return tl.reduce(tile, 0, _add)


@_jit
def _compose(retain_first, input_first, retain_second, input_second):
    """The affine step h -> a h + b of `first` followed by that of `second` (in scan order)."""
    return retain_first * retain_second, input_first * retain_second + input_second


@_jit
def _write_weights(z, k, m, n, f):
    """log sigmoid(x), sigmoid(-x) (its slope), the shape sigmoid(x) ** n and the write weight (1 - f) * shape, with
    x = k (z - m), elementwise in fp32: the one definition of the gate in the kernels."""
    x = k * (z - m)
    exp_neg_abs = tl.exp(-tl.abs(x))
    log_sigmoid = tl.minimum(x, 0.0) - _log1p(exp_neg_abs)
    sigmoid_neg = tl.where(x >= 0, exp_neg_abs, 1.0) / (1.0 + exp_neg_abs)
    shape = tl.exp(n * log_sigmoid)
    return log_sigmoid, sigmoid_neg, shape, (1.0 - f) * shape


@_jit
def _softplus(x):
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@_jit
def _log1p(x):
    """log(1 + x) for x in [0, 1], without the rounding of 1 + x in fp32 where x is small (below 1e-4 two terms of
    its series are exact to fp32)."""
    return tl.where(x < 1e-4, x * (1.0 - 0.5 * x), tl.log(1.0 + x))


@_jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@_jit
def _load_gate_shape(k_ptr, m_ptr, n_ptr, f_ptr, cols, in_channels, RAW_SHAPE: tl.constexpr):
    """k, m, n and f of a block of channels in fp32. With RAW_SHAPE the pointers hold a layer's stored parameters,
    constrained here as `scan_pmg.constrain_gate_shape` does: k and n through a softplus, f through a sigmoid."""
    k = tl.load(k_ptr + cols, mask=in_channels, other=1.0).to(tl.float32)
    m = tl.load(m_ptr + cols, mask=in_channels, other=0.0).to(tl.float32)
    n = tl.load(n_ptr + cols, mask=in_channels, other=1.0).to(tl.float32)
    f = tl.load(f_ptr + cols, mask=in_channels, other=0.0).to(tl.float32)
    if RAW_SHAPE:
        k = _softplus(k)
        n = _softplus(n)
        f = _sigmoid(f)
    return k, m, n, f


@_jit
def _tile(chunk, where, in_channels, BLOCK_T):
    """Which rows of chunk `chunk`'s tile are steps of the program's segment, `where` = (start, end, batch, length,
    channels, rows, cols) with the segment's steps in [start, end); their token indices, the tile's element offsets
    and which elements exist."""
    start, end, batch, length, channels, rows, cols = where
    steps = chunk * BLOCK_T + rows
    in_sequence = (steps >= start) & (steps < end)
    tokens = batch * length + steps
    offsets = tokens[:, None] * channels + cols[None, :]
    return in_sequence, tokens, offsets, in_sequence[:, None] & in_channels[None, :]


@_jit
def _load_flags(mask_ptr, resets_ptr, tokens, in_sequence, HAS_MASK, HAS_RESETS):
    """Per row of a tile: whether the step is real (in the sequence, not padding) and whether a document starts."""
    keep = in_sequence
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + tokens, mask=in_sequence, other=0) != 0)
    reset = tl.full(in_sequence.shape, False, tl.int1)
    if HAS_RESETS:
        reset = tl.load(resets_ptr + tokens, mask=in_sequence, other=0) != 0
    return keep, reset


@_jit
def _gates(z, keep, reset, k, m, n, f):
    """Gate logits (in fp32) and gates of one tile; rows past the end of the sequence act as padding (identity)."""
    z = z.to(tl.float32)
    log_sigmoid, sigmoid_neg, shape, write = _write_weights(z, k[None, :], m[None, :], n[None, :], f[None, :])
    retain = tl.where(reset[:, None], 0.0, 1.0 - write)
    retain = tl.where(keep[:, None], retain, 1.0)
    write = tl.where(keep[:, None], write, 0.0)
    return z, log_sigmoid, sigmoid_neg, shape, write, retain


@_jit
def _load_tiles(first_ptr, second_ptr, mask_ptr, resets_ptr, chunk, where, in_channels, BLOCK_T, HAS_MASK, HAS_RESETS):
    """Two activation tiles of chunk `chunk` (`_tile`) in their own dtypes, z and v forward or z and dL/dh backward,
    the rows' flags (`_load_flags`), and the tile's offsets and element mask."""
    in_sequence, tokens, offsets, valid = _tile(chunk, where, in_channels, BLOCK_T)
    first = tl.load(first_ptr + offsets, mask=valid, other=0.0)
    second = tl.load(second_ptr + offsets, mask=valid, other=0.0)
    keep, reset = _load_flags(mask_ptr, resets_ptr, tokens, in_sequence, HAS_MASK, HAS_RESETS)
    return first, second, keep, reset, offsets, valid


@_jit
def _load_backward_tile(sources, chunk, where, in_channels, BLOCK_T, HAS_MASK, HAS_RESETS, LOAD_VALUES):
    """What the backward pass reads of one tile from `sources` = (z, v, mask, resets, checkpoints, dL/dh pointers,
    num_chunks): z, dL/dh, the rows' flags and, unless it only sums the segment up (not LOAD_VALUES), v and the fp32
    state entering the chunk (scalars 0 otherwise)."""
    z_ptr, v_ptr, mask_ptr, resets_ptr, checkpoints_ptr, grad_states_ptr, num_chunks = sources
    z, grad_states, keep, reset, offsets, valid = _load_tiles(
        z_ptr, grad_states_ptr, mask_ptr, resets_ptr, chunk, where, in_channels, BLOCK_T, HAS_MASK, HAS_RESETS
    )
    v = 0.0
    entering = 0.0
    if LOAD_VALUES:
        v = tl.load(v_ptr + offsets, mask=valid, other=0.0)
        # chunk -1 (prefetched ahead of the first) reads chunk 0's checkpoint instead, which is never used
        _, _, batch, _, channels, _, cols = where
        checkpoint = checkpoints_ptr + (batch * num_chunks + tl.maximum(chunk, 0)) * channels + cols
        entering = tl.load(checkpoint, mask=in_channels, other=0.0)
    return z, grad_states, keep, reset, v, entering


@_jit
def _row(tile, rows, index):
    """Row `index` of a (BLOCK_T, BLOCK_D) tile as a (BLOCK_D,) vector."""
    return _column_sums(tl.where(rows[:, None] == index, tile, 0.0))


@_jit
def _carried_over_segments(
    value, summaries_ptr, summary_stride, batch, num_segments, channels, cols, in_channels, first, count, direction
):
    """`value` carried through `count` segments' summaries, segment `first` first and then `direction` (+1 or -1):
    value -> decay * value + local for each, the summaries (local, decay) of segment s at
    (batch * num_segments + s) * channels and that plus `summary_stride`."""
    for step in range(count):
        offsets = (batch * num_segments + first + direction * step) * channels + cols
        local = tl.load(summaries_ptr + offsets, mask=in_channels, other=0.0)
        decay = tl.load(summaries_ptr + summary_stride + offsets, mask=in_channels, other=1.0)
        value = decay * value + local
    return value


@_jit
def _pmg_scan_forward_kernel(
    z_ptr,
    v_ptr,
    mask_ptr,
    resets_ptr,
    k_ptr,
    m_ptr,
    n_ptr,
    f_ptr,
    initial_ptr,
    states_ptr,
    final_ptr,
    write_ptr,
    checkpoints_ptr,
    batch_size,
    length,
    channels,
    summaries_ptr,
    num_chunks,
    chunks_per_segment,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_RESETS: tl.constexpr,
    HAS_INITIAL: tl.constexpr,
    OUTPUT_WRITE: tl.constexpr,
    RAW_SHAPE: tl.constexpr,
    SUMMARY: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)
    segment = tl.program_id(2)
    num_segments = tl.num_programs(2)
    summary_stride = batch_size * num_segments * channels
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_channels = cols < channels
    rows = tl.arange(0, BLOCK_T)
    k, m, n, f = _load_gate_shape(k_ptr, m_ptr, n_ptr, f_ptr, cols, in_channels, RAW_SHAPE)
    # a summary pass scans its segment from zero, keeping the product of its retentions; the states pass enters each
    # segment with the initial state carried through the earlier segments' summaries
    state = tl.full([BLOCK_D], 0.0, tl.float32)
    decay = tl.full([BLOCK_D], 1.0, tl.float32)
    if not SUMMARY:
        if HAS_INITIAL:
            state = tl.load(initial_ptr + batch * channels + cols, mask=in_channels, other=0.0)
        state = _carried_over_segments(
            state, summaries_ptr, summary_stride, batch, num_segments, channels, cols, in_channels, 0, segment, 1
        )
    first_chunk = segment * chunks_per_segment
    end_chunk = tl.minimum(first_chunk + chunks_per_segment, num_chunks)
    # the tensors a tile is read from, and where: the segment's steps (a tile beyond them loads nothing)
    sources = (z_ptr, v_ptr, mask_ptr, resets_ptr)
    where = (first_chunk * BLOCK_T, tl.minimum(end_chunk * BLOCK_T, length), batch, length, channels, rows, cols)
    if PREFETCH:  # each chunk's loads are issued a chunk ahead, so their latency hides behind the chunk before
        # (discarded values get names: Triton carries variables across the loop, `_` included)
        z_next, v_next, keep_next, reset_next, _next_offsets, _next_valid = _load_tiles(
            *sources, first_chunk, where, in_channels, BLOCK_T, HAS_MASK, HAS_RESETS
        )
    for chunk in range(first_chunk, end_chunk):
        if PREFETCH:
            z, v, keep, reset = z_next, v_next, keep_next, reset_next
            z_next, v_next, keep_next, reset_next, _next_offsets, _next_valid = _load_tiles(
                *sources, chunk + 1, where, in_channels, BLOCK_T, HAS_MASK, HAS_RESETS
            )
        else:
            z, v, keep, reset, _, _ = _load_tiles(*sources, chunk, where, in_channels, BLOCK_T, HAS_MASK, HAS_RESETS)
        _, _, offsets, valid = _tile(chunk, where, in_channels, BLOCK_T)
        _, _, _, _, write, retain = _gates(z, keep, reset, k, m, n, f)
        carried, local = tl.associative_scan((retain, write * v.to(tl.float32)), axis=0, combine_fn=_compose)
        states = local + carried * state[None, :]
        if SUMMARY:
            decay *= _row(carried, rows, BLOCK_T - 1)
        else:
            tl.store(checkpoints_ptr + (batch * num_chunks + chunk) * channels + cols, state, mask=in_channels)
            tl.store(states_ptr + offsets, states.to(states_ptr.dtype.element_ty), mask=valid)
            if OUTPUT_WRITE:
                tl.store(write_ptr + offsets, write, mask=valid)
        state = _row(states, rows, BLOCK_T - 1)  # steps past the end are identities: this is the last real state
    if SUMMARY:
        summary = summaries_ptr + (batch * num_segments + segment) * channels + cols
        tl.store(summary, state, mask=in_channels)
        tl.store(summary + summary_stride, decay, mask=in_channels)
    else:
        if segment == num_segments - 1:
            tl.store(final_ptr + batch * channels + cols, state, mask=in_channels)


@_jit
def _pmg_scan_backward_kernel(
    z_ptr,
    v_ptr,
    mask_ptr,
    resets_ptr,
    k_ptr,
    m_ptr,
    n_ptr,
    f_ptr,
    checkpoints_ptr,
    grad_states_ptr,
    grad_final_ptr,
    grad_write_ptr,
    grad_z_ptr,
    grad_v_ptr,
    grad_initial_ptr,
    grad_params_ptr,
    batch_size,
    length,
    channels,
    summaries_ptr,
    num_chunks,
    chunks_per_segment,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_RESETS: tl.constexpr,
    HAS_GRAD_FINAL: tl.constexpr,
    HAS_GRAD_WRITE: tl.constexpr,
    RAW_SHAPE: tl.constexpr,
    SUMMARY: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)
    segment = tl.program_id(2)
    num_segments = tl.num_programs(2)
    summary_stride = batch_size * num_segments * channels
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_channels = cols < channels
    rows = tl.arange(0, BLOCK_T)
    k, m, n, f = _load_gate_shape(k_ptr, m_ptr, n_ptr, f_ptr, cols, in_channels, RAW_SHAPE)
    # dL/dh_{t-1} through the recurrence alone (a_t dL/dh_t). A summary pass runs its segment from zero, keeping the
    # product of its retentions; the gradient pass starts from the final state's gradient carried back through the
    # later segments' summaries
    grad_carry = tl.full([BLOCK_D], 0.0, tl.float32)
    decay = tl.full([BLOCK_D], 1.0, tl.float32)
    if not SUMMARY:
        if HAS_GRAD_FINAL:
            grad_carry = tl.load(grad_final_ptr + batch * channels + cols, mask=in_channels, other=0.0)
        grad_carry = _carried_over_segments(
            grad_carry,
            summaries_ptr,
            summary_stride,
            batch,
            num_segments,
            channels,
            cols,
            in_channels,
            num_segments - 1,
            num_segments - 1 - segment,
            -1,
        )
    # per-channel parameter gradients, summed over chunks elementwise and over time once at the end
    grad_k = tl.full([BLOCK_T, BLOCK_D], 0.0, tl.float32)
    grad_x_sum = tl.full([BLOCK_T, BLOCK_D], 0.0, tl.float32)
    grad_n = tl.full([BLOCK_T, BLOCK_D], 0.0, tl.float32)
    grad_shape = tl.full([BLOCK_T, BLOCK_D], 0.0, tl.float32)
    previous_row = tl.maximum(rows - 1, 0)[:, None] + tl.full([BLOCK_T, BLOCK_D], 0, tl.int32)
    next_row = tl.minimum(rows + 1, BLOCK_T - 1)[:, None] + tl.full([BLOCK_T, BLOCK_D], 0, tl.int32)
    first_chunk = segment * chunks_per_segment
    end_chunk = tl.minimum(first_chunk + chunks_per_segment, num_chunks)
    sources = (z_ptr, v_ptr, mask_ptr, resets_ptr, checkpoints_ptr, grad_states_ptr, num_chunks)
    where = (first_chunk * BLOCK_T, tl.minimum(end_chunk * BLOCK_T, length), batch, length, channels, rows, cols)
    if PREFETCH:  # as forward, a chunk ahead: here the chunk before
        z_next, grad_next, keep_next, reset_next, v_next, entering_next = _load_backward_tile(
            sources, end_chunk - 1, where, in_channels, BLOCK_T, HAS_MASK, HAS_RESETS, not SUMMARY
        )
    for reverse_chunk in range(end_chunk - first_chunk):
        chunk = end_chunk - 1 - reverse_chunk
        if PREFETCH:
            z, grad_states, keep, reset, v, entering = z_next, grad_next, keep_next, reset_next, v_next, entering_next
            z_next, grad_next, keep_next, reset_next, v_next, entering_next = _load_backward_tile(
                sources, chunk - 1, where, in_channels, BLOCK_T, HAS_MASK, HAS_RESETS, not SUMMARY
            )
        else:
            z, grad_states, keep, reset, v, entering = _load_backward_tile(
                sources, chunk, where, in_channels, BLOCK_T, HAS_MASK, HAS_RESETS, not SUMMARY
            )
        _, _, offsets, valid = _tile(chunk, where, in_channels, BLOCK_T)
        z, log_sigmoid, sigmoid_neg, shape, write, retain = _gates(z, keep, reset, k, m, n, f)

        # dL/dh_t = grad_t + a_{t+1} dL/dh_{t+1}: a reverse scan, seeded by the gradient flowing in from later chunks
        grad_states = grad_states.to(tl.float32)
        next_retain = tl.where(rows[:, None] == BLOCK_T - 1, 1.0, tl.gather(retain, next_row, axis=0))
        carried, local = tl.associative_scan((next_retain, grad_states), axis=0, combine_fn=_compose, reverse=True)
        grad_h = local + carried * grad_carry[None, :]
        grad_carry = _row(retain * grad_h, rows, 0)
        if SUMMARY:
            decay *= _row(retain * carried, rows, 0)  # the product of the chunk's retentions
        else:
            # recompute the fp32 states h_{t-1} of this chunk from the checkpoint, exactly as the forward pass did
            v = v.to(tl.float32)
            carried, local = tl.associative_scan((retain, write * v), axis=0, combine_fn=_compose)
            states = local + carried * entering[None, :]
            previous = tl.where(rows[:, None] == 0, entering[None, :], tl.gather(states, previous_row, axis=0))

            tl.store(grad_v_ptr + offsets, (grad_h * write).to(grad_v_ptr.dtype.element_ty), mask=valid)
            # dL/dw_t: through w_t v_t, and through a_t = 1 - w_t except where a reset pins a_t to 0
            grad_write = grad_h * (v - tl.where(reset[:, None], 0.0, previous))
            if HAS_GRAD_WRITE:
                grad_write += tl.load(grad_write_ptr + offsets, mask=valid, other=0.0)
            grad_write = tl.where(keep[:, None], grad_write, 0.0)  # padding has constant gates
            grad_x = grad_write * write * n[None, :] * sigmoid_neg  # dL/d(k (z - m))
            tl.store(grad_z_ptr + offsets, (grad_x * k[None, :]).to(grad_z_ptr.dtype.element_ty), mask=valid)
            grad_k += grad_x * (z - m[None, :])
            grad_x_sum += grad_x
            grad_n += grad_write * write * log_sigmoid
            grad_shape += grad_write * shape

    if SUMMARY:
        summary = summaries_ptr + (batch * num_segments + segment) * channels + cols
        tl.store(summary, grad_carry, mask=in_channels)
        tl.store(summary + summary_stride, decay, mask=in_channels)
    else:
        if segment == 0:
            tl.store(grad_initial_ptr + batch * channels + cols, grad_carry, mask=in_channels)
        # one (B, D) partial per parameter and segment, summed on the host
        partials = grad_params_ptr + (segment * batch_size + batch) * channels + cols
        parameter_stride = num_segments * batch_size * channels
        sum_k = _column_sums(grad_k)
        sum_n = _column_sums(grad_n)
        sum_f = -_column_sums(grad_shape)  # dw/df = -shape
        if RAW_SHAPE:  # on to the stored parameters: a softplus's slope is sigmoid(raw), a sigmoid's f (1 - f)
            sum_k *= _sigmoid(tl.load(k_ptr + cols, mask=in_channels, other=0.0))
            sum_n *= _sigmoid(tl.load(n_ptr + cols, mask=in_channels, other=0.0))
            sum_f *= f * (1.0 - f)
        tl.store(partials, sum_k, mask=in_channels)
        tl.store(partials + parameter_stride, -k * _column_sums(grad_x_sum), mask=in_channels)  # dx/dm = -k
        tl.store(partials + 2 * parameter_stride, sum_n, mask=in_channels)
        tl.store(partials + 3 * parameter_stride, sum_f, mask=in_channels)


# Under torch.compile the kernels run inside two custom operators: torch.compile then treats each launch as one opaque
# call with known output shapes (the fake implementations below) instead of tracing into Triton, and autograd links
# them. In eager mode the same functions run without the operators' dispatch (`operator_with_eager_path`). Each copy
# of this module (pmg's own, or the copy saved with a checkpoint for trust_remote_code, maybe of another version)
# registers its operators in a namespace of its own, so loading one never replaces the other's kernels.
_NAMESPACE = "".join(character if character.isalnum() else "_" for character in __name__)


def cdiv(numerator: int, denominator: int) -> int:
    """Ceiling division on the host: `triton.cdiv` is a constexpr function, whose calls from Python cost microseconds
    a launch (a decoding step makes one per layer)."""
    return -(-numerator // denominator)


def next_power_of_2(number: int) -> int:
    """The smallest power of two >= number (>= 1), on the host, as `cdiv` replaces Triton's own. Shifts and ors
    only: under torch.compile a symbolic length stays symbolic (int.bit_length would fix the graph to one length)."""
    number -= 1
    for shift in (1, 2, 4, 8, 16, 32):
        number |= number >> shift
    return number + 1


def runs_eagerly() -> bool:
    """Whether a call is plain eager PyTorch, whose kernels can skip the custom operators' dispatch: not under
    torch.compile, `torch.jit.trace`, or a dispatch mode (`make_fx`, fake tensors), which must see the operators."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None)


def operator_with_eager_path(
    name: str,
    operator: Callable,
    run_forward: Callable,
    run_backward: Callable,
    setup_context: Callable,
    backward: Callable,
    materialize_grads: bool = True,
) -> Callable:
    """`operator` (a custom operator whose body is `run_forward`) with autograd: `backward(ctx, *grads)` calls the
    backward operator by default and `setup_context` saves what it needs. The returned function calls the operator
    where torch.compile, tracing or a dispatch mode must see it; in plain eager mode it runs `run_forward` and
    `run_backward` through an autograd.Function instead, as the operators' dispatch costs host time (a scan forward +
    backward with the kernels stubbed: 258 against 140 us on CPU) and a training step on an H100 waits on the host.
    There, without `materialize_grads`, `backward` gets None rather than zeros for the gradients of outputs that
    nothing used (under torch.compile it always gets zeros). The autograd.Function is called `name`, so that
    profiles tell its rows (NAME, NAMEBackward) apart."""
    operator.register_autograd(backward, setup_context=setup_context)

    def eager_forward(ctx, *inputs):  # ctx here: with a setup_context method, `apply` runs inspect.signature each call
        ctx.set_materialize_grads(materialize_grads)
        outputs = run_forward(*inputs)
        setup_context(ctx, inputs, outputs)
        return outputs

    @once_differentiable  # kernels have no second derivative: raise where one is asked for, not return zeros
    def eager_backward(ctx, *grads):
        return backward(ctx, *grads, run_backward=run_backward)

    methods = {"forward": staticmethod(eager_forward), "backward": staticmethod(eager_backward)}
    eager = type(name, (torch.autograd.Function,), methods)

    def call(*inputs):
        return eager.apply(*inputs) if runs_eagerly() else operator(*inputs)

    return call


def contiguous(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The tensors in the dense row-major layout the kernels index (None stays None): inductor may hand a custom
    operator other strides, e.g. rows padded to an aligned length."""
    return tuple(None if tensor is None else tensor.contiguous() for tensor in tensors)


def segments_for(programs: int, num_chunks: int, device: torch.device, requested: int | None = None) -> int:
    """How many segments of the sequence the scan runs side by side: `requested`, else as many as bring the
    `programs` of one segment (batch rows x channel blocks) up to PROGRAMS_PER_MULTIPROCESSOR per multiprocessor of
    `device`, with segments of at least MIN_CHUNKS_PER_SEGMENT chunks. Never more than the chunks, and no segment
    empty."""
    if requested is not None and requested < 1:
        raise ValueError(f"segments must be at least 1, got {requested}.")
    if programs == 0 or num_chunks == 0:  # an empty batch, width or sequence: nothing to cut
        return 1
    if requested is None:
        wanted = cdiv(PROGRAMS_PER_MULTIPROCESSOR * _multiprocessors(device), programs)
        requested = max(1, min(wanted, num_chunks // MIN_CHUNKS_PER_SEGMENT))
    return cdiv(num_chunks, cdiv(num_chunks, min(requested, num_chunks)))


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessor count (1 for CPU tensors in the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _segment_layout(
    z: torch.Tensor, num_chunks: int, block_d: int, requested: int | None
) -> tuple[tuple[int, int], int, torch.Tensor]:
    """The grid of one segment (channel blocks, batch rows), the number of segments, and the buffer of their
    summaries (2, B, segments, D) in fp32 (empty for one segment, which needs none)."""
    batch, _, channels = z.shape
    grid = (cdiv(channels, block_d), batch)
    segments = segments_for(grid[0] * batch, num_chunks, z.device, requested)
    summaries = z.new_empty((2, batch, segments, channels) if segments > 1 else (0,), dtype=torch.float32)
    return grid, segments, summaries


def _launch_segments(kernel, grid: tuple[int, int], segments: int, num_chunks: int, summaries, *arguments, **flags):
    """Launch `kernel` over `segments` segments of the chunks: with more than one, first its summary pass (each
    segment from zero: its final value and the product of its retentions, into `summaries`), then the main pass,
    which carries the sequence's state across the segments before it through those summaries."""
    chunks_per_segment = cdiv(num_chunks, segments)
    with _on_device_of(summaries):
        for summary in (True, False) if segments > 1 else (False,):
            kernel[(*grid, segments)](
                *arguments,
                summaries,
                num_chunks,
                chunks_per_segment,
                **flags,
                SUMMARY=summary,
                PREFETCH=PREFETCH,
                num_warps=NUM_WARPS,
            )


def _gate_arguments(z, v, mask, resets, sharpness, shift, asymmetry, floor) -> tuple[torch.Tensor, ...]:
    """The arguments both scan kernels open with: z, v, the masks (z in the place of an absent one, never read) and
    the gate shape."""
    return z, v, z if mask is None else mask, z if resets is None else resets, sharpness, shift, asymmetry, floor


def _gate_flags(mask, resets, raw_shape: bool, block_t: int, block_d: int) -> dict:
    """The compile-time flags both scan kernels take: tile sizes, which masks exist, how the gate shape is given."""
    return dict(
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        HAS_MASK=mask is not None,
        HAS_RESETS=resets is not None,
        RAW_SHAPE=raw_shape,
    )


def _run_scan_forward(
    z: torch.Tensor,
    v: torch.Tensor,
    sharpness: torch.Tensor,
    shift: torch.Tensor,
    asymmetry: torch.Tensor,
    floor: torch.Tensor,
    initial_state: torch.Tensor | None,
    mask: torch.Tensor | None,
    resets: torch.Tensor | None,
    return_write: bool,
    raw_shape: bool,
    block_t: int,
    block_d: int,
    segments: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """States, final state, write weights (empty unless `return_write`) and the per-chunk fp32 checkpoints."""
    z, v, sharpness, shift, asymmetry, floor, initial_state, mask, resets = contiguous(
        z, v, sharpness, shift, asymmetry, floor, initial_state, mask, resets
    )
    states, final, write, checkpoints = _allocate_forward_outputs(z, v, return_write, block_t)
    batch, length, channels = z.shape
    num_chunks = checkpoints.shape[1]
    grid, segments, summaries = _segment_layout(z, num_chunks, block_d, segments)
    _launch_segments(
        _pmg_scan_forward_kernel,
        grid,
        segments,
        num_chunks,
        summaries,
        *_gate_arguments(z, v, mask, resets, sharpness, shift, asymmetry, floor),
        z if initial_state is None else initial_state,
        states,
        final,
        write if return_write else z,
        checkpoints,
        batch,
        length,
        channels,
        **_gate_flags(mask, resets, raw_shape, block_t, block_d),
        HAS_INITIAL=initial_state is not None,
        OUTPUT_WRITE=return_write,
    )
    return states, final, write, checkpoints


_scan_forward = torch.library.custom_op(f"{_NAMESPACE}::triton_scan_forward", _run_scan_forward, mutates_args=())


def _allocate_forward_outputs(
    z: torch.Tensor, v: torch.Tensor, return_write: bool, block_t: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, length, channels = z.shape
    return (
        v.new_empty(v.shape),
        z.new_empty((batch, channels), dtype=torch.float32),
        z.new_empty((batch, length, channels) if return_write else (0,), dtype=torch.float32),
        z.new_empty((batch, cdiv(length, block_t), channels), dtype=torch.float32),
    )


@_scan_forward.register_fake
def _scan_forward_fake(
    z,
    v,
    sharpness,
    shift,
    asymmetry,
    floor,
    initial_state,
    mask,
    resets,
    return_write,
    raw_shape,
    block_t,
    block_d,
    segments,
):
    """The forward outputs' shapes and dtypes, without running the kernel (what torch.compile traces with)."""
    return _allocate_forward_outputs(z, v, return_write, block_t)


def _run_scan_backward(
    z: torch.Tensor,
    v: torch.Tensor,
    sharpness: torch.Tensor,
    shift: torch.Tensor,
    asymmetry: torch.Tensor,
    floor: torch.Tensor,
    mask: torch.Tensor | None,
    resets: torch.Tensor | None,
    checkpoints: torch.Tensor,
    grad_states: torch.Tensor,
    grad_final: torch.Tensor | None,
    grad_write: torch.Tensor | None,
    raw_shape: bool,
    block_t: int,
    block_d: int,
    segments: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of z, v and the initial state, and of k, m, n, f (4, D) (of the stored parameters with
    `raw_shape`), from the checkpoints. A None gradient of the final state or write weights counts as zeros."""
    z, v, sharpness, shift, asymmetry, floor, mask, resets, checkpoints = contiguous(
        z, v, sharpness, shift, asymmetry, floor, mask, resets, checkpoints
    )
    grad_states, grad_final, grad_write = contiguous(grad_states, grad_final, grad_write)
    batch, length, channels = z.shape
    num_chunks = checkpoints.shape[1]
    grid, segments, summaries = _segment_layout(z, num_chunks, block_d, segments)
    grad_z, grad_v, grad_initial = _allocate_backward_outputs(z, v)
    grad_params = z.new_empty((4, segments * batch, channels), dtype=torch.float32)  # summed over dim 1 below
    _launch_segments(
        _pmg_scan_backward_kernel,
        grid,
        segments,
        num_chunks,
        summaries,
        *_gate_arguments(z, v, mask, resets, sharpness, shift, asymmetry, floor),
        checkpoints,
        grad_states,
        z if grad_final is None else grad_final,
        z if grad_write is None else grad_write,
        grad_z,
        grad_v,
        grad_initial,
        grad_params,
        batch,
        length,
        channels,
        **_gate_flags(mask, resets, raw_shape, block_t, block_d),
        HAS_GRAD_FINAL=grad_final is not None,
        HAS_GRAD_WRITE=grad_write is not None,
    )
    return grad_z, grad_v, grad_initial, grad_params.sum(dim=1)


_scan_backward = torch.library.custom_op(f"{_NAMESPACE}::triton_scan_backward", _run_scan_backward, mutates_args=())


def _allocate_backward_outputs(z: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of z, v and the initial state."""
    batch, _, channels = z.shape
    return z.new_empty(z.shape), v.new_empty(v.shape), z.new_empty((batch, channels), dtype=torch.float32)


@_scan_backward.register_fake
def _scan_backward_fake(
    z, v, sharpness, shift, asymmetry, floor, mask, resets, checkpoints, grad_states, grad_final, grad_write, *tiles
):
    """The backward outputs' shapes and dtypes, without running the kernel."""
    return *_allocate_backward_outputs(z, v), z.new_empty((4, z.shape[2]), dtype=torch.float32)


def _save_for_backward(ctx, inputs: tuple, output: tuple) -> None:
    """Keep z, v, the gate parameters, masks and the checkpoints; never the states or the gates."""
    z, v, sharpness, shift, asymmetry, floor, initial_state, mask, resets, return_write, raw_shape, *tiles = inputs
    ctx.save_for_backward(z, v, sharpness, shift, asymmetry, floor, mask, resets, output[3])
    ctx.has_initial_state = initial_state is not None
    ctx.return_write = return_write
    ctx.raw_shape = raw_shape
    ctx.tiles = tiles


def _backward(ctx, grad_states, grad_final, grad_write, grad_checkpoints, run_backward=_scan_backward) -> tuple:
    """The gradients of `_scan_forward`'s inputs, computed by `run_backward`: the backward operator, or in eager mode
    its function itself. In eager mode the gradients of unused outputs arrive as None (no zeros are made for them)."""
    z, v, sharpness, shift, asymmetry, floor, mask, resets, checkpoints = ctx.saved_tensors
    if grad_states is None:  # only the final state reached the loss
        grad_states = torch.zeros_like(v)
    grad_z, grad_v, grad_initial, (grad_k, grad_m, grad_n, grad_f) = run_backward(
        z,
        v,
        sharpness,
        shift,
        asymmetry,
        floor,
        mask,
        resets,
        checkpoints,
        grad_states,
        None if grad_final is None else grad_final.float(),
        grad_write.float() if ctx.return_write and grad_write is not None else None,
        ctx.raw_shape,
        *ctx.tiles,
    )
    grad_initial = grad_initial if ctx.has_initial_state else None
    return grad_z, grad_v, grad_k, grad_m, grad_n, grad_f, grad_initial, *[None] * 7


# the scan's final state, write weights and checkpoints usually reach no loss: no zero gradients are made for them
_scan = operator_with_eager_path(
    "triton_scan",
    _scan_forward,
    _run_scan_forward,
    _run_scan_backward,
    _save_for_backward,
    _backward,
    materialize_grads=False,
)


def triton_pmg_scan(
    z: torch.Tensor,
    v: torch.Tensor,
    sharpness: torch.Tensor,
    shift: torch.Tensor,
    asymmetry: torch.Tensor,
    floor: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    resets: torch.Tensor | None = None,
    return_write: bool = True,
    raw_shape: bool = False,
    block_t: int = BLOCK_T,
    block_d: int = BLOCK_D,
    segments: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`pmg_scan` with the fused kernels: same arguments, outputs, dtypes and gradients. With `raw_shape` the
    kernels constrain the gate shape themselves (three launches fewer each way than softplus and sigmoid calls).

    Returns states (B, T, D) in v's dtype, the final state (B, D) in fp32 and the write weights (B, T, D) in fp32,
    or None when `return_write` is False (the forward pass then writes nothing but the states). `block_t` and
    `block_d` (powers of two) are the tile sizes, `segments` the number of stretches of the sequence scanned side by
    side (None: enough to fill the GPU, see `segments_for`); they only matter for speed. Shapes are checked by
    `pmg_scan`, the entry point.
    """
    check_runs_here(z, 'scan_impl="triton"', hint='; use "auto" or "chunked" otherwise')
    length, channels = z.shape[1:]
    # no tile larger than the problem needs (a decoding step is one row), none under 16: tiny tiles are odd corners
    tiles = (
        min(block_t, max(16, next_power_of_2(length))),
        min(block_d, max(16, next_power_of_2(channels))),
    )
    states, final, write, _ = _scan(
        z,
        v,
        *(parameter.float() for parameter in (sharpness, shift, asymmetry, floor)),
        None if initial_state is None else initial_state.float(),
        None if mask is None else mask.to(torch.uint8),
        None if resets is None else resets.to(torch.uint8),
        return_write,
        raw_shape,
        *tiles,
        segments,
    )
    return states, final, write if return_write else None
