"""Pretrain a PMG language model (or the matched Llama baseline) with accelerate.

With no arguments it trains on the embedded plays of Shakespeare, offline:

    python scripts/train.py
    python scripts/train.py --model_type llama --output_dir outputs/llama-shakespeare
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py --output_dir outputs/pmg-2proc
    python scripts/train.py --dataset_name Salesforce/wikitext --dataset_config_name wikitext-103-raw-v1 --streaming \
        --max_steps 20000 --output_dir outputs/pmg-wikitext --push_to_hub --hub_model_id you/pmg-wikitext

(Without a GPU, add `--use_cpu True` to the script: the processes then join over gloo.) TensorBoard logs go to
OUTPUT_DIR/runs: `tensorboard --logdir outputs/pmg-shakespeare/runs`.

Options use TrainingArguments' names (--output_dir, --max_steps, --learning_rate, ...); --help lists them all.
"""

from transformers import HfArgumentParser, TrainingArguments

from pmg.pretraining import DataArguments, ModelArguments, pretrain


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    parser.set_defaults(
        output_dir="outputs/pmg-shakespeare",
        max_steps=600,
        learning_rate=3e-3,
        warmup_steps=0.05,
        lr_scheduler_type="cosine",
        weight_decay=0.1,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        logging_steps=25,
        eval_strategy="steps",
        eval_steps=200,
        save_steps=200,
        save_total_limit=2,
        report_to=["tensorboard"],
        use_cpu=False,
    )
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    metrics = pretrain(model_args, data_args, training_args)
    print({name: round(value, 4) if isinstance(value, float) else value for name, value in metrics.items()})


if __name__ == "__main__":
    main()
