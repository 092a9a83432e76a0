"""Correctness and speed of PMG on an accelerator, in one run: scan parity, cached generation, timings.

Prints one line per result and writes them all to --output (JSON). The timings are a first baseline for the
kernel/benchmark work (scripts/benchmark.py will own the full comparison); Llama runs beside PMG in the same process
so the two are measured on equal terms.

    python scripts/cuda_check.py --output cuda_check.json            # on a GPU
    python scripts/cuda_check.py --device cpu --quick                  # smoke test of the script itself
"""

import argparse
import json
import platform
import time
from collections.abc import Callable
from functools import partial

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from pmg import PMGConfig, PMGForCausalLM
from pmg.scan_pmg import pmg_scan

RESULTS: dict[str, object] = {}


def record(name: str, value) -> None:
    RESULTS[name] = value
    print(f"{name}: {value}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(function: Callable[[], object], device: torch.device, repeats: int, warmups: int = 2) -> float:
    """Median wall time of `function` in milliseconds, after warm-up calls."""
    for _ in range(warmups):
        function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def scan_inputs(batch: int, length: int, channels: int, device: torch.device, dtype: torch.dtype) -> dict:
    return dict(
        z=torch.randn(batch, length, channels, device=device, dtype=dtype),
        v=torch.randn(batch, length, channels, device=device, dtype=dtype),
        sharpness=torch.rand(channels, device=device) + 0.5,
        shift=torch.randn(channels, device=device) * 0.3,
        asymmetry=torch.rand(channels, device=device) + 0.5,
        floor=torch.rand(channels, device=device) * 0.9,
    )


def check_scan_parity(device: torch.device, length: int) -> None:
    inputs = {k: v.requires_grad_() for k, v in scan_inputs(2, length, 64, device, torch.float32).items()}
    results = {}
    for impl in ("recurrent", "chunked"):
        states, _, _ = pmg_scan(**inputs, impl=impl)
        grads = torch.autograd.grad(states.square().sum(), list(inputs.values()))
        results[impl] = (states, grads)
    output_error = (results["chunked"][0] - results["recurrent"][0]).abs().max().item()
    grad_error = max((a - b).abs().max().item() for a, b in zip(*(results[i][1] for i in results), strict=True))
    record(f"scan parity fp32 T={length}: max |chunked - recurrent| output", output_error)
    record(f"scan parity fp32 T={length}: max |chunked - recurrent| gradient", grad_error)


def check_generation(device: torch.device) -> None:
    torch.manual_seed(0)
    layer_types = ["linear_attention", "full_attention", "linear_attention", "sliding_attention"]
    config = PMGConfig(vocab_size=97, hidden_size=64, num_hidden_layers=4, layer_types=layer_types, sliding_window=8)
    model = PMGForCausalLM(config).to(device).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    prompt = torch.randint(1, 97, (3, 9), device=device)
    cached = model.generate(prompt, max_new_tokens=16, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=False)
    record("hybrid greedy generation: cached == uncached", bool(torch.equal(cached, uncached)))
    full = model(cached).logits
    step = model(cached[:, :-1]).logits
    record("hybrid logits: prefix recomputation max difference", (full[:, :-1] - step).abs().max().item())


def scan_forward(inputs: dict, chunk_size: int) -> None:
    with torch.no_grad():
        pmg_scan(**inputs, impl="chunked", chunk_size=chunk_size)


def scan_forward_backward(leaves: dict, chunk_size: int) -> None:
    states, _, _ = pmg_scan(**leaves, impl="chunked", chunk_size=chunk_size)
    states.float().sum().backward()


def time_scan(
    device: torch.device, batch: int, length: int, channels: int, repeats: int, chunk_sizes: list[int]
) -> None:
    inputs = scan_inputs(batch, length, channels, device, torch.bfloat16)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    label = f"B={batch} T={length} D={channels} bf16"

    source = torch.empty(2 * batch * length * channels, device=device, dtype=torch.bfloat16)
    target = torch.empty_like(source)
    copy_ms = time_ms(lambda: target.copy_(source), device, repeats)
    moved_bytes = 2 * source.numel() * source.element_size()
    record(f"copy of z+v bytes ({label}) ms", round(copy_ms, 4))
    record("copy bandwidth GB/s", round(moved_bytes / copy_ms / 1e6, 1))
    for chunk in chunk_sizes:
        forward_ms = time_ms(partial(scan_forward, inputs, chunk), device, repeats)
        backward_ms = time_ms(partial(scan_forward_backward, leaves, chunk), device, repeats)
        record(f"pmg_scan chunked C={chunk} forward ({label}) ms", round(forward_ms, 3))
        record(f"pmg_scan chunked C={chunk} forward+backward ({label}) ms", round(backward_ms, 3))


def build_models(device: torch.device, hidden: int, layers: int, vocab: int) -> dict[str, torch.nn.Module]:
    pmg = PMGForCausalLM(PMGConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers))
    llama_config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=pmg.config.intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    llama = LlamaForCausalLM(llama_config)
    models = {"pmg": pmg, "llama": llama}
    for name, model in models.items():
        record(f"{name} parameters", model.num_parameters())
    return {name: model.to(device) for name, model in models.items()}


def training_step(model: torch.nn.Module, ids: torch.Tensor, device: torch.device) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def time_training(
    models: dict, device: torch.device, batch: int, length: int, repeats: int, compile_models: bool = False
) -> None:
    for name, model in models.items():
        model.train()
        if compile_models:
            start = time.perf_counter()
            model = torch.compile(model)
            training_step(model, torch.randint(0, 100, (batch, length), device=device), device)
            record(f"compile {name} {batch}x{length} first step s", round(time.perf_counter() - start, 1))
            name = f"{name} compiled"
        ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        milliseconds = time_ms(partial(training_step, model, ids, device), device, repeats)
        record(f"train {name} {batch}x{length} tokens/s", round(batch * length / milliseconds * 1e3))
        if device.type == "cuda":
            record(f"train {name} {batch}x{length} peak GiB", round(torch.cuda.max_memory_allocated() / 2**30, 2))


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, device: torch.device) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )


def time_generation(models: dict, device: torch.device, batch: int, prompt: int, new: int) -> None:
    for name, model in models.items():
        model.eval()
        ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
        greedy_generate(model, ids, 4, device)  # warm-up
        milliseconds = time_ms(partial(greedy_generate, model, ids, new, device), device, repeats=1, warmups=0)
        tokens_per_second = round(batch * new / milliseconds * 1e3)
        record(f"generate {name} batch {batch}, {prompt}+{new} tokens: new tokens/s", tokens_per_second)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="torch device to check (default: cuda)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    parser.add_argument("--output", default=None, help="JSON file for the results")
    parser.add_argument(
        "--sections",
        default="parity,generation,scan,train,generate",
        help="comma-separated subset of: parity, generation, scan, train, generate",
    )
    parser.add_argument("--chunk_sizes", default="64", help="comma-separated chunk sizes for the scan timings")
    parser.add_argument("--compile", action="store_true", help="time training under torch.compile")
    args = parser.parse_args()
    device = torch.device(args.device)
    record("device", torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor())
    record("versions", f"torch {torch.__version__}, transformers {transformers.__version__}")
    record("date", time.strftime("%Y-%m-%d"))
    torch.manual_seed(0)
    sections = set(args.sections.split(","))
    chunk_sizes = [int(size) for size in args.chunk_sizes.split(",")]
    quick = args.quick
    if "parity" in sections:
        check_scan_parity(device, length=256 if quick else 4096)
    if "generation" in sections:
        check_generation(device)
    if "scan" in sections:
        shape = dict(batch=2, length=256, channels=64) if quick else dict(batch=8, length=4096, channels=2048)
        time_scan(device, **shape, repeats=2 if quick else 10, chunk_sizes=chunk_sizes)
    if sections & {"train", "generate"}:
        size = dict(hidden=64, layers=2, vocab=256) if quick else dict(hidden=768, layers=12, vocab=32000)
        models = build_models(device, **size)
    if "train" in sections:
        shapes = [(2, 128, 2)] if quick else [(8, 2048, 5), (1, 16384, 3)]
        for batch, length, repeats in shapes:
            time_training(models, device, batch, length, repeats, compile_models=args.compile)
    if "generate" in sections:
        shapes = [(2, 16, 8)] if quick else [(1, 512, 256), (32, 512, 256)]
        for batch, prompt, new in shapes:
            time_generation(models, device, batch=batch, prompt=prompt, new=new)
    if args.output:
        with open(args.output, "w") as file:
            json.dump(RESULTS, file, indent=2)


if __name__ == "__main__":
    main()
