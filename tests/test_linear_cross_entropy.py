"""The chunked LM head + loss, with and without the logits, against transformers' loss on materialised logits: values
and gradients, in the functions and in the model."""

import pytest
import torch
from accelerate import cpu_offload
from conftest import count_calls, perturbed, tiny_config
from torch.utils.flop_counter import FlopCounterMode
from transformers.loss import loss_utils
from transformers.loss.loss_utils import ForCausalLMLoss

from pmg import PMGForCausalLM
from pmg.linear_cross_entropy import causal_lm_linear_cross_entropy, causal_lm_logits_and_loss

VOCAB = 50


def inputs(batch=3, length=11, width=16, device="cpu"):
    hidden = torch.randn(batch, length, width, device=device, requires_grad=True)
    weight = (torch.randn(VOCAB, width, device=device) * 0.3).requires_grad_()
    labels = torch.randint(0, VOCAB, (batch, length), device=device)
    labels[0, :4] = labels[2, 7] = -100  # ignored tokens
    return hidden, weight, labels


def loss_and_grads(loss, hidden, weight):
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("num_items_in_batch", [None, 25])
@pytest.mark.parametrize("chunk_size", [7, 4096])  # several chunks, the last one partial; one chunk
@pytest.mark.parametrize("keeps_logits", [False, True])
def test_matches_the_transformers_loss_on_full_logits(chunk_size, num_items_in_batch, keeps_logits):
    hidden, weight, labels = inputs()
    expected_logits = hidden @ weight.T
    expected = loss_and_grads(ForCausalLMLoss(expected_logits, labels, VOCAB, num_items_in_batch), hidden, weight)
    hidden.grad = weight.grad = None
    if keeps_logits:
        logits, loss = causal_lm_logits_and_loss(hidden, weight, labels, num_items_in_batch, chunk_size=chunk_size)
        torch.testing.assert_close(logits, expected_logits.detach())
    else:
        loss = causal_lm_linear_cross_entropy(hidden, weight, labels, num_items_in_batch, chunk_size=chunk_size)
    for actual, reference in zip(loss_and_grads(loss, hidden, weight), expected, strict=True):
        torch.testing.assert_close(actual, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("uses_the_loss", [True, False])
def test_a_loss_on_the_kept_logits_gets_its_gradient(uses_the_loss):
    """The logits stay in the graph: what a user adds on them (here a z-loss) reaches hidden states and weight."""
    hidden, weight, labels = inputs()
    expected_logits = hidden @ weight.T
    z_loss = expected_logits.logsumexp(-1).square().mean()
    expected = ForCausalLMLoss(expected_logits, labels, VOCAB) + z_loss if uses_the_loss else z_loss
    expected = loss_and_grads(expected, hidden, weight)
    hidden.grad = weight.grad = None
    logits, loss = causal_lm_logits_and_loss(hidden, weight, labels, chunk_size=8)
    z_loss = logits.logsumexp(-1).square().mean()
    actual = loss_and_grads(loss + z_loss if uses_the_loss else z_loss, hidden, weight)
    for value, reference in zip(actual, expected, strict=True):
        torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
)
@pytest.mark.parametrize("keeps_logits", [False, True])
def test_pre_shifted_labels_and_bf16_autocast(keeps_logits, device):
    hidden, weight, labels = inputs(device=device)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    with torch.autocast(device, dtype=torch.bfloat16):
        expected_logits = hidden @ weight.T
        expected = loss_and_grads(ForCausalLMLoss(expected_logits, labels, VOCAB), hidden, weight)
        hidden.grad = weight.grad = None
        if keeps_logits:
            logits, loss = causal_lm_logits_and_loss(hidden, weight, None, shift_labels=shifted, chunk_size=8)
            assert logits.dtype == torch.bfloat16  # as nn.Linear under autocast
            torch.testing.assert_close(logits, expected_logits.detach())
        else:
            loss = causal_lm_linear_cross_entropy(hidden, weight, None, shift_labels=shifted, chunk_size=8)
    actual = loss_and_grads(loss, hidden, weight)
    assert actual[1].dtype == actual[2].dtype == torch.float32  # fp32 leaves get fp32 gradients
    for value, reference in zip(actual, expected, strict=True):
        torch.testing.assert_close(value, reference, rtol=2e-2, atol=2e-3)  # both multiply in bf16


@pytest.mark.parametrize("keeps_logits", [False, True])
@pytest.mark.parametrize(
    "hidden_trains, weight_trains, gradient_products",
    [(True, True, 2), (True, False, 1), (False, True, 1)],  # a frozen head (LoRA), a frozen body
)
def test_only_the_wanted_gradient_products(keeps_logits, hidden_trains, weight_trains, gradient_products):
    """Evaluation (no_grad) pays for the logits' product only; training adds the product of each gradient wanted."""
    hidden, weight, labels = inputs()
    hidden.requires_grad_(hidden_trains)
    weight.requires_grad_(weight_trains)
    loss_function = causal_lm_logits_and_loss if keeps_logits else causal_lm_linear_cross_entropy
    logits_flops = 2 * hidden.numel() * VOCAB
    for grad_enabled, products in ((False, 1), (True, 1 + gradient_products)):
        with torch.set_grad_enabled(grad_enabled), FlopCounterMode(display=False) as counter:
            loss = loss_function(hidden, weight, labels, chunk_size=8)
        assert counter.get_total_flops() == products * logits_flops
    loss = loss if not keeps_logits else loss[1]
    loss.backward()
    assert (hidden.grad is not None) == hidden_trains and (weight.grad is not None) == weight_trains


def test_labels_outside_the_vocabulary_are_refused_and_no_counted_label_gives_nan_as_in_transformers():
    hidden, weight, labels = inputs()
    for bad in (-1, VOCAB):
        wrong = labels.clone()
        wrong[1, 5] = bad
        with pytest.raises(RuntimeError, match=rf"labels must be token ids in \[0, {VOCAB}\) or -100"):
            causal_lm_logits_and_loss(hidden, weight, wrong)
    ignored = torch.full_like(labels, -100)
    assert ForCausalLMLoss(hidden @ weight.T, ignored, VOCAB).isnan()
    assert causal_lm_linear_cross_entropy(hidden, weight, ignored).isnan()


def test_bf16_gradients_are_scaled_in_fp32():
    """Without autocast, in bf16: the 1 / num_items scale must not be rounded to bf16 first (a 0.2% bias of every
    hidden-state gradient). Measured as the gradient's projection on an fp64 reference."""
    hidden, weight, labels = inputs(batch=4, length=64)
    reference = torch.autograd.grad(
        causal_lm_linear_cross_entropy(hidden.double(), weight.double(), labels, num_items_in_batch=3), hidden
    )[0]
    bf16_hidden = hidden.detach().bfloat16().requires_grad_()
    loss = causal_lm_linear_cross_entropy(bf16_hidden, weight.detach().bfloat16(), labels, num_items_in_batch=3)
    (gradient,) = torch.autograd.grad(loss, bf16_hidden)
    scale = (gradient.double() * reference).sum() / reference.square().sum()
    assert abs(scale - 1) < 1e-3, scale


def test_mismatched_labels_are_named():
    hidden, weight, labels = inputs()
    with pytest.raises(ValueError, match=r"labels of shape \(3, 10\) do not match \(3, 11\)"):
        causal_lm_linear_cross_entropy(hidden, weight, labels[:, :10])


def test_the_model_trains_the_same_with_the_chunked_losses_as_with_transformers_loss(monkeypatch):
    """Three twins: a replaced `loss_function` (here transformers' own loss on the logits) is what the model calls;
    by default the chunked loss keeps the logits; `fuse_linear_cross_entropy` drops them in training."""
    cross_entropy_calls = count_calls(monkeypatch, loss_utils, "fixed_cross_entropy")  # inside transformers' loss
    torch.manual_seed(0)
    reference = perturbed(PMGForCausalLM(tiny_config(gate_l1=0.01))).train()
    reference.loss_function = lambda **kwargs: ForCausalLMLoss(**kwargs)
    default = PMGForCausalLM(tiny_config(gate_l1=0.01)).train()
    fused = PMGForCausalLM(tiny_config(gate_l1=0.01, fuse_linear_cross_entropy=True)).train()
    ids = torch.randint(0, 97, (2, 9))
    expected = reference(ids, labels=ids)
    assert cross_entropy_calls == [1]
    for twin in (default, fused):
        twin.load_state_dict(reference.state_dict())
        output = twin(ids, labels=ids)
        if twin is fused:
            assert output.logits is None
        else:
            torch.testing.assert_close(output.logits, expected.logits)
        torch.testing.assert_close(output.loss, expected.loss)
        output.loss.backward()
    assert cross_entropy_calls == [1]  # the twins computed their loss in chunks
    expected.loss.backward()
    for name, parameter in reference.named_parameters():
        for twin in (default, fused):
            torch.testing.assert_close(twin.get_parameter(name).grad, parameter.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert fused.eval()(ids, labels=ids).logits.shape == (2, 9, 97)  # evaluation keeps the logits


def test_a_hooked_or_offloaded_head_is_called_not_read():
    """A user's forward hook on the head expects to see the logits, and accelerate's offload keeps the head's weight
    on the meta device outside the head's own call: with either, the model calls the head and transformers' loss."""
    torch.manual_seed(0)
    model = perturbed(PMGForCausalLM(tiny_config(tie_word_embeddings=False))).eval()
    ids = torch.randint(1, 97, (2, 9))
    expected = model(ids, labels=ids)
    seen = []
    handle = model.lm_head.register_forward_hook(lambda module, args, output: seen.append(output))
    hooked = model(ids, labels=ids)
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], hooked.logits)
    cpu_offload(model.lm_head, execution_device=torch.device("cpu"))
    assert model.lm_head.weight.device.type == "meta"
    offloaded = model(ids, labels=ids)
    torch.testing.assert_close(offloaded.loss, expected.loss)
    torch.testing.assert_close(offloaded.logits, expected.logits)
