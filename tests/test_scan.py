"""The scan backends against the step-by-step reference: outputs, gradients, masks, resets, long sequences."""

import functools
import math

import pytest
import torch
from conftest import saved_activations

from pmg import scan_pmg
from pmg.scan_pmg import _doubling_scan, _inclusive_scan_, _sequential_scan_, linear_recurrence, pmg_gates, pmg_scan

FP32_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def random_scan_inputs(batch=2, length=64, channels=8, dtype=torch.float32):
    """Gate logits, values and gate parameters spread over sharp, smooth, shifted and floored channels."""
    return dict(
        z=torch.randn(batch, length, channels, dtype=dtype) * 2,
        v=torch.randn(batch, length, channels, dtype=dtype),
        sharpness=torch.rand(channels) * 3 + 0.2,
        shift=torch.randn(channels) * 0.5,
        asymmetry=torch.rand(channels) * 2 + 0.3,
        floor=torch.rand(channels) * 0.95,
    )


@pytest.fixture(params=["cpu loop", "doubling"])
def cpu_inner_scan(request, monkeypatch):
    """Run a test with each inner scan the CPU picks by width: the in-place loop, and doubling (narrow inputs)."""
    width = 0 if request.param == "cpu loop" else 2**62
    monkeypatch.setattr(scan_pmg, "SEQUENTIAL_SCAN_MIN_WIDTH", width)
    return request.param


def leaves_requiring_grad(inputs: dict) -> dict:
    return {name: tensor.clone().requires_grad_() for name, tensor in inputs.items()}


def run_with_grads(impl, inputs, initial_state=None, **kwargs):
    leaves = leaves_requiring_grad(inputs)
    state = initial_state.clone().requires_grad_() if initial_state is not None else None
    states, final, write = pmg_scan(**leaves, initial_state=state, impl=impl, **kwargs)
    weights = torch.linspace(-1, 1, states.numel()).view_as(states)
    ((states * weights).sum() + final.sum() + write.sum()).backward()
    grads = {name: leaf.grad for name, leaf in leaves.items()}
    if state is not None:
        grads["initial_state"] = state.grad
    return states, final, grads


@pytest.mark.parametrize("with_initial_state", [False, True])
def test_chunked_matches_recurrent_outputs_and_gradients_at_4096(with_initial_state, cpu_inner_scan):
    inputs = random_scan_inputs(batch=2, length=4096, channels=8)
    initial = torch.randn(2, 8) if with_initial_state else None
    mask = torch.rand(2, 4096) > 0.1
    resets = torch.rand(2, 4096) < 0.01
    reference = run_with_grads("recurrent", inputs, initial, mask=mask, resets=resets)
    chunked = run_with_grads("chunked", inputs, initial, mask=mask, resets=resets, chunk_size=64)
    torch.testing.assert_close(chunked[0], reference[0], **FP32_TOLERANCE)
    torch.testing.assert_close(chunked[1], reference[1], **FP32_TOLERANCE)
    assert chunked[2].keys() == reference[2].keys()
    for name in reference[2]:
        torch.testing.assert_close(chunked[2][name], reference[2][name], **FP32_TOLERANCE, msg=name)


@pytest.mark.parametrize(("length", "chunk_size"), [(1, 64), (5, 2), (7, 3), (64, 64), (65, 16), (100, 1)])
def test_chunked_handles_any_length_and_chunk_size(length, chunk_size, cpu_inner_scan):
    retain, inputs, initial = torch.rand(3, length, 4), torch.randn(3, length, 4), torch.randn(3, 4)
    originals = [tensor.clone() for tensor in (retain, inputs, initial)]
    expected = linear_recurrence(retain, inputs, initial, impl="recurrent")
    actual = linear_recurrence(retain, inputs, initial, impl="chunked", chunk_size=chunk_size)
    torch.testing.assert_close(actual, expected, **FP32_TOLERANCE)
    for tensor, original in zip((retain, inputs, initial), originals, strict=True):  # the CPU scan works in place
        assert torch.equal(tensor, original)


@pytest.mark.parametrize("inner_scan", [_doubling_scan, _sequential_scan_])
def test_both_inner_scans_give_cumulative_retentions_and_states(inner_scan):
    """The CPU loop and the doubling scan (GPU, torch.compile) against cumprod and the step-by-step recurrence."""
    retain, inputs = torch.rand(6, 37, 4), torch.randn(6, 37, 4)
    products, states = inner_scan(retain.clone(), inputs.clone())
    torch.testing.assert_close(products, retain.cumprod(dim=1), **FP32_TOLERANCE)
    torch.testing.assert_close(states, linear_recurrence(retain, inputs, impl="recurrent"), **FP32_TOLERANCE)


def test_reverse_inner_scan_is_the_forward_scan_of_the_flipped_sequence(cpu_inner_scan):
    """The backward pass scans from the last position to the first: the CPU loop runs backwards, doubling flips."""
    retain, inputs = torch.rand(6, 37, 4), torch.randn(6, 37, 4)
    products, states = _inclusive_scan_(retain.clone(), inputs.clone(), reverse=True)
    expected_states = linear_recurrence(retain.flip(1), inputs.flip(1), impl="recurrent").flip(1)
    torch.testing.assert_close(products, retain.flip(1).cumprod(dim=1).flip(1), **FP32_TOLERANCE)
    torch.testing.assert_close(states, expected_states, **FP32_TOLERANCE)


@pytest.mark.parametrize("compiling", [False, True])
def test_cpu_loops_over_positions_only_for_wide_inputs_in_eager_mode(compiling, monkeypatch):
    """The in-place loop for inputs of at least SEQUENTIAL_SCAN_MIN_WIDTH elements per position, doubling below it
    and, at any width, under torch.compile (what a GPU runs too)."""
    if compiling:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    loops = []
    monkeypatch.setattr(scan_pmg, "_sequential_scan_", lambda *args: loops.append(args) or _sequential_scan_(*args))
    width = scan_pmg.SEQUENTIAL_SCAN_MIN_WIDTH
    for channels in (width - 1, width):
        retain, inputs = torch.rand(1, 8, channels), torch.randn(1, 8, channels)
        _, states = _inclusive_scan_(retain.clone(), inputs.clone())
        torch.testing.assert_close(states, linear_recurrence(retain, inputs, impl="recurrent"), **FP32_TOLERANCE)
    assert [args[1].shape[-1] for args in loops] == ([] if compiling else [width])


def test_auto_uses_the_recurrent_step_for_decoding_and_matches_chunked():
    retain, inputs, initial = torch.rand(2, 1, 4), torch.randn(2, 1, 4), torch.randn(2, 4)
    step = linear_recurrence(retain, inputs, initial, impl="auto")
    torch.testing.assert_close(step[:, 0], retain[:, 0] * initial + inputs[:, 0])


@pytest.mark.parametrize("with_initial_state", [True, False])
def test_decoding_step_matches_the_chunked_path_with_masks_and_resets(with_initial_state):
    """The recurrent step (what decoding runs) against the chunked path at T = 1: every mask x reset combination,
    outputs and gradients (a padded step keeps its state even where a reset is marked)."""
    generator = torch.Generator().manual_seed(0)

    def leaf(*shape, low=-1.0, high=1.0):
        return (torch.rand(*shape, generator=generator) * (high - low) + low).requires_grad_()

    inputs = dict(z=leaf(4, 1, 5, low=-3, high=3), v=leaf(4, 1, 5), sharpness=leaf(5, low=0.5, high=2.0))
    inputs |= dict(shift=leaf(5), asymmetry=leaf(5, low=0.5, high=2.0), floor=leaf(5, low=0.0, high=0.9))
    inputs["initial_state"] = leaf(4, 5) if with_initial_state else None
    mask = torch.tensor([[True], [False], [True], [False]])
    resets = torch.tensor([[False], [False], [True], [True]])
    results = {}
    for impl in ("recurrent", "chunked"):
        states, final, write = pmg_scan(**inputs, mask=mask, resets=resets, impl=impl)
        leaves = [tensor for tensor in inputs.values() if tensor is not None]
        gradients = torch.autograd.grad((states * torch.arange(1.0, 6.0)).sum() + write.sum(), leaves)
        results[impl] = (states, final, write, *gradients)
    for step, general in zip(results["recurrent"], results["chunked"], strict=True):
        torch.testing.assert_close(step, general, **FP32_TOLERANCE)


def test_default_gate_shape_is_the_plain_sigmoid_scaled_by_the_floor():
    z = torch.randn(1, 10, 3)
    ones, zeros = torch.ones(3), torch.zeros(3)
    floor = torch.tensor([0.0, 0.5, 0.9])
    write, retain, _ = pmg_gates(z, z, sharpness=ones, shift=zeros, asymmetry=ones, floor=floor)
    torch.testing.assert_close(write, (1 - floor) * torch.sigmoid(z))
    torch.testing.assert_close(retain, floor + (1 - floor) * (1 - torch.sigmoid(z)))
    assert (retain >= floor - 1e-7).all(), "the floor is a lower bound on retention"


def test_gate_shape_sharpness_shift_and_asymmetry():
    z = torch.linspace(-3, 3, 7).view(1, 7, 1)
    one = torch.ones(1)
    smooth, _, _ = pmg_gates(z, z, one, 0 * one, one, 0 * one)
    sharp, _, _ = pmg_gates(z, z, 10 * one, 0 * one, one, 0 * one)
    shifted, _, _ = pmg_gates(z, z, one, one, one, 0 * one)
    asymmetric, _, _ = pmg_gates(z, z, one, 0 * one, 3 * one, 0 * one)
    assert sharp[0, -1] > smooth[0, -1] and sharp[0, 0] < smooth[0, 0], "sharper k switches harder"
    torch.testing.assert_close(shifted[0, 1:], smooth[0, :-1])  # m = 1 moves the curve by one step of z
    torch.testing.assert_close(asymmetric, smooth**3)


def test_gates_backward_recomputes_the_exact_gradients():
    """`pmg_gates` keeps only z and v and differentiates by hand: gradcheck it in float64, masks and resets too."""
    generator = torch.Generator().manual_seed(0)

    def leaf(*shape, low=-2.0, high=2.0):
        values = torch.rand(*shape, generator=generator, dtype=torch.float64) * (high - low) + low
        return values.requires_grad_()

    z, v = leaf(2, 5, 3), leaf(2, 5, 3)
    sharpness, shift, asymmetry, floor = leaf(3, low=0.5), leaf(3), leaf(3, low=0.5), leaf(3, low=0.05, high=0.9)
    mask = torch.tensor([[True, True, False, True, True], [True] * 5])
    resets = torch.tensor([[False, False, False, True, False], [False] * 5])
    for masks in ({}, {"mask": mask, "resets": resets}):
        gates = functools.partial(pmg_gates, **masks)
        assert torch.autograd.gradcheck(gates, (z, v, sharpness, shift, asymmetry, floor))
    write, retain, inputs = pmg_gates(z, v, sharpness, shift, asymmetry, floor)
    assert write.dtype == torch.float64  # fp64 in, fp64 gates (the kernels' fp32 is for the other dtypes)
    expected = (1 - floor) * torch.sigmoid(sharpness * (z - shift)) ** asymmetry
    torch.testing.assert_close(write, expected)
    torch.testing.assert_close(retain, 1 - expected)
    torch.testing.assert_close(inputs, expected * v)
    kept = saved_activations(pmg_gates, z, v, sharpness, shift, asymmetry, floor, min_numel=z.numel())
    assert {tensor.data_ptr() for tensor in kept} == {z.data_ptr(), v.data_ptr()}  # the gates are recomputed


def test_masked_steps_leave_the_state_untouched():
    inputs = random_scan_inputs(batch=1, length=20, channels=4)
    mask = torch.ones(1, 20, dtype=torch.bool)
    mask[0, 5:9] = False
    states, _, write = pmg_scan(**inputs, mask=mask, impl="chunked", chunk_size=4)
    for t in range(5, 9):
        torch.testing.assert_close(states[0, t], states[0, 4])
    assert (write[0, 5:9] == 0).all()


def test_a_reset_restarts_the_memory_like_a_separate_sequence():
    first, second = random_scan_inputs(1, 13, 4), random_scan_inputs(1, 9, 4)
    shared = {name: first[name] for name in ("sharpness", "shift", "asymmetry", "floor")}
    packed_z = torch.cat([first["z"], second["z"]], dim=1)
    packed_v = torch.cat([first["v"], second["v"]], dim=1)
    resets = torch.zeros(1, 22, dtype=torch.bool)
    resets[0, 13] = True
    packed, _, _ = pmg_scan(packed_z, packed_v, **shared, initial_state=torch.randn(1, 4), resets=resets)
    alone, _, _ = pmg_scan(second["z"], second["v"], **shared)
    torch.testing.assert_close(packed[:, 13:], alone, **FP32_TOLERANCE)


def test_strongly_forgetting_channels_do_not_overflow():
    # log a = -5 per step over whole chunks: the exp(-cumsum) formulation would overflow fp32 here
    retain = torch.full((1, 512, 2), math.exp(-5.0))
    inputs = torch.randn(1, 512, 2)
    chunked = linear_recurrence(retain, inputs, impl="chunked", chunk_size=128)
    assert torch.isfinite(chunked).all()
    torch.testing.assert_close(chunked, linear_recurrence(retain, inputs, impl="recurrent"), **FP32_TOLERANCE)


def test_million_step_scan_is_finite_and_matches_a_float64_reference():
    length = 1_000_000
    generator = torch.Generator().manual_seed(1)
    # near-1 retentions (long memory) on one channel, fast forgetting on the other
    retain = torch.stack(
        [1 - 1e-4 * torch.rand(length, generator=generator), 0.5 * torch.rand(length, generator=generator)], dim=-1
    )[None]
    inputs = torch.randn(1, length, 2, generator=generator) * 1e-2
    chunked = linear_recurrence(retain, inputs, impl="chunked", chunk_size=64)
    assert torch.isfinite(chunked).all()
    retain64, inputs64 = retain[0].double().tolist(), inputs[0].double().tolist()
    state, reference = [0.0, 0.0], []
    for t in range(0, length):
        state = [retain64[t][c] * state[c] + inputs64[t][c] for c in range(2)]
        if t % 1000 == 999:
            reference.append(state)
    reference = torch.tensor(reference)
    scale = reference.abs().max()
    error = (chunked[0, 999::1000].double() - reference).abs().max() / scale
    assert error < 1e-4, f"relative error {error:.2e} at T=1e6"


def test_scan_runs_in_fp32_under_bf16_autocast_and_casts_back():
    inputs = random_scan_inputs(batch=1, length=4096, channels=8)
    expected, expected_final, _ = pmg_scan(**inputs, impl="recurrent")
    bf16 = dict(inputs, z=inputs["z"].bfloat16(), v=inputs["v"].bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        states, final, _ = pmg_scan(**bf16, impl="chunked")
    assert states.dtype == torch.bfloat16 and final.dtype == torch.float32
    # bf16 inputs (8-bit mantissa) bound the agreement, not the scan
    torch.testing.assert_close(states.float(), expected, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(final, expected_final, rtol=5e-2, atol=5e-2)


def test_unknown_backend_and_bad_shapes_raise():
    with pytest.raises(ValueError, match="Unknown scan implementation 'fused'"):
        linear_recurrence(torch.rand(1, 4, 2), torch.rand(1, 4, 2), impl="fused")
    with pytest.raises(ValueError, match=r"must both be \(B, T, D\)"):
        linear_recurrence(torch.rand(1, 4, 2), torch.rand(1, 5, 2))


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("floor", torch.rand(3)),
        ("initial_state", torch.zeros(2, 1)),  # would broadcast over the 8 channels unnoticed
        ("initial_state", torch.zeros(3, 8)),
        ("mask", torch.ones(2, 63, dtype=torch.bool)),
        ("resets", torch.zeros(1, 64, dtype=torch.bool)),
    ],
)
def test_pmg_scan_names_the_argument_with_a_wrong_shape(name, bad):
    inputs = {**random_scan_inputs(), name: bad}
    with pytest.raises(ValueError, match=rf"^{name} must have shape"):
        pmg_scan(**inputs)


def test_pmg_scan_names_the_argument_on_another_device():
    """The Triton scan would read another device's pointer; meta tensors stand in for a second device here."""
    inputs = {**random_scan_inputs(), "floor": torch.rand(8, device="meta")}
    with pytest.raises(ValueError, match=r"^floor is on meta, z on cpu"):
        pmg_scan(**inputs)


def test_chunked_scan_compiles_without_graph_breaks():
    inputs = leaves_requiring_grad(random_scan_inputs(batch=2, length=256, channels=8))
    compiled = torch.compile(pmg_scan, fullgraph=True, backend="aot_eager")
    states, _, _ = compiled(**inputs, impl="chunked", chunk_size=32)
    states.sum().backward()
    expected, _, _ = pmg_scan(**{k: v.detach() for k, v in inputs.items()}, impl="recurrent")
    torch.testing.assert_close(states, expected, **FP32_TOLERANCE)
    assert all(leaf.grad is not None for leaf in inputs.values())
