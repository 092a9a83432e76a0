"""Gate pictures: plot_gates and scripts/plot_gates.py draw one heatmap and one histogram per PMG layer."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HYBRID_LAYERS, tiny_model
from PIL import Image

from pmg import PMGForCausalLM
from pmg.data import train_tokenizer
from pmg.gate_plots import plot_gates

TEXT = "KING HENRY.\nOnce more unto the breach, dear friends, once more;\nOr close the wall up with our English dead."


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TEXT] * 4, vocab_size=300)


def test_plot_has_one_row_per_pmg_layer(tokenizer, tmp_path):
    hybrid = tiny_model(PMGForCausalLM, vocab_size=len(tokenizer), layer_types=HYBRID_LAYERS)
    all_pmg = tiny_model(PMGForCausalLM, vocab_size=len(tokenizer), expand=2)  # memories wider than hidden_size
    two_rows = Image.open(plot_gates(hybrid, tokenizer, TEXT, tmp_path / "hybrid.png", horizon=32))
    four_rows = Image.open(plot_gates(all_pmg, tokenizer, TEXT, tmp_path / "pmg.png", max_tokens=8))
    assert two_rows.size[0] == four_rows.size[0] and four_rows.size[1] > 1.5 * two_rows.size[1]


def test_models_without_gates_empty_texts_and_sizes_below_one_are_refused(tokenizer, tmp_path):
    attention_only = tiny_model(PMGForCausalLM, vocab_size=len(tokenizer), layer_types=["full_attention"] * 4)
    with pytest.raises(ValueError, match="no PMG layers"):
        plot_gates(attention_only, tokenizer, TEXT, tmp_path / "x.png")
    with pytest.raises(ValueError, match="The text is empty"):
        plot_gates(tiny_model(PMGForCausalLM, vocab_size=len(tokenizer)), tokenizer, "", tmp_path / "x.png")
    for sizes in (dict(max_tokens=0), dict(max_tokens=-20), dict(horizon=0), dict(horizon=-5)):
        with pytest.raises(ValueError, match="must be at least 1"):  # empty heatmaps or a silently lost marker before
            plot_gates(
                tiny_model(PMGForCausalLM, vocab_size=len(tokenizer)), tokenizer, TEXT, tmp_path / "x.png", **sizes
            )
    assert not (tmp_path / "x.png").exists()


def test_script_reads_the_text_from_a_file(tokenizer, tmp_path):
    model_dir = tmp_path / "model"
    tiny_model(PMGForCausalLM, vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (tmp_path / "passage.txt").write_text(TEXT)
    script = Path(__file__).resolve().parents[1] / "scripts" / "plot_gates.py"
    output = tmp_path / "gates.png"
    command = [sys.executable, str(script), str(model_dir), f"@{tmp_path / 'passage.txt'}", "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(output).size[1] > 0
