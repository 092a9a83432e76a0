"""lm-evaluation-harness: the shipped `shakespeare_lastword` task on a tiny PMG checkpoint, by the Python API and the
CLI (`hf` model type, `trust_remote_code`), offline."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HYBRID_LAYERS, perturbed, tiny_config
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pmg import PMGForCausalLM
from pmg.data import TEST_WORKS, VALIDATION_WORKS, load_shakespeare, train_tokenizer
from pmg.lm_eval_tasks import TASKS_DIR
from pmg.lm_eval_tasks.shakespeare_lastword.build import (
    EXAMPLES_PATH,
    EXAMPLES_PER_WORK,
    FEWSHOT_EXAMPLES_PER_WORK,
    build_examples,
)

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is missing: pip install -e .[dev]")
TaskManager = pytest.importorskip("lm_eval.tasks").TaskManager

TASK = "shakespeare_lastword"
LIMIT = 8
BATCH_SIZE = 4  # lm-eval right-pads the batches; each example is also scored alone below


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny PMG/attention hybrid with a byte-level tokenizer, saved with save_pretrained."""
    torch.manual_seed(0)
    contexts = [json.loads(line)["context"] for line in EXAMPLES_PATH.read_text(encoding="utf-8").splitlines()]
    tokenizer = train_tokenizer(contexts, vocab_size=300)
    special = {f"{name}_token_id": tokenizer.eos_token_id for name in ("pad", "bos", "eos")}
    model = perturbed(PMGForCausalLM(tiny_config(vocab_size=len(tokenizer), layer_types=HYBRID_LAYERS, **special)))
    path = tmp_path_factory.mktemp("tiny-pmg")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def evaluation(checkpoint: Path) -> dict:
    """lm-eval's results for the first LIMIT examples, with per-sample logs, through `simple_evaluate`."""
    return lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={checkpoint},trust_remote_code=True,dtype=float32",
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(TASKS_DIR)),
        limit=LIMIT,
        batch_size=BATCH_SIZE,
        device="cpu",  # lm-eval's hf model defaults to "cuda" even where torch has no CUDA
        log_samples=True,
    )


def score(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, context: str, target: str) -> tuple[float, bool]:
    """Log-likelihood of `target` after `context` and whether greedy decoding yields it, from one unpadded pass."""
    context_ids, target_ids = tokenizer([context, target], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([context_ids + target_ids])).logits[0, len(context_ids) - 1 : -1]
    log_probs = logits.double().log_softmax(-1)
    targets = torch.tensor(target_ids)
    return log_probs.gather(-1, targets[:, None]).sum().item(), bool((log_probs.argmax(-1) == targets).all())


def test_examples_are_rebuilt_from_the_held_out_plays():
    """The committed examples are what build.py makes, and each is a passage of its play cut before the last word of
    a spoken line: test examples from the test plays, few-shot ones from the validation plays."""
    lines = EXAMPLES_PATH.read_text(encoding="utf-8").splitlines()
    examples = build_examples()
    assert [json.loads(line) for line in lines] == examples
    works = {"test": TEST_WORKS, "validation": VALIDATION_WORKS}
    per_work = {"test": EXAMPLES_PER_WORK, "validation": FEWSHOT_EXAMPLES_PER_WORK}
    for split in works:
        assert [example["work"] for example in examples if example["split"] == split] == [
            work for work in works[split] for _ in range(per_work[split])
        ]
    corpus = load_shakespeare()
    texts = {play["work"]: play["text"] for split in works for play in corpus[split]}
    for example in examples:
        text = texts[example["work"]]
        assert re.fullmatch(r" [A-Za-z]+(['-][A-Za-z]+)*", example["target"])
        # the word follows the context after its space (two, in a few lines of the source text)
        after = text.index(example["context"]) + len(example["context"])
        word = re.compile(r" +" + re.escape(example["target"].strip())).match(text, after)
        end = word.end()
        assert not text[end].isalpha()
        assert text.count("\n", 0, end) + 1 == example["line"]
        target_line = text.split("\n")[example["line"] - 1]
        assert not target_line.startswith(("ACT", "SCENE")), f"a heading is no spoken line: {target_line!r}"


def test_few_shot_examples_come_from_other_plays_with_one_space_before_each_target(checkpoint: Path):
    evaluation = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={checkpoint},trust_remote_code=True,dtype=float32",
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(TASKS_DIR)),
        num_fewshot=2,
        limit=2,
        batch_size=BATCH_SIZE,
        device="cpu",
        log_samples=True,
    )
    shots = {example["context"] + example["target"] for example in build_examples() if example["split"] == "validation"}
    for sample in evaluation["samples"][TASK]:
        ((prompt, target),) = sample["arguments"]
        assert target == sample["doc"]["target"] and prompt.endswith("\n\n" + sample["doc"]["context"])
        shots_given = prompt[: -len(sample["doc"]["context"])]  # each shot is context + target, one space between
        assert any(shots_given == f"{first}\n\n{second}\n\n" for first in shots for second in shots)


def test_simple_evaluate_reports_the_task_metrics(evaluation: dict):
    """Both metrics come back for LIMIT samples, in their ranges."""
    results = evaluation["results"][TASK]
    assert results["sample_len"] == LIMIT
    assert 0.0 <= results["acc,none"] <= 1.0
    assert 1.0 <= results["perplexity,none"] < math.inf
    assert evaluation["config"]["device"] == "cpu"


def test_per_sample_scores_match_an_independent_forward_pass(evaluation: dict, checkpoint: Path):
    """lm-eval scores each example as the model does unbatched (no BOS: the tokenizer adds no special tokens), and
    its aggregates are the mean greedy accuracy and exp(-mean log-likelihood) of those scores."""
    model = PMGForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    samples = sorted(evaluation["samples"][TASK], key=lambda sample: sample["doc_id"])
    assert [sample["doc_id"] for sample in samples] == list(range(LIMIT))
    scores = []
    for sample in samples:
        doc = sample["doc"]
        assert sample["arguments"] == [(doc["context"], doc["target"])]
        log_likelihood, greedy = score(model, tokenizer, doc["context"], doc["target"])
        assert sample["filtered_resps"][0][0] == pytest.approx(log_likelihood, rel=1e-4, abs=1e-4)
        assert sample["acc"] == greedy
        scores.append((log_likelihood, greedy))
    results = evaluation["results"][TASK]
    assert results["acc,none"] == pytest.approx(sum(greedy for _, greedy in scores) / LIMIT)
    mean_log_likelihood = sum(log_likelihood for log_likelihood, _ in scores) / LIMIT
    assert results["perplexity,none"] == pytest.approx(math.exp(-mean_log_likelihood), rel=1e-3)


def test_cli_in_a_fresh_process_matches_the_python_api(evaluation: dict, checkpoint: Path, tmp_path: Path):
    """`lm_eval run` with `--include_path`, from another working directory and without pmg imported (the
    checkpoint's own code runs through trust_remote_code), writes the same results."""
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
    }
    command = [
        *(sys.executable, "-m", "lm_eval", "run", "--model", "hf"),
        *("--model_args", f"pretrained={checkpoint},trust_remote_code=True,dtype=float32"),
        *("--tasks", TASK, "--include_path", str(TASKS_DIR), "--limit", str(LIMIT)),
        *("--batch_size", str(BATCH_SIZE), "--device", "cpu", "--output_path", str(tmp_path / "results")),
    ]
    process = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    (results_file,) = (tmp_path / "results").glob("*/results_*.json")
    results = json.loads(results_file.read_text())["results"][TASK]
    assert any((tmp_path / "modules" / "transformers_modules").rglob("modeling_pmg.py"))
    expected = evaluation["results"][TASK]
    assert results["acc,none"] == expected["acc,none"]
    assert results["perplexity,none"] == pytest.approx(expected["perplexity,none"], rel=1e-5)
