"""Forward-pass API of the PMG models: outputs, losses, heads, training switches and bad input."""

import pytest
import torch
import torch.nn.functional as F
from conftest import HYBRID_LAYERS, perturbed, saved_activations, tiny_config, tiny_model

from pmg import PMGForCausalLM, PMGForSequenceClassification, optimizer_param_groups
from pmg.modeling_pmg import PMGLayer, PMGRMSNorm, _RMSNormFunction, read_pmg_state, silu_gated, softplus_inverse


def tokens(batch=2, length=12, vocab=97):
    return torch.randint(1, vocab, (batch, length))


def test_causal_lm_loss_is_the_shifted_cross_entropy(layer_types):
    model = tiny_model(PMGForCausalLM, layer_types=layer_types)
    ids = tokens()
    labels = ids.clone()
    labels[0, :3] = -100
    output = model(ids, labels=labels)
    expected = F.cross_entropy(output.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(output.loss, expected)
    assert output.gate_loss is None


def test_logits_to_keep_hidden_states_gates_and_tuple_outputs(layer_types):
    config = tiny_config(layer_types=layer_types)
    model = perturbed(PMGForCausalLM(config)).eval()
    ids = tokens()
    full = model(ids, output_hidden_states=True, output_gates=True)
    last = model(ids, logits_to_keep=1)
    torch.testing.assert_close(last.logits, full.logits[:, -1:])
    assert len(full.hidden_states) == config.num_hidden_layers + 1
    assert len(full.gates) == len(config.pmg_layer_indices)
    for layer_index, write in zip(config.pmg_layer_indices, full.gates, strict=True):
        floor = torch.sigmoid(model.model.layers[layer_index].pmg.floor_logit)
        assert write.shape == (2, 12, config.expand * config.hidden_size)
        assert (write >= 0).all() and (write <= 1 - floor + 1e-6).all()
    as_tuple = model(ids, return_dict=False)
    torch.testing.assert_close(as_tuple[0], full.logits)


def test_gate_l1_adds_the_mean_write_weight_and_reports_it():
    model = tiny_model(PMGForCausalLM, gate_l1=0.5)
    ids = tokens()
    output = model(ids, labels=ids, output_gates=True)
    mean_write = torch.stack([write.mean() for write in output.gates]).mean()
    torch.testing.assert_close(output.gate_loss, 0.5 * mean_write)
    ce = F.cross_entropy(output.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(output.loss, ce + output.gate_loss)
    output.loss.backward()
    assert model.model.layers[0].pmg.floor_logit.grad.abs().sum() > 0


def test_full_attention_hybrid_needs_no_sliding_window():
    model = tiny_model(PMGForCausalLM, layer_types=["linear_attention", "full_attention"] * 2, sliding_window=None)
    assert model(tokens()).logits.shape == (2, 12, 97)


def test_inputs_embeds_match_input_ids(layer_types):
    model = tiny_model(PMGForCausalLM, layer_types=layer_types)
    ids = tokens()
    embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(ids).logits)


def test_embeddings_are_tied_by_default_and_can_be_untied():
    tied = PMGForCausalLM(tiny_config())
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied = PMGForCausalLM(tiny_config(tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_resize_token_embeddings_keeps_ties_and_accepts_new_ids():
    model = PMGForCausalLM(tiny_config())
    model.resize_token_embeddings(120)
    assert model.config.vocab_size == 120
    assert model.lm_head.weight.shape == (120, 32) and model.lm_head.weight is model.model.embed_tokens.weight
    assert model(torch.tensor([[5, 119]])).logits.shape == (1, 2, 120)


def test_gradient_checkpointing_gives_the_same_gradients(layer_types):
    config = tiny_config(layer_types=layer_types)
    ids = tokens()
    reference = perturbed(PMGForCausalLM(config)).train()
    checkpointed = PMGForCausalLM(config).train()
    checkpointed.load_state_dict(reference.state_dict())
    checkpointed.activation_checkpointing_enable()
    for model in (reference, checkpointed):
        model(ids, labels=ids).loss.backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), checkpointed.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_autocast_forward_and_backward(layer_types, dtype):
    model = perturbed(PMGForCausalLM(tiny_config(layer_types=layer_types)))
    ids = tokens(length=40)
    fp32_loss = model(ids, labels=ids).loss
    with torch.autocast("cpu", dtype=dtype):
        half_loss = model(ids, labels=ids).loss
    half_loss.backward()
    assert torch.isfinite(half_loss)
    # half-precision projections bound the agreement (bf16 keeps 8 mantissa bits); the scan itself runs in fp32
    torch.testing.assert_close(half_loss.float(), fp32_loss, rtol=2e-2, atol=2e-2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_norms_hand_their_consumers_the_autocast_dtype_once():
    """Under autocast a norm's output is cast once, not once per projection that reads it (the same values)."""
    norm, projection = PMGRMSNorm(16), torch.nn.Linear(16, 8)
    x = torch.randn(2, 5, 16)
    assert norm(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        normed = norm(x)
        assert normed.dtype == torch.bfloat16
        torch.testing.assert_close(projection(normed), projection(norm.weight * F.rms_norm(x, (16,), eps=1e-6)))


def test_cpu_training_norm_matches_rms_norm_and_its_gradients():
    """The hand-written CPU norm (used when autograd records) against `F.rms_norm` differentiated by autograd."""
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(16, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-6, torch.float64), (x, weight))
    norm = PMGRMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 5, 16).to(dtype).requires_grad_()
        grad = torch.randn(3, 5, 16).to(dtype)
        output = norm(x)
        output.backward(grad)
        reference_x = x.detach().float().requires_grad_()
        reference_weight = norm.weight.detach().clone().requires_grad_()
        reference = F.rms_norm(reference_x, (16,), reference_weight, 1e-6)
        reference.backward(grad.float())
        assert output.dtype == x.grad.dtype == dtype
        tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(output.float(), reference, **tolerance)
        torch.testing.assert_close(x.grad.float(), reference_x.grad, **tolerance)
        torch.testing.assert_close(norm.weight.grad, reference_weight.grad, rtol=1e-4, atol=1e-5)
        norm.weight.grad = None


def test_torch_compile_captures_the_training_step_in_one_graph():
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward without inductor's C++
    build (minutes on a cold CPU machine, see README for measured compile times)."""
    config = tiny_config(layer_types=HYBRID_LAYERS, scan_impl="chunked")
    ids = tokens(length=32)
    eager = perturbed(PMGForCausalLM(config))
    compiled_model = PMGForCausalLM(config)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    eager_loss = eager(ids, labels=ids).loss
    compiled_loss = compiled(ids, labels=ids).loss
    eager_loss.backward()
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)
    gate = "model.layers.0.pmg.gate_net.up_proj.weight"
    grads = {name: p.grad for name, p in compiled_model.named_parameters()}
    torch.testing.assert_close(grads[gate], dict(eager.named_parameters())[gate].grad, rtol=1e-3, atol=1e-5)


def test_fresh_deep_model_is_the_identity_through_its_residuals_and_trains_out_of_it():
    model = PMGForCausalLM(tiny_config(num_hidden_layers=12, layer_types=None))
    ids = tokens(length=32)
    hidden = model.model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden[-2], hidden[0], rtol=0, atol=0)  # before the final norm
    model(ids, labels=ids).loss.backward()
    for layer in model.model.layers:
        assert layer.pmg.out_proj.weight.grad.abs().sum() > 0, "zero outputs still receive gradients"
        assert layer.mlp.down_proj.weight.grad.abs().sum() > 0


def test_init_weights_sets_every_custom_parameter_and_works_on_meta():
    config = tiny_config(memory_floor_init=0.8)
    with torch.device("meta"):
        model = PMGForCausalLM(config)
    assert model.model.layers[0].pmg.floor_logit.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    pmg_layers = [module for module in model.modules() if isinstance(module, PMGLayer)]
    floors = [torch.sigmoid(layer.floor_logit).mean().item() for layer in pmg_layers]
    assert floors == sorted(floors) and abs(floors[-1] - 0.8) < 1e-5, "floors rise with depth to memory_floor_init"
    for layer in pmg_layers:
        torch.testing.assert_close(layer.sharpness_raw, torch.full_like(layer.sharpness_raw, softplus_inverse(1.0)))
        torch.testing.assert_close(layer.asymmetry_raw, torch.full_like(layer.asymmetry_raw, softplus_inverse(1.0)))
        assert (layer.shift == 0).all()
    assert torch.isfinite(model(tokens()).logits).all()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_sequence_classification_pools_the_last_real_token(layer_types, padding_side):
    model = tiny_model(PMGForSequenceClassification, layer_types=layer_types, num_labels=3)
    ids = tokens(batch=2, length=10)
    mask = torch.ones_like(ids)
    padded_ids = ids.clone()
    if padding_side == "left":
        mask[1, :4], padded_ids[1, :4] = 0, 0
        alone = ids[1:, 4:]
    else:
        mask[1, 6:], padded_ids[1, 6:] = 0, 0
        alone = ids[1:, :6]
    batch_logits = model(padded_ids, attention_mask=mask).logits
    assert batch_logits.shape == (2, 3)
    torch.testing.assert_close(batch_logits[1:], model(alone).logits, rtol=1e-5, atol=1e-5)
    # without a mask, the pad token id finds the same position for right padding
    if padding_side == "right":
        torch.testing.assert_close(model(padded_ids).logits, batch_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("problem_type", "num_labels", "make_labels", "loss_fn"),
    [
        ("single_label_classification", 3, lambda: torch.tensor([0, 2]), F.cross_entropy),
        (
            "multi_label_classification",
            3,
            lambda: torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
            F.binary_cross_entropy_with_logits,
        ),
        ("regression", 1, lambda: torch.tensor([0.5, -1.0]), lambda logits, y: F.mse_loss(logits.squeeze(-1), y)),
    ],
)
def test_sequence_classification_problem_types(problem_type, num_labels, make_labels, loss_fn):
    model = tiny_model(PMGForSequenceClassification, num_labels=num_labels, problem_type=problem_type)
    labels = make_labels()
    output = model(tokens(), labels=labels)
    torch.testing.assert_close(output.loss, loss_fn(output.logits, labels))
    output.loss.backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_cuda_training_step_never_waits_on_the_device():
    """No forward or backward operation reads a value back from the GPU (token-id and label checks included): a
    training step that synchronises cannot queue its kernels ahead of the device. Without padding: with a 2D
    attention mask, transformers' mask helper checks whether every token is real, a sync of its own."""
    model = PMGForCausalLM(tiny_config()).cuda()
    ids = tokens().cuda()
    model(ids, labels=ids).loss.backward()  # the first call may sync (Triton compiles, caches fill)
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(ids, labels=ids).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_an_empty_sequence_gives_empty_logits_and_keeps_the_state():
    """A PMG stack only: transformers' attention functions cannot take zero-length queries (as for Llama)."""
    model = tiny_model(PMGForCausalLM)
    ids = tokens(length=6)
    cache = model(ids, use_cache=True).cache
    before = [state.clone() for state in read_pmg_state(cache, 0)]
    output = model(ids[:, :0], cache=cache, use_cache=True)
    assert output.logits.shape == (ids.shape[0], 0, model.config.vocab_size)
    for state, kept in zip(read_pmg_state(output.cache, 0), before, strict=True):
        torch.testing.assert_close(state, kept, rtol=0, atol=0)


def test_bad_inputs_raise_clear_errors():
    model = PMGForCausalLM(tiny_config())
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=97\)"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match=r"input_ids must lie in"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match=r"exactly one of input_ids or inputs_embeds"):
        model(torch.tensor([[1, 2]]), inputs_embeds=torch.zeros(1, 2, 32))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\)"):
        model(tokens(length=6), attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 6\)"):
        model(tokens(length=6), attention_mask=torch.ones(1, 6))
    with pytest.raises(ValueError, match=r"attention_mask must be 2D"):
        model(tokens(length=6), attention_mask=torch.ones(2, 1, 6, 6))
    with pytest.raises(ValueError, match=r"position_ids must have shape"):
        model(tokens(length=6), position_ids=torch.arange(5)[None])
    with pytest.raises(ValueError, match=r"past_key_values"):
        model(tokens(), cache=object(), past_key_values=object())
    with pytest.raises(TypeError, match=r"cache must be a transformers Cache"):
        model(tokens(), cache=(torch.zeros(1),))
    classifier = PMGForSequenceClassification(tiny_config(pad_token_id=None, num_labels=2))
    with pytest.raises(ValueError, match=r"pass attention_mask or set config.pad_token_id"):
        classifier(tokens())


def test_optimizer_groups_slow_the_gates_and_skip_decay_on_vectors():
    model = PMGForCausalLM(tiny_config(gate_lr_ratio=0.1))
    groups = optimizer_param_groups(model, learning_rate=1e-3, weight_decay=0.1)
    by_id = {id(p): group for group in groups for p in group["params"]}
    layer = model.model.layers[0].pmg
    assert by_id[id(layer.gate_net.up_proj.weight)]["lr"] == pytest.approx(1e-4)
    assert by_id[id(layer.gate_net.up_proj.weight)]["weight_decay"] == 0.1
    assert by_id[id(layer.floor_logit)]["lr"] == pytest.approx(1e-4)
    assert by_id[id(layer.sharpness_raw)]["weight_decay"] == 0.0
    assert by_id[id(layer.value_proj.weight)] == {**by_id[id(layer.value_proj.weight)], "lr": 1e-3, "weight_decay": 0.1}
    assert by_id[id(layer.norm.weight)]["weight_decay"] == 0.0
    assert by_id[id(layer.conv.bias)]["weight_decay"] == 0.0
    assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))
    torch.optim.AdamW(groups)


def test_a_dict_of_prepared_masks_must_name_every_layer_type():
    model = tiny_model(PMGForCausalLM, layer_types=HYBRID_LAYERS)
    ids = torch.randint(0, 97, (2, 5))
    with pytest.raises(ValueError, match=r"lacks \['full_attention', 'sliding_attention'\]"):
        model(ids, attention_mask={"linear_attention": None})


def test_silu_gated_has_autograds_gradients_and_keeps_only_its_inputs():
    x, gate = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(silu_gated, (x.requires_grad_(), gate.requires_grad_()))
    # mixed dtypes, as under autocast (fp32 norm output, bf16 projection): the same values and gradients as autograd
    x, gate = torch.randn(4, 8, 16, requires_grad=True), torch.randn(4, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(4, 8, 16)
    ours = silu_gated(x, gate)
    reference = x * F.silu(gate)
    assert ours.dtype == reference.dtype and torch.equal(ours, reference)
    expected_gradients = torch.autograd.grad(reference, (x, gate), grad)
    for mine, expected in zip(torch.autograd.grad(ours, (x, gate), grad), expected_gradients, strict=True):
        assert mine.dtype == expected.dtype and torch.equal(mine, expected)
    kept = saved_activations(silu_gated, x, gate, min_numel=x.numel())
    assert {tensor.data_ptr() for tensor in kept} == {x.data_ptr(), gate.data_ptr()}  # not silu(gate)


def test_attention_weights_of_hybrid_stacks_are_returned_with_eager_attention(caplog):
    """One (B, heads, T, T) tensor per attention layer, causal rows summing to 1, as Llama returns them; through
    generate too. Implementations that compute no weights say so and return none, as in transformers."""
    eager = tiny_model(PMGForCausalLM, layer_types=HYBRID_LAYERS, attn_implementation="eager")
    ids = torch.randint(1, 97, (2, 7))
    attentions = eager(ids, output_attentions=True).attentions
    assert len(attentions) == HYBRID_LAYERS.count("full_attention") + HYBRID_LAYERS.count("sliding_attention")
    for weights in attentions:
        assert weights.shape == (2, eager.config.num_attention_heads, 7, 7)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, eager.config.num_attention_heads, 7))
        assert torch.all(weights.triu(diagonal=1) == 0)
    assert eager(ids).attentions is None
    generated = eager.generate(
        ids, max_new_tokens=2, do_sample=False, output_attentions=True, return_dict_in_generate=True
    )
    assert len(generated.attentions) == 2 and len(generated.attentions[-1]) == len(attentions)
    sdpa = tiny_model(PMGForCausalLM, layer_types=HYBRID_LAYERS)
    assert sdpa(ids, output_attentions=True).attentions == ()
    assert "load the model with attn_implementation='eager'" in caplog.text
