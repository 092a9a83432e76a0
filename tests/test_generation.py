"""Caching and generation through transformers' own machinery, padding, and packed documents."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from torch._dynamo.utils import counters
from transformers import (
    CompileConfig,
    DataCollatorWithFlattening,
    DynamicCache,
    GenerationMixin,
    LlamaConfig,
    LlamaForCausalLM,
)

from pmg import PMGForCausalLM

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def prompt(batch=2, length=7):
    return torch.randint(1, 97, (batch, length))


def test_cached_greedy_generation_matches_full_recomputation(layer_types):
    model = tiny_model(PMGForCausalLM, layer_types=layer_types)
    out = model.generate(prompt(), max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    full_logits = model(out.sequences).logits
    step_logits = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(step_logits, full_logits[:, 6:-1], **TOLERANCE)
    uncached = model.generate(prompt_like(out.sequences), max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(uncached, out.sequences)


def prompt_like(sequences):
    return sequences[:, :7]


def test_sampling_with_and_without_cache_gives_the_same_tokens(layer_types):
    model = tiny_model(PMGForCausalLM, layer_types=layer_types)
    ids = prompt()
    torch.manual_seed(3)
    cached = model.generate(ids, max_new_tokens=10, do_sample=True, top_k=20)
    torch.manual_seed(3)
    uncached = model.generate(ids, max_new_tokens=10, do_sample=True, top_k=20, use_cache=False)
    assert torch.equal(cached, uncached)


def test_beam_search_with_and_without_cache_agree(layer_types):
    model = tiny_model(PMGForCausalLM, layer_types=layer_types)
    ids = prompt()
    cached = model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False)
    uncached = model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("cache_argument", ["cache", "past_key_values"])
def test_cache_continuation_equals_one_pass(layer_types, cache_argument):
    model = tiny_model(PMGForCausalLM, layer_types=layer_types)
    ids = prompt(length=15)
    first = model(ids[:, :9], use_cache=True)
    cache = first.cache
    assert isinstance(cache, DynamicCache)
    second = model(ids[:, 9:], use_cache=True, **{cache_argument: cache})
    full = model(ids).logits
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), full, **TOLERANCE)


def test_user_supplied_cache_is_filled_by_generate(layer_types):
    model = tiny_model(PMGForCausalLM, layer_types=layer_types)
    cache = DynamicCache(config=model.config)
    ids = prompt()
    out = model.generate(ids, max_new_tokens=4, do_sample=False, cache=cache)
    assert cache.layers[0].is_recurrent_states_initialized[0] or cache.layers[0].get_seq_length() > 0
    expected = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, expected)


def test_a_stack_without_attention_continues_from_unseen_tokens_and_warns_when_given_seen_ones(caplog):
    """Without attention layers the cache keeps no token count (as transformers' Mamba): a generate() cache continues
    from the tokens it has not seen; given the whole sequence, generate() says that it reads every token as new."""
    model = tiny_model(PMGForCausalLM, layer_types=["linear_attention"] * 4)
    ids = prompt()
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)
    first = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    continued = model.generate(first.sequences[:, -1:], cache=first.past_key_values, max_new_tokens=4, do_sample=False)
    assert torch.equal(continued[:, 1:], expected[:, -4:])
    assert "keeps no count" not in caplog.text
    first = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    model.generate(first.sequences, cache=first.past_key_values, max_new_tokens=1, do_sample=False)
    assert "with 11 tokens, all read as new: this stack has no attention layer" in caplog.text


def test_prepare_inputs_for_generation_takes_generation_mixins_arguments_in_its_order():
    """The override adds a warning only: callers passing arguments by position get what GenerationMixin gives."""
    ours = list(inspect.signature(PMGForCausalLM.prepare_inputs_for_generation).parameters)
    assert ours == list(inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters)


def test_caches_without_pmg_layers_or_recording_past_states_are_refused(layer_types):
    """A DynamicCache() without config has no place for PMG memories; a cache that records past states to crop them
    back (assisted decoding) would need memories rolled back, which a recurrence cannot do."""
    model = tiny_model(PMGForCausalLM, layer_types=layer_types)
    no_layers = r"no linear-attention layer for PMG layer 0 .* pass DynamicCache\(config=model.config\)"
    with pytest.raises(ValueError, match=no_layers):
        model.generate(prompt(), max_new_tokens=2, cache=DynamicCache())
    recording = DynamicCache(config=model.config)
    recording.activate_past_recording()
    with pytest.raises(NotImplementedError, match="a PMG memory cannot be rolled back"):
        model(prompt(), cache=recording, use_cache=True)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1))
    with pytest.raises(NotImplementedError, match="use a model without PMG layers as the assistant"):
        llama.eval().generate(prompt(1), assistant_model=model, max_new_tokens=4, do_sample=False)


def test_left_padded_batch_matches_each_row_alone(layer_types):
    model = tiny_model(PMGForCausalLM, layer_types=layer_types)
    rows = [prompt(1, 9)[0], prompt(1, 5)[0], prompt(1, 7)[0]]
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    batch_logits = model(ids, attention_mask=mask).logits
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for i, row in enumerate(rows):
        alone = model(row[None]).logits
        torch.testing.assert_close(batch_logits[i, width - len(row) :], alone[0], **TOLERANCE)
        alone_generated = model.generate(row[None], max_new_tokens=6, do_sample=False)
        assert torch.equal(generated[i, width:], alone_generated[0, len(row) :])


@pytest.mark.parametrize("second", ["linear_attention", "full_attention"], ids=["pmg", "hybrid"])
def test_a_right_padded_prompt_continues_as_the_unpadded_one(second):
    """Padded steps at the end of a prompt leave every state as the real steps left it (memory and conv window):
    the next token, after the padding in the cache, gets the unpadded prompt's logits. (Not with sliding windows,
    which transformers counts in cache positions, padding included.)"""
    model = tiny_model(PMGForCausalLM, layer_types=["linear_attention", second] * 2)
    ids, follow = prompt(1, 7), prompt(1, 1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    padded_cache = model(ids, attention_mask=mask, use_cache=True).cache
    padded = model(
        follow, attention_mask=F.pad(mask, (0, 1), value=1), position_ids=torch.tensor([[5]]), cache=padded_cache
    )
    unpadded_cache = model(ids[:, :5], use_cache=True).cache
    unpadded = model(follow, cache=unpadded_cache)
    torch.testing.assert_close(padded.logits, unpadded.logits, **TOLERANCE)


def test_packed_documents_equal_each_document_alone(layer_types):
    model = tiny_model(PMGForCausalLM, layer_types=layer_types)
    documents = [prompt(1, n)[0].tolist() for n in (6, 9, 4)]
    batch = DataCollatorWithFlattening()([{"input_ids": doc} for doc in documents])
    assert batch["input_ids"].shape == (1, 19) and "attention_mask" not in batch
    packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    # with a padding mask too (transformers' mask helpers look for packed documents only without one)
    masked = model(**batch, attention_mask=torch.ones_like(batch["input_ids"])).logits[0]
    start = 0
    for doc in documents:
        alone = model(torch.tensor([doc])).logits[0]
        torch.testing.assert_close(packed[start : start + len(doc)], alone, **TOLERANCE)
        torch.testing.assert_close(masked[start : start + len(doc)], alone, **TOLERANCE)
        start += len(doc)
    # the packed loss uses the collator's labels, which mask every document boundary
    loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_generation_state_is_constant_size_for_pmg_layers():
    model = tiny_model(PMGForCausalLM)
    cache = DynamicCache(config=model.config)
    model.generate(prompt(), max_new_tokens=3, do_sample=False, cache=cache)
    sizes_after_short = [layer.recurrent_states[0].shape for layer in cache.layers]
    cache = DynamicCache(config=model.config)
    model.generate(prompt(), max_new_tokens=30, do_sample=False, cache=cache)
    assert [layer.recurrent_states[0].shape for layer in cache.layers] == sizes_after_short
    assert sizes_after_short[0] == (2, 32)


def left_padded_prompt() -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = prompt(3, 8), torch.ones(3, 8, dtype=torch.long)
    mask[0, :3] = mask[2, :5] = 0
    return ids * mask, mask


def test_static_cache_generation_matches_the_dynamic_cache(layer_types):
    model = tiny_model(PMGForCausalLM, layer_types=layer_types)
    ids, mask = left_padded_prompt()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    static = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, cache_implementation="static")
    assert torch.equal(static, expected)


def test_static_cache_generation_compiles_the_decoding_step_without_breaks_or_recompiles(layer_types):
    """What `generate` does by itself on a GPU with a static cache (there with CUDA graphs), here with aot_eager.

    Dynamo compiles the step at most twice, the second time with the sizes that grow (the 2D padding mask, a
    sliding-window layer's fill level) made dynamic; the other 12 steps reuse the graph.
    """
    model = tiny_model(PMGForCausalLM, layer_types=layer_types)
    ids, mask = left_padded_prompt()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False)
    compile_config = CompileConfig(fullgraph=True, backend="aot_eager")
    compile_config._compile_all_devices = True  # generate compiles on accelerators only, unless told so
    torch._dynamo.reset()
    counters.clear()
    compiled = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=14,
        do_sample=False,
        cache_implementation="static",
        compile_config=compile_config,
    )
    assert torch.equal(compiled, expected)
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert not counters["graph_break"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_generate_compiles_the_static_cache_step_with_cuda_graphs_by_itself(layer_types):
    """On a GPU, `generate` with a static cache compiles with its default CompileConfig (inductor, CUDA graphs)."""
    model = tiny_model(PMGForCausalLM, layer_types=layer_types).cuda()
    ids, mask = (tensor.cuda() for tensor in left_padded_prompt())
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    compiled = model.generate(
        ids, attention_mask=mask, max_new_tokens=10, do_sample=False, cache_implementation="static"
    )
    assert torch.equal(compiled, expected)
    assert hasattr(model, "_compiled_call"), "generate did not compile the decoding step"
