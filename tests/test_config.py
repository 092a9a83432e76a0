import json

import pytest

from pmg import PMGConfig


def test_defaults_are_all_pmg_layers_with_llama_style_mlp_width():
    config = PMGConfig(hidden_size=256, num_hidden_layers=3)
    assert config.layer_types == ["linear_attention"] * 3
    assert config.intermediate_size == 704  # 8/3 * 256 rounded up to a multiple of 64
    assert config.head_dim * config.num_attention_heads == 256
    assert config.pmg_layer_indices == [0, 1, 2]


def test_config_round_trips_through_save_and_load(tmp_path):
    config = PMGConfig(
        hidden_size=64,
        num_hidden_layers=4,
        layer_types=["linear_attention", "full_attention", "linear_attention", "sliding_attention"],
        sliding_window=16,
        gate_rank=0,
        memory_floor_init=0.5,
        gate_l1=0.01,
        scan_impl="recurrent",
    )
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "pmg"
    reloaded = PMGConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("scan_impl", "fused"),
        ("expand", 0),
        ("gate_rank", -1),
        ("conv_size", 1),
        ("chunk_size", 0),
        ("chunk_size", 2.5),
        ("memory_floor_init", 1.0),
        ("memory_floor_init", -0.1),
        ("gate_l1", -1.0),
        ("gate_lr_ratio", 0.0),
        ("vocab_size", 0),
        ("hidden_act", "gelu"),
        ("attention_dropout", 1.0),
        ("rms_norm_eps", 0.0),
        ("fuse_linear_cross_entropy", "yes"),
        ("use_short_conv", "yes"),
        ("num_attention_heads", 0),
        ("rope_parameters", "default"),
        ("rms_norm_eps", "a"),
        ("initializer_range", None),
        ("pad_token_id", 32000),
        ("pad_token_id", -2),
    ],
)
def test_invalid_field_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"PMGConfig\.{field} must be"):
        PMGConfig(hidden_size=64, num_hidden_layers=2, **{field: value})


def test_unknown_layer_type_and_wrong_layer_count_are_rejected():
    with pytest.raises(ValueError, match=r"layer_types must be entries from"):
        PMGConfig(hidden_size=64, num_hidden_layers=2, layer_types=["mamba2", "linear_attention"])
    with pytest.raises(ValueError, match=r"layer_types must be a list of num_hidden_layers=2"):
        PMGConfig(hidden_size=64, num_hidden_layers=2, layer_types=["linear_attention"])
    with pytest.raises(ValueError, match=r"layer_types must be a list of num_hidden_layers=2 entries, got 'linear_"):
        PMGConfig(hidden_size=64, num_hidden_layers=2, layer_types="linear_attention")


def test_sliding_attention_needs_a_window_and_heads_must_group():
    with pytest.raises(ValueError, match=r"sliding_window"):
        PMGConfig(hidden_size=64, num_hidden_layers=1, layer_types=["sliding_attention"])
    with pytest.raises(ValueError, match=r"num_key_value_heads"):
        PMGConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=3)


def test_wrong_type_raises_value_error():
    with pytest.raises(ValueError, match=r"PMGConfig\.hidden_size must be an integer"):
        PMGConfig(hidden_size="64")


def test_layer_types_from_any_iterable_and_a_pad_token_id_of_minus_one_as_none():
    """Hub configs say "no pad token" with -1; an embedding with padding_idx=-1 would freeze the last token's row."""
    as_generator = PMGConfig(hidden_size=64, num_hidden_layers=2, layer_types=(t for t in ["linear_attention"] * 2))
    assert as_generator.layer_types == ["linear_attention"] * 2
    assert PMGConfig(hidden_size=64, num_hidden_layers=2, pad_token_id=-1).pad_token_id is None
