"""Fine-tune a PMG checkpoint (or any transformers one) with Trainer.

With no arguments it classifies Shakespeare passages as comedy, history or tragedy, starting from the model that
`python scripts/train.py` saved, with whole plays held out for evaluation:

    python scripts/finetune.py
    python scripts/finetune.py --model_name_or_path outputs/llama-shakespeare --output_dir outputs/llama-genre
    python scripts/finetune.py --task causal-lm --train_files new_text.txt --padding_free True
    python scripts/finetune.py --dataset_name ORG/NAME --text_column sentence --label_column label

Options use TrainingArguments' names (--learning_rate, --eval_strategy, --load_best_model_at_end, --bf16,
--gradient_checkpointing, --resume_from_checkpoint, ...); --help lists them all. Multi-process runs work through
`accelerate launch` or `torchrun`, as for any Trainer script.
"""

from transformers import HfArgumentParser, TrainingArguments

import pmg  # noqa: F401  (registers PMG with the Auto classes)
from pmg.finetuning import FinetuneArguments, finetune


def main() -> None:
    parser = HfArgumentParser((FinetuneArguments, TrainingArguments))
    parser.set_defaults(
        output_dir="outputs/pmg-genre",
        num_train_epochs=3,
        learning_rate=1e-3,
        warmup_steps=0.1,
        weight_decay=0.01,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        logging_steps=20,
        report_to=["tensorboard"],
        seed=0,
    )
    args, training_args = parser.parse_args_into_dataclasses()
    metrics = finetune(args, training_args)
    print({name: round(value, 4) if isinstance(value, float) else value for name, value in metrics.items()})


if __name__ == "__main__":
    main()
