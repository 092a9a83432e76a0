"""Fine-tuning with transformers' Trainer: causal LM and sequence classification, loss going down."""

import pytest
import torch
from conftest import perturbed, tiny_config
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


class InOrderTrainer(Trainer):
    """Batches in dataset order: one batch of four rows and two accumulated batches of two see the same rows."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def pad_rows_and_labels(features: list[dict]) -> dict:
    """right_pad, with per-token labels padded by -100 where there are any."""
    labels = [f["labels"] for f in features]
    batch = right_pad([{**f, "labels": 0} for f in features])
    if isinstance(labels[0], list):
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    else:
        batch["labels"] = torch.tensor(labels)
    return batch


@pytest.mark.parametrize("model_class", [PMGForCausalLM, PMGForSequenceClassification])
def test_gradient_accumulation_makes_the_update_of_the_whole_batch(tmp_path, model_class):
    """Trainer scales losses for accumulation as `accepts_loss_kwargs` says. The causal LM's loss follows Trainer's
    token count, with the gate penalty weighted by each micro-batch's counted labels; the classifier's batch-mean
    loss is left for Trainer to divide. The gate penalty, a mean over tokens, is then exactly the whole batch's only
    where micro-batches hold as many tokens, as here (14 and 14); before, it counted once per micro-batch."""
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, 97, (length,), generator=generator).tolist() for length in (3, 11, 5, 9)]
    labels = rows if model_class is PMGForCausalLM else [0, 2, 1, 2]
    dataset = Dataset.from_dict({"input_ids": rows, "labels": labels})

    def update(batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = perturbed(model_class(tiny_config(gate_l1=0.5, num_labels=3)))
        before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
        arguments = training_arguments(
            tmp_path / f"{batch_size}",
            max_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=1.0,
            max_grad_norm=0.0,
            weight_decay=0.0,
        )
        InOrderTrainer(model=model, args=arguments, train_dataset=dataset, data_collator=pad_rows_and_labels).train()
        return {name: before[name] - parameter.detach() for name, parameter in model.named_parameters()}

    whole, accumulated = update(4, 1), update(2, 2)
    for name, step in whole.items():
        torch.testing.assert_close(accumulated[name], step, rtol=1e-4, atol=1e-6, msg=name)


def test_predictions_are_the_logits_alone_with_the_gate_penalty(tmp_path):
    """gate_loss is an output for training, not a prediction: compute_metrics gets the logits array alone."""
    dataset = Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9, 10, 11], [12, 13]], "labels": [0, 1, 2]})
    model = PMGForSequenceClassification(tiny_config(gate_l1=0.01, num_labels=3))
    arguments = training_arguments(tmp_path, per_device_eval_batch_size=2)
    predictions = Trainer(model=model, args=arguments, data_collator=right_pad).predict(dataset).predictions
    assert predictions.shape == (3, 3)
