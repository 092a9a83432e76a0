"""Fine-tuning with transformers' Trainer: causal LM and sequence classification, loss going down."""

import torch
from conftest import tiny_config
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from pmg import PMGForCausalLM, PMGForSequenceClassification


def periodic_sequences(count=64, length=24, vocab=97):
    """Each row repeats a random 3-token motif: predictable after the first period."""
    generator = torch.Generator().manual_seed(0)
    motifs = torch.randint(1, vocab, (count, 3), generator=generator)
    ids = motifs.repeat(1, length // 3)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def training_arguments(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=60,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def right_pad(features: list[dict]) -> dict:
    """Pad token ids with 0 on the right and mask the padding."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, feature in enumerate(features):
        ids[i, : len(feature["input_ids"])] = torch.tensor(feature["input_ids"])
        mask[i, : len(feature["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([f["labels"] for f in features])}


def logged_losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_lowers_the_causal_lm_loss_with_gradient_checkpointing(tmp_path):
    model = PMGForCausalLM(tiny_config(gate_l1=0.01))
    trainer = Trainer(
        model=model,
        args=training_arguments(
            tmp_path, activation_checkpointing=True, max_steps=60, learning_rate=1e-2, logging_steps=10
        ),
        train_dataset=periodic_sequences(),
    )
    trainer.train()
    losses = logged_losses(trainer)
    assert len(losses) == 6
    assert losses[-1] < 0.7 * losses[0], losses


def test_trainer_fits_a_sequence_classification_task(tmp_path):
    # label = whether token 5 appears in the (padded, variable-length) sequence
    generator = torch.Generator().manual_seed(1)
    rows, labels = [], []
    for i in range(128):
        length = 6 + i % 7
        row = torch.randint(6, 97, (length,), generator=generator)
        if i % 2:
            row[torch.randint(0, length, (1,), generator=generator)] = 5
        rows.append(row.tolist())
        labels.append(i % 2)
    dataset = Dataset.from_dict({"input_ids": rows, "labels": labels})
    model = PMGForSequenceClassification(tiny_config(num_labels=2))

    trainer = Trainer(
        model=model,
        args=training_arguments(tmp_path, per_device_train_batch_size=16),
        train_dataset=dataset,
        data_collator=right_pad,
    )
    trainer.train()
    losses = logged_losses(trainer)
    assert losses[-1] < 0.5 * losses[0], losses
