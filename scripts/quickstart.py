"""Quickstart: build a small PMG language model, train it with Trainer, save it, reload it, generate.

The task is synthetic and offline: every sequence repeats a random motif, so a model that learns to recall what it
saw a few tokens back can predict everything after the first period. It shows the whole API in a minute on CPU;
the pretraining pipeline (scripts/train.py, issue 3) replaces it as the project's main job. The saved folder also
holds the modeling files, so that `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it
where pmg is not installed (here pmg is imported, and its own classes load it).

    python scripts/quickstart.py                      # defaults: 300 steps, outputs/quickstart
    python scripts/quickstart.py --max_steps 50 --output_dir /tmp/pmg-quick
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, HfArgumentParser, Trainer, TrainingArguments

from pmg import PMGConfig, PMGForCausalLM


@dataclass
class QuickstartArguments:
    hidden_size: int = field(default=64, metadata={"help": "Model width."})
    layer_types: str = field(
        default="linear_attention,linear_attention,full_attention,linear_attention",
        metadata={"help": "Comma-separated block types: linear_attention (PMG), full_attention, sliding_attention."},
    )
    vocab_size: int = field(default=64, metadata={"help": "Size of the synthetic vocabulary."})
    motif_length: int = field(default=5, metadata={"help": "Length of the repeated motif in each sequence."})
    sequence_length: int = field(default=40, metadata={"help": "Tokens per training sequence."})
    num_sequences: int = field(default=512, metadata={"help": "Training sequences."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace what an earlier run saved in output_dir (refused otherwise)."}
    )


def motif_dataset(args: QuickstartArguments, seed: int) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    motifs = torch.randint(1, args.vocab_size, (args.num_sequences, args.motif_length), generator=generator)
    repeats = -(-args.sequence_length // args.motif_length)
    ids = motifs.repeat(1, repeats)[:, : args.sequence_length].tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def main() -> None:
    parser = HfArgumentParser((QuickstartArguments, TrainingArguments))
    parser.set_defaults(
        output_dir="outputs/quickstart",
        max_steps=300,
        learning_rate=3e-3,
        per_device_train_batch_size=32,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
    )
    args, training_args = parser.parse_args_into_dataclasses()
    output_dir = Path(training_args.output_dir)
    if output_dir.is_dir() and any(output_dir.iterdir()) and not args.overwrite_output_dir:
        parser.error(f"{output_dir} is not empty: choose a new --output_dir, or pass --overwrite_output_dir True")
    layer_types = args.layer_types.split(",")
    config = PMGConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=len(layer_types),
        layer_types=layer_types,
        num_attention_heads=4,
        gate_rank=16,
        chunk_size=16,
    )
    model = PMGForCausalLM(config)
    print(f"PMG model: {model.num_parameters():,} parameters, layers {layer_types}")
    trainer = Trainer(model=model, args=training_args, train_dataset=motif_dataset(args, training_args.seed))
    trainer.train()
    trainer.save_model()

    reloaded = AutoModelForCausalLM.from_pretrained(training_args.output_dir).eval()
    prompt = motif_dataset(args, seed=training_args.seed + 1)[0]["input_ids"][: 2 * args.motif_length]
    generated = reloaded.generate(torch.tensor([prompt]), max_new_tokens=3 * args.motif_length, do_sample=False)
    continuation = generated[0, len(prompt) :].tolist()
    expected = (prompt[: args.motif_length] * 10)[len(prompt) % args.motif_length :][: len(continuation)]
    accuracy = sum(a == b for a, b in zip(continuation, expected, strict=True)) / len(expected)
    print(f"prompt (two periods of an unseen motif): {prompt}")
    print(f"greedy continuation: {continuation}")
    print(f"continuation matches the motif at {accuracy:.0%} of positions")


if __name__ == "__main__":
    main()
