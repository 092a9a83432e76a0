"""The Triton softmax cross-entropy against PyTorch's: token losses and the logits' gradient, alone and inside the
chunked LM loss. Without a GPU the kernel runs in the Triton interpreter on CPU tensors."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TRITON_DEVICE as DEVICE
from conftest import count_calls, import_triton_modules

from pmg import linear_cross_entropy
from pmg.linear_cross_entropy import causal_lm_linear_cross_entropy, causal_lm_logits_and_loss

(triton_cross_entropy,) = import_triton_modules("triton_cross_entropy")


def reference(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's token losses and the gradient of their sum, in fp32."""
    leaf = logits.float().requires_grad_()
    losses = F.cross_entropy(leaf, targets, reduction="none")
    losses.sum().backward()
    return losses.detach(), leaf.grad


@pytest.mark.parametrize("vocabulary", [97, 2048, 5000])  # inside one block, exactly one, three with a partial last
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_losses_and_gradient_match_pytorch(vocabulary, dtype):
    logits = (torch.randn(7, vocabulary, device=DEVICE) * 4).to(dtype)
    targets = torch.randint(0, vocabulary, (7,), device=DEVICE)
    targets[2] = -100  # ignored
    targets[3] = vocabulary - 1  # the last column, in a partial block
    losses, grad = triton_cross_entropy.triton_cross_entropy(logits, targets)
    expected_losses, expected_grad = reference(logits, targets)
    assert losses.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-5)
    # the gradient is rounded once to the logits' dtype (bf16: 8 bits)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=2**-8)
    torch.testing.assert_close(grad.float(), expected_grad, **tolerance)
    assert grad[2].abs().max() == 0 and losses[2] == 0


def test_extreme_logits_stay_finite():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [3e38, 0.0, -3e38]], device=DEVICE)
    targets = torch.tensor([1, 0, 2], device=DEVICE)
    losses, grad = triton_cross_entropy.triton_cross_entropy(logits, targets)
    expected_losses, expected_grad = reference(logits, targets)
    torch.testing.assert_close(losses, expected_losses)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("column", [3, 3000])  # in the first block of a row, and in a later one
def test_a_nan_logit_makes_the_loss_nan_as_in_pytorch(column):
    logits = torch.randn(2, 5000, device=DEVICE)
    logits[0, column] = float("nan")
    losses, grad = triton_cross_entropy.triton_cross_entropy(logits, torch.tensor([1, 2], device=DEVICE))
    assert losses[0].isnan() and grad[0].isnan().all()
    assert losses[1].isfinite() and grad[1].isfinite().all()


def test_the_gradient_can_overwrite_the_logits_and_can_be_skipped():
    logits = torch.randn(4, 300, device=DEVICE)
    targets = torch.randint(0, 300, (4,), device=DEVICE)
    expected_losses, expected_grad = reference(logits, targets)
    losses_only, no_grad = triton_cross_entropy.triton_cross_entropy(logits, targets, write_grad=False)
    assert no_grad is None
    torch.testing.assert_close(losses_only, expected_losses)
    losses, grad = triton_cross_entropy.triton_cross_entropy(logits, targets, grad_out=logits)
    assert grad.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(losses, expected_losses)
    torch.testing.assert_close(logits, expected_grad)


def test_bad_shapes_are_named():
    logits = torch.randn(4, 30, device=DEVICE)
    with pytest.raises(ValueError, match=r"targets \(N,\)"):
        triton_cross_entropy.triton_cross_entropy(logits, torch.zeros(5, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        triton_cross_entropy.triton_cross_entropy(logits.T, torch.zeros(30, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="grad_out"):
        triton_cross_entropy.triton_cross_entropy(logits, torch.zeros(4, dtype=torch.long, device=DEVICE), logits[:2])


@pytest.mark.parametrize("keeps_logits", [False, True])
def test_the_chunked_lm_loss_runs_the_kernel_where_auto_runs_triton(monkeypatch, keeps_logits):
    """On CUDA (eager) the chunked loss runs the kernel per chunk; here it is made to on CPU, and its loss, kept
    logits and gradients match the PyTorch path's."""
    hidden = torch.randn(2, 13, 16, device=DEVICE, requires_grad=True)
    weight = (torch.randn(50, 16, device=DEVICE) * 0.3).requires_grad_()
    labels = torch.randint(0, 50, (2, 13), device=DEVICE)
    labels[0, :4] = -100
    results = []
    for kernel in (False, True):
        monkeypatch.setattr(linear_cross_entropy, "auto_runs_triton", lambda tensor, kernel=kernel: kernel)
        calls = count_calls(monkeypatch, triton_cross_entropy, "triton_cross_entropy")
        if keeps_logits:
            logits, loss = causal_lm_logits_and_loss(hidden, weight, labels, chunk_size=7)
        else:
            logits, loss = None, causal_lm_linear_cross_entropy(hidden, weight, labels, chunk_size=7)
        gradients = torch.autograd.grad(loss, (hidden, weight))
        assert len(calls) == (4 if kernel else 0), "26 tokens in chunks of 7"
        results.append([tensor for tensor in (loss, logits, *gradients) if tensor is not None])
    for actual, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
