"""Hub datasets by name: `load_text_dataset`, `scripts/train.py` and `scripts/train_timeseries.py` read dataset repos
through a Hub endpoint.

The endpoint is an `olah` mirror on 127.0.0.1 serving a git repo from a temporary folder, offline. Clients run in
subprocesses because huggingface_hub and datasets read HF_ENDPOINT and the offline flags when they are imported.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import free_port
from huggingface_hub import ModelCard

OLAH = shutil.which("olah-cli")
pytestmark = pytest.mark.skipif(OLAH is None, reason="olah-cli (the olah Hub mirror) is missing: pip install -e .[dev]")

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASET = "pmg-test/tiny-plays"
SONNET_18 = (
    "Shall I compare thee to a summer's day?",
    "Thou art more lovely and more temperate:",
    "Rough winds do shake the darling buds of May,",
    "And summer's lease hath all too short a date;",
    "Sometime too hot the eye of heaven shines,",
    "And often is his gold complexion dimm'd;",
    "And every fair from fair sometime declines,",
    "By chance or nature's changing course untrimm'd;",
    "But thy eternal summer shall not fade,",
    "Nor lose possession of that fair thou ow'st;",
    "Nor shall death brag thou wander'st in his shade,",
    "When in eternal lines to time thou grow'st:",
    "So long as men can breathe or eyes can see,",
    "So long lives this, and this gives life to thee.",
)
# 44 two-line documents, about 800 words: enough 32-token blocks for batches of 2 in both splits
DOCUMENTS = [f"Verse {i}: {SONNET_18[i % 14]} {SONNET_18[(3 * i + 1) % 14]}" for i in range(44)]
SPLITS = {"train": DOCUMENTS[:36], "validation": DOCUMENTS[36:]}
README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: train.jsonl
  - split: validation
    path: validation.jsonl
---
# tiny-plays

Lines of Shakespeare's Sonnet 18 (public domain), for tests of loading a Hub dataset by name.
"""
SERIES_DATASET = "pmg-test/tiny-series"
# 150 months of two channels in the long-horizon benchmarks' layout: a date column, then one column per channel
SERIES_CSV = "date,load,temperature\n" + "".join(
    f"{1990 + month // 12}-{month % 12 + 1:02d}-01,{100 + month % 12 * 3 + month * 0.1:.1f},{(month * 7) % 11 - 5}\n"
    for month in range(150)
)
LABELLED_DATASET = "pmg-test/tiny-verses"
# each sonnet line labelled by the half of the poem it comes from: text and label columns, as a user's dataset
LABELLED = {
    split: [{"text": DOCUMENTS[i], "label": "first" if i % 14 < 7 else "second"} for i in indices]
    for split, indices in (("train", range(36)), ("validation", range(36, 44)))
}
REPOS = {
    DATASET: {
        **{f"{split}.jsonl": "".join(json.dumps({"text": t}) + "\n" for t in texts) for split, texts in SPLITS.items()},
        "README.md": README,
    },
    LABELLED_DATASET: {
        **{f"{split}.jsonl": "".join(json.dumps(row) + "\n" for row in rows) for split, rows in LABELLED.items()},
        "README.md": "# tiny-verses\n\nLines of Sonnet 18 labelled by the half they come from, for tests.\n",
    },
    SERIES_DATASET: {
        "series.csv": SERIES_CSV,
        "README.md": "# tiny-series\n\nA synthetic monthly series, for tests.\n",
    },
}
TINY_RUN = (
    "--max_steps 2 --hidden_size 32 --num_hidden_layers 2 --vocab_size 300 --block_size 32 "
    "--per_device_train_batch_size 2 --per_device_eval_batch_size 2 --logging_steps 1 --save_steps 0 "
    "--use_cpu True --report_to none"
)
LOADER = """
import json, sys
from pmg.data import load_text_dataset
corpus = load_text_dataset(sys.argv[1])
with open(sys.argv[2], "w") as f:
    json.dump({split: list(corpus[split]["text"]) for split in corpus}, f)
"""


class Mirror(NamedTuple):
    """The mirror's base URL, and its log, which records every request it answered."""

    endpoint: str
    log: Path


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=pmg", "-c", "user.email=pmg@example.com", *args], cwd=repo, check=True)


def wait_until_served(url: str, server: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    """Poll `url` until it answers 200; fail with olah's log if the server exits or never gets there."""
    deadline = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)
    state = f"exited with {server.returncode}" if server.poll() is not None else f"no answer within {timeout:.0f} s"
    pytest.fail(f"olah never served {url} ({state}). Its log:\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mirror]:
    """An offline olah mirror on a free port, serving each of REPOS as a git repo."""
    root = tmp_path_factory.mktemp("olah")
    for name, files in REPOS.items():
        repo = root / "mirrors_dir" / "datasets" / name
        repo.mkdir(parents=True)
        for filename, content in files.items():
            (repo / filename).write_text(content)
        git(repo, "init", "--quiet", "--initial-branch=main")
        git(repo, "add", ".")
        git(repo, "commit", "--quiet", "--message", name)

    port = free_port()
    (root / "olah.toml").write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nmirror-netloc = "127.0.0.1:{port}"\n'
        'mirrors-path = ["./mirrors_dir"]\n\n[accessibility]\noffline = true\n'
    )
    log = root / "olah.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [OLAH, "-c", "olah.toml"],
            cwd=root,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until_served(f"{endpoint}/api/datasets/{DATASET}/revision/main", server, log)
        yield Mirror(endpoint, log)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def run_client(mirror: Mirror, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """Run Python with `args` against the mirror, online as far as the Hub clients know, with caches in `workdir`."""
    env = {
        **os.environ,
        "HF_ENDPOINT": mirror.endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_HOME": str(workdir / "hf_home"),
        "HF_DATASETS_CACHE": str(workdir / "hf_home" / "datasets"),
        # this checkout's pmg, also for scripts/train.py, whose sys.path starts at scripts/
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_load_text_dataset_reads_the_hub_dataset_by_name(mirror: Mirror, tmp_path: Path) -> None:
    log_start = mirror.log.stat().st_size
    result = run_client(mirror, tmp_path, "-c", LOADER, DATASET, str(tmp_path / "texts.json"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "texts.json").read_text()) == SPLITS
    served = mirror.log.read_bytes()[log_start:].decode(errors="replace")
    for split in SPLITS:
        assert re.search(rf"GET /datasets/{DATASET}/resolve/\w+/{split}\.jsonl", served), f"{split} not via the mirror"


def test_train_script_pretrains_on_the_hub_dataset(mirror: Mirror, tmp_path: Path) -> None:
    output_dir = tmp_path / "run"
    script = str(REPO_ROOT / "scripts" / "train.py")
    options = ["--dataset_name", DATASET, "--output_dir", str(output_dir), *TINY_RUN.split()]
    result = run_client(mirror, tmp_path, script, *options)
    assert result.returncode == 0, result.stderr
    assert (output_dir / "model.safetensors").is_file()
    assert json.loads((output_dir / "metrics.json").read_text())["step"] == 2


def test_an_unknown_dataset_name_fails_naming_it(mirror: Mirror, tmp_path: Path) -> None:
    missing = "pmg-test/no-such-corpus"
    result = run_client(mirror, tmp_path, "-c", LOADER, missing, str(tmp_path / "texts.json"))
    assert result.returncode != 0
    assert "DatasetNotFoundError" in result.stderr and missing in result.stderr, result.stderr
    assert not (tmp_path / "texts.json").exists()


def test_time_series_script_benchmarks_on_the_hub_dataset(mirror: Mirror, tmp_path: Path) -> None:
    log_start = mirror.log.stat().st_size
    script = str(REPO_ROOT / "scripts" / "train_timeseries.py")
    options = ["--dataset_name", SERIES_DATASET, "--date_column", "date", "--output_dir", str(tmp_path / "run")]
    options += ["--context_length", "12", "--prediction_length", "4", "--models", "last_value", "pmg"]
    options += ["--hidden_size", "16", "--max_steps", "2", "--seeds", "0"]
    result = run_client(mirror, tmp_path, script, *options)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    assert report["data"]["channels"] == ["load", "temperature"]
    assert [row["model"] for row in report["results"]] == ["last_value", "pmg"]
    served = mirror.log.read_bytes()[log_start:].decode(errors="replace")
    assert re.search(rf"GET /datasets/{SERIES_DATASET}/resolve/\w+/series\.csv", served), "the CSV not via the mirror"


def test_finetune_script_classifies_a_hub_dataset(mirror: Mirror, tmp_path: Path) -> None:
    from conftest import tiny_config

    from pmg import PMGForCausalLM
    from pmg.data import train_tokenizer

    pretrained = tmp_path / "pretrained"  # a tiny checkpoint, as scripts/train.py would leave it
    tokenizer = train_tokenizer(DOCUMENTS, vocab_size=300)
    PMGForCausalLM(tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)).save_pretrained(
        pretrained
    )
    tokenizer.save_pretrained(pretrained)
    script = str(REPO_ROOT / "scripts" / "finetune.py")
    options = ["--dataset_name", LABELLED_DATASET, "--model_name_or_path", str(pretrained)]
    options += ["--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--per_device_train_batch_size", "4"]
    options += ["--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "False"]
    options += ["--use_cpu", "True", "--report_to", "none"]
    result = run_client(mirror, tmp_path, script, *options)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((tmp_path / "run" / "all_results.json").read_text())
    assert 0 <= metrics["eval_accuracy"] <= 1 and "test_accuracy" not in metrics  # the repo has no test split
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["id2label"] == {"0": "first", "1": "second"}
    card = ModelCard.load(tmp_path / "run" / "README.md")  # the Hub dataset linked, and the results typed by it
    assert card.data.datasets == [LABELLED_DATASET]
    results = {(result.dataset_type, result.metric_type): result.metric_value for result in card.data.eval_results}
    assert results[(LABELLED_DATASET, "accuracy")] == pytest.approx(metrics["eval_accuracy"], abs=1e-4)
