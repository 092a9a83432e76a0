"""Pretraining of PMG (or matched Llama) language models with accelerate: data, model, loop, evaluation, checkpoints.

`scripts/train.py` is the command-line front end; tests call `pretrain` directly.
"""

import functools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, TorchDynamoPlugin, set_seed
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    IntervalStrategy,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    SchedulerType,
    TrainingArguments,
    default_data_collator,
    get_scheduler,
)
from transformers.trainer_utils import HubStrategy, SaveStrategy
from transformers.training_args import OptimizerNames

from .configuration_pmg import PMGConfig
from .data import (
    SHAKESPEARE_PROMPTS,
    TEST_WORKS,
    VALIDATION_WORKS,
    iterate_texts,
    load_text_dataset,
    pack_dataset,
    train_tokenizer,
)
from .gate_plots import plot_gates
from .gate_statistics import GateStatistics
from .metrics import load_metric
from .modeling_pmg import PMGForCausalLM
from .optimization import optimizer_param_groups
from .publishing import create_hub_repo, push_run, render_model_card, sample_generations
from .sequence_models import matched_llama_config

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_progress.json"
IGNORE_INDEX = -100


@dataclass
class ModelArguments:
    model_type: str = field(default="pmg", metadata={"help": "pmg, or llama for the matched Transformer baseline."})
    config_name: str | None = field(default=None, metadata={"help": "A config file or folder; overrides sizes."})
    hidden_size: int = field(default=256, metadata={"help": "Model width."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Number of blocks."})
    layer_types: str | None = field(
        default=None,
        metadata={"help": "PMG only: comma-separated linear_attention / full_attention / sliding_attention."},
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "A Hub or local tokenizer; default: train a byte-level BPE on the data."}
    )
    vocab_size: int = field(default=4096, metadata={"help": "Vocabulary of the trained tokenizer."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset; default: embedded plays."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    train_files: list[str] | None = field(default=None, metadata={"help": "Local .txt/.json/.parquet/.csv files."})
    text_column: str = field(default="text", metadata={"help": "Column holding the documents."})
    block_size: int = field(default=256, metadata={"help": "Tokens per training block."})
    document_resets: bool = field(
        default=False, metadata={"help": "Reset memory at document starts inside blocks (position_ids)."}
    )
    streaming: bool = field(default=False, metadata={"help": "Stream the corpus instead of downloading it all."})
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Blocks in the shuffle buffer of a stream."})
    streaming_eval_documents: int = field(
        default=1000, metadata={"help": "Documents of a streamed validation/test split to evaluate on."}
    )
    max_tokenizer_documents: int = field(
        default=100_000, metadata={"help": "Documents (from the start of the training split) to train BPE on."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "num_proc of datasets.map."})
    max_eval_blocks: int | None = field(default=None, metadata={"help": "Evaluate on at most this many blocks."})
    sample_prompts: list[str] | None = field(
        default=None, metadata={"help": "Prompts for the sample generations saved with the model."}
    )


def build_model(model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase, block_size: int) -> PreTrainedModel:
    """A PMG model, or a Llama of matched width, depth, MLP size and tied embeddings."""
    special = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if model_args.model_type == "pmg":
        if model_args.config_name:
            config = PMGConfig.from_pretrained(model_args.config_name, **special)
        else:
            layer_types = model_args.layer_types.split(",") if model_args.layer_types else None
            num_layers = len(layer_types) if layer_types else model_args.num_hidden_layers
            config = PMGConfig(
                hidden_size=model_args.hidden_size,
                num_hidden_layers=num_layers,
                layer_types=layer_types,
                max_position_embeddings=max(4096, block_size),
                **special,
            )
        return PMGForCausalLM(config)
    if model_args.model_type == "llama":
        for option in ("config_name", "layer_types"):  # PMG options a Llama would silently ignore
            if getattr(model_args, option):
                raise ValueError(
                    f"--{option} applies to PMG models only; the Llama baseline is sized by "
                    "--hidden_size and --num_hidden_layers."
                )
        reference = PMGConfig(
            hidden_size=model_args.hidden_size, num_hidden_layers=model_args.num_hidden_layers, **special
        )
        config = matched_llama_config(
            reference,
            max_position_embeddings=max(4096, block_size),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return LlamaForCausalLM(config)
    raise ValueError(f"model_type must be 'pmg' or 'llama', got {model_args.model_type!r}.")


def prepare_tokenizer(
    model_args: ModelArguments, data_args: DataArguments, train_split: Dataset | IterableDataset
) -> PreTrainedTokenizerBase:
    """The named tokenizer (eos doubling as pad when it has none), or a byte-level BPE trained on the data."""
    if model_args.tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name)
        if tokenizer.eos_token is None:
            raise ValueError(f"The tokenizer {model_args.tokenizer_name!r} has no eos token to separate documents.")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    texts = iterate_texts(train_split, data_args.text_column, max_documents=data_args.max_tokenizer_documents)
    return train_tokenizer(texts, vocab_size=model_args.vocab_size)


# written into output_dir when a run's setup has succeeded, removed once its model is saved: a run that stopped before
# its first checkpoint (killed, crashed) leaves only this setup behind, which a new run may then replace
RUN_STARTED_MARKER = ".pmg-run-started"


def check_supported_arguments(training_args: TrainingArguments) -> None:
    """Refuse the TrainingArguments this loop would otherwise ignore without a word (it is not Trainer): another
    optimizer, label smoothing, logging, evaluation or saving other than every so many steps, keeping the best model."""
    unsupported = {
        "optim": (training_args.optim not in (OptimizerNames.ADAMW_TORCH, OptimizerNames.ADAMW_TORCH_FUSED), "AdamW"),
        "label_smoothing_factor": (training_args.label_smoothing_factor != 0, "0"),
        "eval_strategy": (
            training_args.eval_strategy not in (IntervalStrategy.NO, IntervalStrategy.STEPS),
            '"no" or "steps"',
        ),
        "save_strategy": (training_args.save_strategy not in (SaveStrategy.NO, SaveStrategy.STEPS), '"no" or "steps"'),
        "logging_strategy": (training_args.logging_strategy != IntervalStrategy.STEPS, '"steps"'),
        "load_best_model_at_end": (training_args.load_best_model_at_end, "False"),
        "lr_scheduler_type": (training_args.lr_scheduler_type == SchedulerType.REDUCE_ON_PLATEAU, "a schedule by step"),
        **{  # Trainer options the loop does not implement, at their defaults only
            name: (getattr(training_args, name) not in (False, None), "unset")
            for name in (
                "logging_first_step",
                "eval_on_start",
                "save_only_model",
                "full_determinism",
                "ignore_data_skip",
                "neftune_noise_alpha",
                "optim_args",
                "hub_revision",
            )
        },
        "hub_strategy": (  # the run is pushed once, at its end; checkpoints stay local
            training_args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS),
            '"end" or "every_save" (the run is pushed once, when it ends)',
        ),
    }
    for name, (refused, supported) in unsupported.items():
        if refused:
            value = getattr(training_args, name)
            raise ValueError(f"Pretraining supports --{name} {supported} only, got {getattr(value, 'value', value)!r}.")
    if training_args.gradient_accumulation_steps < 1:
        raise ValueError(
            f"--gradient_accumulation_steps must be at least 1, got {training_args.gradient_accumulation_steps}."
        )


def interval(steps: float, max_steps: int) -> int:
    """Steps between two logs, evaluations or checkpoints: TrainingArguments' values below 1 are a fraction of
    `max_steps`; 0 means never."""
    return math.ceil(steps * max_steps) if 0 < steps < 1 else int(steps)


def check_output_dir(output_dir: Path, resuming: bool) -> None:
    """A new run needs an empty (or new) output_dir, or one where a run stopped before saving anything but its setup
    (tokenizer, logs): nothing else saved there before is ever overwritten."""
    if resuming or not output_dir.exists() or not any(output_dir.iterdir()):
        return
    unfinished = (output_dir / RUN_STARTED_MARKER).exists() and not (output_dir / "config.json").exists()
    if unfinished and not any(output_dir.glob(f"{CHECKPOINT_PREFIX}*")):
        return
    raise ValueError(
        f"output_dir {output_dir} is not empty: choose a new folder, or pass --resume_from_checkpoint True to "
        "continue the run saved there."
    )


def check_process_count(joined: int) -> None:
    """Processes started by a launcher (`WORLD_SIZE`) must have joined one run: `accelerate launch --multi_gpu` on a
    machine without a GPU starts them, but without `--use_cpu` accelerate joins none, and each would train alone
    and write the same output_dir."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > joined:
        raise ValueError(
            f"{launched} processes were launched, but only {joined} joined the run: each would train alone and write "
            "the same output_dir. Without a GPU, add --use_cpu True (the processes then join over gloo)."
        )


def resume_checkpoint(output_dir: Path, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint to resume from: None for a new run, the latest complete one in output_dir for "True", or the
    given folder. Checked before any work, so a wrong path fails at once."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint in ("True", "true"):
        checkpoint = max(complete_checkpoints(output_dir), key=checkpoint_step, default=None)
    else:
        checkpoint = Path(resume_from_checkpoint)
    if checkpoint is None or not (checkpoint / STATE_FILE).exists():
        raise ValueError(
            f"No complete checkpoint to resume from at {resume_from_checkpoint!r} (output_dir {output_dir})."
        )
    return checkpoint


def complete_checkpoints(output_dir: Path) -> list[Path]:
    return [path for path in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if (path / STATE_FILE).exists()]


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def save_checkpoint(accelerator: Accelerator, output_dir: Path, progress: dict, keep: int | None) -> None:
    """accelerate state (model, optimizer, scheduler, RNG) and the loop's `progress`, written to a temporary folder
    and then renamed: a kill in the middle leaves the previous checkpoint as the latest complete one. Only the
    `keep` newest checkpoints are kept, when given."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{progress['step']}"
    partial = output_dir / f".partial-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps(progress, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        if keep:
            for old in sorted(complete_checkpoints(output_dir), key=checkpoint_step)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> dict:
    """Restore the accelerate state and return the loop's progress, or say clearly why the checkpoint cannot be
    used (a truncated file, or one saved by a model of another configuration)."""
    try:
        accelerator.load_state(str(checkpoint))
        return json.loads((checkpoint / STATE_FILE).read_text())
    except Exception as error:
        raise ValueError(
            f"Cannot resume from {checkpoint}: it is corrupt or was saved by a different model or optimizer "
            f"configuration ({type(error).__name__}: {error}). Resume with the run's original arguments, or "
            "from an earlier checkpoint."
        ) from error


@torch.no_grad()
def evaluate_model(
    model: PreTrainedModel,
    dataloader: DataLoader,
    accelerator: Accelerator,
    bytes_per_token: float,
    gate_statistics: GateStatistics | None = None,
) -> dict[str, float]:
    """Token-weighted loss, perplexity and bits per byte (the shipped `language_modeling` metric) of the language
    model alone (no gate regulariser); also accumulates PMG write weights into `gate_statistics` when given."""
    model.eval()
    metric = load_metric("language_modeling", keep_in_memory=True)
    for batch in dataloader:
        labels = batch.pop("labels")
        gates = {"output_gates": True} if gate_statistics is not None else {}
        outputs = model(**batch, use_cache=False, **gates)
        targets = labels[:, 1:]
        token_losses = F.cross_entropy(
            outputs.logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        # gathered per sequence, so the duplicates that pad the last batch of a process are dropped
        loss_sums, token_counts = accelerator.gather_for_metrics(
            (token_losses.sum(1).double(), (targets != IGNORE_INDEX).sum(1))
        )
        metric.add_batch(loss_sums=loss_sums.tolist(), token_counts=token_counts.tolist())
        if gate_statistics is not None:
            gate_statistics.update(outputs.gates, batch.get("attention_mask"))
    model.train()
    return metric.compute(bytes_per_token=bytes_per_token)


def bytes_per_token(
    split: Dataset, text_column: str, tokenizer: PreTrainedTokenizerBase, max_tokens: int | None = None
) -> float:
    """UTF-8 bytes of text per token (the eos after each document included), for bits per byte: over the whole
    split, or over its first `max_tokens` tokens where evaluation reads no further (`--max_eval_blocks`; the bytes
    of a document read in part are those its tokens read decode to)."""
    texts = list(split[text_column])
    total_bytes = total_tokens = 0
    for text, ids in zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"], strict=True):
        if max_tokens is not None and total_tokens + len(ids) + 1 > max_tokens:
            read = ids[: max_tokens - total_tokens]
            total_bytes += len(tokenizer.decode(read).encode("utf-8"))
            total_tokens += len(read)
            break
        total_bytes += len(text.encode("utf-8"))
        total_tokens += len(ids) + 1
    return total_bytes / total_tokens


@dataclass
class PretrainingData:
    """Tokenizer and packed splits of one run; `evaluation` maps "validation" (and "test" when the corpus has one)
    to the packed blocks and the bytes per token of their raw text."""

    tokenizer: PreTrainedTokenizerBase
    train: Dataset | IterableDataset
    evaluation: dict[str, tuple[Dataset, float]]


def prepare_data(
    model_args: ModelArguments, data_args: DataArguments, run_dir: Path | None, seed: int
) -> PretrainingData:
    """The tokenizer (that of `run_dir`, the folder of the run being resumed, where it was saved) and packed splits."""
    corpus = load_text_dataset(
        data_args.dataset_name,
        data_args.dataset_config_name,
        data_args.train_files,
        data_args.text_column,
        streaming=data_args.streaming,
    )
    if run_dir is not None and (run_dir / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(run_dir)  # the run's own tokenizer, saved when it began
    else:
        tokenizer = prepare_tokenizer(model_args, data_args, corpus["train"])
    pack = functools.partial(
        pack_dataset,
        tokenizer=tokenizer,
        block_size=data_args.block_size,
        text_column=data_args.text_column,
        document_resets=data_args.document_resets,
        num_proc=data_args.preprocessing_num_workers,
    )
    train = pack(corpus["train"])
    if isinstance(train, IterableDataset):
        train = train.shuffle(seed=seed, buffer_size=data_args.shuffle_buffer_size)
    evaluation = {}
    for split in ("validation", "test"):
        if split not in corpus:
            continue
        documents = corpus[split]
        if isinstance(documents, IterableDataset):  # evaluation reads a fixed, finite sample of a stream
            documents = Dataset.from_list(list(documents.take(data_args.streaming_eval_documents)))
        blocks = pack(documents)
        read = None
        if data_args.max_eval_blocks:
            blocks = blocks.select(range(min(data_args.max_eval_blocks, len(blocks))))
            read = len(blocks) * data_args.block_size
        evaluation[split] = (blocks, bytes_per_token(documents, data_args.text_column, tokenizer, read))
    return PretrainingData(tokenizer, train, evaluation)


def build_optimizer(model: PreTrainedModel, training_args: TrainingArguments) -> torch.optim.AdamW:
    """AdamW; for PMG with its parameter groups (gating network at `gate_lr_ratio` x lr, no decay on gate shapes).

    `--optim adamw_torch_fused` (TrainingArguments' default) takes torch's fused kernel, as Trainer does.
    """
    learning_rate, weight_decay = training_args.learning_rate, training_args.weight_decay
    if model.config.model_type == "pmg":
        groups = optimizer_param_groups(model, learning_rate, weight_decay)
    else:
        groups = [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    betas = (training_args.adam_beta1, training_args.adam_beta2)
    fused = training_args.optim == OptimizerNames.ADAMW_TORCH_FUSED
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=training_args.adam_epsilon, fused=fused)


def describe_run(
    model: PreTrainedModel,
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    max_steps: int,
    evaluation: dict[str, tuple[Dataset, float]],
) -> dict[str, str]:
    """Dataset, tokenizer and evaluation descriptions and the hyperparameters (`max_steps` as run, by steps or
    epochs), for the model card and TensorBoard."""
    if data_args.dataset_name:
        dataset = f"the Hub dataset `{data_args.dataset_name}`" + (
            f" (configuration `{data_args.dataset_config_name}`)" if data_args.dataset_config_name else ""
        )
    elif data_args.train_files:
        dataset = "local files: " + ", ".join(f"`{Path(path).name}`" for path in data_args.train_files)
    else:
        dataset = (
            "the works of Shakespeare embedded in `pmg` (Project Gutenberg texts in the Open Shakespeare edition, "
            f"CC BY 2.5); validation plays: {', '.join(VALIDATION_WORKS)}; test plays: {', '.join(TEST_WORKS)}"
        )
    tokenizer = (
        f"`{model_args.tokenizer_name}`"
        if model_args.tokenizer_name
        else f"byte-level BPE with {model.config.vocab_size} tokens, trained on the training split"
    )
    accelerator_state = AcceleratorState()
    hyperparameters = {
        "model_type": model.config.model_type,
        "parameters": model.num_parameters(),
        "hidden_size": model.config.hidden_size,
        "num_hidden_layers": model.config.num_hidden_layers,
        "vocab_size": model.config.vocab_size,
        "block_size": data_args.block_size,
        "document_resets": data_args.document_resets,
        "max_steps": max_steps,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "num_processes": accelerator_state.num_processes,
        "learning_rate": training_args.learning_rate,
        "warmup_steps": training_args.warmup_steps,
        "weight_decay": training_args.weight_decay,
        "max_grad_norm": training_args.max_grad_norm,
        "mixed_precision": str(accelerator_state.mixed_precision),
        "seed": training_args.seed,
    }
    if model.config.model_type == "pmg":
        hyperparameters.update(gate_lr_ratio=model.config.gate_lr_ratio, gate_l1=model.config.gate_l1)
    return {
        "dataset": dataset,
        "tokenizer": tokenizer,
        "evaluation": describe_evaluation(data_args, evaluation),
        "hyperparameters": hyperparameters,
    }


def describe_evaluation(data_args: DataArguments, evaluation: dict[str, tuple[Dataset, float]]) -> str:
    """What the results were measured on: every full block of the held-out splits, or the part of them read."""
    sizes = " and ".join(f"{len(blocks) * data_args.block_size:,} {split}" for split, (blocks, _) in evaluation.items())
    if data_args.max_eval_blocks:
        scope = f"the first {data_args.max_eval_blocks} blocks of each split (`--max_eval_blocks`), not all of it"
    elif data_args.streaming:
        scope = f"blocks of at most the first {data_args.streaming_eval_documents} documents of each streamed split"
    else:
        scope = "every full block of each split"
    return f"Measured on {sizes} tokens in blocks of {data_args.block_size}: {scope}."


def log_metrics(accelerator: Accelerator, prefix: str, metrics: dict, gates: list[dict], step: int) -> None:
    """Send a split's metrics and per-layer gate statistics to the trackers (TensorBoard)."""
    values = {f"{prefix}/{name}": value for name, value in metrics.items()}
    for row in gates:
        values[f"gates/layer_{row['layer']}/mean_write"] = row["mean_write"]
        values[f"gates/layer_{row['layer']}/long_memory_fraction"] = row["long_memory_fraction"]
    accelerator.log(values, step=step)


def compile_plugin(training_args: TrainingArguments) -> TorchDynamoPlugin | None:
    """`--torch_compile` (with `--torch_compile_backend` / `--torch_compile_mode`, as Trainer reads them): accelerate
    compiles the model when it is prepared; the saved weights are the uncompiled model's."""
    if not training_args.torch_compile:
        return None
    backend = training_args.torch_compile_backend or "inductor"
    return TorchDynamoPlugin(backend=backend, mode=training_args.torch_compile_mode)


def pretrain(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> dict:
    """Train a causal LM and save model, tokenizer, metrics, samples and model card to `training_args.output_dir`
    (and push them to the Hub with `push_to_hub`); returns the final metrics."""
    check_supported_arguments(training_args)
    output_dir = Path(training_args.output_dir)
    checkpoint = resume_checkpoint(output_dir, training_args.resume_from_checkpoint)
    # a checkpoint of another folder's run continues into a new (or empty) output_dir, with that run's tokenizer
    in_place = checkpoint is not None and checkpoint.parent.resolve() == output_dir.resolve()
    check_output_dir(output_dir, resuming=in_place)
    accelerator = Accelerator(
        gradient_accumulation_steps=training_args.gradient_accumulation_steps,
        mixed_precision="bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "no",
        cpu=training_args.use_cpu,
        dynamo_plugin=compile_plugin(training_args),
        log_with=training_args.report_to or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
        # the shuffle order is a function of (seed, epoch): a resumed run sees the same batches
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=training_args.data_seed),
    )
    check_process_count(accelerator.num_processes)
    set_seed(training_args.seed)
    if data_args.streaming and training_args.max_steps <= 0:
        raise ValueError("A streamed corpus has no known length: set --max_steps.")
    repo_id = training_args.hub_model_id or output_dir.name
    if training_args.push_to_hub and accelerator.is_main_process:
        repo_id = create_hub_repo(repo_id, training_args.hub_token, training_args.hub_private_repo)

    with accelerator.main_process_first():
        run_dir = checkpoint.parent if checkpoint is not None else None
        data_seed = training_args.seed if training_args.data_seed is None else training_args.data_seed
        data = prepare_data(model_args, data_args, run_dir, data_seed)
    tokenizer = data.tokenizer
    model = build_model(model_args, tokenizer, data_args.block_size)
    if training_args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs)
    optimizer = build_optimizer(model, training_args)
    streamed = isinstance(data.train, IterableDataset)
    train_loader = DataLoader(
        data.train.with_format("torch"),
        batch_size=training_args.per_device_train_batch_size,
        shuffle=not streamed,
        collate_fn=default_data_collator,
        drop_last=True,
    )
    eval_loaders = {
        split: DataLoader(
            blocks.with_format("torch"),
            batch_size=training_args.per_device_eval_batch_size,
            collate_fn=default_data_collator,
        )
        for split, (blocks, _) in data.evaluation.items()
    }
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    eval_loaders = {split: accelerator.prepare(loader) for split, loader in eval_loaders.items()}
    max_steps = training_args.max_steps
    accumulation = training_args.gradient_accumulation_steps
    # accelerate also takes an optimizer step at the end of an epoch, over the batches left (`short_group`)
    short_group = 0 if streamed else len(train_loader) % accumulation
    if not streamed:
        steps_per_epoch = math.ceil(len(train_loader) / accumulation)
        if len(train_loader) < accumulation:
            raise ValueError(
                f"One optimizer step needs {accumulation} batches of "
                f"{training_args.per_device_train_batch_size} blocks per process; the data has {len(data.train)} "
                f"blocks of {data_args.block_size} tokens. Use a smaller batch or block size, or more data."
            )
        if max_steps <= 0:
            max_steps = math.ceil(training_args.num_train_epochs * steps_per_epoch)
    warmup_steps = training_args.get_warmup_steps(max_steps)
    # a prepared scheduler advances once per process at each optimizer step
    scheduler = accelerator.prepare(
        get_scheduler(
            training_args.lr_scheduler_type,
            optimizer,
            num_warmup_steps=warmup_steps * accelerator.num_processes,
            num_training_steps=max_steps * accelerator.num_processes,
            scheduler_specific_kwargs=training_args.lr_scheduler_kwargs,
        )
    )

    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)  # the plain model, for saving
    description = describe_run(unwrapped, model_args, data_args, training_args, max_steps, data.evaluation)
    has_gates = unwrapped.config.model_type == "pmg" and bool(unwrapped.config.pmg_layer_indices)

    def evaluate_split(split: str) -> tuple[dict[str, float], list[dict]]:
        statistics = None
        if has_gates:
            config = unwrapped.config
            statistics = GateStatistics(config.pmg_layer_indices, config.pmg_inner_size, data_args.block_size)
        bytes_per_token_ = data.evaluation[split][1]
        metrics = evaluate_model(model, eval_loaders[split], accelerator, bytes_per_token_, statistics)
        gates = (
            statistics.summary(lambda sums: accelerator.reduce(sums.to(accelerator.device)).cpu()) if has_gates else []
        )
        return metrics, gates

    progress = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "history": []}
    if checkpoint is not None:
        progress = load_checkpoint(accelerator, checkpoint)
    if not in_place and accelerator.is_main_process:
        # saved once the setup succeeded (a failed setup leaves output_dir empty), before any checkpoint needs it
        tokenizer.save_pretrained(output_dir)
        (output_dir / RUN_STARTED_MARKER).touch()
    accelerator.init_trackers(training_args.run_name or "pretraining", config=description["hyperparameters"])

    tokens_per_step = (
        training_args.per_device_train_batch_size * accumulation * accelerator.num_processes * data_args.block_size
    )
    logging_steps = max(1, interval(training_args.logging_steps, max_steps))
    eval_steps = interval(training_args.eval_steps or training_args.logging_steps, max_steps)
    evaluate_during_training = training_args.eval_strategy == IntervalStrategy.STEPS and eval_steps
    save_steps = (
        interval(training_args.save_steps, max_steps) if training_args.save_strategy == SaveStrategy.STEPS else 0
    )
    losses, interval_start, interval_steps = [], time.perf_counter(), 0
    bar = tqdm(total=max_steps, initial=progress["step"], disable=not accelerator.is_local_main_process)
    model.train()
    while progress["step"] < max_steps:
        train_loader.set_epoch(progress["epoch"])
        step_at_epoch_start = progress["step"]
        for batch in accelerator.skip_first_batches(train_loader, progress["batches_in_epoch"]):
            progress["batches_in_epoch"] += 1
            with accelerator.accumulate(model):
                loss = model(**batch, use_cache=False).loss  # a Llama with a cache attends across packed documents
                # accelerate divides by `accumulation`; an epoch's last, shorter group is averaged over its own size
                in_short_group = short_group and progress["batches_in_epoch"] > len(train_loader) - short_group
                accelerator.backward(loss * accumulation / short_group if in_short_group else loss)
                if accelerator.sync_gradients and training_args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), training_args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            losses.append(loss.detach().float())
            if not accelerator.sync_gradients:
                continue
            progress["step"] += 1
            step, interval_steps = progress["step"], interval_steps + 1
            bar.update(1)
            if step % logging_steps == 0 or step == max_steps:
                elapsed = time.perf_counter() - interval_start
                entry = {
                    "step": step,
                    "loss": accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item(),
                    "learning_rate": scheduler.get_last_lr()[0],
                    "tokens_per_second": interval_steps * tokens_per_step / elapsed,
                }
                progress["history"].append(entry)
                accelerator.log({f"train/{name}": value for name, value in entry.items() if name != "step"}, step)
                bar.set_postfix(
                    loss=f"{entry['loss']:.3f}",
                    lr=f"{entry['learning_rate']:.2e}",
                    tok_s=f"{entry['tokens_per_second']:.0f}",
                )
                losses, interval_start, interval_steps = [], time.perf_counter(), 0
            if evaluate_during_training and step % eval_steps == 0 and step < max_steps:
                metrics, gates = evaluate_split("validation")
                progress["history"].append({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})
                log_metrics(accelerator, "eval", metrics, gates, step)
                interval_start = time.perf_counter()  # evaluation time is not training throughput
            if save_steps and step % save_steps == 0 and step < max_steps:
                save_checkpoint(accelerator, output_dir, progress, training_args.save_total_limit)
                interval_start = time.perf_counter()
            if step >= max_steps:
                break
        else:
            if progress["step"] == step_at_epoch_start and progress["batches_in_epoch"] == 0:
                raise ValueError(
                    "The training data yields no optimizer step per pass: a stream shorter than "
                    f"{accumulation} batches of "
                    f"{training_args.per_device_train_batch_size} blocks per process. Use a smaller batch or more data."
                )
            progress["epoch"], progress["batches_in_epoch"] = progress["epoch"] + 1, 0
    bar.close()

    history = progress["history"]
    train_losses = [entry["loss"] for entry in history if "loss" in entry]
    metrics = {"step": progress["step"], "train_loss": train_losses[-1] if train_losses else None}
    # saved before the final evaluation, so that a failure there cannot lose the trained weights. Gathered from every
    # process under FSDP / DeepSpeed; under --torch_compile from the module inside the compiled one, so the names carry
    # no "_orig_mod." prefix
    state_dict = accelerator.get_state_dict(getattr(model, "_orig_mod", model))
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir, state_dict=state_dict)
        tokenizer.save_pretrained(output_dir)
        (output_dir / RUN_STARTED_MARKER).unlink(missing_ok=True)
    gate_statistics = []
    for split, prefix in (("validation", "eval"), ("test", "test")):
        if split in data.evaluation:
            split_metrics, split_gates = evaluate_split(split)
            metrics.update({f"{prefix}_{name}": value for name, value in split_metrics.items()})
            log_metrics(accelerator, prefix, split_metrics, split_gates if split == "validation" else [], max_steps)
            gate_statistics = gate_statistics or split_gates
    if accelerator.is_main_process:
        # sampled from the saved files, which also proves they load
        saved = type(unwrapped).from_pretrained(output_dir)
        embedded_corpus = not (data_args.dataset_name or data_args.train_files)
        prompts = data_args.sample_prompts or (list(SHAKESPEARE_PROMPTS) if embedded_corpus else [""])
        samples = sample_generations(saved, tokenizer, prompts, seed=training_args.seed)
        gate_plot = None
        if has_gates:  # the gates on the start of the first validation block, embedded in the model card
            passage = tokenizer.decode(data.evaluation["validation"][0][0]["input_ids"])
            gate_plot = plot_gates(saved, tokenizer, passage, output_dir / "gates.png", horizon=data_args.block_size)
        write_json(output_dir / "metrics.json", metrics)
        write_json(output_dir / "training_history.json", history)
        write_json(output_dir / "gate_statistics.json", gate_statistics)
        write_json(output_dir / "samples.json", samples)
        write_json(
            output_dir / "training_arguments.json",
            {"model": asdict(model_args), "data": asdict(data_args), "training": training_args.to_dict()},
        )
        card = render_model_card(
            saved,
            repo_id,
            metrics,
            gate_statistics,
            samples,
            description["hyperparameters"],
            data_args.dataset_name,
            bool(data_args.train_files),
            description["dataset"],
            description["tokenizer"],
            description["evaluation"],
            data_args.block_size,
            gate_plot.name if gate_plot else None,
        )
        card.save(output_dir / "README.md")
    # end_training destroys the process group: every process does it together, since a gloo group torn down after
    # its peer had already exited waited forever in its destructor (seen with two CPU processes)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if training_args.push_to_hub and accelerator.is_main_process:
        push_run(output_dir, repo_id, training_args.hub_token, f"Pretrained for {progress['step']} steps")
    return metrics


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False, default=str))
