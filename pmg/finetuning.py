"""Fine-tuning PMG (or any transformers) checkpoints with `Trainer`: sequence classification and causal LM.

`scripts/finetune.py` is the command-line front end; tests call `finetune` directly. Without a dataset, sequence
classification is the embedded genre task (`pmg.data.load_genre_passages`) and causal LM the embedded plays.
"""

import logging
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Value, load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DataCollatorWithFlattening,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    EvalPrediction,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    default_data_collator,
)
from transformers.trainer_utils import get_last_checkpoint

from .data import (
    check_data_sources,
    file_builder,
    load_genre_passages,
    load_text_dataset,
    load_tokenizer,
    pack_dataset,
)
from .metrics import load_metric
from .pretraining import check_output_dir, check_process_count
from .publishing import create_hub_repo, hub_id

TASKS = ("sequence-classification", "causal-lm")
logger = logging.getLogger(__name__)


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
    """train / validation (/ test) splits with `text_column` and `label_column`; the genre task by default.
    Evaluation splits without any label (GLUE's test splits) are left out; rows without text or label are refused."""
    check_data_sources(args.dataset_name, args.train_files, args.validation_files)
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
    data = DatasetDict({name: rows for name, rows in data.items() if _check_rows(name, rows, args)})
    if "validation" not in data:
        raise ValueError("Sequence classification needs a validation split (or --validation_files) to evaluate on.")
    return data


def _check_rows(split: str, rows: Dataset, args: FinetuneArguments) -> bool:
    """Whether to keep an evaluation split: False where it has no label at all (left out, with a warning); a split
    with some rows lacking text or label is refused, naming how many."""
    is_class_label = isinstance(rows.features[args.label_column], ClassLabel)
    unlabelled = sum(_is_missing(label, is_class_label) for label in rows[args.label_column])
    if split != "train" and unlabelled == len(rows):
        logger.warning("The %s split has no labels: it is not evaluated.", split)
        return False
    textless = sum(text is None for text in rows[args.text_column])
    for count, what in ((unlabelled, "label (empty, null, or -1 in a ClassLabel column)"), (textless, "text")):
        if count:
            raise ValueError(f"{count} of the {len(rows)} rows of the {split} split have no {what}: fill or drop them.")
    return True


def _is_missing(label: object, is_class_label: bool) -> bool:
    """datasets marks a missing ClassLabel with -1; csv readers leave NaN in empty cells, json null gives None."""
    return label is None or (isinstance(label, float) and math.isnan(label)) or (is_class_label and label == -1)


def is_regression(data: DatasetDict, label_column: str) -> bool:
    """Float labels are scores to regress on (one output, MSE loss), as transformers' run_glue reads them."""
    feature = data["train"].features[label_column]
    return isinstance(feature, Value) and feature.dtype.startswith("float")


def label_names(data: DatasetDict, label_column: str) -> list[str]:
    """Class names, from a ClassLabel feature or the training labels (numbers in numeric order, so class id 2 is
    label 2 where labels are 0..n-1); evaluation splits may not add new ones."""
    feature = data["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    names = [str(label) for label in sorted(set(data["train"][label_column]))]
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
    output_dir = Path(training_args.output_dir)
    checkpoint = _resume_checkpoint(output_dir, training_args.resume_from_checkpoint)
    # a checkpoint of another run starts a new output_dir: only the run's own folder may hold files already
    in_place = checkpoint is not None and checkpoint.parent.resolve() == output_dir.resolve()
    check_output_dir(output_dir, resuming=in_place)
    _move_token_out_of_saved_arguments(training_args)
    if training_args.push_to_hub and training_args.process_index == 0:  # a bad name, token or endpoint fails here
        create_hub_repo(
            training_args.hub_model_id or output_dir.absolute().name,  # Trainer's default
            None,
            training_args.hub_private_repo,
        )
    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    build = _classification_task if args.task == "sequence-classification" else _causal_lm_task
    task = build(args, tokenizer)
    trainer = FinetuningTrainer(
        base_model=args.model_name_or_path,
        model=task.model,
        args=training_args,
        train_dataset=task.splits["train"],
        eval_dataset=task.splits["validation"],
        processing_class=tokenizer,
        data_collator=task.collator,
        compute_metrics=task.compute_metrics,
        callbacks=[EarlyStoppingCallback(args.early_stopping_patience)] if args.early_stopping_patience else [],
    )
    trained = trainer.train(resume_from_checkpoint=None if checkpoint is None else str(checkpoint))
    trainer.save_model()  # before the last evaluations: a failure there loses no training
    trainer.save_metrics("train", trained.metrics)
    trainer.save_state()
    metrics = {**trained.metrics, **task.baselines}
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
    if training_args.push_to_hub:  # writes the card and uploads the folder
        trainer.push_to_hub(commit_message="End of fine-tuning", **card)
    else:
        trainer.create_model_card(**card)
    return metrics


class FinetuningTrainer(Trainer):
    """`Trainer` whose model card names a local base checkpoint: transformers' card links a Hub base model and calls
    any other "trained from scratch"."""

    FROM_SCRATCH = "This model was trained from scratch on "

    def __init__(self, *args, base_model: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.base_model = base_model

    def create_model_card(self, *args, **kwargs) -> None:
        super().create_model_card(*args, **kwargs)
        card = Path(self.args.output_dir) / "README.md"
        if hub_id(self.base_model) is None and self.is_world_process_zero():
            fine_tuned = f"This model is a fine-tuned version of the local checkpoint `{self.base_model}` on "
            card.write_text(card.read_text().replace(self.FROM_SCRATCH, fine_tuned))


def _move_token_out_of_saved_arguments(training_args: TrainingArguments) -> None:
    """Trainer pickles its arguments into every checkpoint and the pushed repository (training_args.bin): a
    `--hub_token` moves to this process's `HF_TOKEN`, where huggingface_hub finds it, instead."""
    if training_args.hub_token:
        os.environ["HF_TOKEN"] = training_args.hub_token
        training_args.hub_token = None


# the corpora a task uses without --dataset_name or --train_files, as model cards name them
_EMBEDDED_DATASETS = {
    "sequence-classification": "Shakespeare genre passages (embedded in pmg)",
    "causal-lm": "Shakespeare plays (embedded in pmg)",
}


def _resume_checkpoint(output_dir: Path, resume_from_checkpoint: str | None) -> Path | None:
    """Trainer's checkpoint to resume from: None for a new run, the last one in output_dir for "True" (as
    `scripts/train.py` takes it), or the given folder; checked before any work."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint in ("True", "true"):
        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if last is None:
            raise ValueError(f"No checkpoint to resume from in output_dir {output_dir}.")
        checkpoint = Path(last)
    else:
        checkpoint = Path(resume_from_checkpoint)
    if not (checkpoint / TRAINER_STATE).is_file():
        raise ValueError(
            f"{checkpoint} is no Trainer checkpoint (it has no {TRAINER_STATE}): fine-tuning resumes its own "
            "checkpoints; a pretraining run's final model is a --model_name_or_path."
        )
    return checkpoint


TRAINER_STATE = "trainer_state.json"


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
    regression = is_regression(data, args.label_column)
    names = [] if regression else label_names(data, args.label_column)
    head = (
        {"num_labels": 1, "problem_type": "regression"}
        if regression
        else {
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {name: index for index, name in enumerate(names)},
        }
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model_name_or_path, trust_remote_code=args.trust_remote_code, **head
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    is_class_label = isinstance(data["train"].features[args.label_column], ClassLabel)
    label_ids = {name: index for index, name in enumerate(names)}

    def encode(batch: dict) -> dict:
        encoded = tokenizer(batch[args.text_column])
        truncated = [len(ids) > args.max_length for ids in encoded["input_ids"]]
        encoded = {key: [row[: args.max_length] for row in rows] for key, rows in encoded.items()}
        labels = batch[args.label_column]
        if not (regression or is_class_label):
            labels = [label_ids[str(label)] for label in labels]
        return {**encoded, "labels": labels, "truncated": truncated}

    encoded = {}
    for split, rows in data.items():
        rows = _limit(rows, args.max_train_samples if split == "train" else args.max_eval_samples)
        rows = rows.map(encode, batched=True, remove_columns=rows.column_names)
        truncated = sum(rows["truncated"])
        if truncated:  # the classifier reads the last token kept: what is cut off never reaches it
            logger.warning(
                "%d of the %d %s texts are longer than max_length=%d tokens and lose their ends; raise --max_length "
                "to keep more.",
                truncated,
                len(rows),
                split,
                args.max_length,
            )
        encoded[split] = rows.remove_columns("truncated")
    if regression:
        compute_metrics, baselines = _regression_metrics(encoded)
    else:
        compute_metrics, baselines = _classification_metrics(encoded, len(names))
    return FinetuningTask(model, encoded, DataCollatorWithPadding(tokenizer), compute_metrics, baselines)


MetricsAndBaselines = tuple[Callable[[EvalPrediction], dict[str, float]], dict[str, float]]
EVALUATED_SPLITS = (("validation", "eval"), ("test", "test"))


def _classification_metrics(encoded: dict[str, Dataset], num_labels: int) -> MetricsAndBaselines:
    """Accuracy and macro-F1 of the arg-max class, and of the baseline every classifier must beat: always answering
    the most frequent training class."""
    metric = load_metric("classification", keep_in_memory=True)
    all_labels = list(range(num_labels))

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        predicted = np.argmax(prediction.predictions, axis=-1)
        return metric.compute(predictions=predicted, references=prediction.label_ids, labels=all_labels)

    majority = Counter(encoded["train"]["labels"]).most_common(1)[0][0]
    baselines = {}
    for split, prefix in EVALUATED_SPLITS:
        if split in encoded:
            references = encoded[split]["labels"]
            scores = metric.compute(predictions=[majority] * len(references), references=references, labels=all_labels)
            baselines.update({f"majority_{prefix}_{name}": value for name, value in scores.items()})
    return compute_metrics, baselines


def _regression_metrics(encoded: dict[str, Dataset]) -> MetricsAndBaselines:
    """MSE, Pearson and Spearman of the predicted scores, and the MSE of always answering the training mean (its
    correlations are undefined)."""
    metric = load_metric("regression", keep_in_memory=True)

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        return metric.compute(predictions=prediction.predictions.reshape(-1), references=prediction.label_ids)

    mean = float(np.mean(encoded["train"]["labels"]))
    baselines = {
        f"mean_{prefix}_mse": float(np.mean((np.asarray(encoded[split]["labels"]) - mean) ** 2))
        for split, prefix in EVALUATED_SPLITS
        if split in encoded
    }
    return compute_metrics, baselines


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
        if tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer needs an eos token to mark document ends.")

        # whole documents (each followed by eos, as in pretraining) in pieces of at most max_length, concatenated
        # per batch with position_ids restarting at each one: no padding, and PMG memories (and attention) never
        # cross a document boundary
        def split_documents(batch: dict) -> dict:
            texts = [text for text in batch[args.text_column] if text is not None]
            pieces = []
            for document in tokenizer(texts, add_special_tokens=False)["input_ids"]:
                ids = [*document, tokenizer.eos_token_id]
                pieces += [ids[start : start + args.max_length] for start in range(0, len(ids), args.max_length)]
            return {"input_ids": [piece for piece in pieces if len(piece) > 1]}

        prepared = {
            split: rows.map(split_documents, batched=True, remove_columns=rows.column_names)
            for split, rows in corpus.items()
        }
        collator = DataCollatorWithFlattening()
    else:
        # full blocks with their labels (eos included: DataCollatorForLanguageModeling would mask it as padding
        # where pad and eos are one token)
        prepared = {
            split: pack_dataset(rows, tokenizer, args.max_length, args.text_column) for split, rows in corpus.items()
        }
        collator = default_data_collator
    prepared = {
        split: _limit(rows, args.max_train_samples if split == "train" else args.max_eval_samples)
        for split, rows in prepared.items()
    }
    return FinetuningTask(model, prepared, collator)
