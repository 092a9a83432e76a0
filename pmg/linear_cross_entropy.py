"""The causal-LM loss computed a chunk of tokens at a time from the last hidden states and the LM head weight.

`transformers`' loss takes logits (B, T, V), upcasts them to fp32 and runs log-softmax and its backward over the
whole tensor: at 16k tokens and a 32k vocabulary that is 1 GiB of bf16 logits, 2 GiB more in fp32, and several
passes over each (log-softmax output, its gradient, the zero-filled gradient of the loss, the logits' gradient).
Here the loss and the gradient of the logits are computed a chunk of tokens at a time: the gradient of the logits is
the softmax minus the one-hot target (computed once, in the forward pass, inside the chunk), and what leaves the
loop is the loss and the gradients of the hidden states and of the head weight, which the backward pass only scales.

Two forms share that loop:
- `causal_lm_logits_and_loss` still returns the logits, from one product over all tokens, and they stay part of the
  graph: a loss a user adds on them gets its gradient. PMG's default path in training with labels.
- `causal_lm_linear_cross_entropy` never materialises them: each chunk's logits live only inside the loop
  (`config.fuse_linear_cross_entropy`).
Same result as `transformers.loss.loss_utils.ForCausalLMLoss` (labels shifted inside, -100 ignored, mean over
counted tokens or sum / `num_items_in_batch`).
"""

import torch
from torch.autograd.function import once_differentiable

from .scan_pmg import auto_runs_triton

IGNORE_INDEX = -100
# Logits per chunk by default. On a GPU 2**26 (256 MiB in fp32): peak memory stays flat in the number of tokens
# without a storm of small launches. On a CPU 2**22 (16 MiB), so the softmax passes over a chunk run from cache and
# no chunk is big enough for glibc to map fresh pages for it on every step: head + loss forward and backward, 4096
# tokens, hidden 256, 2 cores, 2026-11-26: vocabulary 8192, 512 rows per chunk 218 ms against 272 ms with 4096 rows
# (384 ms unfused); vocabulary 32000, 131 / 262 / 2097 rows 1051-1086 / 962-1037 / 1140-1343 ms.
LOGITS_PER_CHUNK = {"cpu": 2**22}
DEFAULT_LOGITS_PER_CHUNK = 2**26


def causal_lm_linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Loss of the logits `hidden_states @ weight.T` (B, T, V) against `labels` (B, T), shifted by one inside.

    `shift_labels` (B, T), already shifted, replaces `labels` when given (as in transformers). Under autocast the
    head runs in the autocast dtype, as `nn.Linear` would; the softmax and the loss are always fp32. `chunk_size`
    tokens go through the head at a time (default: as many as make the device's `LOGITS_PER_CHUNK` logits).
    """
    _, loss = _chunked_loss(hidden_states, weight, labels, num_items_in_batch, shift_labels, chunk_size, False)
    return loss


def causal_lm_logits_and_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits `hidden_states @ weight.T` (B, T, V, differentiable) and the same loss as
    `causal_lm_linear_cross_entropy`, without the fp32 copies and full-size passes of a loss over finished logits."""
    return _chunked_loss(hidden_states, weight, labels, num_items_in_batch, shift_labels, chunk_size, True)


def _chunked_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | None,
    shift_labels: torch.Tensor | None,
    chunk_size: int | None,
    keep_logits: bool,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    targets = shift_labels.reshape(-1).to(hidden_states.device)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels of shape {tuple(shift_labels.shape)} do not match {tuple(hidden_states.shape[:-1])}.")
    device_type = hidden.device.type
    logits_per_chunk = LOGITS_PER_CHUNK.get(device_type, DEFAULT_LOGITS_PER_CHUNK)
    chunk_size = chunk_size or max(1, logits_per_chunk // weight.shape[0])
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    # what transformers' cross-entropy would refuse (on a GPU without waiting for the device, as its kernel does)
    valid = (targets == IGNORE_INDEX) | ((targets >= 0) & (targets < weight.shape[0]))
    torch._assert_async(valid.all(), f"labels must be token ids in [0, {weight.shape[0]}) or {IGNORE_INDEX} (ignored)")
    # a custom Function's forward cannot tell no_grad (evaluation) from training: it is told which gradients to build
    wanted = (torch.is_grad_enabled() and hidden.requires_grad, torch.is_grad_enabled() and weight.requires_grad)
    with torch.autocast(device_type, enabled=False):
        total, logits = _LinearCrossEntropy.apply(hidden, weight, targets, dtype, chunk_size, keep_logits, wanted)
    if logits is not None:
        logits = logits.view(*hidden_states.shape[:-1], weight.shape[0])
    if num_items_in_batch is None:  # the mean over counted tokens: nan when none is, as in transformers
        return logits, total / (targets != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return logits, total / num_items_in_batch


def softmax_cross_entropy_function(hidden: torch.Tensor, vocabulary: int, chunk_size: int, triton: bool):
    """`(logits, targets, wants_gradient, may_overwrite) -> (sum of token losses, d sum / d logits or None)` for
    the chunks of one call: one Triton kernel per chunk (`triton`: CUDA, eager), else PyTorch's passes over a fp32
    buffer shared by the chunks (no allocation per chunk)."""
    if triton:
        from .triton_cross_entropy import triton_cross_entropy  # imported here: Triton is optional

        def fused(logits, targets, wants_gradient, may_overwrite):
            grad_out = logits if may_overwrite else None
            losses, grad_logits = triton_cross_entropy(logits, targets, grad_out, write_grad=wants_gradient)
            return losses.sum(), grad_logits

        return fused
    exponentials = hidden.new_empty((min(chunk_size, hidden.shape[0]), vocabulary), dtype=torch.float32)

    def in_passes(logits, targets, wants_gradient, may_overwrite):
        counted = targets != IGNORE_INDEX
        target = targets.clamp(min=0).unsqueeze(1)
        maxima = logits.amax(dim=-1, keepdim=True).float()
        chunk_exponentials = torch.sub(logits, maxima, out=exponentials[: logits.shape[0]]).exp_()
        sums = chunk_exponentials.sum(dim=-1, keepdim=True)
        log_normaliser = maxima + sums.log()
        loss = ((log_normaliser - logits.gather(1, target).float()).squeeze(1) * counted).sum()
        if not wants_gradient:
            return loss, None
        # d loss / d logits = softmax - one_hot(target), zero on ignored tokens
        grad_logits = chunk_exponentials.div_(sums)
        grad_logits.scatter_add_(1, target, -counted.unsqueeze(1).to(grad_logits.dtype))
        return loss, grad_logits.mul_(counted.unsqueeze(1)).to(logits.dtype)

    return in_passes


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of token losses, and the logits when kept; the forward pass also computes the loss's gradients (for an
    upstream gradient of 1) for the inputs in `gradients_wanted` (hidden, weight).

    The products run in `dtype` (the autocast dtype, or the inputs' own); the gradients are accumulated and scaled in
    fp32 and returned in the dtypes of `hidden` and `weight`, so an fp32 master weight gets an fp32 gradient. A
    gradient that reaches the kept logits (a loss of the user's own on them) goes back through the head in the
    backward pass.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, chunk_size: int, keep_logits: bool, gradients_wanted):
        wants_hidden_gradient, wants_weight_gradient = gradients_wanted
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if wants_hidden_gradient else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_weight_gradient else None
        weight_in_dtype = weight.to(dtype)
        logits = hidden.to(dtype) @ weight_in_dtype.T if keep_logits else None
        wants_gradient = wants_hidden_gradient or wants_weight_gradient
        softmax_cross_entropy = softmax_cross_entropy_function(
            hidden, weight.shape[0], chunk_size, triton=auto_runs_triton(hidden)
        )
        for start in range(0, hidden.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            hidden_chunk = hidden[chunk].to(dtype)
            chunk_logits = logits[chunk] if keep_logits else hidden_chunk @ weight_in_dtype.T
            # the chunk's logits are overwritten by their gradient where nothing else holds them
            loss, grad_logits = softmax_cross_entropy(chunk_logits, targets[chunk], wants_gradient, not keep_logits)
            total += loss
            if wants_gradient:
                if wants_hidden_gradient:
                    grad_hidden[chunk] = grad_logits @ weight_in_dtype
                if wants_weight_gradient:
                    grad_weight += (grad_logits.T @ hidden_chunk).float()
        ctx.set_materialize_grads(False)
        kept_inputs = (hidden, weight_in_dtype) if keep_logits else (None, None)
        ctx.save_for_backward(grad_hidden, grad_weight, *kept_inputs)
        ctx.dtypes = dtype, hidden.dtype, weight.dtype
        return total, logits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: torch.Tensor | None, grad_logits: torch.Tensor | None):
        grad_hidden, grad_weight, hidden, weight_in_dtype = ctx.saved_tensors
        dtype, hidden_dtype, weight_dtype = ctx.dtypes
        scale = grad_total if grad_total is not None else 0.0  # None: only the logits were used
        if grad_logits is not None:
            grad_logits = grad_logits.to(dtype)
        if grad_hidden is not None:
            grad_hidden = grad_hidden.float() * scale
            if grad_logits is not None:
                grad_hidden += (grad_logits @ weight_in_dtype).float()
            grad_hidden = grad_hidden.to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * scale
            if grad_logits is not None:
                grad_weight += (grad_logits.T @ hidden.to(dtype)).float()
            grad_weight = grad_weight.to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None
