"""The model card template renders into a valid Hub model card."""

from pathlib import Path

from conftest import run_remote_code, tiny_model
from huggingface_hub import ModelCard, ModelCardData

from pmg import PMGForCausalLM
from pmg.data import train_tokenizer
from pmg.publishing import hub_id, render_model_card

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
        evaluation_description="Measured on 4,096 validation tokens in blocks of 256: every full block of each split.",
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


def test_a_run_on_local_files_without_a_prompt_gets_a_card_that_says_so_and_a_snippet_that_runs():
    model = tiny_model(PMGForCausalLM)
    card = render_model_card(
        model,
        "me/pmg-local",
        {"eval_loss": 2.0, "eval_perplexity": 7.4, "eval_bits_per_byte": 1.1},
        [],
        [{"prompt": "", "generation": "text"}],
        {"max_steps": 2},
        None,
        True,
        "local files",
        "byte-level BPE",
        "Measured on 64 validation tokens in blocks of 32: every full block of each split.",
        32,
    )
    result = card.data.eval_results[0]
    assert (result.dataset_type, result.dataset_name) == ("local-files", "local files")
    assert card.data.datasets is None
    # the usage snippet starts from the end-of-text token: an empty prompt gives generate no token to start from
    snippet = card.text.split("```python")[1].split("```")[0]
    assert 'inputs = tokenizer(tokenizer.eos_token, return_tensors="pt")' in snippet
    tokenizer = train_tokenizer(["some text to learn from"] * 4, vocab_size=300)
    model.resize_token_embeddings(len(tokenizer))
    lines = [line for line in snippet.splitlines() if line.startswith(("inputs", "print"))]
    exec("\n".join(lines), {"tokenizer": tokenizer, "model": model.eval()})  # the snippet's own lines, as written


def test_the_usage_snippet_runs_as_written_where_pmg_is_not_installed_without_a_prompt(tmp_path):
    """The card's code against the saved model, with pmg not importable: tokenizer and model load as remote code,
    without transformers asking "Do you wish to run the custom code? [y/N]" (which blocks a script for 15 s)."""
    model = tiny_model(PMGForCausalLM)
    tokenizer = train_tokenizer(["some text to learn from"] * 4, vocab_size=300)
    model.resize_token_embeddings(len(tokenizer))
    run = tmp_path / "run"
    model.save_pretrained(run)
    tokenizer.save_pretrained(run)
    metrics = {"eval_loss": 2.0, "eval_perplexity": 7.4, "eval_bits_per_byte": 1.1}
    samples = [{"prompt": "some", "generation": " text"}]
    card = render_model_card(model, str(run), metrics, [], samples, {}, None, True, "local files", "BPE", "", 32)
    snippet = card.text.split("```python")[1].split("```")[0]
    output = run_remote_code('import sys\nsys.modules["pmg"] = None\n' + snippet, workdir=tmp_path)
    assert "custom code" not in output and "instantiate a model of type" not in output, output


def test_model_cards_link_hub_names_only(tmp_path):
    """A local folder given as --dataset_name or --model_name_or_path would become a link to a Hub repository; the
    pretraining card calls such a dataset local files."""
    assert hub_id(str(tmp_path)) is None and hub_id(None) is None
    assert hub_id("org/reviews") == "org/reviews"
    metrics = {"eval_loss": 2.0, "eval_perplexity": 7.4, "eval_bits_per_byte": 1.1}
    model = tiny_model(PMGForCausalLM)
    card = render_model_card(model, "me/pmg", metrics, [], [], {}, str(tmp_path), False, "a folder", "BPE", "", 32)
    assert card.data.datasets is None and card.data.eval_results[0].dataset_type == "local-files"
