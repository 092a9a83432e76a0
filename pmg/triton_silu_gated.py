"""x * silu(gate), the SwiGLU product and PMG's output gate, as one Triton kernel each way.

In PyTorch the product is two kernels forward (silu, then the multiply) and four backward (silu again, two products,
silu's backward), each reading and writing whole activations: five activation-sized reads and writes forward and
eleven backward. Here the forward kernel reads x and the gate and writes the product (three); the backward kernel
reads the output gradient, x and the gate and writes both gradients (five), recomputing silu in registers. Computed in
fp32, stored in the inputs' dtypes. Triton is optional; with TRITON_INTERPRET=1 set when this module is imported, the
kernels run on CPU tensors (tests).
"""

import torch

from .triton_scan import _jit, _on_device_of, check_runs_here, tl, triton

# 1024 elements per program and 4 warps: 8 per thread, 16 bytes of bf16 per load
BLOCK = 1024
NUM_WARPS = 4


@_jit
def _sigmoid(x):
    """sigmoid(x) from exp(-|x|), which never overflows."""
    exp_neg_abs = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0, exp_neg_abs) / (1.0 + exp_neg_abs)


@_jit
def _silu_gated_forward_kernel(x_ptr, gate_ptr, output_ptr, size, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < size
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    output = x * gate * _sigmoid(gate)
    tl.store(output_ptr + offsets, output.to(output_ptr.dtype.element_ty), mask=inside)


@_jit
def _silu_gated_backward_kernel(x_ptr, gate_ptr, grad_ptr, grad_x_ptr, grad_gate_ptr, size, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < size
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    sigmoid = _sigmoid(gate)
    silu = gate * sigmoid
    tl.store(grad_x_ptr + offsets, (grad * silu).to(grad_x_ptr.dtype.element_ty), mask=inside)
    # d silu(g) / dg = sigmoid(g) (1 + g (1 - sigmoid(g)))
    grad_gate = grad * x * sigmoid * (1.0 + gate * (1.0 - sigmoid))
    tl.store(grad_gate_ptr + offsets, grad_gate.to(grad_gate_ptr.dtype.element_ty), mask=inside)


# Operators in a namespace named after this module, as `triton_scan` does, so a checkpoint's copy never replaces them
_NAMESPACE = "".join(character if character.isalnum() else "_" for character in __name__)


@torch.library.custom_op(f"{_NAMESPACE}::silu_gated_forward", mutates_args=())
def _forward(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    output = _forward_fake(x, gate)
    with _on_device_of(x):
        _silu_gated_forward_kernel[(triton.cdiv(x.numel(), BLOCK),)](
            x, gate, output, x.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS
        )
    return output


@_forward.register_fake
def _forward_fake(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, gate.dtype))


@torch.library.custom_op(f"{_NAMESPACE}::silu_gated_backward", mutates_args=())
def _backward_op(x: torch.Tensor, gate: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad_x, grad_gate = torch.empty_like(x), torch.empty_like(gate)
    with _on_device_of(x):
        _silu_gated_backward_kernel[(triton.cdiv(x.numel(), BLOCK),)](
            x, gate, grad, grad_x, grad_gate, x.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS
        )
    return grad_x, grad_gate


@_backward_op.register_fake
def _backward_fake(x: torch.Tensor, gate: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(gate)


def _save_for_backward(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, gate = ctx.saved_tensors
    return _backward_op(x, gate, grad.contiguous())


_forward.register_autograd(_backward, setup_context=_save_for_backward)


def triton_silu_gated(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x * silu(gate) for two tensors of one shape, in their promoted dtype, with autograd; keeps only x and gate."""
    check_runs_here(x, "The Triton silu_gated")
    if x.shape != gate.shape:
        raise ValueError(f"x and gate must have one shape, got {tuple(x.shape)} and {tuple(gate.shape)}.")
    return _forward(x.contiguous(), gate.contiguous())
