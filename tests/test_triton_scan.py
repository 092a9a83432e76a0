"""The fused Triton scan against the step-by-step reference: outputs and gradients of every input.

With padding, resets and initial states, over several chunks and channel blocks whose last ones are partial, in fp32
and bf16. Without a GPU the kernels run on CPU in the Triton interpreter, which runs each scan combine in Python, so
the shapes stay tiny; with one, the same tests run the compiled kernels on it, plus a long-sequence check.
"""

import importlib.util
from functools import partial

import pytest
import torch
import torch._dynamo.testing
from conftest import TRITON_DEVICE as DEVICE
from conftest import (
    assert_accepts_any_strides,
    count_calls,
    import_triton_modules,
    operator_calls,
    perturbed,
    tiny_config,
)
from torch.fx.experimental.proxy_tensor import make_fx

from pmg import PMGForCausalLM
from pmg.scan_pmg import pmg_scan

(triton_scan,) = import_triton_modules("triton_scan")
needs_gpu = pytest.mark.skipif(DEVICE == "cpu", reason="too slow for the Triton interpreter")

FP32_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
# bf16 z and v: both backends see the same rounded inputs and compute in fp32; the states and input gradients are
# stored in bf16 (8-bit mantissa, relative step 2^-8 ~ 4e-3), so they agree to a bf16 rounding step or two
BF16_TOLERANCE = dict(rtol=1e-2, atol=1e-2)
TILES = dict(block_t=8, block_d=16)  # T=37, D=24: five chunks and two channel blocks, the last of each partial


def scan_inputs(batch=2, length=37, channels=24, dtype=torch.float32) -> dict:
    """Gate logits, values and per-channel gate parameters, with padding, resets and an initial state."""
    mask = torch.ones(batch, max(length, 37), dtype=torch.bool)
    mask[1, :5] = False  # left padding
    mask[0, 20:23] = False  # a padded gap
    resets = torch.zeros_like(mask)
    resets[0, 8] = resets[0, 9] = resets[1, 5] = resets[1, 16] = True  # at a chunk boundary, twice in a row, ...
    resets[0, 21] = True  # ... and inside padding, where the mask wins
    inputs = dict(
        z=(torch.randn(batch, length, channels) * 2).to(dtype),
        v=torch.randn(batch, length, channels).to(dtype),
        sharpness=torch.rand(channels) * 3 + 0.2,
        shift=torch.randn(channels) * 0.5,
        asymmetry=torch.rand(channels) * 2 + 0.3,
        floor=torch.rand(channels) * 0.95,
        initial_state=torch.randn(batch, channels),
        mask=mask[:, :length],
        resets=resets[:, :length],
    )
    return {name: tensor.to(DEVICE) for name, tensor in inputs.items()}


def run_with_grads(scan, inputs: dict, use_write: bool = True, **kwargs):
    """Outputs and the gradients of every floating-point input under a loss that uses states, final and w."""
    leaves = {
        name: tensor.clone().requires_grad_() if tensor.is_floating_point() else tensor
        for name, tensor in inputs.items()
    }
    states, final, write = scan(**leaves, **kwargs)
    weights = torch.linspace(-1, 1, states.numel(), device=DEVICE).view_as(states)
    loss = (states.float() * weights).sum() + (final * final.detach().sign()).sum()
    if use_write:
        loss = loss + (write * weights.flip(-1)).sum()
    loss.backward()
    grads = {name: leaf.grad for name, leaf in leaves.items() if leaf.is_floating_point()}
    return (states, final, write), grads


def assert_scans_match(actual, expected, tolerance):
    (outputs, grads), (reference_outputs, reference_grads) = actual, expected
    for name, output, reference in zip(("states", "final", "write"), outputs, reference_outputs, strict=True):
        if reference is None:
            assert output is None, name
            continue
        assert output.dtype == reference.dtype, name
        torch.testing.assert_close(output, reference, **tolerance, msg=name)
    assert grads.keys() == reference_grads.keys()
    for name, reference in reference_grads.items():
        assert grads[name].dtype == reference.dtype, name
        torch.testing.assert_close(grads[name], reference, **tolerance, msg=f"gradient of {name}")


def test_triton_is_available():
    assert triton_scan.is_triton_available()


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float32, FP32_TOLERANCE), (torch.bfloat16, BF16_TOLERANCE)], ids=["fp32", "bf16"]
)
def test_outputs_and_gradients_match_the_recurrent_reference(dtype, tolerance):
    inputs = scan_inputs(dtype=dtype)
    expected = run_with_grads(pmg_scan, inputs, impl="recurrent")
    actual = run_with_grads(triton_scan.triton_pmg_scan, inputs, **TILES)
    assert_scans_match(actual, expected, tolerance)


@pytest.mark.parametrize("prefetch", [False, True], ids=["chunk-by-chunk", "prefetching"])
@pytest.mark.parametrize("segments", [1, 2, 3, 5], ids=["one-segment", "3+2-chunks", "2+2+1-chunks", "a-chunk-each"])
def test_segments_scanned_side_by_side_match_the_reference(monkeypatch, segments, prefetch):
    """The five chunks cut into segments whose summaries carry the state forward and dL/dh backward: with padding
    and resets inside and across segment boundaries, an initial state, and a loss on states, final state and w. With
    PREFETCH each chunk's tiles are loaded while the one before is computed (the last load of a segment, and the
    first of an empty one, load nothing), in the summary passes too."""
    monkeypatch.setattr(triton_scan, "PREFETCH", prefetch)
    inputs = scan_inputs()
    expected = run_with_grads(pmg_scan, inputs, impl="recurrent")
    actual = run_with_grads(triton_scan.triton_pmg_scan, inputs, **TILES, segments=segments)
    assert_scans_match(actual, expected, FP32_TOLERANCE)


@pytest.mark.parametrize("segments", [1, 3], ids=["one-segment", "three-segments"])
def test_stored_gate_parameters_are_constrained_inside_the_kernels(segments):
    """raw_shape=True: the kernels apply the softplus and sigmoid that `constrain_gate_shape` applies in PyTorch, and
    carry the parameter gradients through them, as autograd does through the reference's transforms."""
    channels = 24
    inputs = scan_inputs(channels=channels) | dict(
        sharpness=torch.randn(channels, device=DEVICE),
        asymmetry=torch.randn(channels, device=DEVICE),
        floor=torch.randn(channels, device=DEVICE) * 2,
    )
    expected = run_with_grads(pmg_scan, inputs, impl="recurrent", raw_shape=True)
    actual = run_with_grads(triton_scan.triton_pmg_scan, inputs, raw_shape=True, **TILES, segments=segments)
    assert_scans_match(actual, expected, FP32_TOLERANCE)


def test_gate_parameters_far_below_zero_keep_their_gradients_accurate():
    """Stored sharpness and asymmetry of -12: softplus and log-sigmoid in fp32 add exp(-12) ~ 6e-6 to 1, which
    rounds; their series keeps it (the gradient of z was 9e-3 off in relative terms before)."""
    channels = 24
    inputs = scan_inputs(channels=channels) | dict(
        sharpness=torch.full((channels,), -12.0, device=DEVICE),
        asymmetry=torch.linspace(-12.0, 2.0, channels, device=DEVICE),
        floor=torch.randn(channels, device=DEVICE) * 2,
    )
    expected = run_with_grads(pmg_scan, inputs, impl="recurrent", raw_shape=True)
    actual = run_with_grads(triton_scan.triton_pmg_scan, inputs, raw_shape=True, **TILES)
    assert_scans_match(actual, expected, FP32_TOLERANCE)
    # k ~ 6e-6 scales dL/dz and dL/dm: compare them to their own size, not to an absolute tolerance
    for name in ("z", "shift"):
        gradient, reference = actual[1][name], expected[1][name]
        assert (gradient - reference).abs().max() <= 1e-4 * reference.abs().max(), name


@pytest.mark.parametrize("impl", ["chunked", "recurrent", "triton"])
def test_a_second_derivative_is_refused_by_name(impl):
    """The scans' hand-written backward passes run once: differentiating them again raises, never returns zeros."""
    inputs = scan_inputs(length=5, channels=3)
    if impl != "triton":
        inputs = {name: tensor.cpu() for name, tensor in inputs.items()}
    z, v = inputs.pop("z").requires_grad_(), inputs.pop("v").requires_grad_()
    states = pmg_scan(z, v, **inputs, impl=impl)[0]
    grad_z, grad_v = torch.autograd.grad(states.square().sum(), (z, v), create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice a function that was marked with @once_differentiable"):
        (grad_z.square().sum() + grad_v.square().sum()).backward()


def test_a_loss_on_the_states_alone_needs_no_other_gradients():
    """Neither the final state nor the write weights reach the loss, as in a model: their gradients arrive as None
    (no zeros are made for them) and the kernel starts dL/dh at zero after the last step."""
    inputs = scan_inputs()
    leaves = {name: tensor.clone().requires_grad_() for name, tensor in inputs.items() if tensor.is_floating_point()}
    masks = {"mask": inputs["mask"], "resets": inputs["resets"]}
    grads, reference_grads = (
        torch.autograd.grad(scan(**leaves, **masks, **kwargs)[0].sum(), list(leaves.values()))
        for scan, kwargs in ((triton_scan.triton_pmg_scan, TILES), (pmg_scan, dict(impl="recurrent")))
    )
    for grad, reference in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, reference, **FP32_TOLERANCE)


def test_segments_carry_the_final_state_gradient_back_to_the_first():
    inputs = scan_inputs()
    leaves = {name: tensor.clone().requires_grad_() for name, tensor in inputs.items() if tensor.is_floating_point()}
    masks = {"mask": inputs["mask"], "resets": torch.zeros_like(inputs["resets"])}  # no reset cuts the path
    _, final, _ = triton_scan.triton_pmg_scan(**leaves, **masks, **TILES, segments=3)
    grads = torch.autograd.grad(final.sum(), [leaves["z"], leaves["initial_state"]])
    _, reference_final, _ = pmg_scan(**leaves, **masks, impl="recurrent")
    reference_grads = torch.autograd.grad(reference_final.sum(), [leaves["z"], leaves["initial_state"]])
    assert reference_grads[1].abs().min() > 0, "the initial state must reach the final one"
    for grad, reference in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, reference, **FP32_TOLERANCE)


def empty_inputs(batch: int, length: int, channels: int) -> dict:
    """`scan_inputs` cut down to a shape with a zero in it."""
    shape = (batch, length, channels)
    sizes = {"z": shape, "v": shape, "mask": shape[:2], "resets": shape[:2], "initial_state": (batch, channels)}
    return {
        name: tensor[tuple(slice(size) for size in sizes.get(name, (channels,)))]
        for name, tensor in scan_inputs().items()
    }


@pytest.mark.parametrize("shape", [(0, 5, 8), (2, 5, 0)], ids=["no-rows", "no-channels"])
def test_empty_batches_and_widths_match_the_reference(shape):
    inputs = empty_inputs(*shape)
    expected = run_with_grads(pmg_scan, inputs, impl="recurrent")
    actual = run_with_grads(triton_scan.triton_pmg_scan, inputs, **TILES)
    assert_scans_match(actual, expected, FP32_TOLERANCE)


@pytest.mark.parametrize("scan", ["triton kernels", "pmg_scan"])
def test_no_steps_leave_the_state_as_it_was(scan):
    inputs = empty_inputs(2, 0, 8)
    initial = inputs["initial_state"].clone().requires_grad_()
    function = triton_scan.triton_pmg_scan if scan == "triton kernels" else partial(pmg_scan, impl="chunked")
    states, final, write = function(**{**inputs, "initial_state": initial})
    assert states.shape == write.shape == (2, 0, 8) and final.dtype == torch.float32
    torch.testing.assert_close(final, initial, rtol=0, atol=0)
    final.backward(torch.arange(16.0).view(2, 8))
    torch.testing.assert_close(initial.grad, torch.arange(16.0).view(2, 8))


def test_segments_fill_the_gpu_only_where_rows_and_channels_are_too_few(monkeypatch):
    monkeypatch.setattr(triton_scan, "_multiprocessors", lambda device: 132)
    cpu = torch.device("cpu")
    # 8 x 2048 at width 768: 8 rows x 48 channel blocks are enough programs
    assert triton_scan.segments_for(384, 64, cpu) == 1
    # 1 x 16384: 48 programs, brought up to 2 per multiprocessor
    assert triton_scan.segments_for(48, 512, cpu) == 6
    # a short sequence: no segment under MIN_CHUNKS_PER_SEGMENT chunks
    assert triton_scan.segments_for(1, 9, cpu) == 9 // triton_scan.MIN_CHUNKS_PER_SEGMENT
    # as asked, but never more segments than chunks, nor an empty one (5 chunks in 4 would leave the last empty)
    assert triton_scan.segments_for(384, 64, cpu, requested=3) == 3
    assert triton_scan.segments_for(384, 5, cpu, requested=9) == 5
    assert triton_scan.segments_for(384, 5, cpu, requested=4) == 3
    with pytest.raises(ValueError, match="segments must be at least 1"):
        triton_scan.segments_for(384, 64, cpu, requested=0)


def test_default_tiles_and_no_optional_inputs_match_the_reference():
    inputs = scan_inputs(length=40, channels=16)
    for name in ("initial_state", "mask", "resets"):
        del inputs[name]
    expected = run_with_grads(pmg_scan, inputs, impl="recurrent")
    actual = run_with_grads(pmg_scan, inputs, impl="triton")
    assert_scans_match(actual, expected, FP32_TOLERANCE)


@pytest.mark.parametrize("length", [1, 3])
def test_short_sequences_and_the_decoding_step_match_the_reference(length):
    inputs = scan_inputs(length=length, channels=20)
    inputs["mask"][:] = True
    expected = run_with_grads(pmg_scan, inputs, impl="recurrent")
    actual = run_with_grads(triton_scan.triton_pmg_scan, inputs, **TILES)
    assert_scans_match(actual, expected, FP32_TOLERANCE)


def test_without_write_weights_only_states_are_returned_and_gradients_still_match():
    inputs = scan_inputs()
    expected = run_with_grads(pmg_scan, inputs, use_write=False, impl="recurrent", return_write=False)
    actual = run_with_grads(triton_scan.triton_pmg_scan, inputs, use_write=False, return_write=False, **TILES)
    assert expected[0][2] is None
    assert_scans_match(actual, expected, FP32_TOLERANCE)


def test_gradients_flow_from_the_final_state_alone():
    inputs = scan_inputs()
    leaves = {name: tensor.clone().requires_grad_() for name, tensor in inputs.items() if tensor.is_floating_point()}
    masks = {"mask": inputs["mask"], "resets": inputs["resets"]}
    _, final, _ = triton_scan.triton_pmg_scan(**leaves, **masks, **TILES)
    (grad_z,) = torch.autograd.grad(final.sum(), leaves["z"])
    _, reference_final, _ = pmg_scan(**leaves, **masks, impl="recurrent")
    (reference_grad_z,) = torch.autograd.grad(reference_final.sum(), leaves["z"])
    torch.testing.assert_close(grad_z, reference_grad_z, **FP32_TOLERANCE)


def test_a_model_trains_the_same_with_the_triton_scan():
    # padding, packed documents and the gate penalty (whose gradient reaches the kernel through the write weights)
    chunked = perturbed(PMGForCausalLM(tiny_config(gate_l1=0.1, scan_impl="chunked"))).to(DEVICE)
    fused = PMGForCausalLM(tiny_config(gate_l1=0.1, scan_impl="triton")).to(DEVICE)
    fused.load_state_dict(chunked.state_dict())
    ids = torch.randint(1, 97, (2, 12), device=DEVICE)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0
    position_ids = torch.cat([torch.arange(7), torch.arange(5)]).expand(2, -1).to(DEVICE)
    losses = []
    for model in (chunked, fused):
        output = model(ids, attention_mask=attention_mask, position_ids=position_ids, labels=ids)
        output.loss.backward()
        losses.append(output.loss)
    torch.testing.assert_close(losses[1], losses[0], **FP32_TOLERANCE)
    for (name, expected), actual in zip(chunked.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(actual.grad, expected.grad, **FP32_TOLERANCE, msg=name)


@needs_gpu
def test_a_model_compiled_with_inductor_trains_the_same_on_the_triton_scan():
    """The custom operators inside a real inductor graph (on CPU the compile tests use aot_eager)."""
    eager = perturbed(PMGForCausalLM(tiny_config(scan_impl="triton"))).to(DEVICE)
    compiled = PMGForCausalLM(tiny_config(scan_impl="triton")).to(DEVICE)
    compiled.load_state_dict(eager.state_dict())
    ids = torch.randint(1, 97, (2, 40), device=DEVICE)
    expected = eager(ids, labels=ids).loss
    actual = torch.compile(compiled, fullgraph=True)(ids, labels=ids).loss
    expected.backward()
    actual.backward()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    for (name, reference), parameter in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(
            parameter.grad, reference.grad, rtol=1e-3, atol=1e-5, msg=lambda message, name=name: f"{name}: {message}"
        )


def long_inputs(dtype: torch.dtype) -> dict:
    """4099 steps (129 chunks of 32) of 200 channels, with a long left padding and scattered resets."""
    inputs = scan_inputs(batch=3, length=4099, channels=200, dtype=dtype)
    inputs["mask"][2, :1000] = False
    inputs["resets"] = torch.rand(3, 4099, device=DEVICE) < 0.002
    return inputs


@needs_gpu
def test_long_bf16_sequences_match_the_chunked_scan():
    inputs = long_inputs(torch.bfloat16)
    expected = run_with_grads(pmg_scan, inputs, impl="chunked")
    assert_scans_match(run_with_grads(pmg_scan, inputs, impl="triton"), expected, BF16_TOLERANCE)


@needs_gpu
def test_long_fp32_sequences_are_accurate_against_fp64():
    """The per-channel parameter gradients sum ~12k terms, which two fp32 backends round differently (on an H100 the
    floor gradient, of magnitude 767, differed by up to 7e-4 between them): each is held to an fp64 run instead,
    within 1e-5 of the tensor's largest entry (measured: below 1e-6 for both backends)."""
    inputs = long_inputs(torch.float32)
    outputs, grads = run_with_grads(pmg_scan, inputs, impl="triton")
    exact_inputs = {name: tensor.double() if tensor.is_floating_point() else tensor for name, tensor in inputs.items()}
    exact_outputs, exact_grads = run_with_grads(pmg_scan, exact_inputs, impl="chunked")
    pairs = [*zip(("states", "final", "write"), outputs, exact_outputs, strict=True)]
    pairs += [(f"gradient of {name}", grads[name], exact_grads[name]) for name in exact_grads]
    for name, actual, exact in pairs:
        assert actual.dtype == torch.float32, name
        error = (actual.double() - exact).abs().max().item()
        assert error <= 1e-5 * exact.abs().max().item(), f"{name}: off by {error:.3g}"


def test_auto_picks_the_fused_kernels_for_sequences_on_cuda_only(monkeypatch):
    launches = count_calls(monkeypatch, triton_scan, "triton_pmg_scan")
    inputs = scan_inputs()
    pmg_scan(**inputs)
    assert launches == ([1] if DEVICE == "cuda" else []), "auto: Triton on CUDA, the PyTorch scan on CPU"
    sequences = ("z", "v", "mask", "resets")
    pmg_scan(**{name: tensor[:, :1] if name in sequences else tensor for name, tensor in inputs.items()})
    pmg_scan(**{name: tensor.double() if tensor.is_floating_point() else tensor for name, tensor in inputs.items()})
    assert len(launches) <= 1, "a decoding step and fp64 inputs stay on the PyTorch scan"


def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_scan, "INTERPRETED", False)
    inputs = {name: tensor.cpu() for name, tensor in scan_inputs(length=4).items()}
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        pmg_scan(**inputs, impl="triton")


def test_the_fused_scan_operators_pass_torch_library_checks():
    """Schema, fake (meta) shapes, autograd registration and AOT dispatch of both custom operators."""
    inputs = scan_inputs(length=20)
    leaves = {
        name: tensor.requires_grad_() if tensor.is_floating_point() else tensor for name, tensor in inputs.items()
    }
    gate = [leaves[name] for name in ("z", "v", "sharpness", "shift", "asymmetry", "floor")]
    masks = [leaves["mask"].to(torch.uint8), leaves["resets"].to(torch.uint8)]
    for return_write, raw_shape, segments in ((True, False, None), (False, True, 2)):
        arguments = (*gate, leaves["initial_state"], *masks, return_write, raw_shape, 8, 16, segments)
        torch.library.opcheck(triton_scan._scan_forward, arguments)
    states, final, _, checkpoints = triton_scan._scan_forward(*arguments)
    detached = [tensor.detach() for tensor in gate]
    for grad_final, raw_shape, segments in ((torch.randn_like(final), False, None), (None, True, 2)):
        grads = (torch.randn_like(states), grad_final, None)
        backward_arguments = (*detached, *masks, checkpoints.detach(), *grads, raw_shape, 8, 16, segments)
        torch.library.opcheck(triton_scan._scan_backward, backward_arguments)


def test_the_fused_scan_operators_accept_any_strides():
    inputs = scan_inputs(length=20)
    gate = [inputs[name] for name in ("z", "v", "sharpness", "shift", "asymmetry", "floor")]
    masks = [inputs["mask"].to(torch.uint8), inputs["resets"].to(torch.uint8)]
    arguments = (*gate, inputs["initial_state"], *masks, True, False, 8, 16, 2)
    assert_accepts_any_strides(triton_scan._scan_forward, *arguments)
    states, final, write, checkpoints = triton_scan._scan_forward(*arguments)
    grads = (torch.randn_like(states), torch.randn_like(final), torch.randn_like(write))
    assert_accepts_any_strides(triton_scan._scan_backward, *gate, *masks, checkpoints, *grads, False, 8, 16, 2)


def test_eager_mode_runs_the_kernels_without_the_operators_dispatch():
    """Outside torch.compile the custom operators' functions run through a plain autograd.Function: the operators'
    dispatch costs host time, and a training step on an H100 waits on the host. (The compile test below holds the
    two paths to the same outputs and gradients.)"""
    inputs = scan_inputs()
    gate = [inputs[name] for name in ("z", "v", "sharpness", "shift", "asymmetry", "floor")]
    masks = [inputs["mask"].to(torch.uint8), inputs["resets"].to(torch.uint8)]
    arguments = (*gate, inputs["initial_state"], *masks, True, False, 8, 16, None)
    assert operator_calls(triton_scan._NAMESPACE, lambda: triton_scan._scan_forward(*arguments)), "seen when called"
    eager = operator_calls(triton_scan._NAMESPACE, lambda: run_with_grads(triton_scan.triton_pmg_scan, inputs, **TILES))
    assert eager == []
    # named after the operator, so that a profile (benchmark.py's training profile) can tell where its time goes
    with torch.profiler.profile() as profile:
        run_with_grads(triton_scan.triton_pmg_scan, inputs, **TILES)
    assert {"triton_scan", "triton_scanBackward"} <= {event.key for event in profile.key_averages()}


def test_a_compiled_scan_takes_new_lengths_without_recompiling():
    """The tile sizes follow the length through shifts and ors (`next_power_of_2`), which keep it symbolic."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(triton_scan.triton_pmg_scan, backend=counter, dynamic=True, fullgraph=True)
    for length in (20, 25, 30):  # one tile size for all: a length needing another tile compiles once more
        inputs = scan_inputs(length=length)
        expected = run_with_grads(triton_scan.triton_pmg_scan, inputs, **TILES)
        assert_scans_match(run_with_grads(compiled, inputs, **TILES), expected, FP32_TOLERANCE)
    assert counter.frame_count == 1


def test_tracing_outside_torch_compile_records_the_operators():
    """make_fx (and fake tensors, jit.trace) must see the custom operators, not the eager path's direct launches."""
    inputs = scan_inputs(length=9)

    def states(*tensors):
        return triton_scan.triton_pmg_scan(**dict(zip(inputs, tensors, strict=True)), **TILES)[0]

    graph = make_fx(states, tracing_mode="fake")(*inputs.values())
    assert f"{triton_scan._NAMESPACE}.triton_scan_forward" in graph.code


def test_the_fused_scan_compiles_as_one_graph_with_the_same_outputs_and_gradients():
    inputs = scan_inputs()
    expected = run_with_grads(triton_scan.triton_pmg_scan, inputs, **TILES)
    compiled = torch.compile(triton_scan.triton_pmg_scan, fullgraph=True, backend="aot_eager")
    assert_scans_match(run_with_grads(compiled, inputs, **TILES), expected, FP32_TOLERANCE)


def test_a_second_copy_of_the_module_registers_its_own_operators():
    """A checkpoint's trust_remote_code copy (maybe another version) must not replace the installed kernels."""
    spec = importlib.util.spec_from_file_location("transformers_modules.checkpoint.triton_scan", triton_scan.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy._NAMESPACE != triton_scan._NAMESPACE
    installed = getattr(torch.ops, triton_scan._NAMESPACE).triton_scan_forward.default
    assert installed._schema.name == f"{triton_scan._NAMESPACE}::triton_scan_forward"
    assert getattr(torch.ops, copy._NAMESPACE).triton_scan_forward.default is not installed
