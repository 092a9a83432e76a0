"""PMGLayer on its own: the nn.GRU-like API, streaming continuation, padding and resets through the conv."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_padded_steps_are_absent

from pmg import PMGLayer, PMGState, modeling_pmg
from pmg.modeling_pmg import _CausalDepthwiseConv


def make_layer(**overrides) -> PMGLayer:
    settings = dict(hidden_size=16, expand=2, gate_rank=4, conv_size=4, memory_floor_init=0.5, chunk_size=8)
    settings.update(overrides)
    layer = PMGLayer(**settings)
    with torch.no_grad():  # random (not identity-like) weights, so the checks below can fail
        for parameter in layer.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return layer


def test_gru_like_call_returns_outputs_and_final_state():
    layer = make_layer()
    x = torch.randn(3, 11, 16)
    y, state = layer(x)
    assert y.shape == (3, 11, 16)
    assert isinstance(state, PMGState)
    assert state.recurrent.shape == (3, 32) and state.recurrent.dtype == torch.float32
    assert state.conv.shape == (3, 3, 32)
    y_again, _ = layer(x, torch.zeros(3, 32))  # a plain memory tensor works as the initial state
    torch.testing.assert_close(y_again, y)


def test_a_call_without_state_returns_the_same_outputs_and_none(monkeypatch):
    layer = make_layer()
    x = torch.randn(3, 11, 16)
    y, _ = layer(x)
    windows = []
    monkeypatch.setattr(modeling_pmg, "_next_conv_window", lambda *args: windows.append(1))
    y_without_state, state = layer(x, return_state=False)
    assert state is None and windows == [], "no next conv window is built"
    torch.testing.assert_close(y_without_state, y, rtol=0, atol=0)


def test_streaming_in_pieces_equals_one_pass():
    for conv in (dict(use_short_conv=True), dict(use_short_conv=True, conv_size=1), dict(use_short_conv=False)):
        layer = make_layer(**conv)
        x = torch.randn(2, 23, 16)
        full, full_state = layer(x)
        pieces, state = [], None
        for start, stop in [(0, 1), (1, 3), (3, 12), (12, 13), (13, 23)]:
            y, state = layer(x[:, start:stop], state)
            pieces.append(y)
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state.recurrent, full_state.recurrent, rtol=1e-5, atol=1e-5)


def test_padding_never_touches_the_state():
    layer = make_layer()
    x = torch.randn(1, 10, 16)
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, :4] = 0
    y_padded, state_padded = layer(x, attention_mask=mask)
    y_alone, state_alone = layer(x[:, 4:])
    torch.testing.assert_close(y_padded[:, 4:], y_alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state_padded.recurrent, state_alone.recurrent, rtol=1e-5, atol=1e-5)


def test_padded_steps_anywhere_are_as_if_absent():
    assert_padded_steps_are_absent(make_layer(scan_impl="chunked"))


def test_right_padding_leaves_the_conv_window_of_the_real_steps():
    """The state after a right-padded call continues the sequence as the unpadded one does (the window holds the
    last real inputs, not zeros for the padding)."""
    layer = make_layer()
    x, follow = torch.randn(1, 7, 16), torch.randn(1, 3, 16)
    _, padded = layer(x, attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0, 0]]))
    _, unpadded = layer(x[:, :5])
    torch.testing.assert_close(padded.conv, unpadded.conv, rtol=0, atol=0)
    torch.testing.assert_close(layer(follow, padded)[0], layer(follow, unpadded)[0])


def test_reset_restarts_memory_and_conv_window():
    layer = make_layer()
    first, second = torch.randn(1, 9, 16), torch.randn(1, 6, 16)
    resets = torch.zeros(1, 15, dtype=torch.bool)
    resets[0, 9] = True
    y_packed, state_packed = layer(torch.cat([first, second], dim=1), resets=resets)
    y_alone, state_alone = layer(second)
    torch.testing.assert_close(y_packed[:, 9:], y_alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state_packed.conv, state_alone.conv)


def test_conv_window_forgets_tokens_before_a_late_reset():
    layer = make_layer()
    x = torch.randn(1, 8, 16)
    resets = torch.zeros(1, 8, dtype=torch.bool)
    resets[0, 7] = True  # the last document is one token long
    _, state = layer(x, resets=resets)
    _, state_last_alone = layer(x[:, 7:])
    torch.testing.assert_close(state.conv, state_last_alone.conv)
    follow = torch.randn(1, 3, 16)
    torch.testing.assert_close(layer(follow, state)[0], layer(follow, state_last_alone)[0])


def test_short_conv_is_torchs_causal_depthwise_conv_with_exact_gradients():
    layer = make_layer()
    values = torch.randn(3, 11, 32)
    output, window = layer._short_conv(values, None, None, None)
    reference = F.conv1d(F.pad(values.transpose(1, 2), (3, 0)), layer.conv.weight, layer.conv.bias, groups=32)
    torch.testing.assert_close(output, reference.transpose(1, 2))
    torch.testing.assert_close(window, values[:, -3:])
    # the hand-written backward, in float64, with and without taps masked at document resets
    padded = torch.randn(2, 9, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    tap_mask = torch.rand(2, 6, 4) > 0.3
    for mask in (None, tap_mask):
        assert torch.autograd.gradcheck(_CausalDepthwiseConv.apply, (padded, weight, bias, mask))


def test_layer_under_bf16_autocast_is_finite_over_a_million_steps():
    layer = make_layer(hidden_size=8, expand=1, gate_rank=2, chunk_size=64)
    x = torch.randn(1, 1_000_000, 8)
    with torch.no_grad():
        y_fp32, _ = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_bf16, state_bf16 = layer(x)
    assert torch.isfinite(y_bf16).all() and torch.isfinite(state_bf16.recurrent).all()
    assert state_bf16.recurrent.dtype == torch.float32
    # bf16 projections (3 significant digits) bound the agreement; the fp32 scan adds no drift over 1e6 steps
    torch.testing.assert_close(y_bf16[:, -1000:].float(), y_fp32[:, -1000:], rtol=0.1, atol=0.1)
    relative_error = (y_bf16.float() - y_fp32).norm() / y_fp32.norm()
    assert relative_error < 0.05


def test_layer_trains_its_gate_shape_and_floor():
    layer = make_layer()
    y, _ = layer(torch.randn(2, 16, 16))
    y.pow(2).mean().backward()
    for name in ("sharpness_raw", "shift", "asymmetry_raw", "floor_logit"):
        gradient = getattr(layer, name).grad
        assert gradient is not None and gradient.abs().sum() > 0, name


def test_a_float64_layer_is_float64_throughout_and_passes_gradcheck():
    """The stored gate-shape parameters are constrained in fp64 too: gradcheck of the whole layer in those
    parameters (rounding them to fp32 fails it)."""
    layer = make_layer(hidden_size=4, expand=1, gate_rank=2, chunk_size=4, scan_impl="chunked").double()
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    names = ("sharpness_raw", "shift", "asymmetry_raw", "floor_logit")

    def outputs(*shape):
        return torch.func.functional_call(layer, dict(zip(names, shape, strict=True)), (x,))[0]

    shape = tuple(getattr(layer, name).detach().clone().requires_grad_() for name in names)
    assert outputs(*shape).dtype == torch.float64
    assert torch.autograd.gradcheck(outputs, shape)


def test_inputs_of_the_wrong_shape_are_named_and_integer_flags_read_as_booleans():
    layer = make_layer()
    x = torch.randn(3, 10, 16)
    wrong = {
        "attention_mask must have shape \\(3, 10\\)": dict(attention_mask=torch.ones(3, 9)),
        "resets must have shape \\(3, 10\\)": dict(resets=torch.zeros(2, 10, dtype=torch.bool)),
        "state.conv must have shape \\(3, 3, 32\\)": dict(state=PMGState(torch.zeros(3, 32), torch.zeros(3, 2, 32))),
        "state.recurrent must have shape \\(3, 32\\)": dict(state=PMGState(torch.zeros(2, 32))),
    }
    for message, arguments in wrong.items():
        with pytest.raises(ValueError, match=message):
            layer(x, **arguments)
    flags = torch.zeros(3, 10, dtype=torch.long)
    flags[:, 4] = 1
    expected = layer(x, attention_mask=flags.bool().logical_not(), resets=flags.bool())
    actual = layer(x, attention_mask=1.0 - flags.float(), resets=flags)
    for got, want in zip(
        torch.utils._pytree.tree_leaves(actual), torch.utils._pytree.tree_leaves(expected), strict=True
    ):
        assert torch.equal(got, want)


def test_a_layer_runs_on_the_meta_device_for_shapes_alone():
    with torch.device("meta"):
        layer = make_layer(scan_impl="chunked")
        output, state = layer(torch.randn(2, 5, 16))
    assert output.shape == (2, 5, 16) and output.is_meta and state.recurrent.shape == (2, 32)
