"""The pretraining loop: a short run end to end, exact resume, the Llama baseline, and refusals."""

import json
import math
import shutil

import pytest
from accelerate import Accelerator
from conftest import load_script
from huggingface_hub import ModelCard
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM, TrainingArguments

from pmg import PMGConfig, PMGForCausalLM
from pmg.data import SHAKESPEARE_PROMPTS
from pmg.pretraining import DataArguments, ModelArguments, build_model, build_optimizer, prepare_data, pretrain


def run(output_dir, model_type="pmg", vocab_size=512, hidden_size=32, data=None, **training_overrides):
    settings = dict(
        output_dir=str(output_dir),
        max_steps=12,
        learning_rate=3e-3,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        logging_steps=4,
        save_steps=6,
        eval_strategy="steps",
        eval_steps=6,
        seed=0,
        use_cpu=True,
        report_to=["tensorboard"],
    )
    settings.update(training_overrides)
    return pretrain(
        ModelArguments(model_type=model_type, hidden_size=hidden_size, num_hidden_layers=2, vocab_size=vocab_size),
        DataArguments(block_size=32, max_eval_blocks=16, **(data or {})),
        TrainingArguments(**settings),
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run")
    return output_dir, run(output_dir)


def test_short_run_saves_a_loadable_model_tokenizer_and_metrics(finished_run):
    output_dir, metrics = finished_run
    assert metrics["step"] == 12
    assert metrics["eval_loss"] < 6.24, "12 steps must beat the uniform guess over 512 tokens (ln 512 = 6.24)"
    assert metrics["eval_bits_per_byte"] > 0 and metrics["eval_perplexity"] > 1
    saved = json.loads((output_dir / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    assert metrics["test_loss"] < 6.24 and metrics["test_bits_per_byte"] > 0
    history = json.loads((output_dir / "training_history.json").read_text())
    assert [(entry["step"], "loss" in entry) for entry in history] == [(4, True), (6, False), (8, True), (12, True)]
    assert history[1]["eval_loss"] > metrics["eval_loss"], "evaluation during training, at step 6, saw a worse model"
    assert all(entry["tokens_per_second"] > 0 for entry in history if "loss" in entry)
    assert (output_dir / "checkpoint-6").is_dir() and not (output_dir / "checkpoint-12").exists()
    model = AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert len(tokenizer) == model.config.vocab_size == 512
    ids = tokenizer("Shall I compare thee", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=5, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 5


def test_run_publishes_a_model_card_samples_gate_statistics_and_tensorboard_logs(finished_run):
    output_dir, metrics = finished_run
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "text-generation"
    assert "pmg" in card.data.tags and card.data.eval_results[0].dataset_split == "validation"
    assert f"| validation | {metrics['eval_loss']:.4f} |" in card.text and "layer pattern `PMG PMG`" in card.text
    gates = json.loads((output_dir / "gate_statistics.json").read_text())
    assert [row["layer"] for row in gates] == [0, 1]
    assert all(0 < row["mean_write"] < 1 and 0 <= row["long_memory_fraction"] <= 1 for row in gates)
    assert f"| 1 | {gates[1]['mean_write']:.4f} |" in card.text
    assert "![write weights and memory horizons](gates.png)" in card.text
    # the results are on part of the held-out plays (max_eval_blocks=16), and the card says so
    scope = "Measured on 512 validation and 512 test tokens in blocks of 32: the first 16 blocks of each split"
    assert scope in card.text
    assert Image.open(output_dir / "gates.png").size[0] > 0
    samples = json.loads((output_dir / "samples.json").read_text())
    assert [sample["prompt"] for sample in samples] == list(SHAKESPEARE_PROMPTS)
    assert all(sample["text"].startswith(sample["prompt"]) and sample["text"] in card.text for sample in samples)
    assert (output_dir / "generation_config.json").exists()
    events = EventAccumulator(str(output_dir / "runs" / "pretraining"))
    scalars = events.Reload().Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "train/tokens_per_second", "eval/bits_per_byte"} <= set(scalars)
    assert {"gates/layer_0/mean_write", "gates/layer_1/long_memory_fraction", "test/loss"} <= set(scalars)
    assert [event.step for event in events.Scalars("eval/loss")] == [6, 12]


def test_a_finished_run_is_never_overwritten(finished_run):
    output_dir, _ = finished_run
    before = (output_dir / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"is not empty"):
        run(output_dir)
    assert (output_dir / "model.safetensors").read_bytes() == before


def test_resuming_from_a_checkpoint_reaches_the_same_result(finished_run, tmp_path):
    output_dir, metrics = finished_run
    shutil.copytree(output_dir / "checkpoint-6", tmp_path / "checkpoint-6")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # saved when the run began
        shutil.copy(output_dir / name, tmp_path / name)
    # a resumed run reuses the saved tokenizer: a different --vocab_size cannot change it mid-run
    resumed = run(tmp_path, vocab_size=600, resume_from_checkpoint="True")
    assert resumed == pytest.approx(metrics, rel=1e-5)
    full = json.loads((output_dir / "training_history.json").read_text())
    after_resume = json.loads((tmp_path / "training_history.json").read_text())
    assert [entry["step"] for entry in after_resume] == [entry["step"] for entry in full] == [4, 6, 8, 12]
    assert after_resume[:2] == full[:2], "the history up to the checkpoint is saved with it"
    # the step-8 entry averages steps 7-8 after the resume and 5-8 before; steps 9-12 are averaged alike
    assert after_resume[-1]["loss"] == pytest.approx(full[-1]["loss"], rel=1e-5)


def test_a_checkpoint_of_another_folder_continues_into_an_empty_one_with_its_own_tokenizer(finished_run, tmp_path):
    """Before, it wrote over whatever run the folder held, and paired the weights with that run's tokenizer."""
    output_dir, metrics = finished_run
    checkpoint = str(output_dir / "checkpoint-6")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"is not empty"):
        run(occupied, resume_from_checkpoint=checkpoint)
    assert [path.name for path in occupied.iterdir()] == ["notes.txt"]
    resumed = run(tmp_path / "continued", vocab_size=600, resume_from_checkpoint=checkpoint)
    assert resumed == pytest.approx(metrics, rel=1e-5)
    tokenizer = (tmp_path / "continued" / "tokenizer.json").read_bytes()
    assert tokenizer == (output_dir / "tokenizer.json").read_bytes()


def test_corrupt_or_mismatched_checkpoints_are_refused_before_training(finished_run, tmp_path):
    output_dir, _ = finished_run
    shutil.copytree(output_dir / "checkpoint-6", tmp_path / "checkpoint-6")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(output_dir / name, tmp_path / name)
    with pytest.raises(ValueError, match=r"Cannot resume from .*checkpoint-6: it is corrupt or was saved by a diff"):
        run(tmp_path, resume_from_checkpoint="True", hidden_size=48)
    weights = tmp_path / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a file cut short, as by a full disk
    with pytest.raises(ValueError, match=r"Cannot resume from .*checkpoint-6: it is corrupt"):
        run(tmp_path, resume_from_checkpoint="True")
    untouched = ["checkpoint-6", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(path.name for path in tmp_path.iterdir()) == untouched


def test_a_streamed_corpus_trains_and_resumes_exactly(tmp_path):
    streamed = dict(streaming=True, shuffle_buffer_size=64, streaming_eval_documents=2)
    options = dict(max_steps=6, save_steps=3, eval_strategy="no", report_to=[], data=streamed)
    full = run(tmp_path / "full", **options)
    assert full["step"] == 6 and full["eval_loss"] < 6.24
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "full" / name, tmp_path / "resumed" / name)
    assert run(tmp_path / "resumed", resume_from_checkpoint="True", **options) == pytest.approx(full, rel=1e-5)
    with pytest.raises(ValueError, match="A streamed corpus has no known length: set --max_steps"):
        run(tmp_path / "no-steps", max_steps=-1, data=streamed)


def test_llama_baseline_trains_through_the_same_script_with_a_matched_size(finished_run, tmp_path, monkeypatch):
    output_dir, _ = finished_run
    for option in ("config_name", "layer_types"):  # PMG options the baseline cannot take
        with pytest.raises(ValueError, match=rf"--{option} applies to PMG models only"):
            build_model(
                ModelArguments(model_type="llama", **{option: "x"}), AutoTokenizer.from_pretrained(output_dir), 32
            )
    # with packed documents: transformers keeps a Llama's attention inside them (from position_ids) only where it
    # builds no cache, and a Llama called without use_cache=False builds one, in training too
    calls = []
    original = LlamaForCausalLM.forward
    monkeypatch.setattr(LlamaForCausalLM, "forward", lambda self, **kw: calls.append(kw) or original(self, **kw))
    metrics = run(tmp_path, model_type="llama", max_steps=4, save_steps=0, data=dict(document_resets=True))
    assert metrics["step"] == 4
    assert calls and all("position_ids" in kw and kw["use_cache"] is False for kw in calls if "labels" in kw)
    llama = AutoModelForCausalLM.from_pretrained(tmp_path)
    pmg_model = AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True)
    assert llama.config.model_type == "llama"
    assert abs(llama.num_parameters() / pmg_model.num_parameters() - 1) < 0.15


def test_memories_wider_than_hidden_size_train_and_report_their_gates(tmp_path):
    config = PMGForCausalLM.config_class(vocab_size=512, hidden_size=16, num_hidden_layers=2, expand=2, gate_rank=4)
    config.save_pretrained(tmp_path / "config")
    metrics = pretrain(
        ModelArguments(config_name=str(tmp_path / "config"), vocab_size=512),
        DataArguments(block_size=32, max_eval_blocks=4),
        TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, use_cpu=True),
    )
    assert metrics["step"] == 2
    gates = json.loads((tmp_path / "run" / "gate_statistics.json").read_text())
    assert [row["layer"] for row in gates] == [0, 1]


def test_a_pmg_config_of_attention_layers_alone_trains_and_reports_no_gates(tmp_path):
    """Before, its first evaluation failed in the gate statistics, after training and saving."""
    config = PMGForCausalLM.config_class(
        vocab_size=512, hidden_size=16, num_hidden_layers=2, layer_types=["full_attention"] * 2
    )
    config.save_pretrained(tmp_path / "config")
    metrics = pretrain(
        ModelArguments(config_name=str(tmp_path / "config"), vocab_size=512),
        DataArguments(block_size=32, max_eval_blocks=4),
        TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, use_cpu=True),
    )
    assert metrics["step"] == 2 and "test_bits_per_byte" in metrics
    assert json.loads((tmp_path / "run" / "gate_statistics.json").read_text()) == []


def test_a_failing_final_evaluation_keeps_the_trained_model(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr("pmg.pretraining.evaluate_model", fail)
    with pytest.raises(RuntimeError, match="evaluation broke"):  # (and --save_strategy no saves no checkpoint)
        run(tmp_path, max_steps=2, save_steps=1, save_strategy="no", eval_strategy="no")
    assert PMGForCausalLM.from_pretrained(tmp_path).config.hidden_size == 32
    assert not list(tmp_path.glob("checkpoint-*"))


def test_a_run_that_stopped_before_its_first_checkpoint_can_be_run_again(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(PMGForCausalLM, "forward", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("killed")))
        with pytest.raises(RuntimeError, match="killed"):
            run(tmp_path, max_steps=2, save_steps=0, eval_strategy="no")
    assert (tmp_path / "tokenizer.json").exists()  # its setup, and nothing else
    metrics = run(tmp_path, max_steps=2, save_steps=0, eval_strategy="no")
    assert metrics["step"] == 2 and not (tmp_path / ".pmg-run-started").exists()
    with pytest.raises(ValueError, match=r"is not empty"):  # a finished run is never replaced
        run(tmp_path, max_steps=2, save_steps=0, eval_strategy="no")


def test_steps_below_one_are_fractions_of_the_run_and_unsupported_arguments_are_refused(tmp_path):
    run(tmp_path / "fractions", max_steps=8, save_steps=0.5, logging_steps=0.5, eval_strategy="no")
    history = json.loads((tmp_path / "fractions" / "training_history.json").read_text())
    assert [entry["step"] for entry in history if "loss" in entry] == [4, 8]
    assert [path.name for path in (tmp_path / "fractions").glob("checkpoint-*")] == ["checkpoint-4"]
    refused = [("optim", "sgd"), ("label_smoothing_factor", 0.1), ("save_strategy", "epoch")]
    refused += [("logging_strategy", "epoch"), ("load_best_model_at_end", True)]
    refused += [("lr_scheduler_type", "reduce_lr_on_plateau"), ("eval_on_start", True), ("neftune_noise_alpha", 5.0)]
    refused += [("hub_revision", "dev"), ("hub_strategy", "all_checkpoints")]  # a push would go to main, once
    for option, value in refused:
        with pytest.raises(ValueError, match=rf"Pretraining supports --{option} .* only, got"):
            run(tmp_path / option, **{option: value})
        assert not (tmp_path / option).exists()
    with pytest.raises(ValueError, match="--gradient_accumulation_steps must be at least 1, got 0"):
        run(tmp_path / "accumulation", gradient_accumulation_steps=0)
    assert not (tmp_path / "accumulation").exists()


def test_epochs_count_the_shorter_last_step_of_each_epoch_and_warmup_rounds_up(tmp_path, monkeypatch):
    """accelerate steps at an epoch's end over the batches left: 2 epochs of 13 batches at accumulation 3 are 2 x 5
    steps, as Trainer counts them (2 x 4 before, and 2 of the 26 batches never trained), and the last step averages
    the loss over its own batch (accelerate divides every loss by 3); a warmup of 0.05 of 10 steps is one step, as
    TrainingArguments.get_warmup_steps rounds."""
    losses, backward_losses = [], []
    forward, backward = PMGForCausalLM.forward, Accelerator.backward
    monkeypatch.setattr(
        PMGForCausalLM, "forward", lambda self, *args, **kw: losses.append(forward(self, *args, **kw)) or losses[-1]
    )
    monkeypatch.setattr(
        Accelerator, "backward", lambda self, loss, **kw: backward_losses.append(loss) or backward(self, loss, **kw)
    )
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Line {i} of a small corpus, with words enough to fill blocks." for i in range(60)))
    data = dict(train_files=[str(corpus)])
    packed = prepare_data(ModelArguments(vocab_size=512), DataArguments(block_size=32, **data), None, seed=0)
    batches = len(packed.train) // 2
    assert batches % 3, "the test needs an epoch that does not divide into whole steps"
    settings = dict(max_steps=-1, num_train_epochs=2, per_device_train_batch_size=2, gradient_accumulation_steps=3)
    settings |= dict(warmup_steps=0.05, lr_scheduler_type="linear", logging_steps=1, eval_strategy="no")
    metrics = run(tmp_path / "epochs", data=data, save_steps=0, **settings)
    assert metrics["step"] == 2 * math.ceil(batches / 3)
    assert f"| max_steps | {metrics['step']} |" in (tmp_path / "epochs" / "README.md").read_text()  # not -1
    history = json.loads((tmp_path / "epochs" / "training_history.json").read_text())
    # one warmup step takes the rate to its peak (logged after the step); without warmup it had decayed by 1/6
    assert history[0]["learning_rate"] == pytest.approx(3e-3)
    training_losses = [output.loss for output in losses if output.loss is not None and output.loss.requires_grad]
    scales = [(given / loss).item() for given, loss in zip(backward_losses, training_losses, strict=True)]
    assert scales == pytest.approx(([1.0] * (batches - 1) + [3.0]) * 2)


def test_data_seed_orders_the_batches_apart_from_the_seed(tmp_path):
    losses = {}
    for data_seed in (1, 2):
        run(tmp_path / str(data_seed), max_steps=4, data_seed=data_seed, save_steps=0, eval_strategy="no")
        history = json.loads((tmp_path / str(data_seed) / "training_history.json").read_text())
        losses[data_seed] = [entry["loss"] for entry in history if "loss" in entry]
    assert losses[1] != losses[2]  # the same model initialisation (seed 0), other batches


def test_refuses_foreign_output_dir_and_missing_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"is not empty: choose a new folder"):
        run(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match=r"No complete checkpoint to resume from"):
        run(tmp_path / "empty", resume_from_checkpoint="True")
    # a setup that fails leaves nothing behind, so the same command can be rerun once fixed
    failed = tmp_path / "too-large-batch"
    with pytest.raises(ValueError, match=r"Use a smaller batch or block size"):
        run(failed, per_device_train_batch_size=100_000)
    assert not failed.exists() or not any(failed.iterdir())


def test_generate_script_samples_and_searches_from_a_trained_run(finished_run):
    output_dir, _ = finished_run
    script = load_script("generate")
    prompts = ["Shall I", "Enter the King"]
    common = dict(model_name_or_path=str(output_dir), prompt=prompts, max_new_tokens=6)
    sampled = script.generate(script.GenerateArguments(**common, do_sample=True, num_return_sequences=2, seed=1))
    assert len(sampled) == 4 and all(text.startswith(prompts[i // 2]) for i, text in enumerate(sampled))
    assert sampled == script.generate(
        script.GenerateArguments(**common, do_sample=True, num_return_sequences=2, seed=1)
    )
    beams = script.generate(script.GenerateArguments(**common, num_beams=3))
    greedy = script.generate(script.GenerateArguments(**common))
    assert len(beams) == len(greedy) == 2 and all(text.startswith(p) for text, p in zip(greedy, prompts, strict=True))
    # an empty prompt continues from the end-of-text token, beside a real one in the same batch
    unprompted = script.generate(script.GenerateArguments(**{**common, "prompt": ["", "Shall I"]}))
    assert len(unprompted) == 2 and unprompted[1] == greedy[0]


def test_generate_script_takes_unset_options_from_the_models_generation_config(finished_run, tmp_path):
    """As `model.generate()` does: a checkpoint's recommended settings were overwritten by the script's defaults."""
    shutil.copytree(finished_run[0], tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    model.generation_config = GenerationConfig(do_sample=True, top_k=1, max_new_tokens=5, pad_token_id=0)
    model.save_pretrained(tmp_path / "model")
    script = load_script("generate")
    (text,) = script.generate(script.GenerateArguments(model_name_or_path=str(tmp_path / "model"), prompt=["Shall"]))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    expected = model.generate(**tokenizer(["Shall"], return_tensors="pt"))  # top_k=1 samples the greedy tokens
    assert expected.shape[1] == len(tokenizer("Shall")["input_ids"]) + 5
    assert text == tokenizer.decode(expected[0], skip_special_tokens=True)


def test_generate_script_names_a_missing_model_folder(tmp_path, monkeypatch):
    """A mistyped local path is called missing, not a failed connection to the Hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    script = load_script("generate")
    with pytest.raises(OSError, match=r"No folder .*pmg-shakespeare' here, and no Hub repository of that name"):
        script.generate(script.GenerateArguments(model_name_or_path=str(tmp_path / "pmg-shakespeare")))


def test_torch_compile_trains_like_eager_saves_plain_weights_and_resumes(finished_run, tmp_path):
    """--torch_compile (here with the quick aot_eager backend) compiles through accelerate; same run, same files."""
    output_dir, metrics = finished_run
    compile_options = dict(torch_compile=True, torch_compile_backend="aot_eager")
    compiled = run(tmp_path / "compiled", **compile_options)
    assert compiled == pytest.approx(metrics, rel=1e-4)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "compiled", trust_remote_code=True)
    assert not any("_orig_mod" in name for name, _ in model.named_parameters())
    shutil.copytree(tmp_path / "compiled" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(output_dir / name, tmp_path / "resumed" / name)
    resumed = run(tmp_path / "resumed", resume_from_checkpoint="True", **compile_options)
    assert resumed == pytest.approx(metrics, rel=1e-4)


def test_scheduler_and_gradient_checkpointing_arguments_are_honoured(tmp_path, monkeypatch):
    """--lr_scheduler_type and --gradient_checkpointing are TrainingArguments names: the loop must not ignore them."""
    enabled = []
    original = PMGForCausalLM.gradient_checkpointing_enable
    monkeypatch.setattr(
        PMGForCausalLM, "gradient_checkpointing_enable", lambda self, **kw: enabled.append(1) or original(self, **kw)
    )
    checkpointed = run(tmp_path / "checkpointed", lr_scheduler_type="constant", gradient_checkpointing=True)
    assert enabled == [1]
    history = json.loads((tmp_path / "checkpointed" / "training_history.json").read_text())
    rates = [entry["learning_rate"] for entry in history if "learning_rate" in entry]
    assert len(rates) == 3 and len(set(rates)) == 1, rates  # constant, where the default schedule decays
    plain = run(tmp_path / "plain", lr_scheduler_type="constant")
    assert checkpointed == pytest.approx(plain, rel=1e-5)  # recomputed activations, the same gradients


@pytest.mark.parametrize(("optim", "fused"), [("adamw_torch_fused", True), ("adamw_torch", False)])
def test_optim_chooses_the_fused_adamw_as_trainer_does(tmp_path, optim, fused):
    model = PMGForCausalLM(PMGConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2))
    optimizer = build_optimizer(model, TrainingArguments(output_dir=str(tmp_path), optim=optim, use_cpu=True))
    assert bool(optimizer.defaults["fused"]) is fused
