"""PEFT/LoRA: adapters on every PMG projection (gating network included) are used, train, save, reload and merge."""

import json

import pytest
import torch
from conftest import HYBRID_LAYERS, tiny_model
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file

from pmg import PMGForCausalLM, PMGForSequenceClassification
from pmg.optimization import GATE_SHAPE_PARAMETERS

PMG_TARGETS = ["value_proj", "gate_net.down_proj", "gate_net.up_proj", "output_gate_proj", "out_proj"]
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP_TARGETS = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
TARGETS = PMG_TARGETS + ATTENTION_TARGETS + MLP_TARGETS
# merging reassociates fp32 sums (W + BA instead of W x + B A x): logits of size ~5 move by ~1e-5 through 4 layers
MERGE_ATOL = 5e-5


def lora_model(model, **overrides):
    settings = dict(r=4, lora_alpha=8, target_modules=TARGETS)
    settings.update(overrides)
    return get_peft_model(model, LoraConfig(**settings))


def module_kind(name: str) -> str:
    """'base_model.model.model.layers.2.pmg.gate_net.up_proj' -> 'pmg.gate_net.up_proj'."""
    return name.split(".layers.", 1)[1].split(".", 1)[1]


def lora_kinds(model) -> set[str]:
    return {module_kind(name) for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def expected_kinds(layer_types: list[str]) -> set[str]:
    kinds = {f"mlp.{name.split('.')[-1]}" for name in MLP_TARGETS}
    if "linear_attention" in layer_types:
        kinds |= {f"pmg.{name}" for name in PMG_TARGETS}
    if any(kind != "linear_attention" for kind in layer_types):
        kinds |= {f"self_attn.{name}" for name in ATTENTION_TARGETS}
    return kinds


@torch.no_grad()
def perturb_lora(model, kind: str | None = None, scale: float = 0.5) -> None:
    """Give the LoRA B matrices (of one module kind, or all) non-zero weights: fresh adapters are exact no-ops."""
    for name, parameter in model.named_parameters():
        if "lora_B" in name and (kind is None or module_kind(name.split(".lora_B")[0]) == kind):
            parameter.normal_(std=scale)


def train_steps(model, batch: dict, steps: int = 8, lr: float = 1e-2) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return losses


def lm_batch() -> dict:
    ids = torch.randint(1, 97, (2, 12))
    return {"input_ids": ids, "labels": ids}


def test_lora_wraps_every_pmg_projection_and_leaves_only_adapters_trainable(layer_types):
    base = tiny_model(PMGForCausalLM, layer_types=layer_types)
    ids = torch.randint(1, 97, (2, 12))
    reference = base(ids).logits
    model = lora_model(base)
    assert lora_kinds(model) == expected_kinds(layer_types)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert len(trainable) == 2 * sum(isinstance(module, LoraLayer) for module in model.modules())
    # a fresh adapter (B = 0) is an exact no-op
    assert torch.equal(model(ids).logits, reference)
    # "all-linear" reaches the same projections, the gating network included (the LM head is left out)
    all_linear = lora_model(tiny_model(PMGForCausalLM, layer_types=layer_types), target_modules="all-linear")
    assert lora_kinds(all_linear) == expected_kinds(layer_types)


def test_every_lora_module_kind_changes_the_logits(layer_types):
    """No PMG code path may read a targeted projection's weight directly and so bypass its adapter."""
    model = lora_model(tiny_model(PMGForCausalLM, layer_types=layer_types))
    ids = torch.randint(1, 97, (2, 12))
    reference = model(ids).logits
    for kind in sorted(expected_kinds(layer_types)):
        perturb_lora(model, kind)
        changed = (model(ids).logits - reference).abs().max().item()
        assert changed > 1e-4, f"LoRA on {kind} does not reach the output"
        perturb_lora(model, kind, scale=0.0)
    assert torch.equal(model(ids).logits, reference)


def test_lora_gradients_reach_every_adapter_and_adamw_reduces_the_loss(layer_types):
    model = lora_model(tiny_model(PMGForCausalLM, layer_types=layer_types))
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    batch = lm_batch()
    model.train()
    model(**batch).loss.backward()
    # lora_A receives no gradient while lora_B is still zero, so check B
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    model.zero_grad()
    losses = train_steps(model, batch)
    assert losses[-1] < losses[0] - 0.05, losses
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), f"frozen base weight {name} changed"


def test_adapter_saves_and_reloads_onto_a_fresh_base(tmp_path, layer_types):
    base = tiny_model(PMGForCausalLM, layer_types=layer_types)
    base.save_pretrained(tmp_path / "base")
    ids = torch.randint(1, 97, (2, 12))
    base_logits = base(ids).logits
    model = lora_model(base)
    train_steps(model, lm_batch(), steps=3)
    model.save_pretrained(tmp_path / "adapter")

    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == set(TARGETS) and adapter_config["r"] == 4
    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert stored and all("lora_A" in key or "lora_B" in key for key in stored)
    assert any("gate_net.down_proj.lora_B" in key for key in stored) and any(
        "gate_net.up_proj.lora_B" in key for key in stored
    )
    assert any(tensor.abs().sum() > 0 for key, tensor in stored.items() if "lora_B" in key)

    fresh = PMGForCausalLM.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    expected = model(ids).logits
    assert (expected - base_logits).abs().max() > 1e-4  # training moved the adapter off its no-op start
    torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=1e-6)
    with reloaded.disable_adapter():
        torch.testing.assert_close(reloaded(ids).logits, base_logits, rtol=0, atol=1e-6)


def test_merge_and_unload_matches_the_unmerged_adapter_and_generates_with_cache(tmp_path, layer_types):
    base = tiny_model(PMGForCausalLM, layer_types=layer_types)
    ids = torch.randint(1, 97, (2, 12))
    base_logits = base(ids).logits
    model = lora_model(base)
    perturb_lora(model)
    unmerged = model(ids).logits
    prompt = ids[:, :5]
    unmerged_tokens = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, use_cache=True)

    merged = model.merge_and_unload()
    assert type(merged) is PMGForCausalLM
    assert not any(isinstance(module, LoraLayer) for module in merged.modules())
    torch.testing.assert_close(merged(ids).logits, unmerged, rtol=0, atol=MERGE_ATOL)
    assert (merged(ids).logits - base_logits).abs().max() > 1e-3  # the merge really moved the weights

    tokens = merged.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(tokens, unmerged_tokens)
    assert torch.equal(tokens, merged.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False))

    # the merged model is a plain checkpoint: PMG's strict loader finds no leftover adapter keys
    merged.save_pretrained(tmp_path)
    torch.testing.assert_close(PMGForCausalLM.from_pretrained(tmp_path)(ids).logits, unmerged, rtol=0, atol=MERGE_ATOL)


def test_sequence_classification_lora_trains_the_score_head_saves_and_merges(tmp_path, layer_types):
    base = tiny_model(PMGForSequenceClassification, layer_types=layer_types, num_labels=3)
    base.save_pretrained(tmp_path / "base")
    score_before = base.score.weight.detach().clone()
    model = lora_model(base, task_type=TaskType.SEQ_CLS)
    assert isinstance(model.base_model.model.score, ModulesToSaveWrapper)
    assert model.base_model.model.score.modules_to_save["default"].weight.requires_grad
    assert lora_kinds(model) == expected_kinds(layer_types)

    ids = torch.randint(1, 97, (4, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # one left-padded row
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}
    losses = train_steps(model, batch, steps=10)
    assert losses[-1] < losses[0] - 0.05, losses
    trained_score = model.base_model.model.score.modules_to_save["default"].weight
    assert not torch.allclose(trained_score, score_before)
    assert torch.equal(model.base_model.model.score.original_module.weight, score_before)

    model.save_pretrained(tmp_path / "adapter")
    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("score" in key for key in stored)
    expected = model(input_ids=ids, attention_mask=mask).logits
    fresh = PMGForSequenceClassification.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-6)

    merged = reloaded.merge_and_unload()
    assert type(merged) is PMGForSequenceClassification
    torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=MERGE_ATOL)
    torch.testing.assert_close(merged.score.weight, trained_score, rtol=0, atol=0)


def test_lora_on_the_short_conv_is_never_silently_ignored():
    """PMGLayer runs its depthwise conv by hand from `conv.weight`; an adapter there is refused, not skipped."""
    base = tiny_model(PMGForCausalLM)
    ids = torch.randint(1, 97, (2, 12))
    # peft needs the rank of a grouped conv to be a multiple of its groups (the inner width)
    with pytest.raises(ValueError, match="divisible by groups"):
        lora_model(base, target_modules=["conv"])
    model = lora_model(base, target_modules=["conv"], rank_pattern={"conv": base.config.hidden_size})
    perturb_lora(model)
    with pytest.raises(NotImplementedError, match=r"Adapters on PMGLayer\.conv are not supported"):
        model(ids)


def test_modules_to_save_conv_trains_the_copy_that_the_pmg_layer_reads():
    """The supported way to adapt the short conv: a full trainable copy, which `_short_conv` does read."""
    model = lora_model(tiny_model(PMGForCausalLM), modules_to_save=["conv"])
    ids = torch.randint(1, 97, (2, 12))
    reference = model(ids).logits
    conv = model.base_model.model.model.layers[0].pmg.conv
    assert isinstance(conv, ModulesToSaveWrapper)
    assert conv.weight is conv.modules_to_save["default"].weight and conv.weight.requires_grad
    with torch.no_grad():
        conv.modules_to_save["default"].weight.add_(0.5)
    changed = model(ids).logits
    assert (changed - reference).abs().max() > 1e-4
    with model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, reference, rtol=0, atol=0)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(ids).logits, changed, rtol=0, atol=MERGE_ATOL)


def test_gate_shape_parameters_are_not_reachable_by_lora_target_parameters():
    """peft's `target_parameters` only wraps 2D/3D parameters; the per-channel gate shape is 1D. If a future peft
    accepts them, the adapter must reach the output (PMGLayer reads them as attributes, so parametrizations apply)."""
    model = tiny_model(PMGForCausalLM)
    ids = torch.randint(1, 97, (2, 12))
    reference = model(ids).logits
    try:
        model = lora_model(model, target_modules=[], target_parameters=list(GATE_SHAPE_PARAMETERS))
    except ValueError as error:
        assert "2d and 3d" in str(error)
        return
    perturb_lora(model)
    assert (model(ids).logits - reference).abs().max() > 1e-4


def test_gate_shape_trains_through_modules_to_save_of_the_whole_pmg_layer(tmp_path):
    """What works with peft today: LoRA on attention/MLP, the PMG mixers (gate shape included) as full copies."""
    base = tiny_model(PMGForCausalLM, layer_types=HYBRID_LAYERS)
    base.save_pretrained(tmp_path / "base")
    model = lora_model(base, target_modules=ATTENTION_TARGETS + MLP_TARGETS, modules_to_save=["pmg"])
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    for parameter_name in GATE_SHAPE_PARAMETERS:
        assert any(name.endswith(f"pmg.modules_to_save.default.{parameter_name}") for name in names), parameter_name
    before = base.model.layers[0].pmg.original_module.shift.detach().clone()
    losses = train_steps(model, lm_batch())
    assert losses[-1] < losses[0] - 0.05, losses
    trained = model.base_model.model.model.layers[0].pmg.modules_to_save["default"].shift
    assert not torch.allclose(trained, before)

    model.save_pretrained(tmp_path / "adapter")
    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(key.endswith("pmg.shift") for key in stored)
    ids = torch.randint(1, 97, (2, 12))
    expected = model(ids).logits
    reloaded = PeftModel.from_pretrained(PMGForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    torch.testing.assert_close(reloaded.eval()(ids).logits, expected, rtol=0, atol=1e-6)
    merged = reloaded.merge_and_unload()
    torch.testing.assert_close(merged.model.layers[0].pmg.shift, trained, rtol=0, atol=0)
    torch.testing.assert_close(merged(ids).logits, expected, rtol=0, atol=MERGE_ATOL)
