"""Checkpoints: safetensors round trips, Auto classes, trust_remote_code loading without pmg, mismatches."""

import json
import textwrap

import pytest
import torch
from conftest import HYBRID_LAYERS, run_remote_code, tiny_config, tiny_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from pmg import PMGConfig, PMGForCausalLM, PMGForSequenceClassification, PMGModel


def test_weights_save_as_safetensors_and_reload_bit_identically(tmp_path, layer_types):
    model = tiny_model(PMGForCausalLM, layer_types=layer_types, tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "pytorch_model.bin").exists()
    stored = load_file(tmp_path / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(stored[name], tensor), name
    reloaded = PMGForCausalLM.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(1, 97, (2, 10))
    assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_a_model_cast_to_bf16_keeps_fp32_rotary_frequencies_and_reloads_to_the_same_logits(tmp_path):
    """A cast leaves the rotary frequencies (a buffer not saved) in fp32, as a reload computes them: before, the
    cast rounded them and the reloaded model's logits differed."""
    model = tiny_model(PMGForCausalLM, layer_types=HYBRID_LAYERS).to(torch.bfloat16)
    rotary = model.model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, rotary.compute_inv_freq())
    model.save_pretrained(tmp_path)
    reloaded = PMGForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ids = torch.randint(1, 97, (2, 40))
    assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_auto_classes_resolve_pmg(tmp_path):
    model = tiny_model(PMGForCausalLM)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PMGConfig)
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), PMGForCausalLM)
    assert isinstance(AutoModel.from_pretrained(tmp_path), PMGModel)


def test_classification_head_is_created_and_reported_from_a_causal_checkpoint(tmp_path):
    tiny_model(PMGForCausalLM).save_pretrained(tmp_path)
    classifier, info = AutoModelForSequenceClassification.from_pretrained(
        tmp_path, num_labels=3, output_loading_info=True
    )
    assert isinstance(classifier, PMGForSequenceClassification)
    assert set(info["missing_keys"]) == {"score.weight"}
    assert classifier(torch.randint(1, 97, (1, 5))).logits.shape == (1, 3)


def test_saved_folder_declares_auto_map_and_ships_the_modeling_files(tmp_path):
    tiny_model(PMGForCausalLM).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoConfig"] == "configuration_pmg.PMGConfig"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_pmg.PMGForCausalLM"
    shipped = (
        "configuration_pmg",
        "modeling_pmg",
        "scan_pmg",
        "triton_scan",
        "triton_decoding",
        "triton_conv",
        "triton_cross_entropy",
        "linear_cross_entropy",
    )
    for module in shipped:
        assert (tmp_path / f"{module}.py").exists(), module


REMOTE_CODE_LOADER = textwrap.dedent(
    """
    import sys
    sys.modules["pmg"] = None  # as if pmg were not installed: any import of it fails
    import torch
    from transformers import AutoModelForCausalLM
    from transformers import AutoModel, AutoModelForSequenceClassification
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert "transformers_modules" in type(model).__module__, type(model).__module__
    ids = torch.load(sys.argv[2])
    torch.save(model(ids).logits, sys.argv[3])
    # the same checkpoint as the bare model and as a classifier to fine-tune (its head new)
    body = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(body).__name__ == "PMGModel" and "transformers_modules" in type(body).__module__
    torch.testing.assert_close(body(ids).last_hidden_state, model.model(ids).last_hidden_state, rtol=0, atol=0)
    classifier = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], trust_remote_code=True, num_labels=3)
    assert type(classifier).__name__ == "PMGForSequenceClassification"
    assert classifier(ids).logits.shape == (2, 3)
    """
)


def test_trust_remote_code_load_in_a_fresh_process_without_pmg_gives_identical_logits(tmp_path):
    model = tiny_model(PMGForCausalLM, layer_types=HYBRID_LAYERS)
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    ids = torch.randint(1, 97, (2, 11))
    torch.save(ids, tmp_path / "ids.pt")
    run_remote_code(
        REMOTE_CODE_LOADER, str(checkpoint), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt"), workdir=tmp_path
    )
    assert torch.equal(torch.load(tmp_path / "out.pt"), model(ids).logits)


def test_checkpoint_that_does_not_match_the_config_is_refused(tmp_path):
    tiny_model(PMGForCausalLM).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())

    def load_with(**changes):
        (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))
        return PMGForCausalLM.from_pretrained(tmp_path)

    with pytest.raises(ValueError, match=r"does not match the model config: missing weights \['model.layers.4"):
        load_with(num_hidden_layers=5, layer_types=["linear_attention"] * 5)
    with pytest.raises(ValueError, match=r"unexpected weights \['model.layers.0.pmg.conv.bias"):
        load_with(use_short_conv=False)
    with pytest.raises(RuntimeError, match=r"ignore_mismatched_sizes"):  # transformers' own shape check
        load_with(expand=2)
    # the untouched files still load: a refused load changes nothing on disk
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert isinstance(PMGForCausalLM.from_pretrained(tmp_path), PMGForCausalLM)


def test_auto_map_names_only_the_saved_family(tmp_path):
    """A language model built from a config that carries a time-series checkpoint's auto_map maps only its own
    classes (the time-series modeling file is not copied beside it)."""
    config = tiny_config()
    config.auto_map = {"AutoConfig": "configuration_pmg.PMGConfig", "AutoModelForTimeSeriesPrediction": "x.Y"}
    PMGForCausalLM(config).save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_pmg.PMGConfig",
        "AutoModel": "modeling_pmg.PMGModel",
        "AutoModelForCausalLM": "modeling_pmg.PMGForCausalLM",
        "AutoModelForSequenceClassification": "modeling_pmg.PMGForSequenceClassification",
    }
