"""The PMG scan: parametric gates and the gated linear recurrence, with one entry point for every caller.

    write  w_t = (1 - f) * sigmoid(k * (z_t - m)) ** n        (parametric gate shape, memory floor f)
    retain a_t = 1 - w_t = f + (1 - f) * (1 - g_t)
    state  h_t = w_t * v_t + a_t * h_{t-1}

`pmg_scan` owns the dtype policy (gates and state in fp32, fp64 for fp64 inputs; output cast back), padding masks
(a masked step leaves the state untouched), document resets (the state is cleared where a new document starts) and the
choice of backend:

- "recurrent": a step-by-step loop, the reference; every backend but "triton" takes it for a single step (T = 1).
- "chunked": a two-level scan, inside chunks and then across chunk end-states, so no step ever loops over all T
  tokens. Its backward pass is the same scan run in reverse, so training stores only the inputs and the states.
- "triton": fused Triton kernels (`pmg.triton_scan`) that compute the gates inside the scan and recompute them in the
  backward pass; CUDA only (or CPU under TRITON_INTERPRET=1).
- "auto": "recurrent" for a single step; "triton" for sequences on CUDA when Triton is installed (verified compiled on
  an H100, where it trains a 104M-parameter model 1.6x faster than "chunked"); "chunked" otherwise, for fp64 and
  under `torch.compile`.

In a model, a decoding step (one token, no autograd) on CUDA skips this module: `PMGLayer` runs the padding mask,
short convolution, gates and memory update as one kernel (`pmg.triton_decoding`) for scan_impl "auto" and "triton".

The chunked scan multiplies retentions in the linear domain (inside chunks a loop over positions on the CPU and
Hillis-Steele doubling elsewhere, see `_inclusive_scan_`; across chunks always doubling). Retentions lie in [0, 1],
so products can only underflow towards the exact limit 0: there is no exp(-cumsum) to overflow at long T and no
cancellation between large cumulative log-sums.
"""

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

SCAN_BACKENDS = ("auto", "chunked", "recurrent", "triton")
RECURRENCE_BACKENDS = ("auto", "chunked", "recurrent")  # "triton" fuses the gates, so it lives in `pmg_scan` only


def constrain_gate_shape(
    sharpness_raw: torch.Tensor, shift: torch.Tensor, asymmetry_raw: torch.Tensor, floor_logit: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gate shape (k, m, n, f) in at least fp32 (fp64 parameters stay fp64) from the unconstrained parameters a
    layer stores: k and n through a softplus (> 0), the floor f through a sigmoid (in (0, 1)); the shift m as it is."""
    dtype = torch.promote_types(sharpness_raw.dtype, torch.float32)
    return (
        F.softplus(sharpness_raw.to(dtype)),
        shift.to(dtype),
        F.softplus(asymmetry_raw.to(dtype)),
        torch.sigmoid(floor_logit.to(dtype)),
    )


def pmg_gates(
    z: torch.Tensor,
    v: torch.Tensor,
    sharpness: torch.Tensor,
    shift: torch.Tensor,
    asymmetry: torch.Tensor,
    floor: torch.Tensor,
    mask: torch.Tensor | None = None,
    resets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write weights w, retentions a = 1 - w and gated inputs w * v, shape (B, T, D) each, from gate logits z and
    candidate values v; in fp32, or fp64 for fp64 inputs.

    `sharpness`, `shift`, `asymmetry` (k, m, n) and `floor` (f) are per-channel tensors of shape (D,).
    `mask` (B, T) is True at real tokens: elsewhere w = w * v = 0 and a = 1, so padding never touches the state.
    `resets` (B, T) is True where a new document starts: there a = 0, so the state restarts from zero.
    For the backward pass only z and v are kept and the gates are recomputed (`_GatedInputs`).
    """
    # without autograd (decoding) the plain computation: an autograd Function costs a decoding step ~6% on CPU
    gated_inputs = _GatedInputs.apply if torch.is_grad_enabled() else _gated_inputs
    write, retain, inputs = gated_inputs(z, v, sharpness, shift, asymmetry, floor)
    if resets is not None:
        retain = retain.masked_fill(resets.unsqueeze(-1), 0.0)
    if mask is not None:
        keep = mask.unsqueeze(-1)
        write, inputs = write * keep, inputs * keep
        retain = torch.where(keep, retain, 1.0)
    return write, retain, inputs


def _gate_terms(
    z: torch.Tensor, sharpness: torch.Tensor, shift: torch.Tensor, asymmetry: torch.Tensor, floor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z - m, log sigmoid(k (z - m)) and the write weight w = exp(n log sigmoid(k (z - m)) + log(1 - f)), in at
    least fp32 (the floor folded into the exponent saves a pass over the activations)."""
    centred = z.to(torch.promote_types(z.dtype, torch.float32)) - shift
    log_sigmoid = F.logsigmoid(centred * sharpness)
    return centred, log_sigmoid, torch.addcmul(torch.log1p(-floor), log_sigmoid, asymmetry).exp_()


def _gated_inputs(
    z: torch.Tensor,
    v: torch.Tensor,
    sharpness: torch.Tensor,
    shift: torch.Tensor,
    asymmetry: torch.Tensor,
    floor: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w, 1 - w, w * v) without masks."""
    write = _gate_terms(z, sharpness, shift, asymmetry, floor)[2]
    return write, 1.0 - write, write * v.to(write.dtype)


class _GatedInputs(torch.autograd.Function):
    """`_gated_inputs` with a hand-written backward pass. Autograd through the formula keeps seven activation-sized
    tensors per layer (z - m, k (z - m), the log-sigmoid and its buffer, the shape, w and v); this keeps z and v and
    recomputes the rest in the backward pass: on CPU a training step's peak memory fell by 10% at the same speed."""

    @staticmethod
    def forward(ctx, z, v, sharpness, shift, asymmetry, floor):
        ctx.save_for_backward(z, v, sharpness, shift, asymmetry, floor)
        ctx.set_materialize_grads(False)  # w's gradient is usually None (no gate regulariser): no zeros to add
        return _gated_inputs(z, v, sharpness, shift, asymmetry, floor)

    @staticmethod
    @once_differentiable  # its in-place steps are not differentiable again: a second derivative raises, clearly
    def backward(ctx, grad_write, grad_retain, grad_inputs):
        z, v, sharpness, shift, asymmetry, floor = ctx.saved_tensors
        centred, log_sigmoid, write = _gate_terms(z, sharpness, shift, asymmetry, floor)
        over_batch_and_time = tuple(range(z.dim() - 1))
        # dL/dw (w feeds w * v, 1 - w and, with a gate regulariser, the loss), then times w: the gradient of
        # log w = n log sigmoid(k (z - m)) + log(1 - f)
        grad_log_write = grad_inputs * v.to(write.dtype) if grad_inputs is not None else torch.zeros_like(write)
        if grad_write is not None:
            grad_log_write.add_(grad_write)
        if grad_retain is not None:
            grad_log_write.sub_(grad_retain)
        grad_log_write.mul_(write)
        # d log(1 - f) / df = -1 / (1 - f); where f rounds to 1 in fp32, w = 0 and the sigmoid's slope f (1 - f) that
        # carries this to the floor logit is 0 as well, so the clamp only keeps 0 / 0 out
        minus_open_fraction = (floor - 1.0).clamp(max=-torch.finfo(floor.dtype).tiny)
        grad_floor = grad_log_write.sum(over_batch_and_time).div_(minus_open_fraction)
        grad_asymmetry = (grad_log_write * log_sigmoid).sum(over_batch_and_time)
        # d log sigmoid(x) / dx = sigmoid(-x) = -expm1(log sigmoid(x)); the minus sign goes into the channel factors
        grad_x = torch.expm1(log_sigmoid).mul_(grad_log_write)
        grad_sharpness = (grad_x * centred).sum(over_batch_and_time).mul_(-asymmetry)
        grad_z = grad_x.mul_(-asymmetry * sharpness)
        grad_shift = -grad_z.sum(over_batch_and_time)
        grad_v = None if grad_inputs is None else (grad_inputs * write).to(v.dtype)
        return (
            grad_z.to(z.dtype),
            grad_v,
            grad_sharpness.to(sharpness.dtype),
            grad_shift.to(shift.dtype),
            grad_asymmetry.to(asymmetry.dtype),
            grad_floor.to(floor.dtype),
        )


def pmg_scan(
    z: torch.Tensor,
    v: torch.Tensor,
    sharpness: torch.Tensor,
    shift: torch.Tensor,
    asymmetry: torch.Tensor,
    floor: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    resets: torch.Tensor | None = None,
    impl: str = "auto",
    chunk_size: int = 64,
    return_write: bool = True,
    raw_shape: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run the PMG memory over a sequence.

    Args:
        z: gate logits (B, T, D). v: candidate values (B, T, D).
        sharpness, shift, asymmetry, floor: gate shape and memory floor, (D,) each; with `raw_shape`, the
            unconstrained parameters a layer stores instead (see `constrain_gate_shape`), which the Triton kernels
            constrain themselves, saving the launches of a softplus, a sigmoid and their backward passes.
        initial_state: state before the first step (B, D), zero if None.
        mask, resets: (B, T) booleans, see `pmg_gates` (other dtypes are read as booleans: nonzero is True).
        impl: "auto", "chunked", "recurrent" or "triton". chunk_size: chunk length of the chunked scan.
        return_write: also return the write weights; without them the Triton kernel writes nothing but the states.

    Returns:
        states h (B, T, D) in v's dtype, the final state (B, D) and the write weights w (B, T, D) in fp32 (fp64 for
        fp64 inputs on the PyTorch backends; None for w if `return_write` is False).
    """
    if impl not in SCAN_BACKENDS:
        raise ValueError(f"Unknown scan implementation {impl!r}; expected one of {SCAN_BACKENDS}.")
    _check_shapes(
        z, v, dict(sharpness=sharpness, shift=shift, asymmetry=asymmetry, floor=floor), initial_state, mask, resets
    )
    # every backend reads integer or float masks and resets as booleans, as the Triton kernels do
    mask = mask.bool() if mask is not None else None
    resets = resets.bool() if resets is not None else None
    if z.shape[1] == 0:  # no steps: nothing is written, and the state passes through unchanged
        dtype = torch.promote_types(v.dtype, torch.float32)
        batch, _, channels = v.shape
        final = v.new_zeros((batch, channels), dtype=dtype) if initial_state is None else initial_state.to(dtype)
        return v.new_empty(v.shape), final, v.new_empty(v.shape, dtype=dtype) if return_write else None
    if impl == "auto" and z.shape[1] > 1 and auto_runs_triton(v):
        impl = "triton"
    if impl == "triton":
        from .triton_scan import triton_pmg_scan

        return triton_pmg_scan(
            z, v, sharpness, shift, asymmetry, floor, initial_state, mask, resets, return_write, raw_shape
        )
    if raw_shape:
        sharpness, shift, asymmetry, floor = constrain_gate_shape(sharpness, shift, asymmetry, floor)
    write, retain, inputs = pmg_gates(z, v, sharpness, shift, asymmetry, floor, mask, resets)
    if initial_state is not None:
        initial_state = initial_state.to(inputs.dtype)
    states = linear_recurrence(retain, inputs, initial_state, impl=impl, chunk_size=chunk_size)
    return states.to(v.dtype), states[:, -1], write if return_write else None


def _check_shapes(
    z: torch.Tensor,
    v: torch.Tensor,
    channel_parameters: dict[str, torch.Tensor],
    initial_state: torch.Tensor | None,
    mask: torch.Tensor | None,
    resets: torch.Tensor | None,
) -> None:
    """Name the argument whose shape is wrong, instead of a broadcasting error (or a silent broadcast) deep inside."""
    if z.dim() != 3 or z.shape != v.shape:
        raise ValueError(f"z and v must both be (B, T, D), got {tuple(z.shape)} and {tuple(v.shape)}.")
    batch, length, channels = z.shape
    check_shapes(
        ("z", z),
        **{name: (tensor, (channels,)) for name, tensor in channel_parameters.items()},
        initial_state=(initial_state, (batch, channels)),
        mask=(mask, (batch, length)),
        resets=(resets, (batch, length)),
    )


def check_shapes(reference: tuple[str, torch.Tensor], **expected: tuple[torch.Tensor | None, tuple[int, ...]]) -> None:
    """Name the argument of the wrong shape or device, given as name=(tensor or None, shape), against a named
    reference tensor: a Triton kernel would read out of bounds instead of raising."""
    reference_name, reference_tensor = reference
    device = reference_tensor.device  # once: each `.device` builds an object, and the scan runs this every call
    for name, (tensor, shape) in expected.items():
        if tensor is None:
            continue
        if tensor.shape != shape:
            raise ValueError(
                f"{name} must have shape {shape} for {reference_name} of shape {tuple(reference_tensor.shape)}, "
                f"got {tuple(tensor.shape)}."
            )
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device}, {reference_name} on {device}: one device is needed.")


@functools.cache
def _triton_installed() -> bool:
    """Whether "auto" may pick the Triton kernels (checked once, without importing Triton)."""
    return importlib.util.find_spec("triton") is not None


def auto_runs_triton(v: torch.Tensor) -> bool:
    """Whether "auto" runs PMG's Triton kernels on inputs like `v`: CUDA tensors in eager mode. fp64 stays on
    PyTorch (the kernels compute in fp32), and so does code under `torch.compile`: inductor fuses the chunked scan with
    the elementwise work around it (on an H200 a compiled 104M model trained at 383k tokens/s against 135k eager). The
    scan kernels compile too (as custom operators, `scan_impl="triton"`), but that has not been timed on a GPU yet.
    The scan takes them for sequences (T > 1), `PMGLayer` for its fused decoding step (T = 1)."""
    return v.is_cuda and v.dtype != torch.float64 and not torch.compiler.is_compiling() and _triton_installed()


def linear_recurrence(
    retain: torch.Tensor,
    inputs: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    impl: str = "auto",
    chunk_size: int = 64,
) -> torch.Tensor:
    """h_t = retain_t * h_{t-1} + inputs_t over dim 1 of (B, T, D) fp32 tensors; returns all states (B, T, D)."""
    if impl not in RECURRENCE_BACKENDS:
        raise ValueError(f"Unknown scan implementation {impl!r}; expected one of {RECURRENCE_BACKENDS}.")
    if retain.shape != inputs.shape or retain.dim() != 3:
        raise ValueError(
            f"retain and inputs must both be (B, T, D), got {tuple(retain.shape)} and {tuple(inputs.shape)}."
        )
    if impl == "recurrent" or retain.shape[1] == 1:  # one step is one multiply-add, whatever the backend
        return recurrent_linear_recurrence(retain, inputs, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    return _ChunkedLinearRecurrence.apply(retain, inputs, initial_state, chunk_size)


def recurrent_linear_recurrence(
    retain: torch.Tensor, inputs: torch.Tensor, initial_state: torch.Tensor | None = None
) -> torch.Tensor:
    """Step-by-step reference: one small update per token (and the whole decoding step when T = 1)."""
    state = torch.zeros_like(inputs[:, 0]) if initial_state is None else initial_state
    if inputs.shape[1] == 1:  # a decoding step: one fused multiply-add, no per-step slicing and stacking
        return torch.addcmul(inputs, retain, state.unsqueeze(1))
    states = []
    for t in range(inputs.shape[1]):
        state = retain[:, t] * state + inputs[:, t]
        states.append(state)
    return torch.stack(states, dim=1)


# Elements per position (batch x chunks x channels) from which the CPU loop beats doubling: on 2 cores, 64-step
# chunks, doubling took 0.13-0.28 ms at 256-1024 elements against the loop's 0.50-0.56 ms, 0.50 against 0.60 at 2048,
# then 2.1 against 0.7 at 4096 and 5.3 against 1.4 at 16384 (training at 1 x 4096 x 256 has 16384)
SEQUENTIAL_SCAN_MIN_WIDTH = 2048


def _inclusive_scan_(
    retain: torch.Tensor, inputs: torch.Tensor, reverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan along dim -2: the cumulative products of the retentions and the states from a zero start,
    from the last position to the first if `reverse`. It may overwrite its arguments (callers pass tensors of their
    own).

    On the CPU in eager mode, a loop over positions updating the arguments in place: each step is one vectorised
    multiply-add over every other dimension, and each element is touched once (3-8x faster than doubling on 2 cores
    in training). Elsewhere, and for inputs narrower than `SEQUENTIAL_SCAN_MIN_WIDTH` elements per position (a short
    prompt at batch 1), where the loop's cost is the number of its steps, recursive doubling: log2(n) out-of-place
    steps, few launches on a GPU and a graph inductor compiles in seconds.
    """
    wide = inputs.numel() >= SEQUENTIAL_SCAN_MIN_WIDTH * inputs.shape[-2]
    if inputs.is_cpu and wide and not torch.compiler.is_compiling():
        return _sequential_scan_(retain, inputs, reverse)
    if reverse:
        retain, inputs = _doubling_scan(retain.flip(-2), inputs.flip(-2))
        return retain.flip(-2), inputs.flip(-2)
    return _doubling_scan(retain, inputs)


def _sequential_scan_(
    retain: torch.Tensor, inputs: torch.Tensor, reverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_inclusive_scan_` as a loop over positions, in place."""
    length = inputs.shape[-2]
    for position in range(length - 2, -1, -1) if reverse else range(1, length):
        previous = position + 1 if reverse else position - 1
        inputs[..., position, :].addcmul_(retain[..., position, :], inputs[..., previous, :])
        retain[..., position, :].mul_(retain[..., previous, :])
    return retain, inputs


def _doubling_scan(retain: torch.Tensor, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_inclusive_scan_` by recursive doubling (Hillis-Steele): log2(n) vectorised steps, no loop over positions.

    Each step combines every position with the partial result `offset` positions back; the first `offset` positions
    have none and stay. Out of place (new tensors each step): it compiles in seconds, where in-place updates of views
    made inductor take about 40 s.
    """
    length = retain.shape[-2]
    offset = 1
    while offset < length:
        head, later, earlier = slice(0, offset), slice(offset, length), slice(0, length - offset)
        combined = torch.addcmul(inputs[..., later, :], retain[..., later, :], inputs[..., earlier, :])
        inputs = torch.cat([inputs[..., head, :], combined], dim=-2)
        retain = torch.cat([retain[..., head, :], retain[..., later, :] * retain[..., earlier, :]], dim=-2)
        offset *= 2
    return retain, inputs


def _padded_to_chunks(tensor: torch.Tensor, chunk_size: int, value: float = 0.0) -> torch.Tensor:
    """A new (B, T', D) tensor, T' the next multiple of the chunk length at or above T, padded with `value`.
    It is always a copy (F.pad copies even when there is nothing to pad), which the in-place scan may overwrite."""
    return F.pad(tensor, (0, 0, 0, -tensor.shape[1] % chunk_size), value=value)


def _chunked_scan_(
    retain: torch.Tensor, inputs: torch.Tensor, initial_state: torch.Tensor | None, chunk: int, reverse: bool = False
) -> torch.Tensor:
    """Two-level scan without autograd over (B, T, D) tensors, T a multiple of `chunk`: inside chunks, then across
    chunk end-states. Returns the states; it may overwrite both tensors (callers pass tensors of their own, and on
    the CPU the states are written into `inputs`). With `reverse` the recurrence runs from the last position to the
    first, h_t = a_t h_{t+1} + x_t, and `initial_state` comes after the end."""
    batch, length, channels = inputs.shape
    num_chunks = length // chunk
    retain, inputs = _inclusive_scan_(
        retain.view(batch, num_chunks, chunk, channels), inputs.view(batch, num_chunks, chunk, channels), reverse
    )

    # state at the end of each chunk (in scan order), then the state entering each chunk
    first, last = (-1, 0) if reverse else (0, -1)
    chunk_retain, chunk_states = retain[:, :, last], inputs[:, :, last].clone()
    if initial_state is not None:
        chunk_states[:, first].addcmul_(chunk_retain[:, first], initial_state)
    # the number of chunks grows with T (a CPU loop over 15625 chunks of a 10^6-step sequence took 5x longer): doubling
    if reverse:
        chunk_states = _doubling_scan(chunk_retain.flip(1), chunk_states.flip(1))[1].flip(1)
    else:
        chunk_states = _doubling_scan(chunk_retain, chunk_states)[1]
    start = torch.zeros_like(chunk_states[:, :1]) if initial_state is None else initial_state[:, None]
    entering = torch.cat([chunk_states[:, 1:], start] if reverse else [start, chunk_states[:, :-1]], dim=1)
    return inputs.addcmul_(retain, entering[:, :, None]).view(batch, length, channels)


class _ChunkedLinearRecurrence(torch.autograd.Function):
    """Chunked scan whose backward is the reverse scan of the output gradients (it stores a, h and h0 only)."""

    @staticmethod
    def forward(ctx, retain, inputs, initial_state, chunk_size):
        length = inputs.shape[1]
        chunk = min(chunk_size, length)
        padded_retain = _padded_to_chunks(retain, chunk, value=1.0)  # padded steps are identities
        states = _chunked_scan_(padded_retain, _padded_to_chunks(inputs, chunk), initial_state, chunk)[:, :length]
        ctx.save_for_backward(retain, states, initial_state)
        ctx.chunk = chunk
        return states

    @staticmethod
    def backward(ctx, grad_states):
        retain, states, initial_state = ctx.saved_tensors
        # dL/dh_t = grad_t + a_{t+1} dL/dh_{t+1}: the same recurrence, backwards in time, with the retentions shifted
        # by one (the last one multiplies the zero state after the end, so any value does)
        grad = _padded_to_chunks(grad_states.to(retain.dtype), ctx.chunk)
        next_retain = F.pad(retain[:, 1:], (0, 0, 0, grad.shape[1] - retain.shape[1] + 1), value=1.0)
        grad_total = _chunked_scan_(next_retain, grad, None, ctx.chunk, reverse=True)
        grad_total = grad_total[:, : retain.shape[1]]
        start = torch.zeros_like(states[:, :1]) if initial_state is None else initial_state[:, None]
        grad_retain = grad_total * torch.cat([start, states[:, :-1]], dim=1)  # dL/da_t = dL/dh_t h_{t-1}
        grad_initial = retain[:, 0] * grad_total[:, 0] if initial_state is not None else None
        return grad_retain, grad_total, grad_initial, None
