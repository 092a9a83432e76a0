"""What a finished pretraining run publishes: sample generations, a model card, and the upload to the Hub."""

from importlib.resources import files
from pathlib import Path

import torch
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from transformers import PreTrainedModel, PreTrainedTokenizerBase

MODEL_CARD_TEMPLATE = files("pmg.model_cards") / "pmg_causal_lm.md"
# run folders that stay local: resumable training state, not part of the published model
UNPUBLISHED = ["checkpoint-*/**", ".partial-*/**"]
SAMPLE_SETTINGS = {"temperature": 0.8, "top_k": 50}


@torch.no_grad()
def sample_generations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 80,
    seed: int = 0,
) -> list[dict[str, str]]:
    """One sampled continuation per prompt (prompt included in `text`), reproducible for a given seed."""
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    samples = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        if ids.shape[1] == 0:  # an empty prompt: start from the document separator
            ids = torch.tensor([[tokenizer.eos_token_id]])
        output = model.generate(
            ids.to(model.device),
            attention_mask=torch.ones_like(ids, device=model.device),
            do_sample=True,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **SAMPLE_SETTINGS,
        )
        samples.append({"prompt": prompt, "text": tokenizer.decode(output[0], skip_special_tokens=True)})
    torch.random.set_rng_state(generator_state)
    return samples


def layer_pattern(model: PreTrainedModel) -> str:
    layer_types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    names = {"linear_attention": "PMG", "full_attention": "attention", "sliding_attention": "sliding-attention"}
    return " ".join(names[kind] for kind in layer_types)


def hub_id(name_or_path: str | None) -> str | None:
    """A name a model card may link as a Hub repository: not a local folder or file (which `from_pretrained` and
    `load_dataset` also take), since it would become a link to a Hub repository of that name."""
    return None if name_or_path is None or Path(name_or_path).exists() else name_or_path


def render_model_card(
    model: PreTrainedModel,
    repo_id: str,
    metrics: dict[str, float],
    gate_statistics: list[dict],
    samples: list[dict[str, str]],
    hyperparameters: dict,
    dataset_name: str | None,
    local_files: bool,
    dataset_description: str,
    tokenizer_description: str,
    evaluation_description: str,
    block_size: int,
    gate_plot: str | None = None,
) -> ModelCard:
    """The README.md of a run: Hub metadata (license, datasets, metrics, tags, model-index) and the template's text.
    The corpus is the Hub dataset `dataset_name`, else local files (`local_files`), else the embedded plays."""
    is_pmg = model.config.model_type == "pmg"
    results = [
        {"split": split, **{name: metrics[f"{prefix}_{name}"] for name in ("loss", "perplexity", "bits_per_byte")}}
        for split, prefix in (("validation", "eval"), ("test", "test"))
        if f"{prefix}_loss" in metrics
    ]
    hub_dataset = hub_id(dataset_name)
    if hub_dataset:
        dataset_type = dataset = hub_dataset
    elif local_files or dataset_name:  # (a local folder given as the dataset's name is local files too)
        dataset_type, dataset = "local-files", "local files"
    else:
        dataset_type, dataset = "shakespeare-plays", "shakespeare-plays (embedded in pmg)"
    card_data = ModelCardData(
        language="en",
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["pmg", "recurrent", "text-generation"] if is_pmg else ["llama", "baseline", "text-generation"],
        datasets=[hub_dataset] if hub_dataset else None,
        metrics=["perplexity", "bits_per_byte"],
        model_name=repo_id.split("/")[-1],
        eval_results=[
            EvalResult(
                task_type="text-generation",
                dataset_type=dataset_type,
                dataset_name=dataset,
                dataset_split=row["split"],
                metric_type=name,
                metric_value=round(row[name], 4),
            )
            for row in results
            for name in ("perplexity", "bits_per_byte")
        ],
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        is_pmg=is_pmg,
        num_parameters=f"{model.num_parameters() / 1e6:.2f}M",
        num_hidden_layers=model.config.num_hidden_layers,
        layer_pattern=layer_pattern(model),
        sample_prompt=samples[0]["prompt"] if samples else "",
        dataset_description=dataset_description,
        tokenizer_description=tokenizer_description,
        evaluation_description=evaluation_description,
        hyperparameters=hyperparameters,
        results=results,
        gate_statistics=gate_statistics,
        gate_plot=gate_plot,
        samples=samples,
        sample_temperature=SAMPLE_SETTINGS["temperature"],
        sample_top_k=SAMPLE_SETTINGS["top_k"],
        block_size=block_size,
        limitations=(
            "A small model trained briefly on a small corpus, for demonstration and comparison: it imitates the "
            "style of its training text and knows nothing else. Not evaluated for bias or safety."
        ),
    )


def create_hub_repo(repo_id: str, token: str | None, private: bool | None) -> str:
    """Create (or reuse) the model repository before training, so a bad name, token or endpoint fails in seconds."""
    api = HfApi(token=token)
    try:
        return api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    except Exception as error:
        raise RuntimeError(
            f"--push_to_hub: cannot create or reach the repository {repo_id!r} at {api.endpoint} "
            f"({type(error).__name__}: {error}). Check --hub_model_id, your token (`hf auth login` or --hub_token) "
            "and HF_ENDPOINT; nothing was trained."
        ) from error


def push_run(output_dir: Path, repo_id: str, token: str | None, commit_message: str) -> str:
    """Upload the run's published files (not its checkpoints) in one commit; returns the commit URL."""
    commit = HfApi(token=token).upload_folder(
        repo_id=repo_id, folder_path=output_dir, commit_message=commit_message, ignore_patterns=UNPUBLISHED
    )
    return commit.commit_url
