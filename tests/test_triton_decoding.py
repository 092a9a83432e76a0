"""The fused decoding step against PMGLayer's PyTorch path: outputs, memory and conv window after one token.

After a prefill, with and without the short convolution, with a padded step, over one or two (partial) channel
blocks, in fp32 and bf16; then through whole models: step-by-step decoding against a full forward pass, greedy
generation against the chunked scan, and which calls take the kernel. Without a GPU the kernel runs in the Triton
interpreter on CPU tensors.
"""

import copy

import pytest
import torch
from conftest import TRITON_DEVICE as DEVICE
from conftest import count_calls, import_triton_modules, perturbed, tiny_config

from pmg import PMGForCausalLM, PMGLayer
from pmg.modeling_pmg import PMGState

triton_scan, triton_decoding = import_triton_modules("triton_scan", "triton_decoding")

FP32_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def layer_pair(hidden_size: int, use_short_conv: bool, dtype: torch.dtype) -> tuple[PMGLayer, PMGLayer]:
    """The same perturbed layer twice: on the chunked PyTorch scan, and on the Triton kernels."""
    reference = perturbed(PMGLayer(hidden_size, gate_rank=8, use_short_conv=use_short_conv, scan_impl="chunked"))
    fused = PMGLayer(hidden_size, gate_rank=8, use_short_conv=use_short_conv, scan_impl="triton")
    fused.load_state_dict(reference.state_dict())
    return reference.to(DEVICE, dtype), fused.to(DEVICE, dtype)


def count_fused_steps(monkeypatch) -> list[int]:
    """Record every launch of the fused decoding step (PMGLayer imports it at each call)."""
    return count_calls(monkeypatch, triton_decoding, "triton_decoding_step")


def step_outputs(layer: PMGLayer, step: torch.Tensor, state: PMGState | None, mask: torch.Tensor | None) -> list:
    """y, the memory and the conv window after one step, in fp32 (the window is None without a conv)."""
    output, new_state = layer(step.to(layer.value_proj.weight.dtype), state, attention_mask=mask)
    return [None if tensor is None else tensor.float() for tensor in (output, *new_state)]


def fp32_state(state: PMGState) -> PMGState:
    return PMGState(*(None if tensor is None else tensor.float() for tensor in state))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("use_short_conv", [True, False], ids=["conv", "no-conv"])
@pytest.mark.parametrize("hidden_size", [24, 200], ids=["one-block", "two-blocks"])
@torch.no_grad()
def test_a_step_after_a_prefill_matches_the_pytorch_step(monkeypatch, dtype, use_short_conv, hidden_size):
    """fp32: the same numbers. bf16: both paths round differently (the kernel sums the conv taps in fp32, PyTorch
    rounds after each), so each is held to an fp32 run on the same bf16 inputs and weights, and the kernel may be off
    by no more than PyTorch's own bf16 path (which was 0.10 on outputs of magnitude 20 here)."""
    reference, fused = layer_pair(hidden_size, use_short_conv, dtype)
    exact = PMGLayer(hidden_size, gate_rank=8, use_short_conv=use_short_conv, scan_impl="chunked").to(DEVICE)
    exact.load_state_dict({name: tensor.float() for name, tensor in reference.state_dict().items()})
    _, state = reference(torch.randn(3, 5, hidden_size, device=DEVICE, dtype=dtype))
    step = torch.randn(3, 1, hidden_size, device=DEVICE).to(dtype)
    mask = torch.tensor([[1], [0], [1]], device=DEVICE)  # the second row's step is padding
    launches = count_fused_steps(monkeypatch)
    for step_state, step_mask in [(state, mask), (state, None), (None, None)]:
        actual = step_outputs(fused, step, step_state, step_mask)
        expected = step_outputs(reference, step, step_state, step_mask)
        exact_state = None if step_state is None else fp32_state(step_state)
        for name, got, want, true in zip(
            ("y", "memory", "window"), actual, expected, step_outputs(exact, step, exact_state, step_mask), strict=True
        ):
            if true is None:
                assert got is None and want is None, name
            elif dtype == torch.float32:
                torch.testing.assert_close(got, want, **FP32_TOLERANCE, msg=name)
            else:
                error, reference_error = (got - true).abs().max(), (want - true).abs().max()
                assert error <= 1.5 * reference_error + 1e-3, (
                    f"{name}: off by {error:.3g}, PyTorch {reference_error:.3g}"
                )
    assert len(launches) == 3
    # a padded step leaves the memory and the conv window exactly as they were; a real one shifts the window
    _, padded_state = fused(step, state, attention_mask=mask)
    assert padded_state.recurrent.dtype == torch.float32
    torch.testing.assert_close(padded_state.recurrent[1], state.recurrent[1], rtol=0, atol=0)
    if use_short_conv:
        torch.testing.assert_close(padded_state.conv[1], state.conv[1], rtol=0, atol=0)
        torch.testing.assert_close(padded_state.conv[0, :-1], state.conv[0, 1:], rtol=0, atol=0)


@torch.no_grad()
def test_a_plain_memory_tensor_as_state_starts_an_empty_conv_window():
    reference, fused = layer_pair(24, True, torch.float32)
    memory = torch.randn(2, 24, device=DEVICE)
    step = torch.randn(2, 1, 24, device=DEVICE)
    expected, expected_state = reference(step, memory)
    actual, actual_state = fused(step, memory)
    torch.testing.assert_close(actual, expected, **FP32_TOLERANCE)
    torch.testing.assert_close(actual_state.conv, expected_state.conv, **FP32_TOLERANCE)


@torch.no_grad()
def test_decoding_token_by_token_matches_a_full_forward_pass(monkeypatch, layer_types):
    model = perturbed(PMGForCausalLM(tiny_config(scan_impl="triton", layer_types=layer_types))).to(DEVICE).eval()
    ids = torch.randint(1, 97, (2, 9), device=DEVICE)
    expected = model(ids).logits
    launches = count_fused_steps(monkeypatch)
    output = model(ids[:, :4], use_cache=True)
    steps = [output.logits]
    for position in range(4, 9):
        output = model(ids[:, position : position + 1], cache=output.cache, use_cache=True)
        steps.append(output.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-4, atol=1e-5)
    assert len(launches) == 5 * layer_types.count("linear_attention")


@torch.no_grad()
def test_decoding_steps_write_over_the_cache_tensors(monkeypatch):
    """With a cache, the fused step writes the new memory and conv window over the cache's own tensors: no copies
    into the cache, and the fixed addresses CUDA graphs need. The numbers are those of a step into new tensors,
    which the cache then copies (what happens while it records past windows for assisted generation)."""
    model = perturbed(PMGForCausalLM(tiny_config(scan_impl="triton"))).to(DEVICE).eval()
    ids = torch.randint(1, 97, (2, 6), device=DEVICE)
    in_place = model(ids[:, :5], use_cache=True).cache
    copied = copy.deepcopy(in_place)
    cached = [(layer.recurrent_states[0], layer.conv_states[0]) for layer in in_place.layers]
    before = [(memory.clone(), window.clone()) for memory, window in cached]
    copies = [count_calls(monkeypatch, type(in_place), f"update_{kind}_state") for kind in ("recurrent", "conv")]
    logits = model(ids[:, 5:], cache=in_place, use_cache=True).logits
    assert copies == [[], []]
    step = PMGLayer.forward  # the same step into new tensors, which the cache then copies in
    monkeypatch.setattr(PMGLayer, "forward", lambda self, *a, **kw: step(self, *a, **{**kw, "update_state": False}))
    expected = model(ids[:, 5:], cache=copied, use_cache=True).logits
    assert [len(calls) for calls in copies] == [len(in_place.layers)] * 2
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    for layer, reference, (memory, window), (old_memory, old_window) in zip(
        in_place.layers, copied.layers, cached, before, strict=True
    ):
        assert layer.recurrent_states[0] is memory and layer.conv_states[0] is window
        assert not torch.equal(memory, old_memory) and not torch.equal(window, old_window)
        torch.testing.assert_close(memory, reference.recurrent_states[0], rtol=0, atol=0)
        torch.testing.assert_close(window, reference.conv_states[0], rtol=0, atol=0)
    monkeypatch.undo()  # steps in place again
    in_place.reset()  # zeros, and no previous state: until a step, in place or not, writes one
    assert not in_place.has_previous_state()
    model(ids[:, :1], cache=in_place, use_cache=True)
    assert in_place.has_previous_state()


@pytest.mark.parametrize(
    "options", [dict(num_beams=3), dict(num_beams=2, num_return_sequences=2)], ids=["beams", "two-returned"]
)
@torch.no_grad()
def test_beam_search_over_cache_tensors_updated_in_place_matches_the_chunked_scan(options):
    """Beam search reorders the cache between steps (index_select into new tensors), which the in-place steps then
    write over."""
    chunked = perturbed(PMGForCausalLM(tiny_config(scan_impl="chunked"))).to(DEVICE).eval()
    fused = PMGForCausalLM(tiny_config(scan_impl="triton")).to(DEVICE).eval()
    fused.load_state_dict(chunked.state_dict())
    ids = torch.randint(1, 97, (2, 5), device=DEVICE)
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, **options)
    torch.testing.assert_close(fused.generate(ids, **settings), chunked.generate(ids, **settings), rtol=0, atol=0)


@torch.no_grad()
def test_greedy_generation_with_left_padding_matches_the_chunked_scan():
    chunked = perturbed(PMGForCausalLM(tiny_config(scan_impl="chunked"))).to(DEVICE).eval()
    fused = PMGForCausalLM(tiny_config(scan_impl="triton")).to(DEVICE).eval()
    fused.load_state_dict(chunked.state_dict())
    ids = torch.randint(1, 97, (2, 6), device=DEVICE)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :2] = 0
    options = dict(attention_mask=attention_mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = chunked.generate(ids, **options)
    torch.testing.assert_close(fused.generate(ids, **options), expected, rtol=0, atol=0)


def test_only_single_tokens_without_autograd_take_the_fused_step(monkeypatch):
    launches = count_fused_steps(monkeypatch)
    _, fused = layer_pair(24, True, torch.float32)
    step = torch.randn(2, 1, 24, device=DEVICE)
    fused(step)  # autograd on: the scan kernels, which have a backward pass
    with torch.no_grad():
        fused(torch.randn(2, 3, 24, device=DEVICE))  # a prompt
        fused(step, resets=torch.ones(2, 1, dtype=torch.bool, device=DEVICE))
        assert launches == []
        fused(step)
        assert launches == [1]
        fused.scan_impl = "auto"
        fused(step)
        assert launches == [1] * (2 if DEVICE == "cuda" else 1), "auto: the kernel on CUDA only"


def test_the_fused_step_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_scan, "INTERPRETED", False)
    layer = PMGLayer(24, gate_rank=8, scan_impl="triton")
    with torch.no_grad(), pytest.raises(ValueError, match="runs on CUDA tensors"):
        layer(torch.randn(2, 1, 24))


@torch.no_grad()
def test_write_weights_come_from_the_kernel_too(monkeypatch):
    """`output_gates` (and so a model trained with the gate regulariser) keeps the fused step."""
    reference, fused = layer_pair(24, True, torch.float32)
    _, state = reference(torch.randn(3, 5, 24, device=DEVICE))
    step = torch.randn(3, 1, 24, device=DEVICE)
    mask = torch.tensor([[1], [0], [1]], device=DEVICE)
    launches = count_fused_steps(monkeypatch)
    *_, expected = reference(step, state, attention_mask=mask, output_gates=True)
    *_, actual = fused(step, state, attention_mask=mask, output_gates=True)
    assert launches == [1] and actual.dtype == torch.float32 and actual.shape == (3, 1, 24)
    torch.testing.assert_close(actual, expected, **FP32_TOLERANCE)
    assert torch.equal(actual[1], torch.zeros_like(actual[1])), "a padded step writes nothing"
    model = perturbed(PMGForCausalLM(tiny_config(scan_impl="triton", gate_l1=0.01))).to(DEVICE).eval()
    ids = torch.randint(1, 97, (1, 4), device=DEVICE)
    model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert len(launches) == 1 + 2 * 4, "two decoding steps through each of the four layers"


@pytest.mark.parametrize(
    ("argument", "wrong", "message"),
    [
        ("state", lambda state: state.recurrent[:1], "state must have shape"),  # one row for a batch of three
        ("window", lambda state: state.conv[:, :1], "window must have shape"),  # one step of a 3-step window
        ("mask", lambda state: torch.ones(3, dtype=torch.bool, device=DEVICE), "mask must have shape"),
    ],
)
@torch.no_grad()
def test_inputs_of_the_wrong_shape_are_named_instead_of_read_out_of_bounds(argument, wrong, message):
    _, fused = layer_pair(24, True, torch.float32)
    _, state = fused(torch.randn(3, 5, 24, device=DEVICE))
    arguments = dict(state=state.recurrent, window=state.conv, mask=None)
    arguments[argument] = wrong(state)
    conv_weight, conv_bias = fused._conv_parameters()
    parameters = (fused.sharpness_raw, fused.shift, fused.asymmetry_raw, fused.floor_logit)
    z = torch.randn(3, 1, 24, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        triton_decoding.triton_decoding_step(
            z, torch.randn_like(z), *parameters, conv_weight=conv_weight, conv_bias=conv_bias, **arguments
        )


@torch.no_grad()
def test_strided_gate_parameters_and_conv_bias_give_the_contiguous_step():
    """The launcher makes the per-channel vectors contiguous: a caller's strided views read their own values."""
    _, fused = layer_pair(24, True, torch.float32)
    _, state = fused(torch.randn(3, 5, 24, device=DEVICE))
    conv_weight, conv_bias = fused._conv_parameters()
    vectors = [fused.sharpness_raw, fused.shift, fused.asymmetry_raw, fused.floor_logit, conv_bias]
    strided = [torch.stack([vector, torch.randn_like(vector)], dim=1)[:, 0] for vector in vectors]
    assert not any(view.is_contiguous() for view in strided)
    z = torch.randn(3, 1, 24, device=DEVICE)
    v = torch.randn_like(z)
    step = triton_decoding.triton_decoding_step
    window = dict(conv_weight=conv_weight, state=state.recurrent, window=state.conv)
    expected = step(z, v, *vectors[:4], conv_bias=vectors[4], **window)
    actual = step(z, v, *strided[:4], conv_bias=strided[4], **window)
    for name, output, reference in zip(("h", "memory", "window"), actual, expected, strict=False):
        torch.testing.assert_close(output, reference, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    ("state", "window", "message"),
    [
        (lambda state: state.recurrent.double(), lambda state: state.conv, r"fp32 state \(got torch.float64"),
        (lambda state: None, lambda state: state.conv, r"fp32 state \(got None\)"),
        (lambda state: state.recurrent, lambda state: None, r"window to write over \(got None\)"),
    ],
    ids=["fp64-memory", "no-memory", "no-window"],
)
@torch.no_grad()
def test_a_step_in_place_refuses_what_it_cannot_write_over(state, window, message):
    _, fused = layer_pair(24, True, torch.float32)
    _, prefill = fused(torch.randn(3, 5, 24, device=DEVICE))
    conv_weight, conv_bias = fused._conv_parameters()
    parameters = (fused.sharpness_raw, fused.shift, fused.asymmetry_raw, fused.floor_logit)
    z = torch.randn(3, 1, 24, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        triton_decoding.triton_decoding_step(
            z,
            z,
            *parameters,
            state=state(prefill),
            window=window(prefill),
            conv_weight=conv_weight,
            conv_bias=conv_bias,
            in_place=True,
        )
