"""How far back do PMG, its ablations, attention and LSTM/GRU remember? Four tasks, matched sizes, one budget.

Tasks (`pmg.memory_tasks`): multi-query associative recall (MQAR, Zoology's construction), selective copying, the
adding problem, and sequential classification of scikit-learn's 8x8 digits read pixel by pixel, plain and permuted.
Models (`pmg.sequence_models`): pmg, pmg-sigmoid, pmg-no-floor, pmg-hybrid, llama, lstm, gru, each at the width whose
backbone parameter count is closest to PMG's at the nominal width of the setting.

Every model trains with the same budget per task (AdamW with PMG's parameter groups, warmup + cosine decay,
gradient clipping at 1) once per learning rate of the sweep, from the same seed; the test split scores every run,
and the report keeps each model's best learning rate, as Zoology does. Writes to --output_dir:

    results.json   every run: task, setting, model, width, parameters, learning rate, test metric, train time
    results.md     best learning rate per model and setting, the winner, and whether PMG beats the baselines and its
                   own ablations (rows where it does not say so)
    *.png          test metric against sequence length per task, against width for MQAR, against pixel order

    python scripts/memory_benchmark.py --quick                    # CPU, all tasks and models, a few minutes
    python scripts/memory_benchmark.py --device cuda              # the issue's settings (GPU-sized: hours)
    python scripts/memory_benchmark.py --quick --tasks mqar --models pmg,llama --steps 50 --output_dir /tmp/m
"""

import argparse
import functools
import json
import math
import multiprocessing
import os
import platform
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime
from itertools import product
from pathlib import Path

import numpy as np
import sklearn
import torch
import torch.nn.functional as F
import transformers
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm

from pmg import PMGConfig, optimizer_param_groups
from pmg.memory_tasks import (
    MemoryTask,
    SequenceData,
    adding_problem,
    multi_query_associative_recall,
    selective_copying,
    sequential_digits,
)
from pmg.sequence_models import (
    ABLATIONS,
    BASELINES,
    MODEL_NAMES,
    build_backbone,
    build_model,
    matched_width,
    num_parameters,
)

SHORT_NAMES = {"length": "T", "num_pairs": "pairs", "width": "d", "order": "order"}
PLOT_AXES = ("length", "width", "order")
EVAL_BATCH_SIZE = 256


@dataclass
class TaskPlan:
    """One task of the benchmark: its generator, data sizes, settings and training budget."""

    title: str
    generator: Callable[..., MemoryTask]
    data: dict  # generator arguments shared by all settings (sizes, vocabulary)
    settings: list[dict]  # the generator arguments that vary, plus the nominal model width
    steps: int
    batch_size: int
    baseline: dict = field(default_factory=dict)  # reference scores printed beside the table, e.g. chance


def grid(arguments: list[dict], widths: list[int]) -> list[dict]:
    """Every combination of one set of generator arguments with one nominal width."""
    return [{**each, "width": width} for each, width in product(arguments, widths)]


# per task: title, generator, and the reference scores that follow from its data arguments
TASKS = {
    "mqar": (
        "Multi-query associative recall (accuracy at query positions)",
        multi_query_associative_recall,
        lambda data: {"chance": 2 / data["vocab_size"]},  # values are drawn from half the vocabulary
    ),
    "selective_copy": (
        "Selective copying (accuracy at recall positions)",
        selective_copying,
        lambda data: {"chance": 1 / data["num_data_tokens"]},
    ),
    "adding": ("Adding problem (test MSE)", adding_problem, lambda data: {"always answer 1": 1 / 6}),
    "digits": ("Sequential 8x8 digits, 64 steps (test accuracy)", sequential_digits, lambda data: {"chance": 0.1}),
}
DIGIT_ORDERS = [dict(order="plain"), dict(order="permuted")]
# per task: the quick CPU sizes (tiny vocabularies, lengths and widths), then the full sizes of the issue (GPU)
SIZES = {
    "mqar": (
        dict(
            data=dict(vocab_size=64, num_train=4000, num_test=500),
            settings=[
                *grid([dict(length=32, num_pairs=4), dict(length=64, num_pairs=8)], [32]),
                dict(length=32, num_pairs=4, width=64),
            ],
            steps=150,
            batch_size=32,
        ),
        dict(
            data=dict(vocab_size=8192, num_train=100_000, num_test=3_000),
            settings=grid(
                [dict(length=length, num_pairs=length // 16) for length in (64, 128, 256, 512)], [64, 128, 256]
            ),
            steps=20_000,
            batch_size=64,
        ),
    ),
    "selective_copy": (
        dict(
            data=dict(num_memorize=4, num_data_tokens=8, num_train=4000, num_test=500),
            settings=grid([dict(length=32), dict(length=64)], [32]),
            steps=150,
            batch_size=32,
        ),
        dict(
            data=dict(num_memorize=16, num_data_tokens=16, num_train=20_000, num_test=2_000),
            settings=grid([dict(length=256), dict(length=1024), dict(length=4096)], [128]),
            steps=10_000,
            batch_size=32,
        ),
    ),
    "adding": (
        dict(
            data=dict(num_train=4000, num_test=500),
            settings=grid([dict(length=50), dict(length=100)], [32]),
            steps=150,
            batch_size=32,
        ),
        dict(
            data=dict(num_train=20_000, num_test=2_000),
            settings=grid([dict(length=200), dict(length=1000), dict(length=5000)], [128]),
            steps=10_000,
            batch_size=32,
        ),
    ),
    "digits": (
        dict(data={}, settings=grid(DIGIT_ORDERS, [32]), steps=150, batch_size=32),
        dict(data={}, settings=grid(DIGIT_ORDERS, [128]), steps=5_000, batch_size=64),
    ),
}


def plans(quick: bool) -> dict[str, TaskPlan]:
    """The quick CPU plan or the full plan of the issue, one TaskPlan per task."""
    chosen = {name: sizes[0 if quick else 1] for name, sizes in SIZES.items()}
    return {
        name: TaskPlan(title, generator, **chosen[name], baseline=baseline(chosen[name]["data"]))
        for name, (title, generator, baseline) in TASKS.items()
    }


QUICK_LEARNING_RATES = [3e-3, 1e-2]
FULL_LEARNING_RATES = np.logspace(-4, -2, 4).round(6).tolist()  # Zoology's sweep


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny CPU settings (a few minutes)")
    parser.add_argument("--tasks", default="mqar,selective_copy,adding,digits", help="comma-separated tasks to run")
    parser.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated models to run")
    parser.add_argument("--steps", type=int, default=None, help="training steps for every task (default: per task)")
    parser.add_argument("--learning_rates", default=None, help="comma-separated sweep (default: 2 quick, 4 full)")
    parser.add_argument("--output_dir", default=None, help="default: outputs/memory-benchmark[-quick]")
    parser.add_argument(
        "--gate_lr_ratio",
        type=float,
        default=PMGConfig.gate_lr_ratio,
        help="learning-rate multiplier of PMG's gating networks and gate shape (default: PMG's recipe, 0.1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the initialisation and the batches")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--workers", type=int, default=None, help="parallel runs (default: one per CPU core on CPU, 1 on GPU)"
    )
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="replace the report of an earlier run in --output_dir (refused otherwise)",
    )
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    args.tasks = args.tasks.split(",")
    args.models = args.models.split(",")
    for kind, names, known in (("task", args.tasks, plans(args.quick)), ("model", args.models, MODEL_NAMES)):
        unknown = [name for name in names if name not in known]
        if unknown:
            parser.error(f"unknown {kind}(s) {unknown}; choose from {list(known)}")
        if repeated := sorted({name for name in names if names.count(name) > 1}):
            parser.error(f"--{kind}s lists {repeated} more than once")
    default_rates = QUICK_LEARNING_RATES if args.quick else FULL_LEARNING_RATES
    args.learning_rates = [float(x) for x in args.learning_rates.split(",")] if args.learning_rates else default_rates
    if not all(0 < rate < math.inf for rate in args.learning_rates):
        parser.error(f"--learning_rates must be positive and finite, got {args.learning_rates}")
    if args.workers is None:
        args.workers = os.cpu_count() if args.device == "cpu" else 1
    args.output_dir = Path(args.output_dir or f"outputs/memory-benchmark{'-quick' if args.quick else ''}")
    if (args.output_dir / "results.json").exists() and not args.overwrite_output_dir:
        parser.error(f"{args.output_dir} holds the report of an earlier run: pass --overwrite_output_dir to replace it")
    return args


def masked_loss(outputs: torch.Tensor, batch: SequenceData, metric: str) -> torch.Tensor:
    """Cross-entropy (classes) or MSE (regression) over the scored positions only."""
    scored, targets = outputs[batch.mask], batch.targets[batch.mask]
    return F.mse_loss(scored.squeeze(-1), targets) if metric == "mse" else F.cross_entropy(scored, targets)


def to_device(batch: SequenceData, device: torch.device) -> SequenceData:
    return SequenceData(batch.inputs.to(device), batch.targets.to(device), batch.mask.to(device))


def train(
    model: nn.Module,
    task: MemoryTask,
    learning_rate: float,
    steps: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    gate_lr_ratio: float = PMGConfig.gate_lr_ratio,
) -> float:
    """Train on random batches of the train split; returns the mean loss of the last 10% of steps.

    AdamW over `pmg.optimizer_param_groups` (weight decay 0.1 on matrices; PMG gating networks and gate shape at
    `gate_lr_ratio` x lr, which leaves the baselines untouched), 10% warmup, cosine decay, gradient clipping at 1.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, learning_rate, gate_lr_ratio=gate_lr_ratio))
    schedule = transformers.get_cosine_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    model.to(device).train()
    losses = []
    for _ in range(steps):
        batch = to_device(task.train[torch.randint(len(task.train), (batch_size,), generator=generator)], device)
        loss = masked_loss(model(batch.inputs), batch, task.metric)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return float(np.mean(losses[-max(1, steps // 10) :]))


@torch.no_grad()
def evaluate(model: nn.Module, data: SequenceData, metric: str, device: torch.device) -> float:
    """Accuracy of the argmax, or the MSE, over the scored positions of `data`."""
    model.to(device).eval()
    total, count = 0.0, 0
    for start in range(0, len(data), EVAL_BATCH_SIZE):
        batch = to_device(data[start : start + EVAL_BATCH_SIZE], device)
        scored, targets = model(batch.inputs)[batch.mask], batch.targets[batch.mask]
        if metric == "mse":
            total += (scored.squeeze(-1) - targets).pow(2).sum().item()
        else:
            total += (scored.argmax(dim=-1) == targets).sum().item()
        count += targets.numel()
    return total / count


def matched_widths(models: list[str], nominal_widths: set[int]) -> dict[int, dict[str, dict]]:
    """Per nominal width: each model's width and backbone parameter count, matched to pmg's at that width."""
    table = {}
    with torch.device("meta"):  # parameter counts need shapes only
        for nominal in sorted(nominal_widths):
            target = num_parameters(build_backbone("pmg", nominal))
            table[nominal] = {}
            for name in models:
                width = matched_width(name, target, max_width=2 * nominal)
                count = num_parameters(build_backbone(name, width))
                table[nominal][name] = {"width": width, "backbone_parameters": count}
    return table


def setting_label(setting: dict) -> str:
    return " ".join(f"{SHORT_NAMES.get(key, key)}={value}" for key, value in setting.items())


@dataclass(frozen=True)
class Job:
    """One training run: a model at one learning rate on one setting of a task."""

    quick: bool
    task: str
    setting: tuple[tuple[str, object], ...]  # hashable form of the setting dict
    model: str
    width: int
    backbone_parameters: int
    learning_rate: float
    gate_lr_ratio: float
    steps: int
    batch_size: int
    seed: int
    device: str


@functools.lru_cache(maxsize=1)  # jobs come ordered by setting; the full plan's data sets are large
def make_task(quick: bool, task_name: str, setting: tuple[tuple[str, object], ...], seed: int) -> MemoryTask:
    """The data of one setting, generated once per process and setting."""
    plan = plans(quick)[task_name]
    arguments = {key: value for key, value in setting if key != "width"}
    return plan.generator(**plan.data, **arguments, seed=seed)


def run_job(job: Job) -> dict:
    """Build, train and test one model; returns its row of results.json."""
    task = make_task(job.quick, job.task, job.setting, job.seed)
    device = torch.device(job.device)
    torch.manual_seed(job.seed)
    model = build_model(job.model, job.width, task)
    start = time.perf_counter()
    train_loss = train(model, task, job.learning_rate, job.steps, job.batch_size, job.seed, device, job.gate_lr_ratio)
    seconds = time.perf_counter() - start
    setting = dict(job.setting)
    return {
        "task": job.task,
        "setting": setting,
        "setting_label": setting_label(setting),
        "model": job.model,
        "width": job.width,
        "backbone_parameters": job.backbone_parameters,
        "total_parameters": num_parameters(model),
        "learning_rate": job.learning_rate,
        "steps": job.steps,
        "batch_size": job.batch_size,
        "metric": task.metric,
        "test_sequences": len(task.test),
        "value": evaluate(model, task.test, task.metric, device),
        "final_train_loss": train_loss,
        "train_seconds": round(seconds, 2),
    }


def single_thread() -> None:
    """CPU workers use one thread each: these small models gain nothing from more, and lose much on shared cores."""
    torch.set_num_threads(1)


def run_benchmark(args: argparse.Namespace) -> dict:
    """Every task x setting x model x learning rate, spread over worker processes; returns the results.json report."""
    task_plans = {name: plan for name, plan in plans(args.quick).items() if name in args.tasks}
    widths = matched_widths(
        args.models, {setting["width"] for plan in task_plans.values() for setting in plan.settings}
    )
    tasks = {}
    jobs = []
    for task_name, plan in task_plans.items():
        steps = args.steps or plan.steps
        tasks[task_name] = {
            "title": plan.title,
            "data": plan.data,
            "settings": plan.settings,
            "steps": steps,
            "batch_size": plan.batch_size,
            "baseline": plan.baseline,
        }
        for setting, model, learning_rate in product(plan.settings, args.models, args.learning_rates):
            matched = widths[setting["width"]][model]
            jobs.append(
                Job(
                    args.quick,
                    task_name,
                    tuple(setting.items()),
                    model,
                    matched["width"],
                    matched["backbone_parameters"],
                    learning_rate,
                    args.gate_lr_ratio,
                    steps,
                    plan.batch_size,
                    args.seed,
                    args.device,
                )
            )
    runs = []
    with tqdm(total=len(jobs), desc="runs", unit="run") as progress:
        for run in map_jobs(jobs, args.workers):
            tasks[run["task"]].update(metric=run["metric"], test_sequences=run["test_sequences"])
            progress.write(
                f"[{run['task']} {run['setting_label']}] {run['model']} (d={run['width']}) "
                f"lr={run['learning_rate']:g}: {run['metric']} {run['value']:.4f}, "
                f"train loss {run['final_train_loss']:.4f}, {run['train_seconds']:.1f} s"
            )
            progress.update()
            runs.append(run)
    order = {(job.task, job.setting, job.model, job.learning_rate): i for i, job in enumerate(jobs)}
    runs.sort(key=lambda run: order[(run["task"], tuple(run["setting"].items()), run["model"], run["learning_rate"])])
    on_cuda = args.device.startswith("cuda")
    return {
        "mode": "quick" if args.quick else "full",
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": torch.cuda.get_device_name(args.device)
        if on_cuda
        else f"CPU, {os.cpu_count()} cores; {args.workers} worker processes x 1 thread",
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"scikit-learn {sklearn.__version__}, python {platform.python_version()}",
        "seed": args.seed,
        "learning_rates": args.learning_rates,
        "gate_lr_ratio": args.gate_lr_ratio,
        "models": args.models,
        "tasks": tasks,
        "matched_widths": {str(nominal): models for nominal, models in widths.items()},
        "runs": runs,
    }


def map_jobs(jobs: list[Job], workers: int) -> Iterator[dict]:
    """Run the jobs in this process (one worker) or in a pool of fresh (spawned) processes, yielding as they end."""
    if workers == 1:
        if jobs and jobs[0].device == "cpu":
            single_thread()
        yield from map(run_job, jobs)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that has started OpenMP threads
    with ProcessPoolExecutor(workers, mp_context=context, initializer=single_thread) as pool:
        try:
            for future in as_completed([pool.submit(run_job, job) for job in jobs]):
                yield future.result()
        finally:  # a failed run stops the benchmark at once instead of after every queued run
            pool.shutdown(cancel_futures=True)


def best_runs(report: dict) -> dict[tuple[str, str], dict[str, dict]]:
    """(task, setting label) -> model -> its run at the best learning rate (highest accuracy, lowest MSE)."""
    best: dict[tuple[str, str], dict[str, dict]] = {}
    for run in report["runs"]:
        row = best.setdefault((run["task"], run["setting_label"]), {})
        current = row.get(run["model"])
        if current is None or better(run["value"], current["value"], report["tasks"][run["task"]]["metric"]):
            row[run["model"]] = run
    return best


def better(value: float, other: float, metric: str) -> bool:
    """Whether `value` beats `other`; a diverged run (NaN or infinite) loses to any finite one."""
    return rank(value, metric) < rank(other, metric)


def rank(value: float, metric: str) -> float:
    """Lower is better: MSE as it is, accuracy negated, a non-finite value last."""
    if not math.isfinite(value):
        return math.inf
    return value if metric == "mse" else -value


def formatted(value: float, metric: str) -> str:
    """The precision of the tables; values equal at this precision count as ties."""
    return f"{value:.4f}" if metric == "mse" else f"{value:.3f}"


def comparison(row: dict[str, dict], rivals: tuple[str, ...], metric: str) -> str:
    """How pmg fares against the best of `rivals` in this row: wins, ties, or loses (bold, with the numbers)."""
    present = [name for name in rivals if name in row]
    if "pmg" not in row or not present:
        return "-"
    rival = min(present, key=lambda name: rank(row[name]["value"], metric))
    if not math.isfinite(row["pmg"]["value"]) and not math.isfinite(row[rival]["value"]):
        return "all diverged"
    mine, theirs = formatted(row["pmg"]["value"], metric), formatted(row[rival]["value"], metric)
    if mine == theirs:
        return f"ties {rival}"
    if better(row["pmg"]["value"], row[rival]["value"], metric):
        return f"wins (best rival {rival} {theirs})"
    return f"**loses to {rival}** ({mine} vs {theirs})"


def winners(row: dict[str, dict], metric: str) -> str:
    """The best model of a row, or all of those tied with it at the precision shown."""
    best = min((run["value"] for run in row.values()), key=lambda value: rank(value, metric))
    if not math.isfinite(best):
        return "none (all diverged)"
    shown = formatted(best, metric)
    return ", ".join(name for name, run in row.items() if formatted(run["value"], metric) == shown)


def markdown(report: dict) -> str:
    """The results tables: parameters per model, then per task the best-learning-rate score of every model."""
    models = report["models"]
    lines = [
        f"# Memory benchmark ({report['mode']} mode)",
        "",
        f"{report['date']}; {report['machine']}; {report['versions']}; wall time "
        f"{report['wall_seconds'] / 60:.1f} min.",
        f"Learning-rate sweep {report['learning_rates']}, seed {report['seed']}; AdamW (weight decay 0.1, PMG gating "
        f"networks and gate shape at {report['gate_lr_ratio']:g} x lr), 10% warmup, cosine decay, gradient clipping "
        "at 1. Each cell: the test score at the model's best learning rate (in parentheses). *vs baselines*: pmg "
        "against the best of llama, lstm and gru; *vs ablations*: pmg against the best of pmg-sigmoid and "
        "pmg-no-floor; equal at the precision shown counts as a tie.",
        "",
        "## Models: width / backbone parameters, matched to pmg at each nominal width",
        "",
        "| nominal width | " + " | ".join(models) + " |",
        "| --- |" + " --- |" * len(models),
    ]
    for nominal, row in report["matched_widths"].items():
        cells = [f"{row[name]['width']} / {row[name]['backbone_parameters']:,}" for name in models]
        lines.append(f"| {nominal} | " + " | ".join(cells) + " |")
    best = best_runs(report)
    for task_name, task in report["tasks"].items():
        metric = task["metric"]
        lines += ["", f"## {task_name}: {task['title']}", ""]
        lines.append(
            f"{task['steps']} steps x batch {task['batch_size']}; data {task['data'] or 'bundled'}; "
            f"{task['test_sequences']} test sequences."
        )
        for name, value in task["baseline"].items():
            lines.append(f"Reference: {name} = {value:.4f}.")
        lines += [
            "",
            "| setting | " + " | ".join(models) + " | best | vs baselines | vs ablations |",
            "| --- |" + " --- |" * (len(models) + 3),
        ]
        for setting in task["settings"]:
            row = best[(task_name, setting_label(setting))]
            cells = [f"{formatted(row[name]['value'], metric)} ({row[name]['learning_rate']:g})" for name in models]
            verdicts = [comparison(row, BASELINES, metric), comparison(row, ABLATIONS, metric)]
            lines.append(
                f"| {setting_label(setting)} | " + " | ".join([*cells, winners(row, metric), *verdicts]) + " |"
            )
    return "\n".join(lines) + "\n"


def plot(report: dict, task_name: str, axis: str, path: Path) -> Path:
    """Test score (best learning rate) against one setting axis, one panel per value of the other axis (width, or
    length for the width axis) that has at least two points."""
    task = report["tasks"][task_name]
    best = best_runs(report)
    metric = task["metric"]
    panel_axis = "length" if axis == "width" else "width"
    panels = {}
    for setting in task["settings"]:
        panels.setdefault(setting[panel_axis], []).append(setting)
    panels = {value: settings for value, settings in sorted(panels.items()) if len(settings) > 1}
    figure = Figure(figsize=(5 * len(panels) + 1.5, 3.8))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel, settings) in zip(axes, panels.items(), strict=True):
        ticks = [setting_label({k: v for k, v in setting.items() if k != panel_axis}) for setting in settings]
        for model in report["models"]:
            runs = [best[(task_name, setting_label(setting))][model] for setting in settings]
            style = "-" if model.startswith("pmg") else "--"
            ax.plot(ticks, [run["value"] for run in runs], style, marker="o", label=model)
        for name, value in task["baseline"].items():
            ax.axhline(value, color="grey", linestyle=":", label=name)
        ax.set_xlabel(axis)
        ax.set_ylabel("test MSE (lower is better)" if metric == "mse" else "test accuracy")
        ax.set_title(f"{task_name}, {SHORT_NAMES[panel_axis]}={panel}")
        if metric == "mse":
            ax.set_yscale("log")
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    report = run_benchmark(args)
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.output_dir / "results.md").write_text(table)
    for task_name, task in report["tasks"].items():
        for axis in PLOT_AXES:
            if len({setting.get(axis) for setting in task["settings"]}) > 1:
                plot(report, task_name, axis, args.output_dir / f"{task_name}_vs_{axis}.png")
    print(table)
    print(f"Wrote results.json, results.md and plots to {args.output_dir}")


if __name__ == "__main__":
    main()
