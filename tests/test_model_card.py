"""The model card template renders into a valid Hub model card."""

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "pmg_causal_lm.md"


def test_causal_lm_template_renders_with_hub_metadata():
    card_data = ModelCardData(license="apache-2.0", library_name="transformers", tags=["pmg"], datasets=["local"])
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name="pmg-tiny",
        repo_id="org/pmg-tiny",
        num_parameters="1.2M",
        num_hidden_layers=4,
        layer_pattern="PMG PMG attention PMG",
        sample_prompt="To be",
        dataset_description="synthetic",
        tokenizer_description="byte-level BPE, 8192 tokens",
        hyperparameters={"learning_rate": 3e-3, "max_steps": 300},
        results=[{"split": "validation", "loss": 1.5, "perplexity": 4.48, "bits_per_byte": 1.2}],
        gate_statistics=[{"layer": 0, "mean_write": 0.21, "long_memory_fraction": 0.125}],
        gate_plot=None,
        limitations="A tiny test model.",
    )
    assert card.data.license == "apache-2.0" and card.data.tags == ["pmg"]
    assert "| learning_rate | 0.003 |" in card.text
    assert "| validation | 1.5000 | 4.48 | 1.2000 |" in card.text
    assert "| 0 | 0.2100 | 12.5% |" in card.text
    assert "![write weights]" not in card.text
    reparsed = ModelCard(str(card))
    assert reparsed.data.library_name == "transformers"
