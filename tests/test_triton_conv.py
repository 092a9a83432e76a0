"""The Triton short convolution against `PMGLayer`'s PyTorch convolution: outputs, gradients and the next window.

With a previous window, padding and document resets, over tiles whose last ones are partial, in fp32 and bf16. Without
a GPU the kernels run in the Triton interpreter on CPU tensors, so the shapes stay tiny.
"""

import pytest
import torch
from conftest import TRITON_DEVICE as DEVICE
from conftest import (
    assert_accepts_any_strides,
    assert_padded_steps_are_absent,
    count_calls,
    import_triton_modules,
    operator_calls,
    perturbed,
)

from pmg.modeling_pmg import PMGLayer, PMGState

triton_conv, triton_scan = import_triton_modules("triton_conv", "triton_scan")

# T=21 (24 rows with the window), D=24: three row tiles, two backward programs of two tiles each, two channel tiles; the
# last of each partial
TILES = dict(block_t=8, block_d=16, row_tiles=2)
FP32_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
# the PyTorch path rounds to bf16 after every tap, the kernel once
BF16_TOLERANCE = dict(rtol=2e-2, atol=2e-2)


def conv_inputs(batch=2, length=21, channels=24, taps=4, dtype=torch.float32) -> dict:
    """Values, a previous window, padding (left and a gap) and resets (twice in a row, within padding, at t=0),
    the first `length` positions of them."""
    mask = torch.ones(batch, max(length, 21), dtype=torch.bool)
    mask[1, :4] = False
    mask[0, 10:12] = False
    resets = torch.zeros_like(mask)
    resets[0, 1] = resets[0, 5] = resets[0, 6] = resets[0, 11] = resets[1, 0] = resets[1, 15] = True
    inputs = dict(
        values=torch.randn(batch, length, channels).to(dtype),
        window=torch.randn(batch, taps - 1, channels).to(dtype),
        mask=mask[:, :length],
        resets=resets[:, :length],
    )
    return {name: tensor.to(DEVICE) for name, tensor in inputs.items()}


def layer_pair(channels: int = 24, conv_size: int = 4) -> tuple[PMGLayer, PMGLayer]:
    """The same layer on the PyTorch path and on the Triton kernels."""
    reference = perturbed(PMGLayer(channels, gate_rank=8, conv_size=conv_size, scan_impl="chunked")).to(DEVICE)
    fused = PMGLayer(channels, gate_rank=8, conv_size=conv_size, scan_impl="triton").to(DEVICE)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def convolve_with_grads(layer: PMGLayer, inputs: dict, **tiles) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The convolution, padded steps entering it as zeros (by the kernel when given tiles, else by the layer's
    PyTorch `_convolve`), and the gradients of the values, the window (if any) and the conv's weight and bias."""
    values = inputs["values"].clone().requires_grad_()
    window = inputs["window"].clone().requires_grad_() if inputs["window"] is not None else None
    weight, bias = layer._conv_parameters()
    if tiles:
        convolved = triton_conv.triton_short_conv(
            values, weight, bias, window, inputs["mask"], inputs["resets"], **tiles
        )
    else:
        convolved = layer._convolve(values, weight, bias, window, inputs["mask"], inputs["resets"])
    weights = torch.linspace(-1, 1, convolved.numel(), device=DEVICE).view_as(convolved)
    leaves = [values, *([window] if window is not None else []), layer.conv.weight, layer.conv.bias]
    return convolved, list(torch.autograd.grad((convolved.float() * weights).sum(), leaves))


@pytest.mark.parametrize(
    "dtype, tolerance", [(torch.float32, FP32_TOLERANCE), (torch.bfloat16, BF16_TOLERANCE)], ids=["fp32", "bf16"]
)
@pytest.mark.parametrize("optional", ["all", "none"], ids=["window-mask-resets", "plain"])
def test_outputs_and_gradients_match_the_pytorch_convolution(dtype, tolerance, optional):
    reference, fused = layer_pair()
    inputs = conv_inputs(dtype=dtype)
    if optional == "none":
        inputs.update(window=None, mask=None, resets=None)
    expected, expected_grads = convolve_with_grads(reference, inputs)
    actual, actual_grads = convolve_with_grads(fused, inputs, **TILES)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual, expected, **tolerance)
    names = ("values", "window", "weight", "bias") if optional == "all" else ("values", "weight", "bias")
    for name, grad, expected_grad in zip(names, actual_grads, expected_grads, strict=True):
        assert grad.dtype == expected_grad.dtype, name
        torch.testing.assert_close(grad, expected_grad, **tolerance, msg=name)


@pytest.mark.parametrize("length, taps", [(2, 4), (5, 4), (21, 4), (5, 1)], ids=["2", "5", "21", "5-one-tap"])
def test_the_layer_on_triton_matches_the_pytorch_layer_and_continues_the_same_state(length, taps):
    """Shorter than the window (the next window mixes old and new rows), a little longer, several tiles, and a
    convolution of one tap (an empty window); with a state to continue, padding and resets."""
    reference, fused = layer_pair(conv_size=taps)
    inputs = conv_inputs(length=length, taps=taps)
    x = torch.randn(2, length, 24, device=DEVICE)
    state = PMGState(torch.randn(2, 24, device=DEVICE), inputs["window"])
    results = []
    for layer in (reference, fused):
        leaf = x.clone().requires_grad_()
        output, new_state = layer(leaf, state, attention_mask=inputs["mask"], resets=inputs["resets"])
        output.square().sum().backward()
        results.append((output, new_state, leaf.grad, [parameter.grad for parameter in layer.parameters()]))
    (output, new_state, grad_x, grads), (fused_output, fused_state, fused_grad_x, fused_grads) = results
    torch.testing.assert_close(fused_output, output, **FP32_TOLERANCE)
    torch.testing.assert_close(fused_state.recurrent, new_state.recurrent, **FP32_TOLERANCE)
    torch.testing.assert_close(fused_state.conv, new_state.conv)
    torch.testing.assert_close(fused_grad_x, grad_x, **FP32_TOLERANCE)
    for (name, _), grad, fused_grad in zip(reference.named_parameters(), grads, fused_grads, strict=True):
        # sums over batch and time of terms up to ~150 (conv.weight), added in another order: 1e-4 absolute
        torch.testing.assert_close(fused_grad, grad, rtol=1e-5, atol=1e-4, msg=name)


def test_the_layer_on_triton_treats_padded_steps_as_absent():
    _, fused = layer_pair()
    assert_padded_steps_are_absent(fused, DEVICE)


def test_tiles_shorter_than_the_window_match_too():
    """Two positions per tile, so the window's three rows reach back over two tiles; three tiles per backward
    program."""
    reference, fused = layer_pair()
    inputs = conv_inputs()
    expected, expected_grads = convolve_with_grads(reference, inputs)
    actual, actual_grads = convolve_with_grads(fused, inputs, block_t=2, block_d=16, row_tiles=3)
    torch.testing.assert_close(actual, expected, **FP32_TOLERANCE)
    for grad, expected_grad in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, **FP32_TOLERANCE)


def test_inputs_of_the_wrong_shape_are_named():
    inputs = conv_inputs(length=6)
    values, weight, bias = inputs["values"], torch.randn(24, 4, device=DEVICE), torch.randn(24, device=DEVICE)
    wrong = {
        "weight": dict(weight=weight[:, None]),  # the conv's own (D, 1, K) weight, not (D, K)
        "window": dict(window=inputs["window"][:, :2]),
        "mask": dict(mask=inputs["mask"][:, :5]),
        "resets": dict(resets=inputs["resets"][:1]),
        "bias": dict(bias=bias[:3]),
    }
    for name, arguments in wrong.items():
        with pytest.raises(ValueError, match=name):
            triton_conv.triton_short_conv(values, **{"weight": weight, "bias": bias, **arguments})


def test_auto_runs_the_kernel_for_sequences_on_cuda_only(monkeypatch):
    launches = count_calls(monkeypatch, triton_conv, "triton_short_conv")
    layer = PMGLayer(24, gate_rank=8).to(DEVICE)
    layer(torch.randn(2, 6, 24, device=DEVICE))
    assert launches == ([1] if DEVICE == "cuda" else []), "auto: Triton on CUDA, the PyTorch convolution on CPU"
    layer(torch.randn(2, 1, 24, device=DEVICE))
    assert len(launches) <= 1, "a single token (here with autograd, so not the fused step) stays on PyTorch"


def test_the_kernel_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_scan, "INTERPRETED", False)
    inputs = {name: tensor.cpu() for name, tensor in conv_inputs(length=4).items()}
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        triton_conv.triton_short_conv(inputs["values"], torch.randn(24, 4), torch.randn(24))


def test_the_convolution_operators_pass_torch_library_checks():
    """Schema, fake (meta) shapes, autograd registration and AOT dispatch of both custom operators."""
    inputs = conv_inputs(length=12)
    values, window = (inputs[name].requires_grad_() for name in ("values", "window"))
    weight, bias = torch.randn(24, 4, device=DEVICE, requires_grad=True), torch.randn(24, device=DEVICE)
    masks = [inputs["mask"].to(torch.uint8), inputs["resets"].to(torch.uint8)]
    torch.library.opcheck(triton_conv._conv_forward, (values, window, weight, bias, *masks, 8, 16, 2))
    torch.library.opcheck(triton_conv._conv_forward, (values, None, weight, bias, None, None, 8, 16, 2))
    grad = torch.randn_like(values)
    arguments = (values.detach(), window.detach(), weight.detach(), *masks, grad, 8, 16, 2)
    torch.library.opcheck(triton_conv._conv_backward, arguments)


def test_the_convolution_operators_accept_any_strides():
    inputs = conv_inputs(length=12)
    weight, bias = torch.randn(24, 4, device=DEVICE), torch.randn(24, device=DEVICE)
    masks = [inputs["mask"].to(torch.uint8), inputs["resets"].to(torch.uint8)]
    values, window = inputs["values"], inputs["window"]
    assert_accepts_any_strides(
        lambda *arguments: [triton_conv._conv_forward(*arguments)], values, window, weight, bias, *masks, 8, 16, 2
    )
    grad = torch.randn_like(values)
    assert_accepts_any_strides(triton_conv._conv_backward, values, window, weight, *masks, grad, 8, 16, 2)


def test_eager_mode_runs_the_kernels_without_the_operators_dispatch():
    """As for the scan: no operator call outside torch.compile (forward or backward); the test below compares the two
    paths."""
    assert (
        operator_calls(triton_conv._NAMESPACE, lambda: convolve_with_grads(layer_pair()[1], conv_inputs(), **TILES))
        == []
    )


def test_the_convolution_compiles_as_one_graph_with_the_same_outputs_and_gradients():
    _, fused = layer_pair()
    inputs = conv_inputs()
    weight, bias = (parameter.detach().requires_grad_() for parameter in fused._conv_parameters())
    results = []
    for convolve in (
        triton_conv.triton_short_conv,
        torch.compile(triton_conv.triton_short_conv, fullgraph=True, backend="aot_eager"),
    ):
        values = inputs["values"].clone().requires_grad_()
        convolved = convolve(values, weight, bias, inputs["window"], inputs["mask"], inputs["resets"], **TILES)
        results.append((convolved, *torch.autograd.grad(convolved.square().sum(), (values, weight, bias))))
    for expected, actual in zip(*results, strict=True):
        torch.testing.assert_close(actual, expected, **FP32_TOLERANCE)


@pytest.mark.skipif(DEVICE == "cpu", reason="too slow for the Triton interpreter (9 minutes)")
def test_long_bf16_sequences_are_as_accurate_as_the_pytorch_convolution():
    """4099 positions (257 forward tiles, 33 backward programs), 200 channels, scattered resets, long left padding,
    the default tiles. Long bf16 sums differ by more than a rounding step between two orders of summation, so both
    paths are held to an fp64 run: the kernel's relative error (in norm) must be within a bf16 rounding step (2^-8),
    or at most a quarter above the PyTorch path's."""
    reference, fused = layer_pair(channels=200)
    inputs = conv_inputs(batch=3, length=4099, channels=200, dtype=torch.bfloat16)
    inputs["mask"][2, :1000] = False
    inputs["resets"] = torch.rand(3, 4099, device=DEVICE) < 0.002
    pytorch = convolve_with_grads(reference, inputs)
    kernel = convolve_with_grads(fused, inputs, block_t=triton_conv.BLOCK_T, block_d=triton_conv.BLOCK_D)
    exact_inputs = {name: tensor.double() if tensor.is_floating_point() else tensor for name, tensor in inputs.items()}
    exact = convolve_with_grads(reference.double(), exact_inputs)
    names = ("output", "gradient of the values", "of the window", "of the weight", "of the bias")
    for name, actual, expected, truth in zip(
        names, [kernel[0], *kernel[1]], [pytorch[0], *pytorch[1]], [exact[0], *exact[1]], strict=True
    ):
        error, pytorch_error = ((tensor.double() - truth).norm() / truth.norm() for tensor in (actual, expected))
        assert error <= max(2**-8, 1.25 * pytorch_error), f"{name}: off by {error:.3g}, PyTorch by {pytorch_error:.3g}"
