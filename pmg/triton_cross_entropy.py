"""Softmax cross-entropy over a chunk of logits as one Triton kernel: the token losses and the logits' gradient.

`linear_cross_entropy` computes, per chunk of tokens, the loss and d loss / d logits = softmax - one_hot(target).
In PyTorch that is eight passes over the chunk's logits (max, subtract, exp, sum, divide, scatter, mask, cast), most
of them over an fp32 copy: ~42 bytes moved per logit. On an H100 they were 14% of a training step's kernel time
(8 x 2048 tokens, vocabulary 32000; 2026-11-27). Here one program per token reads its row twice (a running maximum
and sum of exponentials, then the gradient) and writes the gradient once, in the logits' dtype: 6 bytes per bf16
logit. The sums are fp32. Triton is optional; with TRITON_INTERPRET=1 set when this module is imported, the kernel
runs on CPU tensors (tests).
"""

import torch

from .triton_scan import _add, _jit, _on_device_of, check_runs_here, tl

# 2048 logits per step of a row: 16 bytes of bf16 per thread and load with 4 warps, and a vocabulary of 32000 in 16
IGNORE_INDEX = -100
BLOCK_V = 2048
NUM_WARPS = 4


@_jit
def _maximum(left, right):
    """The larger value, NaN if either is (as PyTorch's loss turns NaN; by default tl.maximum drops a NaN)."""
    return tl.maximum(left, right, propagate_nan=tl.PropagateNan.ALL)


@_jit
def _cross_entropy_kernel(
    logits_ptr,
    targets_ptr,
    grad_ptr,
    losses_ptr,
    vocabulary,
    IGNORE_INDEX: tl.constexpr,
    BLOCK_V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    """Row `program_id`: loss = (log sum exp(x) - x[target]) and, with WRITE_GRAD, grad = softmax(x) - one_hot, both
    zero for an ignored target. `grad_ptr` may be `logits_ptr`: each element is read before it is overwritten."""
    row = tl.program_id(0).to(tl.int64)
    row_logits = logits_ptr + row * vocabulary
    target = tl.load(targets_ptr + row)
    counted = target != IGNORE_INDEX
    target = tl.where(counted, target, 0)
    # a running maximum and sum of exponentials per lane, combined once at the end; a lane that has seen only
    # padding (-inf) adds nothing (and must not compute exp(-inf - -inf))
    maxima = tl.full((BLOCK_V,), -float("inf"), tl.float32)
    sums = tl.full((BLOCK_V,), 0.0, tl.float32)
    for start in range(0, vocabulary, BLOCK_V):
        columns = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_logits + columns, mask=columns < vocabulary, other=-float("inf")).to(tl.float32)
        new_maxima = _maximum(maxima, x)
        seen = new_maxima != -float("inf")
        sums = tl.where(seen, sums * tl.exp(maxima - new_maxima) + tl.exp(x - new_maxima), 0.0)
        maxima = new_maxima
    maximum = tl.reduce(maxima, 0, _maximum)
    total = tl.reduce(tl.where(maxima != -float("inf"), sums * tl.exp(maxima - maximum), 0.0), 0, _add)
    # log sum exp(x - max) and x - max: exact where max + log(sum) would round at large logits
    log_total = tl.log(total)
    target_logit = tl.load(row_logits + target).to(tl.float32)
    tl.store(losses_ptr + row, tl.where(counted, log_total + (maximum - target_logit), 0.0))
    if WRITE_GRAD:
        row_grad = grad_ptr + row * vocabulary
        for start in range(0, vocabulary, BLOCK_V):
            columns = start + tl.arange(0, BLOCK_V)
            inside = columns < vocabulary
            x = tl.load(row_logits + columns, mask=inside, other=0.0).to(tl.float32)
            grad = tl.exp((x - maximum) - log_total) - tl.where(columns == target, 1.0, 0.0)
            grad = tl.where(counted, grad, 0.0)
            tl.store(row_grad + columns, grad.to(row_grad.dtype.element_ty), mask=inside)


def triton_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, grad_out: torch.Tensor | None = None, write_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token losses (N,) in fp32 and d (sum of losses) / d logits (N, V) in the logits' dtype, for logits (N, V)
    and targets (N,) (IGNORE_INDEX: loss and gradient 0). The gradient goes to `grad_out` if given (it may be
    `logits` itself, which is then overwritten), else to a new tensor; None without `write_grad`."""
    check_runs_here(logits, "The Triton cross-entropy")
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        shapes = f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        raise ValueError(f"logits must be (N, V) and targets (N,), got {shapes}.")
    if not logits.is_contiguous():
        raise ValueError("logits must be contiguous (the kernel reads rows of V consecutive logits).")
    rows, vocabulary = logits.shape
    losses = logits.new_empty((rows,), dtype=torch.float32)
    grad = None
    if write_grad:
        grad = torch.empty_like(logits) if grad_out is None else grad_out
        if grad.shape != logits.shape or grad.dtype != logits.dtype or not grad.is_contiguous():
            raise ValueError("grad_out must be a contiguous tensor of the logits' shape and dtype.")
    with _on_device_of(logits):
        _cross_entropy_kernel[(rows,)](
            logits,
            targets.contiguous(),
            logits if grad is None else grad,
            losses,
            vocabulary,
            IGNORE_INDEX=IGNORE_INDEX,
            BLOCK_V=BLOCK_V,
            WRITE_GRAD=write_grad,
            num_warps=NUM_WARPS,
        )
    return losses, grad
