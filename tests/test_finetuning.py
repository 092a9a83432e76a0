"""Fine-tuning with Trainer (scripts/finetune.py's engine): genre classification, causal LM with both collators,
pipelines on the results, and the errors users meet."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, perturbed, tiny_config
from huggingface_hub import ModelCard
from transformers import AutoModelForSequenceClassification, TrainingArguments, pipeline

from pmg import PMGForCausalLM
from pmg.data import load_genre_passages, train_tokenizer
from pmg.finetuning import FinetuneArguments, finetune

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A tiny 'pretrained' PMG checkpoint with its tokenizer, as scripts/train.py would leave it (no head)."""
    directory = tmp_path_factory.mktemp("pretrained")
    tokenizer = train_tokenizer(load_genre_passages(passages_per_play=4)["train"]["text"], vocab_size=300)
    config = tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    perturbed(PMGForCausalLM(config), scale=0.05).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def training_arguments(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        max_steps=8,
        learning_rate=3e-3,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        eval_strategy="steps",
        eval_steps=4,
        save_strategy="steps",
        save_steps=4,
        load_best_model_at_end=True,
        metric_for_best_model="macro_f1",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    return TrainingArguments(**{**settings, **overrides})


def test_genre_classification_reports_accuracy_macro_f1_and_the_majority_baseline(pretrained_dir, tmp_path):
    args = FinetuneArguments(model_name_or_path=str(pretrained_dir), max_length=64, max_train_samples=256)
    metrics = finetune(args, training_arguments(tmp_path))
    for prefix in ("eval", "test"):
        assert 0 <= metrics[f"{prefix}_accuracy"] <= 1 and 0 <= metrics[f"{prefix}_macro_f1"] <= 1
    # the held-out plays are balanced over three genres: always answering one of them is right a third of the time
    assert metrics["majority_test_accuracy"] == pytest.approx(1 / 3)
    assert metrics["majority_test_macro_f1"] == pytest.approx(1 / 6)
    card = ModelCard.load(tmp_path / "README.md")  # Trainer's card: the base model, the task and the data
    assert card.data.base_model is None and "Macro F1" in card.text  # a local base model is no Hub link
    assert "Shakespeare genre passages (embedded in pmg) dataset" in card.text
    assert json.loads((tmp_path / "all_results.json").read_text())["test_accuracy"] == metrics["test_accuracy"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert model.config.id2label == {0: "comedy", 1: "history", 2: "tragedy"}
    classify = pipeline("text-classification", model=str(tmp_path))
    prediction = classify("ROMEO.\nBut soft, what light through yonder window breaks?")[0]
    assert prediction["label"] in {"comedy", "history", "tragedy"} and 0 < prediction["score"] <= 1
    # PMG layers have no position limit: a text far longer than any training example is classified as it is
    assert classify("Now is the winter of our discontent. " * 400)[0]["label"] in {"comedy", "history", "tragedy"}
    expected = {"classification": classify("Enter the King.")[0]}
    generate = pipeline("text-generation", model=str(pretrained_dir))
    expected["generation"] = generate("Enter the King.", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    # the same pipelines where pmg is not installed, through the modeling code shipped in the checkpoints
    remote = run_without_pmg(PIPELINES_WITH_REMOTE_CODE, str(tmp_path), str(pretrained_dir))
    assert all(module.startswith("transformers_modules.") for module in remote.pop("modules"))
    assert remote["classification"] == pytest.approx(expected["classification"])
    assert remote["generation"] == expected["generation"]


PIPELINES_WITH_REMOTE_CODE = """
import json, sys
sys.modules["pmg"] = None  # `import pmg` raises ImportError, as where the package is not installed
from transformers import pipeline

classifier_dir, language_model_dir = sys.argv[1:]
classify = pipeline("text-classification", model=classifier_dir, trust_remote_code=True)
generate = pipeline("text-generation", model=language_model_dir, trust_remote_code=True)
print(json.dumps({
    "modules": [type(classify.model).__module__, type(generate.model).__module__],
    "classification": classify("Enter the King.")[0],
    "generation": generate("Enter the King.", max_new_tokens=5, do_sample=False)[0]["generated_text"],
}))
"""


def run_without_pmg(script: str, *args: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300, cwd="/", check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_language_model_checkpoint_gets_a_new_reported_classification_head(pretrained_dir):
    model, info = AutoModelForSequenceClassification.from_pretrained(
        pretrained_dir, num_labels=3, output_loading_info=True
    )
    assert set(info["missing_keys"]) == {"score.weight"}
    assert model.score.out_features == 3


def test_unseen_labels_at_evaluation_are_refused_by_name(pretrained_dir, tmp_path):
    (tmp_path / "train.csv").write_text("text,label\nto be,yes\nnot to be,no\n")
    (tmp_path / "validation.csv").write_text("text,label\nperhaps,maybe\n")
    args = FinetuneArguments(
        model_name_or_path=str(pretrained_dir),
        train_files=[str(tmp_path / "train.csv")],
        validation_files=[str(tmp_path / "validation.csv")],
    )
    with pytest.raises(ValueError, match=r"validation split has labels never seen in training: \['maybe'\]"):
        finetune(args, training_arguments(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"no column\(s\) \['sentence'\]"):
        finetune(FinetuneArguments(**{**vars(args), "text_column": "sentence"}), training_arguments(tmp_path / "o"))
    embedded = FinetuneArguments(model_name_or_path=str(pretrained_dir), label_column="mood")  # the genre task
    with pytest.raises(ValueError, match=r"no column\(s\) \['mood'\]"):
        finetune(embedded, training_arguments(tmp_path / "e"))
    with pytest.raises(ValueError, match=r"max_length must be at least 2 tokens, got 0"):
        finetune(FinetuneArguments(**{**vars(args), "max_length": 0}), training_arguments(tmp_path / "m"))


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded-blocks", "padding-free"])
def test_causal_lm_finetuning_on_new_text(pretrained_dir, tmp_path, padding_free):
    documents = load_genre_passages(passages_per_play=2)
    for split in ("train", "validation"):
        documents[split].select_columns(["text"]).to_json(tmp_path / f"{split}.jsonl")
    args = FinetuneArguments(
        model_name_or_path=str(pretrained_dir),
        task="causal-lm",
        train_files=[str(tmp_path / "train.jsonl")],
        validation_files=[str(tmp_path / "validation.jsonl")],
        max_length=64,
        padding_free=padding_free,
    )
    metrics = finetune(args, training_arguments(tmp_path / "out", metric_for_best_model="eval_loss"))
    assert metrics["eval_loss"] < math.log(300), "8 steps beat a uniform guess over 300 tokens"
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    reloaded = pipeline("text-generation", model=str(tmp_path / "out"))
    assert reloaded("KING.", max_new_tokens=3, do_sample=False)[0]["generated_text"].startswith("KING.")


def test_early_stopping_gradient_checkpointing_bf16_and_resume(pretrained_dir, tmp_path):
    args = FinetuneArguments(
        model_name_or_path=str(pretrained_dir), max_length=48, max_train_samples=128, early_stopping_patience=1
    )
    settings = dict(max_steps=40, eval_steps=2, save_steps=2, learning_rate=0.0, gradient_checkpointing=True, bf16=True)
    metrics = finetune(args, training_arguments(tmp_path / "out", **settings))
    # with a learning rate of 0 nothing improves after the first evaluation: patience 1 stops at the second
    assert metrics["epoch"] < 40 * 8 / 128 and (tmp_path / "out" / "checkpoint-4").is_dir()
    # "True" resumes from the last checkpoint in output_dir, as scripts/train.py takes it
    resumed = finetune(args, training_arguments(tmp_path / "out", resume_from_checkpoint="True", **settings))
    assert 0 <= resumed["eval_accuracy"] <= 1
    with pytest.raises(ValueError, match=r"No checkpoint to resume from"):
        finetune(args, training_arguments(tmp_path / "new", resume_from_checkpoint="True"))


def test_a_folder_that_holds_a_model_is_never_overwritten(pretrained_dir, tmp_path):
    saved = {path.name: path.read_bytes() for path in pretrained_dir.iterdir()}
    args = FinetuneArguments(model_name_or_path=str(pretrained_dir), max_length=48, max_train_samples=32)
    with pytest.raises(ValueError, match=r"is not empty: choose a new folder"):
        finetune(args, training_arguments(pretrained_dir, max_steps=1))
    assert {path.name: path.read_bytes() for path in pretrained_dir.iterdir()} == saved


def test_trainer_runs_in_two_processes_with_torchrun(pretrained_dir, tmp_path):
    command = [
        *("torchrun", "--nproc_per_node", "2", "--master_port", str(free_port())),
        str(REPO_ROOT / "scripts" / "finetune.py"),
        *("--model_name_or_path", str(pretrained_dir), "--output_dir", str(tmp_path), "--max_steps", "4"),
        *("--max_length", "48", "--max_train_samples", "64", "--max_eval_samples", "32", "--use_cpu", "True"),
        *("--per_device_train_batch_size", "4", "--eval_strategy", "no", "--save_strategy", "no"),
        *("--load_best_model_at_end", "False", "--report_to", "none", "--log_level", "info"),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "Total train batch size (w. parallel, distributed & accumulation) = 8" in result.stderr + result.stdout
    assert 0 <= json.loads((tmp_path / "all_results.json").read_text())["test_accuracy"] <= 1


def test_a_hub_that_cannot_be_reached_is_named_before_any_work(pretrained_dir, tmp_path):
    args = FinetuneArguments(model_name_or_path=str(pretrained_dir))
    with pytest.raises(RuntimeError, match=r"--push_to_hub: cannot create or reach the repository 'org/x'"):
        finetune(args, training_arguments(tmp_path / "out", push_to_hub=True, hub_model_id="org/x"))
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_that_is_nowhere_is_named(tmp_path):
    missing = str(tmp_path / "outputs" / "pmg-shakespeare")
    with pytest.raises(OSError, match=r"No folder .*pmg-shakespeare' here, and no Hub repository of that name"):
        finetune(FinetuneArguments(model_name_or_path=missing), training_arguments(tmp_path / "out"))
