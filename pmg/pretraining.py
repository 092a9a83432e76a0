"""Pretraining of PMG (or matched Llama) language models with accelerate: data, model, loop, evaluation, checkpoints.

`scripts/train.py` is the command-line front end; tests call `pretrain` directly.
"""

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
    default_data_collator,
    get_cosine_schedule_with_warmup,
)

from .configuration_pmg import PMGConfig
from .data import iterate_texts, load_text_dataset, pack_dataset, train_tokenizer
from .modeling_pmg import PMGForCausalLM
from .optimization import optimizer_param_groups

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_progress.json"


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
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "num_proc of datasets.map."})
    max_eval_blocks: int | None = field(default=None, metadata={"help": "Evaluate on at most this many blocks."})


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
        reference = PMGConfig(hidden_size=model_args.hidden_size, num_hidden_layers=model_args.num_hidden_layers)
        config = LlamaConfig(
            hidden_size=model_args.hidden_size,
            intermediate_size=reference.intermediate_size,
            num_hidden_layers=model_args.num_hidden_layers,
            num_attention_heads=reference.num_attention_heads,
            max_position_embeddings=max(4096, block_size),
            tie_word_embeddings=True,
            **special,
        )
        return LlamaForCausalLM(config)
    raise ValueError(f"model_type must be 'pmg' or 'llama', got {model_args.model_type!r}.")


def prepare_tokenizer(model_args: ModelArguments, train_split, text_column: str) -> PreTrainedTokenizerBase:
    if model_args.tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name)
        if tokenizer.eos_token is None:
            raise ValueError(f"The tokenizer {model_args.tokenizer_name!r} has no eos token to separate documents.")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    return train_tokenizer(iterate_texts(train_split, text_column), vocab_size=model_args.vocab_size)


def check_output_dir(output_dir: Path, resuming: bool) -> None:
    """A new run needs an empty (or new) output_dir: nothing saved there before is ever overwritten."""
    if resuming or not output_dir.exists() or not any(output_dir.iterdir()):
        return
    raise ValueError(
        f"output_dir {output_dir} is not empty: choose a new folder, or pass --resume_from_checkpoint True to "
        "continue the run saved there."
    )


def resume_checkpoint(output_dir: Path, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint to resume from: None for a new run, the latest complete one in output_dir for "True", or the
    given folder. Checked before any work, so a wrong path fails at once."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint in ("True", "true"):
        complete = [p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).exists()]
        checkpoint = max(complete, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]), default=None)
    else:
        checkpoint = Path(resume_from_checkpoint)
    if checkpoint is None or not (checkpoint / STATE_FILE).exists():
        raise ValueError(
            f"No complete checkpoint to resume from at {resume_from_checkpoint!r} (output_dir {output_dir})."
        )
    return checkpoint


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int) -> None:
    """accelerate state (model, optimizer, scheduler, RNG) written to a temporary folder, then renamed: a kill
    in the middle leaves the previous checkpoint as the latest complete one."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    partial = output_dir / f".partial-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps({"step": step}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    accelerator.wait_for_everyone()


@torch.no_grad()
def evaluate_model(model, dataloader: DataLoader, accelerator: Accelerator, bytes_per_token: float) -> dict:
    """Mean next-token loss over all evaluated tokens, perplexity, and bits per byte of the raw text."""
    model.eval()
    total_loss, total_tokens = torch.zeros((), device=accelerator.device), 0
    for batch in dataloader:
        predicted = batch["labels"][:, 1:].numel()
        loss = model(**batch).loss
        total_loss += loss.float() * predicted
        total_tokens += predicted
    totals = accelerator.reduce(torch.stack([total_loss, torch.tensor(float(total_tokens), device=total_loss.device)]))
    model.train()
    loss = (totals[0] / totals[1]).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "bits_per_byte": loss / math.log(2) / bytes_per_token}


def bytes_per_token(split, text_column: str, tokenizer: PreTrainedTokenizerBase) -> float:
    texts = list(split[text_column])
    total_bytes = sum(len(text.encode("utf-8")) for text in texts)
    total_tokens = sum(len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return total_bytes / total_tokens


def pretrain(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> dict:
    """Train a causal LM and save model, tokenizer and metrics to `training_args.output_dir`; returns the metrics."""
    output_dir = Path(training_args.output_dir)
    checkpoint = resume_checkpoint(output_dir, training_args.resume_from_checkpoint)
    check_output_dir(output_dir, resuming=checkpoint is not None)
    accelerator = Accelerator(
        gradient_accumulation_steps=training_args.gradient_accumulation_steps,
        mixed_precision="bf16" if training_args.bf16 else "no",
        cpu=training_args.use_cpu,
        # the shuffle order is a function of (seed, epoch): a resumed run sees the same batches
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(training_args.seed)

    with accelerator.main_process_first():
        corpus = load_text_dataset(
            data_args.dataset_name, data_args.dataset_config_name, data_args.train_files, data_args.text_column
        )
        if checkpoint is not None and (output_dir / "tokenizer_config.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(output_dir)  # the run's own tokenizer, saved when it began
        else:
            tokenizer = prepare_tokenizer(model_args, corpus["train"], data_args.text_column)
        packed = {
            split: pack_dataset(
                corpus[split],
                tokenizer,
                data_args.block_size,
                data_args.text_column,
                document_resets=data_args.document_resets,
                num_proc=data_args.preprocessing_num_workers,
            )
            for split in ("train", "validation")
        }
    if data_args.max_eval_blocks:
        packed["validation"] = packed["validation"].select(
            range(min(data_args.max_eval_blocks, len(packed["validation"])))
        )
    validation_bytes_per_token = bytes_per_token(corpus["validation"], data_args.text_column, tokenizer)

    model = build_model(model_args, tokenizer, data_args.block_size)
    learning_rate = training_args.learning_rate
    if model_args.model_type == "pmg":
        groups = optimizer_param_groups(model, learning_rate, training_args.weight_decay)
    else:
        groups = [{"params": list(model.parameters()), "weight_decay": training_args.weight_decay}]
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(training_args.adam_beta1, training_args.adam_beta2))
    train_loader = DataLoader(
        packed["train"].with_format("torch"),
        batch_size=training_args.per_device_train_batch_size,
        shuffle=True,
        collate_fn=default_data_collator,
        drop_last=True,
    )
    eval_loader = DataLoader(
        packed["validation"].with_format("torch"),
        batch_size=training_args.per_device_eval_batch_size,
        collate_fn=default_data_collator,
    )
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    steps_per_epoch = len(train_loader) // training_args.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ValueError(
            f"One optimizer step needs {training_args.gradient_accumulation_steps} batches of "
            f"{training_args.per_device_train_batch_size} blocks per process; the data has {len(packed['train'])} "
            f"blocks of {data_args.block_size} tokens. Use a smaller batch or block size, or more data."
        )
    max_steps = training_args.max_steps
    if max_steps <= 0:
        max_steps = math.ceil(training_args.num_train_epochs * steps_per_epoch)
    warmup = training_args.warmup_steps
    warmup_steps = int(warmup * max_steps) if 0 < warmup < 1 else int(warmup)
    # a prepared scheduler advances once per process at each optimizer step
    scheduler = accelerator.prepare(
        get_cosine_schedule_with_warmup(
            optimizer, warmup_steps * accelerator.num_processes, max_steps * accelerator.num_processes
        )
    )

    step = 0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        step = json.loads((checkpoint / STATE_FILE).read_text())["step"]
    elif accelerator.is_main_process:
        # saved once the setup succeeded (a failed setup leaves output_dir empty), before any checkpoint needs it
        tokenizer.save_pretrained(output_dir)

    losses, history = [], []
    progress = tqdm(total=max_steps, initial=step, disable=not accelerator.is_local_main_process, desc="training")
    model.train()
    while step < max_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        train_loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(
            train_loader, done_in_epoch * training_args.gradient_accumulation_steps
        )
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and training_args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), training_args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            losses.append(loss.detach().float())
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if step % max(1, training_args.logging_steps) == 0 or step == max_steps:
                mean_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
                losses.clear()
                history.append({"step": step, "loss": mean_loss, "learning_rate": scheduler.get_last_lr()[0]})
                progress.set_postfix(loss=f"{mean_loss:.3f}")
            if training_args.save_steps and step % int(training_args.save_steps) == 0 and step < max_steps:
                save_checkpoint(accelerator, output_dir, step)
            if step >= max_steps:
                break
    progress.close()

    metrics = {
        "step": step,
        "train_loss": history[-1]["loss"] if history else None,
        **{
            f"eval_{k}": v
            for k, v in evaluate_model(model, eval_loader, accelerator, validation_bytes_per_token).items()
        },
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (output_dir / "training_history.json").write_text(json.dumps(history, indent=2))
        (output_dir / "training_arguments.json").write_text(
            json.dumps(
                {"model": asdict(model_args), "data": asdict(data_args), "training": training_args.to_dict()},
                indent=2,
                default=str,
            )
        )
    accelerator.end_training()
    return metrics
