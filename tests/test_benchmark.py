"""scripts/benchmark.py runs end to end on tiny sizes and writes a well-formed report (no timing assertions)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TRITON_DEVICE, import_triton_modules, load_script
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def test_benchmark_writes_json_markdown_and_plot(tmp_path):
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--output_dir", str(tmp_path)]
    command.append("--smoke")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["versions"].startswith("torch ") and report["settings"]["lengths"] == [16, 32]
    assert report["training precision"] == "fp32"  # the CPU default
    rows = report["results"]
    sections = {row["section"] for row in rows}
    assert {"parity", "op", "models", "train", "generate", "latency", "profile", "train profile"} <= sections
    layer_ops = [row for row in rows if row["section"] == "op" and "PyTorch" in row["name"]]
    names = [row["name"].split(" (")[0] for row in layer_ops]
    assert names == [
        "launch overhead: a PyTorch elementwise op",
        "short conv",
        "softmax cross-entropy, loss and gradient",
    ]
    assert all(row["value"] > 0 for row in layer_ops)
    launches = [row for row in rows if row["name"].startswith("launch overhead")]
    assert len(launches) == 2 and all(row["value"] > 0 for row in launches)  # on CPU: no Triton rows
    parity = [row for row in rows if row["section"] == "parity"]
    assert parity and all(max(row["value"]) < 1e-3 for row in parity), "chunked scan disagrees with the reference"
    models = ("pmg", "pmg-fused-ce", "llama", "lstm")
    for section in ("train", "train memory"):
        measured = {(row["model"], row["length"]) for row in rows if row["section"] == section}
        assert measured == {(model, length) for model in models for length in (16, 32)}, section
    speed_ups = {(row["model"], row["length"]) for row in rows if row["section"] == "train speed-up"}
    pairs = {f"{pmg} over {baseline}" for pmg in ("pmg", "pmg-fused-ce") for baseline in ("llama", "lstm")}
    assert speed_ups == {(pair, length) for pair in pairs for length in (16, 32)}
    timed = {"train", "train speed-up", "train memory", "generate", "latency"}
    assert all(row["value"] > 0 for row in rows if row["section"] in timed)
    assert all(row["value"] < 1 for row in rows if row["section"] == "train memory")  # GiB, for 0.3M-parameter models
    sizes = {row["name"]: row["value"] for row in rows if row["section"] == "models"}
    assert sizes["pmg parameters"] < 10**6, "--smoke must build tiny models"
    report = (tmp_path / "results.md").read_text()
    summary, every = report.split("## Every measurement")
    assert every.count("\n| ") == len(rows) + 2  # the header and the separator line
    assert "## Training tokens/s (batch x length)\n\n| model | 2x16 | 1x32 |" in summary
    assert "\n| pmg over llama | " in summary.split("## Training speed-up")[1]
    # a line in each of the five tables for models that generate, in the three training tables for the others
    lines = {model: summary.count(f"\n| {model} | ") for model in models}
    assert lines == {"pmg": 5, "pmg-fused-ce": 3, "llama": 5, "lstm": 3}
    assert Image.open(tmp_path / "results.png").size[0] > 0
    # the decoding profile: operator calls per step for the models that generate, and the profiler's table of each
    profiled = {row["name"]: row["value"] for row in rows if row["section"] == "profile"}
    for model in ("pmg", "llama"):
        assert profiled[f"{model} operator calls per decoding step"] > 10
        # the host's time ends no later than the device's (both from the same start)
        host, synchronized = (profiled[f"{model} {what} ms per decoding step"] for what in ("host", "synchronized"))
        assert 0 < host <= synchronized
    assert {row["model"] for row in rows if row["section"] == "profile"} == {"pmg", "llama"}
    assert "aten::" in (tmp_path / "decoding-profile-pmg.txt").read_text()
    # the training profile: per model, shares of the step that add up to the whole, and the profiler's table
    for model in models:
        host, synchronized, *shares = [
            row["value"] for row in rows if row["section"] == "train profile" and row["model"] == model
        ]
        assert 0 < host <= synchronized
        assert len(shares) == 7 and abs(sum(shares[1:]) - 100) < 0.5, (model, shares)
        assert shares[0] > 0 and 0 < shares[1] < 100, "operator time per step, then matrix products"
        assert "aten::mm" in (tmp_path / f"training-profile-{model}.txt").read_text()
    assert "## Where a training step's time goes" in summary


def test_benchmark_names_an_unknown_model_and_keeps_the_order_asked_for(tmp_path):
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--output_dir", str(tmp_path), "--sections", "train"]
    command += ["--smoke", "--num_layers", "1", "--lengths", "16", "--repeats", "2"]
    unknown = subprocess.run([*command, "--models", "pmg,gru"], capture_output=True, text=True, timeout=300)
    assert unknown.returncode == 2 and "['gru'] unknown or unavailable" in unknown.stderr
    assert not (tmp_path / "results.json").exists()
    chosen = subprocess.run([*command, "--models", "lstm,pmg"], capture_output=True, text=True, timeout=300)
    assert chosen.returncode == 0, chosen.stderr[-4000:]
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [row["model"] for row in rows if row["section"] == "train"] == ["lstm", "pmg"]
    built = [row["name"] for row in rows if row["name"].endswith(" parameters")]
    assert built == ["lstm parameters", "pmg parameters"]  # the other models are never built
    settings = json.loads((tmp_path / "results.json").read_text())["settings"]
    assert settings["repeats"] == 2 and settings["lengths"] == [16]
    assert settings["tokens_per_batch"] == 32 and all(
        "2x16" in row["name"] for row in rows if row["section"] == "train"
    )


def test_benchmark_compiled_training_and_generation_rows(tmp_path):
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--output_dir", str(tmp_path)]
    command += ["--sections", "train,generate"]
    command += ["--smoke", "--num_layers", "1", "--lengths", "16", "--models", "pmg", "--compile"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    compiled = [row for row in rows if row.get("model") == "pmg compiled"]
    assert [row["batch"] for row in compiled] == [1, 4]
    assert all(isinstance(row["value"], int) and row["value"] > 0 for row in compiled), compiled
    assert sum("compile s" in row["name"] for row in rows) == 3  # training at one length, generation at two batches
    assert [row["model"] for row in rows if row["section"] == "train" and "model" in row] == ["pmg"]


def test_peak_memory_counts_what_a_call_allocates_and_not_what_was_alive_before():
    benchmark = load_script("benchmark")
    cpu = torch.device("cpu")
    mebibyte = 2**20 // 4  # fp32 elements
    resident = torch.ones(256 * mebibyte)  # alive before and after every call: part of no call's peak

    def allocate_and_free(mebibytes: int) -> None:
        first = torch.ones(mebibytes * mebibyte)
        second = first * 2  # both alive at once: the peak is twice one of them
        del first, second

    def one_after_another() -> None:
        for _ in range(4):  # each freed before the next: the peak is one of them
            torch.ones(64 * mebibyte).sum()

    kept = []
    for _ in range(2):  # repeatable: the same calls, the same peaks
        assert benchmark.peak_memory_gib(lambda: allocate_and_free(192), cpu) == pytest.approx(0.375, abs=1e-3)
        assert benchmark.peak_memory_gib(lambda: allocate_and_free(16), cpu) == pytest.approx(0.031, abs=1e-3)
        assert benchmark.peak_memory_gib(one_after_another, cpu) == pytest.approx(0.0625, abs=1e-3)
        # a tensor that outlives the call counts too
        assert benchmark.peak_memory_gib(lambda: kept.append(torch.ones(128 * mebibyte)), cpu) == 0.125
    assert resident.sum() == 256 * mebibyte and len(kept) == 2


def test_the_report_header_names_the_allocator_settings_that_move_cpu_timings(monkeypatch):
    benchmark = load_script("benchmark")
    for name in benchmark.ALLOCATOR_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert benchmark.host_allocator() == "system default"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "17179869184")
    monkeypatch.setenv("LD_PRELOAD", "libjemalloc.so.2")
    assert benchmark.host_allocator() == "LD_PRELOAD=libjemalloc.so.2, MALLOC_MMAP_THRESHOLD_=17179869184"


def test_rounds_drop_a_step_that_fails_and_keep_timing_the_others():
    benchmark = load_script("benchmark")
    calls = []

    def fails_in_its_second_round():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")

    steps = {"steady": lambda: None, "flaky": fails_in_its_second_round}
    times, failures = benchmark.time_in_rounds(steps, torch.device("cpu"), rounds=3)
    assert len(times["steady"]) == 3 and len(times["flaky"]) == 1 and len(calls) == 2
    assert failures == {"flaky": "failed: RuntimeError: boom"}


def test_the_segment_rows_time_the_triton_scan_on_the_longest_batch_cut_every_way(monkeypatch):
    """On CUDA the op section times the Triton scan on one layer of the longest training batch, its sequence in 1 to
    16 segments and in as many as `segments_for` picks; here in the interpreter, at a tiny size, in 1 and as picked."""
    (triton_scan,) = import_triton_modules("triton_scan")
    monkeypatch.setattr(triton_scan, "MIN_CHUNKS_PER_SEGMENT", 2)
    benchmark = load_script("benchmark")
    settings = dataclasses.replace(benchmark.CPU, hidden_size=16, lengths=[32, 128], tokens_per_batch=128, repeats=1)
    record = benchmark.Recorder()
    benchmark.time_scan_segments(record, torch.device(TRITON_DEVICE), settings, counts=(1,))
    names = [row["name"] for row in record.rows]
    assert len(names) == 4 and all(row["value"] > 0 for row in record.rows)
    assert all("(B=1 T=128 D=16 bfloat16)" in name for name in names)
    # 4 chunks of 32 steps, one program per segment: 2 segments of 2 chunks (the interpreter counts as one
    # multiprocessor, which asks for 2 programs)
    assert names[-1] == "pmg_scan triton forward+backward (B=1 T=128 D=16 bfloat16), 2 (picked) segments ms"
