"""The chunked LM head + loss against transformers' loss on materialised logits: values and gradients."""

import pytest
import torch
from conftest import perturbed, tiny_config
from transformers.loss.loss_utils import ForCausalLMLoss

from pmg import PMGForCausalLM
from pmg.linear_cross_entropy import causal_lm_linear_cross_entropy

VOCAB = 50


def inputs(batch=3, length=11, width=16):
    hidden = torch.randn(batch, length, width, requires_grad=True)
    weight = (torch.randn(VOCAB, width) * 0.3).requires_grad_()
    labels = torch.randint(0, VOCAB, (batch, length))
    labels[0, :4] = labels[2, 7] = -100  # ignored tokens
    return hidden, weight, labels


def loss_and_grads(loss, hidden, weight):
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("num_items_in_batch", [None, 25])
@pytest.mark.parametrize("chunk_size", [7, 4096])  # several chunks, the last one partial; one chunk
def test_matches_the_transformers_loss_on_full_logits(chunk_size, num_items_in_batch):
    hidden, weight, labels = inputs()
    expected = loss_and_grads(ForCausalLMLoss(hidden @ weight.T, labels, VOCAB, num_items_in_batch), hidden, weight)
    hidden.grad = weight.grad = None
    fused = causal_lm_linear_cross_entropy(hidden, weight, labels, num_items_in_batch, chunk_size=chunk_size)
    for actual, reference in zip(loss_and_grads(fused, hidden, weight), expected, strict=True):
        torch.testing.assert_close(actual, reference, rtol=1e-5, atol=1e-6)


def test_pre_shifted_labels_and_bf16_autocast():
    hidden, weight, labels = inputs()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = loss_and_grads(ForCausalLMLoss(hidden @ weight.T, labels, VOCAB), hidden, weight)
        hidden.grad = weight.grad = None
        fused = causal_lm_linear_cross_entropy(hidden, weight, None, shift_labels=shifted, chunk_size=8)
    actual = loss_and_grads(fused, hidden, weight)
    assert actual[1].dtype == actual[2].dtype == torch.float32  # fp32 leaves get fp32 gradients
    for value, reference in zip(actual, expected, strict=True):
        torch.testing.assert_close(value, reference, rtol=2e-2, atol=2e-3)  # both multiply in bf16


def test_mismatched_labels_are_named():
    hidden, weight, labels = inputs()
    with pytest.raises(ValueError, match=r"labels of shape \(3, 10\) do not match \(3, 11\)"):
        causal_lm_linear_cross_entropy(hidden, weight, labels[:, :10])


def test_the_model_trains_the_same_with_the_fused_loss():
    torch.manual_seed(0)
    plain = perturbed(PMGForCausalLM(tiny_config(gate_l1=0.01))).train()
    fused = PMGForCausalLM(tiny_config(gate_l1=0.01, fuse_linear_cross_entropy=True)).train()
    fused.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 97, (2, 9))
    expected, actual = plain(ids, labels=ids), fused(ids, labels=ids)
    assert actual.logits is None and expected.logits is not None
    torch.testing.assert_close(actual.loss, expected.loss)
    expected.loss.backward()
    actual.loss.backward()
    for (name, parameter), twin in zip(plain.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(twin.grad, parameter.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert fused.eval()(ids, labels=ids).logits.shape == (2, 9, 97)  # evaluation keeps the logits
