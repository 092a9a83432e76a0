"""The Triton x * silu(gate) against PyTorch's: values and gradients in fp32, bf16 and mixed dtypes, large gates,
sizes that end inside a block; the operators' registration; and which calls take it."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TRITON_DEVICE as DEVICE
from conftest import count_calls, import_triton_modules, tiny_config

from pmg import PMGForCausalLM
from pmg.modeling_pmg import silu_gated

triton_silu_gated, triton_scan = import_triton_modules("triton_silu_gated", "triton_scan")


def product_and_grads(function, x: torch.Tensor, gate: torch.Tensor) -> list[torch.Tensor]:
    x, gate = x.clone().requires_grad_(), gate.clone().requires_grad_()
    output = function(x, gate)
    weights = torch.linspace(-2, 2, output.numel(), device=DEVICE).view_as(output)
    return [output, *torch.autograd.grad((output.float() * weights).sum(), (x, gate))]


def reference(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The formula in fp32 (autograd's gradients), cast to the promoted dtype."""
    return (x.float() * F.silu(gate.float())).to(torch.promote_types(x.dtype, gate.dtype))


@pytest.mark.parametrize(
    "x_dtype, gate_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
    ids=["fp32", "bf16", "mixed"],
)
def test_values_and_gradients_match_the_formula(x_dtype, gate_dtype):
    shape = (3, 7, 101)  # 2121 elements: the third block of 1024 is partial
    x = torch.randn(shape, device=DEVICE).to(x_dtype)
    gate = (torch.randn(shape, device=DEVICE) * 4).to(gate_dtype)
    gate.view(-1)[:4] = torch.tensor([-100.0, -30.0, 30.0, 100.0])  # exp(-gate) would overflow fp32 at the first
    actual = product_and_grads(triton_silu_gated.triton_silu_gated, x, gate)
    expected = product_and_grads(reference, x, gate)
    for name, tensor, expected_tensor in zip(("output", "grad x", "grad gate"), actual, expected, strict=True):
        assert tensor.dtype == expected_tensor.dtype, name
        assert tensor.isfinite().all(), name
        # both compute in fp32 and round once; bf16 results may differ by a rounding step
        tolerance = dict(rtol=1e-5, atol=1e-5) if tensor.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(tensor, expected_tensor, **tolerance, msg=name)


def test_shapes_must_match_and_cpu_tensors_need_the_interpreter(monkeypatch):
    x = torch.randn(2, 3, device=DEVICE)
    with pytest.raises(ValueError, match="one shape"):
        triton_silu_gated.triton_silu_gated(x, torch.randn(2, 1, device=DEVICE))
    monkeypatch.setattr(triton_scan, "INTERPRETED", False)
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        triton_silu_gated.triton_silu_gated(x.cpu(), x.cpu())


def test_the_operators_pass_torch_library_checks():
    x = torch.randn(5, 33, device=DEVICE, requires_grad=True)
    gate = torch.randn(5, 33, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(triton_silu_gated._forward, (x, gate))
    torch.library.opcheck(triton_silu_gated._backward_op, (x.detach(), gate.detach(), torch.randn_like(x)))


def test_models_take_it_for_training_on_cuda_only(monkeypatch):
    """The MLP and the PMG output gate of every layer, forward and backward; not without autograd (decoding)."""
    calls = count_calls(monkeypatch, triton_silu_gated, "triton_silu_gated")
    model = PMGForCausalLM(tiny_config()).to(DEVICE)
    ids = torch.randint(1, 97, (2, 6), device=DEVICE)
    model(ids, labels=ids).loss.backward()
    assert len(calls) == (2 * model.config.num_hidden_layers if DEVICE == "cuda" else 0)
    with torch.no_grad():
        model(ids)
    assert len(calls) == (2 * model.config.num_hidden_layers if DEVICE == "cuda" else 0)
    x = torch.randn(4, device=DEVICE)
    torch.testing.assert_close(silu_gated(x, x), x * F.silu(x))
