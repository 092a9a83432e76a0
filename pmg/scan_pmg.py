"""The PMG scan: parametric gates and the gated linear recurrence, with one entry point for every caller.

    write  w_t = (1 - f) * sigmoid(k * (z_t - m)) ** n        (parametric gate shape, memory floor f)
    retain a_t = 1 - w_t = f + (1 - f) * (1 - g_t)
    state  h_t = w_t * v_t + a_t * h_{t-1}

`pmg_scan` owns the dtype policy (gates and state in fp32, fp64 for fp64 inputs; output cast back), padding masks
(a masked step leaves the state untouched), document resets (the state is cleared where a new document starts) and the
choice of backend:

- "recurrent": a step-by-step loop, the reference and the decoding path (T = 1).
- "chunked": a two-level scan, inside chunks and then across chunk end-states, so no step ever loops over all T
  tokens. Its backward pass is the same scan run in reverse, so training stores only the inputs and the states.
- "triton": fused Triton kernels (`pmg.triton_scan`) that compute the gates inside the scan and recompute them in the
  backward pass; CUDA only (or CPU under TRITON_INTERPRET=1).
- "auto": "recurrent" for a single step; "triton" for sequences on CUDA when Triton is installed (verified compiled on
  an H100, where it trains a 104M-parameter model 1.6x faster than "chunked"); "chunked" otherwise, for fp64 and
  under `torch.compile`.

The chunked scan multiplies retentions in the linear domain (inside chunks a loop over positions on the CPU and
Hillis-Steele doubling elsewhere, see `_inclusive_scan_`; across chunks always doubling). Retentions lie in [0, 1],
so products can only underflow towards the exact limit 0: there is no exp(-cumsum) to overflow at long T and no
cancellation between large cumulative log-sums.
"""

import functools
import importlib.util

import torch
import torch.nn.functional as F

SCAN_BACKENDS = ("auto", "chunked", "recurrent", "triton")
RECURRENCE_BACKENDS = ("auto", "chunked", "recurrent")  # "triton" fuses the gates, so it lives in `pmg_scan` only


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
    z: torch.Tensor, sharpness: torch.Tensor, shift: torch.Tensor, asymmetry: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z - m, log sigmoid(k (z - m)) and the gate shape sigmoid(k (z - m)) ** n, in at least fp32."""
    centred = z.to(torch.promote_types(z.dtype, torch.float32)) - shift
    log_sigmoid = F.logsigmoid(centred * sharpness)
    return centred, log_sigmoid, (log_sigmoid * asymmetry).exp_()


def _gated_inputs(
    z: torch.Tensor,
    v: torch.Tensor,
    sharpness: torch.Tensor,
    shift: torch.Tensor,
    asymmetry: torch.Tensor,
    floor: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w, 1 - w, w * v) without masks."""
    _, _, shape = _gate_terms(z, sharpness, shift, asymmetry)
    write = shape.mul_(1.0 - floor)
    return write, 1.0 - write, write * v.to(write.dtype)


class _GatedInputs(torch.autograd.Function):
    """`_gated_inputs` with a hand-written backward pass. Autograd through the formula keeps seven activation-sized
    tensors per layer (z - m, k (z - m), the log-sigmoid and its buffer, the shape, w and v); this keeps z and v and
    recomputes the rest in the backward pass: on CPU a training step's peak memory fell by 10% at the same speed."""

    @staticmethod
    def forward(ctx, z, v, sharpness, shift, asymmetry, floor):
        ctx.save_for_backward(z, v, sharpness, shift, asymmetry, floor)
        return _gated_inputs(z, v, sharpness, shift, asymmetry, floor)

    @staticmethod
    def backward(ctx, grad_write, grad_retain, grad_inputs):
        z, v, sharpness, shift, asymmetry, floor = ctx.saved_tensors
        centred, log_sigmoid, shape = _gate_terms(z, sharpness, shift, asymmetry)
        over_batch_and_time = tuple(range(z.dim() - 1))
        open_fraction = 1.0 - floor  # w = (1 - f) * shape
        grad_v = grad_inputs * shape * open_fraction
        grad = torch.addcmul(grad_write, grad_inputs, v.to(shape.dtype)).sub_(grad_retain)  # dL/dw
        grad_floor = -(grad * shape).sum(over_batch_and_time)
        grad.mul_(shape).mul_(open_fraction)  # dL/d(n log sigmoid)
        grad_asymmetry = (grad * log_sigmoid).sum(over_batch_and_time)
        # dL/d(k (z - m)), with d log sigmoid(x) / dx = sigmoid(-x)
        grad.mul_(asymmetry).mul_(torch.sigmoid(centred * -sharpness))
        grad_sharpness = (grad * centred).sum(over_batch_and_time)
        grad_z = grad.mul_(sharpness)
        grad_shift = -grad_z.sum(over_batch_and_time)
        return (
            grad_z.to(z.dtype),
            grad_v.to(v.dtype),
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run the PMG memory over a sequence.

    Args:
        z: gate logits (B, T, D). v: candidate values (B, T, D).
        sharpness, shift, asymmetry, floor: gate shape and memory floor, (D,) each.
        initial_state: state before the first step (B, D), zero if None.
        mask, resets: (B, T) booleans, see `pmg_gates`.
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
    if impl == "auto" and _auto_picks_triton(z, v):
        impl = "triton"
    if impl == "triton":
        from .triton_scan import triton_pmg_scan

        return triton_pmg_scan(
            z, v, sharpness, shift, asymmetry, floor, initial_state, mask, resets, return_write=return_write
        )
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
    checks = [(name, tensor, (channels,)) for name, tensor in channel_parameters.items()]
    checks += [("initial_state", initial_state, (batch, channels)), ("mask", mask, (batch, length))]
    checks += [("resets", resets, (batch, length))]
    for name, tensor, shape in checks:
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} must have shape {shape} for z of shape {tuple(z.shape)}, got {tuple(tensor.shape)}."
            )


@functools.cache
def _triton_installed() -> bool:
    """Whether "auto" may pick the Triton kernels (checked once, without importing Triton)."""
    return importlib.util.find_spec("triton") is not None


def _auto_picks_triton(z: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether "auto" runs the fused kernels: for CUDA sequences in eager mode. fp64 stays on the PyTorch scan (the
    kernels compute in fp32), and so does code under `torch.compile`: inductor fuses the chunked scan with the
    elementwise work around it (on an H200 a compiled 104M model trained at 383k tokens/s against 135k eager). The
    kernels compile too (as custom operators, `scan_impl="triton"`), but that has not been timed on a GPU yet."""
    return (
        z.is_cuda
        and z.shape[1] > 1
        and v.dtype != torch.float64
        and not torch.compiler.is_compiling()
        and _triton_installed()
    )


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
    if impl == "recurrent" or (impl == "auto" and retain.shape[1] == 1):
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


def _inclusive_scan_(retain: torch.Tensor, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan along dim -2: the cumulative products of the retentions and the states from a zero start.
    It may overwrite its arguments (callers pass tensors of their own).

    On the CPU in eager mode, a loop over positions updating the arguments in place: each step is one vectorised
    multiply-add over every other dimension, and each element is touched once (3-8x faster than doubling on 2 cores).
    Elsewhere, recursive doubling: log2(n) out-of-place steps, few launches on a GPU and a graph inductor compiles
    in seconds.
    """
    if inputs.is_cpu and not torch.compiler.is_compiling():
        return _sequential_scan_(retain, inputs)
    return _doubling_scan(retain, inputs)


def _sequential_scan_(retain: torch.Tensor, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_inclusive_scan_` as a loop over positions, in place."""
    for position in range(1, inputs.shape[-2]):
        inputs[..., position, :].addcmul_(retain[..., position, :], inputs[..., position - 1, :])
        retain[..., position, :].mul_(retain[..., position - 1, :])
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


def _chunked_scan(
    retain: torch.Tensor, inputs: torch.Tensor, initial_state: torch.Tensor | None, chunk_size: int
) -> torch.Tensor:
    """Forward two-level scan without autograd: inside chunks, then across chunk end-states."""
    batch, length, channels = inputs.shape
    chunk = min(chunk_size, length)
    padding = -length % chunk
    # new tensors (F.pad copies even when padding is 0), which the in-place scan may overwrite
    retain = F.pad(retain, (0, 0, 0, padding), value=1.0)  # padded steps are identities
    inputs = F.pad(inputs, (0, 0, 0, padding))
    num_chunks = retain.shape[1] // chunk
    retain, inputs = _inclusive_scan_(
        retain.view(batch, num_chunks, chunk, channels), inputs.view(batch, num_chunks, chunk, channels)
    )

    # state at the end of each chunk, then the state entering each chunk
    chunk_retain, chunk_states = retain[:, :, -1], inputs[:, :, -1].clone()
    if initial_state is not None:
        chunk_states[:, 0].addcmul_(chunk_retain[:, 0], initial_state)
    # the number of chunks grows with T (a CPU loop over 15625 chunks of a 10^6-step sequence took 5x longer): doubling
    _, chunk_states = _doubling_scan(chunk_retain, chunk_states)
    start = torch.zeros_like(chunk_states[:, :1]) if initial_state is None else initial_state[:, None]
    entering = torch.cat([start, chunk_states[:, :-1]], dim=1)

    states = inputs + retain * entering[:, :, None]
    return states.view(batch, num_chunks * chunk, channels)[:, :length]


class _ChunkedLinearRecurrence(torch.autograd.Function):
    """Chunked scan whose backward is the reverse scan of the output gradients (it stores a, h and h0 only)."""

    @staticmethod
    def forward(ctx, retain, inputs, initial_state, chunk_size):
        states = _chunked_scan(retain, inputs, initial_state, chunk_size)
        ctx.save_for_backward(retain, states, initial_state)
        ctx.chunk_size = chunk_size
        return states

    @staticmethod
    def backward(ctx, grad_states):
        retain, states, initial_state = ctx.saved_tensors
        # dL/dh_t = grad_t + a_{t+1} dL/dh_{t+1}: the same recurrence, backwards in time
        next_retain = torch.cat([retain[:, 1:], torch.zeros_like(retain[:, :1])], dim=1)
        grad_total = _chunked_scan(
            next_retain.flip(1), grad_states.to(retain.dtype).flip(1), None, ctx.chunk_size
        ).flip(1)
        start = torch.zeros_like(states[:, :1]) if initial_state is None else initial_state[:, None]
        previous_states = torch.cat([start, states[:, :-1]], dim=1)
        grad_retain = grad_total * previous_states
        grad_initial = retain[:, 0] * grad_total[:, 0] if initial_state is not None else None
        return grad_retain, grad_total, grad_initial, None
