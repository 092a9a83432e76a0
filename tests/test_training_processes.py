"""scripts/train.py as users run it, in separate processes: killed with SIGKILL and resumed, launched as two
processes with accelerate, and pushed to a (local) Hub, then loaded where pmg is not installed."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port, tiny_config
from hub_server import hub_env
from transformers import AutoModelForCausalLM, AutoTokenizer

import pmg  # noqa: F401  (registers PMG with the Auto classes)
from pmg import PMGForCausalLM
from pmg.data import load_genre_passages, train_tokenizer

pytest_plugins = ["hub_server"]  # the local_hub fixture

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN = [str(REPO_ROOT / "scripts" / "train.py")]
TINY_RUN = [
    *("--hidden_size", "32", "--num_hidden_layers", "2", "--vocab_size", "512", "--block_size", "32"),
    *("--max_eval_blocks", "15", "--per_device_eval_batch_size", "4", "--logging_steps", "5", "--seed", "0"),
    *("--use_cpu", "True", "--report_to", "none", "--sample_prompts", "KING."),
]


def train_command(output_dir: Path, *options: str, launcher: tuple[str, ...] = (sys.executable,)) -> list[str]:
    return [*launcher, *TRAIN, "--output_dir", str(output_dir), *TINY_RUN, *options]


def finish(command: list[str], env: dict[str, str] | None = None) -> dict:
    """Run a training command to the end and return its metrics.json; a run that hangs fails with what it printed
    (a two-process run hung once in a full CI-like run, 2026-11-27, and passed alone every time since)."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as error:
        printed = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else error.stderr or ""
        pytest.fail(f"{' '.join(command)} hung for {error.timeout} s; its last output:\n{printed[-6000:]}")
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-6000:]}"
    output_dir = Path(command[command.index("--output_dir") + 1])
    return json.loads((output_dir / "metrics.json").read_text())


def test_a_run_killed_with_sigkill_resumes_to_the_same_result(tmp_path):
    options = ("--max_steps", "80", "--save_steps", "10", "--per_device_train_batch_size", "8")
    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(train_command(killed_dir, *options), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (killed_dir / "checkpoint-30" / "trainer_progress.json").exists():
        assert process.poll() is None, f"the run ended before it could be killed:\n{process.stderr.read()[-4000:]}"
        assert time.monotonic() < deadline, "no checkpoint-30 after 300 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL and not (killed_dir / "model.safetensors").exists()

    resumed = finish(train_command(killed_dir, *options, "--resume_from_checkpoint", "True"))
    uninterrupted = finish(train_command(tmp_path / "uninterrupted", *options))
    assert resumed["step"] == 80
    assert resumed == pytest.approx(uninterrupted, rel=1e-5)
    assert not list(killed_dir.glob(".partial-*")), "a resumed run cleans up after an interrupted checkpoint write"


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    options = ("--max_steps", "6", "--save_steps", "0")
    one = finish(train_command(tmp_path / "one", *options, "--per_device_train_batch_size", "4"))
    # without a GPU, --multi_gpu starts gloo CPU processes (--cpu alone would run a single process)
    launcher = ("accelerate", "launch", "--num_processes", "2", "--multi_gpu", "--mixed_precision", "no")
    launcher += ("--main_process_port", str(free_port()))  # not the default 29500, which another run may hold
    two = finish(train_command(tmp_path / "two", *options, "--per_device_train_batch_size", "2", launcher=launcher))
    assert two == pytest.approx(one, rel=1e-5)
    assert "| num_processes | 2 |" in (tmp_path / "two" / "README.md").read_text()
    history = [json.loads((tmp_path / run / "training_history.json").read_text()) for run in ("one", "two")]
    assert [entry["loss"] for entry in history[1]] == pytest.approx([entry["loss"] for entry in history[0]], rel=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the processes join (and would train)")
@pytest.mark.parametrize("script", ["train", "finetune"])
def test_processes_that_do_not_join_one_run_are_refused_before_any_work(tmp_path, script):
    """`accelerate launch --multi_gpu` without a GPU and without --use_cpu starts processes that accelerate does not
    join: each would train alone into the same output_dir."""
    launcher = ["accelerate", "launch", "--num_processes", "2", "--multi_gpu", "--mixed_precision", "no"]
    launcher += ["--main_process_port", str(free_port())]
    output_dir = tmp_path / "run"
    command = [*launcher, str(REPO_ROOT / "scripts" / f"{script}.py"), "--output_dir", str(output_dir)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    assert "2 processes were launched, but only 1 joined the run" in result.stderr, result.stderr[-4000:]
    assert "add --use_cpu True" in result.stderr
    assert not output_dir.exists() or not any(output_dir.iterdir())


LOAD_WITHOUT_PMG = """
    import json, sys
    sys.modules["pmg"] = None  # as on a machine without the package: `import pmg` raises ImportError
    import torch
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM, AutoTokenizer

    repo_id = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=True)
    ids = tokenizer("KING.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**ids, labels=ids["input_ids"]).loss.item()
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False)
    files = sorted(HfApi().list_repo_files(repo_id))
    new_tokens = generated.shape[1] - ids["input_ids"].shape[1]
    print(json.dumps({"class": type(model).__module__, "loss": loss, "new": new_tokens, "files": files}))
"""


def test_push_to_hub_publishes_the_run_and_it_loads_without_pmg(local_hub, tmp_path):
    env = hub_env(local_hub, tmp_path / "hf_home")
    options = ("--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "4")
    output_dir = tmp_path / "run"
    finish(train_command(output_dir, *options, "--push_to_hub", "True", "--hub_model_id", "org/pmg-tiny"), env)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LOAD_WITHOUT_PMG), "org/pmg-tiny"],
        capture_output=True,
        text=True,
        timeout=300,
        env=hub_env(local_hub, tmp_path / "fresh_home"),
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,  # not the repository root, where `pmg` would be importable
    )
    assert result.returncode == 0, result.stderr[-6000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["class"].startswith("transformers_modules.") and loaded["new"] == 4
    published = {"README.md", "config.json", "model.safetensors", "modeling_pmg.py", "tokenizer.json", "samples.json"}
    assert published <= set(loaded["files"]) and "metrics.json" in loaded["files"]
    assert not [name for name in loaded["files"] if name.startswith(("checkpoint-", ".partial-"))]
    local_model = AutoModelForCausalLM.from_pretrained(output_dir)
    ids = AutoTokenizer.from_pretrained(output_dir)("KING.", return_tensors="pt")
    with torch.no_grad():
        local_loss = local_model(**ids, labels=ids["input_ids"]).loss.item()
    assert loaded["loss"] == pytest.approx(local_loss, rel=1e-6), "the Hub copy computes what the saved run does"
    card = (output_dir / "README.md").read_text()
    assert 'from_pretrained("org/pmg-tiny", trust_remote_code=True)' in card


def test_push_to_hub_fails_before_training_when_the_hub_refuses(tmp_path):
    env = {**hub_env("http://127.0.0.1:9"), "HF_HUB_ETAG_TIMEOUT": "1"}  # nothing listens on port 9
    output_dir = tmp_path / "run"
    command = train_command(output_dir, "--max_steps", "4", "--push_to_hub", "True", "--hub_model_id", "org/x")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    assert "--push_to_hub: cannot create or reach the repository 'org/x' at http://127.0.0.1:9" in result.stderr
    assert not output_dir.exists() or not any(output_dir.iterdir())


@pytest.fixture(autouse=True)
def importable_pmg(monkeypatch):
    """Child processes import pmg from this checkout, wherever the package is installed."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))


LIST_REPO = """
import json, sys
from huggingface_hub import HfApi, hf_hub_download
files = HfApi().list_repo_files(sys.argv[1])
card = open(hf_hub_download(sys.argv[1], "README.md")).read()
print(json.dumps({"files": files, "card": card}))
"""


def test_finetune_pushes_its_model_card_and_results_with_the_model(local_hub, tmp_path):
    base = tmp_path / "base"
    tokenizer = train_tokenizer(load_genre_passages(passages_per_play=2)["train"]["text"], vocab_size=300)
    PMGForCausalLM(tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    env = hub_env(local_hub, tmp_path / "hf_home")
    command = [sys.executable, str(REPO_ROOT / "scripts" / "finetune.py"), "--model_name_or_path", str(base)]
    command += ["--output_dir", str(tmp_path / "ft"), "--max_steps", "2", "--max_length", "32"]
    command += ["--max_train_samples", "16", "--use_cpu", "True", "--report_to", "none"]
    command += ["--push_to_hub", "True", "--hub_model_id", "org/pmg-genre"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-6000:]
    listed = subprocess.run(
        [sys.executable, "-c", LIST_REPO, "org/pmg-genre"], capture_output=True, text=True, timeout=120, env=env
    )
    assert listed.returncode == 0, listed.stderr[-3000:]
    published = json.loads(listed.stdout.strip().splitlines()[-1])
    assert {"model.safetensors", "all_results.json", "README.md"} <= set(published["files"])
    assert "genre passages" in published["card"] and "Accuracy" in published["card"]
