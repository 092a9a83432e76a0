"""Fine-tuning PMG (or any transformers) checkpoints with `Trainer`: sequence classification and causal LM.

`scripts/finetune.py` is the command-line front end; tests call `finetune` directly. Without a dataset, sequence
classification is the embedded genre task (`pmg.data.load_genre_passages`) and causal LM the embedded plays.
"""

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DataCollatorForLanguageModeling,
    DataCollatorWithFlattening,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    EvalPrediction,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint

from .data import file_builder, load_genre_passages, load_text_dataset, load_tokenizer, pack_dataset
from .metrics import load_metric
from .pretraining import check_output_dir, check_process_count
from .publishing import create_hub_repo, hub_id

TASKS = ("sequence-classification", "causal-lm")


@dataclass
class FinetuneArguments:
    model_name_or_path: str = field(
        default="outputs/pmg-shakespeare", metadata={"help": "A saved or Hub checkpoint (the pretraining output)."}
    )
    task: str = field(default="sequence-classification", metadata={"help": " | ".join(TASKS)})
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset; default: an embedded task."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    train_files: list[str] | None = field(default=None, metadata={"help": "Local .txt/.json/.parquet/.csv files."})
    validation_files: list[str] | None = field(default=None, metadata={"help": "Local evaluation files."})
    text_column: str = field(default="text", metadata={"help": "Column holding the texts."})
    label_column: str = field(default="label", metadata={"help": "Sequence classification: the label column."})
    max_length: int = field(default=256, metadata={"help": "Tokens per example (truncation / block size)."})
    padding_free: bool = field(
        default=False,
        metadata={"help": "Causal LM: DataCollatorWithFlattening (documents concatenated, position_ids reset)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on at most this many examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many."})
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after this many evaluations without improvement."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Load modeling code shipped with the model."})


def load_classification_data(args: FinetuneArguments) -> DatasetDict:
    """train / validation (/ test) splits with `text_column` and `label_column`; the genre task by default."""
    if not (args.dataset_name or args.train_files):
        data = load_genre_passages()
    elif args.dataset_name:
        data = load_dataset(args.dataset_name, args.dataset_config_name)
    else:
        files = {"train": args.train_files, **({"validation": args.validation_files} if args.validation_files else {})}
        data = load_dataset(file_builder([*args.train_files, *(args.validation_files or [])]), data_files=files)
    for split in data.values():
        missing = {args.text_column, args.label_column} - set(split.column_names)
        if missing:
            raise ValueError(f"The dataset has no column(s) {sorted(missing)}; its columns are {split.column_names}.")
    if "validation" not in data:
        raise ValueError("Sequence classification needs a validation split (or --validation_files) to evaluate on.")
    return data


def label_names(data: DatasetDict, label_column: str) -> list[str]:
    """Class names, from a ClassLabel feature or the training labels; evaluation splits may not add new ones."""
    feature = data["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    names = sorted({str(label) for label in data["train"][label_column]})
    for split, rows in data.items():
        unseen = sorted({str(label) for label in rows[label_column]} - set(names))
        if unseen:
            raise ValueError(
                f"The {split} split has labels never seen in training: {unseen}; training labels are {names}."
            )
    return names


def finetune(args: FinetuneArguments, training_args: TrainingArguments) -> dict[str, float]:
    """Fine-tune, evaluate on validation (and test, when present), save the model to `output_dir`; returns metrics."""
    if args.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {args.task!r}.")
    if args.max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {args.max_length}.")
    check_process_count(training_args.world_size)
    checkpoint = _resume_checkpoint(Path(training_args.output_dir), training_args.resume_from_checkpoint)
    check_output_dir(Path(training_args.output_dir), resuming=checkpoint is not None)
    if training_args.push_to_hub and training_args.process_index == 0:  # a bad name, token or endpoint fails here
        create_hub_repo(
            training_args.hub_model_id or Path(training_args.output_dir).absolute().name,  # Trainer's default
            training_args.hub_token,
            training_args.hub_private_repo,
        )
    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    build = _classification_task if args.task == "sequence-classification" else _causal_lm_task
    task = build(args, tokenizer)
    trainer = Trainer(
        model=task.model,
        args=training_args,
        train_dataset=task.splits["train"],
        eval_dataset=task.splits["validation"],
        processing_class=tokenizer,
        data_collator=task.collator,
        compute_metrics=task.compute_metrics,
        callbacks=[EarlyStoppingCallback(args.early_stopping_patience)] if args.early_stopping_patience else [],
    )
    trainer.train(resume_from_checkpoint=checkpoint)
    metrics = dict(task.baselines)
    for split, rows in task.splits.items():
        if split == "train":
            continue
        metrics.update(trainer.evaluate(rows, metric_key_prefix="eval" if split == "validation" else split))
    if "eval_loss" in metrics and args.task == "causal-lm":
        metrics["eval_perplexity"] = float(np.exp(min(metrics["eval_loss"], 700.0)))
    trainer.save_metrics("all", metrics)  # before a push, which uploads the folder
    hub_dataset = hub_id(args.dataset_name)
    card = dict(
        finetuned_from=hub_id(args.model_name_or_path),
        tasks="text-classification" if args.task == "sequence-classification" else "text-generation",
        dataset=args.dataset_name or ("local files" if args.train_files else _EMBEDDED_DATASETS[args.task]),
        # a Hub dataset's id types the model-index results (transformers drops results without one) and links it;
        # local or embedded data have no Hub page to link, and their results stay in the card's text
        dataset_tags=hub_dataset,
        dataset_args=args.dataset_config_name if hub_dataset else None,
    )
    if training_args.push_to_hub:  # saves the model, writes the card, uploads both
        trainer.push_to_hub(commit_message="End of fine-tuning", **card)
    else:
        trainer.save_model()
        trainer.create_model_card(**card)
    return metrics


# the corpora a task uses without --dataset_name or --train_files, as model cards name them
_EMBEDDED_DATASETS = {
    "sequence-classification": "Shakespeare genre passages (embedded in pmg)",
    "causal-lm": "Shakespeare plays (embedded in pmg)",
}


def _resume_checkpoint(output_dir: Path, resume_from_checkpoint: str | None) -> str | None:
    """Trainer's checkpoint to resume from: None for a new run, the last one in output_dir for "True" (as
    `scripts/train.py` takes it), or the given folder."""
    if resume_from_checkpoint not in ("True", "true"):
        return resume_from_checkpoint
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if last is None:
        raise ValueError(f"No checkpoint to resume from in output_dir {output_dir}.")
    return last


def _limit(rows: Dataset, count: int | None) -> Dataset:
    """At most `count` rows, drawn at random (seed 0): held-out splits are often sorted by source or class."""
    return rows.shuffle(seed=0).select(range(min(count, len(rows)))) if count else rows


@dataclass
class FinetuningTask:
    """What `Trainer` needs for one task, plus the metrics of trivial baselines on its evaluation splits."""

    model: PreTrainedModel
    splits: dict[str, Dataset]
    collator: Callable
    compute_metrics: Callable[[EvalPrediction], dict[str, float]] | None = None
    baselines: dict[str, float] = field(default_factory=dict)


def _classification_task(args: FinetuneArguments, tokenizer: PreTrainedTokenizerBase) -> FinetuningTask:
    data = load_classification_data(args)
    names = label_names(data, args.label_column)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model_name_or_path,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: index for index, name in enumerate(names)},
        trust_remote_code=args.trust_remote_code,
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    is_class_label = isinstance(data["train"].features[args.label_column], ClassLabel)

    def encode(batch: dict) -> dict:
        encoded = tokenizer(batch[args.text_column], truncation=True, max_length=args.max_length)
        labels = batch[args.label_column]
        encoded["labels"] = labels if is_class_label else [names.index(str(label)) for label in labels]
        return encoded

    encoded = {
        split: _limit(rows, args.max_train_samples if split == "train" else args.max_eval_samples).map(
            encode, batched=True, remove_columns=rows.column_names
        )
        for split, rows in data.items()
    }
    metric = load_metric("classification", keep_in_memory=True)
    all_labels = list(range(len(names)))

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        predicted = np.argmax(prediction.predictions, axis=-1)
        return metric.compute(predictions=predicted, references=prediction.label_ids, labels=all_labels)

    # the baseline every classifier must beat: always answer the most frequent training class
    majority = Counter(encoded["train"]["labels"]).most_common(1)[0][0]
    baselines = {}
    for split, prefix in (("validation", "eval"), ("test", "test")):
        if split in encoded:
            references = encoded[split]["labels"]
            scores = metric.compute(predictions=[majority] * len(references), references=references, labels=all_labels)
            baselines.update({f"majority_{prefix}_{name}": value for name, value in scores.items()})
    return FinetuningTask(model, encoded, DataCollatorWithPadding(tokenizer), compute_metrics, baselines)


def _causal_lm_task(args: FinetuneArguments, tokenizer: PreTrainedTokenizerBase) -> FinetuningTask:
    corpus = load_text_dataset(
        args.dataset_name,
        args.dataset_config_name,
        args.train_files,
        args.text_column,
        validation_files=args.validation_files,
    )
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    if args.padding_free:
        # whole documents in pieces of at most max_length, concatenated per batch with position_ids restarting at
        # each one: no padding, and PMG memories (and attention) never cross a document boundary
        def split_documents(batch: dict) -> dict:
            pieces = tokenizer(
                batch[args.text_column],
                truncation=True,
                max_length=args.max_length,
                return_overflowing_tokens=True,
                add_special_tokens=False,
            )
            return {"input_ids": [ids for ids in pieces["input_ids"] if len(ids) > 1]}

        prepared = {
            split: rows.map(split_documents, batched=True, remove_columns=rows.column_names)
            for split, rows in corpus.items()
        }
        collator = DataCollatorWithFlattening()
    else:
        prepared = {
            split: pack_dataset(rows, tokenizer, args.max_length, args.text_column).remove_columns("labels")
            for split, rows in corpus.items()
        }
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    prepared = {
        split: _limit(rows, args.max_train_samples if split == "train" else args.max_eval_samples)
        for split, rows in prepared.items()
    }
    return FinetuningTask(model, prepared, collator)
