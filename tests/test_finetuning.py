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
from datasets import ClassLabel, Dataset, Features, Value
from hub_server import hub_env
from huggingface_hub import ModelCard
from scipy.stats import pearsonr, spearmanr
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments, pipeline

from pmg import PMGForCausalLM
from pmg.data import load_genre_passages, train_tokenizer
from pmg.finetuning import FinetuneArguments, _causal_lm_task, finetune, label_names, load_classification_data
from pmg.metrics import load_metric

pytest_plugins = ["hub_server"]  # the local_hub fixture

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


def test_genre_classification_reports_accuracy_macro_f1_and_the_majority_baseline(pretrained_dir, tmp_path, caplog):
    args = FinetuneArguments(model_name_or_path=str(pretrained_dir), max_length=64, max_train_samples=256)
    metrics = finetune(args, training_arguments(tmp_path))
    # passages of about 600 characters do not fit in 64 tokens: the user is told, not left to guess
    assert "of the 256 train texts are longer than max_length=64 tokens and lose their ends" in caplog.text
    # the training summary is kept, as transformers' examples keep it
    assert metrics["train_loss"] > 0 and (tmp_path / "train_results.json").is_file()
    assert (tmp_path / "trainer_state.json").is_file()
    for prefix in ("eval", "test"):
        assert 0 <= metrics[f"{prefix}_accuracy"] <= 1 and 0 <= metrics[f"{prefix}_macro_f1"] <= 1
    # the held-out plays are balanced over three genres: always answering one of them is right a third of the time
    assert metrics["majority_test_accuracy"] == pytest.approx(1 / 3)
    assert metrics["majority_test_macro_f1"] == pytest.approx(1 / 6)
    card = ModelCard.load(tmp_path / "README.md")  # Trainer's card: the base model, the task and the data
    assert card.data.base_model is None and "Macro F1" in card.text  # a local base model is no Hub link
    assert f"fine-tuned version of the local checkpoint `{pretrained_dir}`" in card.text  # but it is named
    assert "from scratch" not in card.text
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
    # nor when resuming another run's checkpoint: that run continues in a new folder
    other_run = tmp_path / "other" / "checkpoint-2"
    other_run.mkdir(parents=True)
    (other_run / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is not empty: choose a new folder"):
        finetune(args, training_arguments(pretrained_dir, max_steps=1, resume_from_checkpoint=str(other_run)))
    assert {path.name: path.read_bytes() for path in pretrained_dir.iterdir()} == saved
    # a folder that is no Trainer checkpoint (a pretraining run's, say) is named before any work
    with pytest.raises(ValueError, match=r"other is no Trainer checkpoint \(it has no trainer_state.json\)"):
        finetune(args, training_arguments(tmp_path / "new", resume_from_checkpoint=str(tmp_path / "other")))


def classification_files(directory: Path, labels: dict[str, list]) -> dict[str, str]:
    """train/validation csv files of short texts with the given labels (a None label is an empty cell)."""
    paths = {}
    for split, values in labels.items():
        rows = "".join(f"line {i},{'' if value is None else value}\n" for i, value in enumerate(values))
        (directory / f"{split}.csv").write_text("text,label\n" + rows)
        paths[split] = str(directory / f"{split}.csv")
    return {"train_files": [paths["train"]], "validation_files": [paths["validation"]]}


def test_numeric_labels_keep_their_numeric_order_and_missing_labels_are_refused(tmp_path):
    args = FinetuneArguments(**classification_files(tmp_path, {"train": [0, 2, 10, 1], "validation": [10, 2]}))
    # class id i is label i, as a user comparing argmax with integer labels expects (not "0", "1", "10", "2")
    assert label_names(load_classification_data(args), "label") == ["0", "1", "2", "10"]
    args = FinetuneArguments(**classification_files(tmp_path, {"train": [0, None, 1], "validation": [1, 0]}))
    with pytest.raises(ValueError, match=r"1 of the 3 rows of the train split have no label \(empty, null"):
        load_classification_data(args)
    (tmp_path / "train.csv").write_text("text,label\nto be,yes\n,no\n")
    with pytest.raises(ValueError, match=r"1 of the 2 rows of the train split have no text"):
        load_classification_data(args)


def test_classification_data_comes_from_one_source():
    with pytest.raises(ValueError, match=r"validation_files need training files"):
        load_classification_data(FinetuneArguments(validation_files=["held_out.csv"]))
    with pytest.raises(ValueError, match=r"Pass either dataset_name or data_files \(--train_files\), not both"):
        load_classification_data(FinetuneArguments(dataset_name="org/data", train_files=["train.csv"]))


def test_float_labels_fine_tune_a_regression_head(pretrained_dir, tmp_path):
    scores = {"train": [0.5, 1.5, 3.0, 4.5] * 8, "validation": [0.25, 2.0, 4.75, 3.5]}
    args = FinetuneArguments(model_name_or_path=str(pretrained_dir), **classification_files(tmp_path, scores))
    metrics = finetune(args, training_arguments(tmp_path / "out", max_steps=2, metric_for_best_model="eval_mse"))
    config = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").config
    assert config.num_labels == 1 and config.problem_type == "regression"
    assert metrics["eval_mse"] == pytest.approx(metrics["eval_loss"], rel=1e-5), "the loss is the MSE"
    assert -1 <= metrics["eval_pearson"] <= 1 and -1 <= metrics["eval_spearman"] <= 1
    training_mean = sum(scores["train"]) / len(scores["train"])
    expected = sum((score - training_mean) ** 2 for score in scores["validation"]) / len(scores["validation"])
    assert metrics["mean_eval_mse"] == pytest.approx(expected)


def test_an_unlabelled_test_split_is_left_out_and_the_model_is_saved(pretrained_dir, tmp_path, caplog):
    """GLUE's test splits carry label -1 (datasets' missing ClassLabel) in every row."""
    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    splits = {"train": [0, 1] * 8, "validation": [0, 1, 1], "test": [-1, -1]}
    folder = tmp_path / "glue_like"
    folder.mkdir()
    for split, labels in splits.items():
        rows = {"sentence": [f"a {split} sentence {i}" for i in range(len(labels))], "label": labels}
        Dataset.from_dict(rows, features=features).to_parquet(folder / f"{split}.parquet")
    args = FinetuneArguments(model_name_or_path=str(pretrained_dir), dataset_name=str(folder), text_column="sentence")
    metrics = finetune(args, training_arguments(tmp_path / "out", max_steps=2))
    assert "The test split has no labels: it is not evaluated." in caplog.text
    assert "eval_accuracy" in metrics and not [name for name in metrics if name.startswith(("test_", "majority_test"))]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    # a split with only some labels missing is refused, naming how many
    partly_labelled = Dataset.from_dict({"sentence": ["x", "y"], "label": [0, -1]}, features=features)
    partly_labelled.to_parquet(folder / "train.parquet")
    with pytest.raises(ValueError, match=r"1 of the 2 rows of the train split have no label"):
        load_classification_data(args)


@pytest.mark.parametrize("padding_free", [False, True], ids=["packed-blocks", "padding-free"])
def test_causal_lm_fine_tuning_learns_where_documents_end(pretrained_dir, tmp_path, padding_free):
    """The tokenizer pads with its eos token, as most causal LMs do: eos must stay a target all the same."""
    (tmp_path / "train.txt").write_text("to be or not to be\n\nthat is the question\n\n" * 8)
    args = FinetuneArguments(
        model_name_or_path=str(pretrained_dir),
        task="causal-lm",
        train_files=[str(tmp_path / "train.txt")],
        validation_files=[str(tmp_path / "train.txt")],
        max_length=16,
        padding_free=padding_free,
    )
    tokenizer = AutoTokenizer.from_pretrained(pretrained_dir)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    task = _causal_lm_task(args, tokenizer)
    batch = task.collator([task.splits["train"][index] for index in range(4)])
    is_eos = batch["input_ids"] == tokenizer.eos_token_id
    assert is_eos.any() and (batch["labels"][is_eos] == tokenizer.eos_token_id).all()


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


def test_a_hub_token_is_used_but_never_saved_or_pushed(pretrained_dir, local_hub, tmp_path):
    secret = "hf_never_written_anywhere"
    command = [
        *(sys.executable, str(REPO_ROOT / "scripts" / "finetune.py"), "--model_name_or_path", str(pretrained_dir)),
        *("--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--save_steps", "1", "--max_length", "32"),
        *("--max_train_samples", "16", "--max_eval_samples", "8", "--use_cpu", "True", "--report_to", "none"),
        *("--push_to_hub", "True", "--hub_model_id", "org/pmg-genre", "--hub_token", secret),
    ]
    env = hub_env(local_hub, tmp_path / "hf_home")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-6000:]
    download = [
        sys.executable,
        "-c",
        "import sys; from huggingface_hub import snapshot_download; print(snapshot_download(sys.argv[1]))",
        "org/pmg-genre",
    ]
    pushed = subprocess.run(download, capture_output=True, text=True, timeout=300, env=env, check=True)
    pushed_dir = Path(pushed.stdout.strip().splitlines()[-1])
    assert (pushed_dir / "training_args.bin").is_file() and list((tmp_path / "out").glob("checkpoint-*/*.bin"))
    for folder in (tmp_path / "out", pushed_dir):
        holding_it = [path for path in folder.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]
        assert not holding_it, f"the token was written to {holding_it}"
    assert "fine-tuned version of the local checkpoint" in (pushed_dir / "README.md").read_text()


def test_a_checkpoint_that_is_nowhere_is_named(tmp_path):
    missing = str(tmp_path / "outputs" / "pmg-shakespeare")
    with pytest.raises(OSError, match=r"No folder .*pmg-shakespeare' here, and no Hub repository of that name"):
        finetune(FinetuneArguments(model_name_or_path=missing), training_arguments(tmp_path / "out"))


def test_the_regression_metric_agrees_with_scipy():
    predictions, references = [0.1, 2.0, 2.0, 3.5, 1.0], [0.0, 1.0, 3.0, 3.0, 2.5]  # ties on both sides
    scores = load_metric("regression", keep_in_memory=True).compute(predictions=predictions, references=references)
    assert scores["pearson"] == pytest.approx(pearsonr(predictions, references).statistic)
    assert scores["spearman"] == pytest.approx(spearmanr(predictions, references).statistic)
    assert scores["mse"] == pytest.approx(sum((p - r) ** 2 for p, r in zip(predictions, references, strict=True)) / 5)
    constant = load_metric("regression", keep_in_memory=True).compute(predictions=[1.0] * 5, references=references)
    assert math.isnan(constant["pearson"]) and math.isnan(constant["spearman"]), "undefined, not 0 or an error"
