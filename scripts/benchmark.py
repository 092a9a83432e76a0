"""PMG against the systems a user would otherwise pick, measured in one run on one machine.

Sections (all by default):
- parity: the scan backends agree with the step-by-step reference (fp32, with gradients).
- op: `pmg_scan` forward and forward+backward per backend (chunked PyTorch; Triton on CUDA when installed) against a
  copy of the same bytes (the memory-bandwidth bound: read z and v, write h) and fla's `chunk_hgrn` when installed;
  the short convolution, forward+backward, PyTorch's path and (on CUDA) the Triton kernel at several tile shapes;
  the loss and gradient of one chunk of the chunked LM loss, PyTorch's passes and (on CUDA) the Triton kernel.
- train: training tokens/s and peak memory of matched models (PMG as configured by default; on CUDA `pmg-triton`
  pinned to the fused kernels and `pmg-chunked` to PyTorch alone, its decoding step included; `pmg-fused-ce`
  without training logits; transformers Llama with SDPA; fla HGRN when installed; a torch LSTM language model)
  across sequence lengths at a constant number of tokens per batch. The models take their steps in turn, round
  after round, and PMG's speed-up over each baseline is the median of the rounds' ratios.
- generate: new tokens/s at batch 1 and 32, and the latency of one decoding step as the context grows; with
  --compile also with a static cache, whose decoding step `generate` compiles (CUDA graphs on a GPU). The models
  take turns here too, and each number is the median of its rounds.
- profile: what one decoding step at batch 1 consists of: operator calls, and on a GPU kernel launches, device syncs
  and the kernels' own time (a step much longer than its kernels is bound by the host that launches them); the
  profiler's table of each model goes to decoding-profile-MODEL.txt.
- train-profile: where one training step's time goes at the longest length (matrix products, attention, the PMG scan
  kernels, copies and casts, the rest), and on a GPU the kernels launched; tables in training-profile-MODEL.txt.
  Both profiles also time the step without the profiler: until the call returns (the host) and until the device is
  done. Close together, with the kernels' time well below, the step waits on the host.

Writes results.json, results.md and results.png to --output_dir, and prints each number as it is measured.

    python scripts/benchmark.py --device cuda --output_dir benchmark-h100       # GPU: width 768, 12 layers, PMG 104M
    python scripts/benchmark.py --device cpu --quick --output_dir benchmark-cpu  # CPU: width 256, 6 layers, PMG 6.7M
"""

import argparse
import inspect
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import transformers
from matplotlib.figure import Figure
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import CompileConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutput

from pmg import PMGConfig, PMGForCausalLM
from pmg.linear_cross_entropy import DEFAULT_LOGITS_PER_CHUNK, LOGITS_PER_CHUNK, softmax_cross_entropy_function
from pmg.modeling_pmg import PMGLayer
from pmg.scan_pmg import pmg_scan
from pmg.sequence_models import matched_llama_config


@dataclass
class Settings:
    """Sizes of one benchmark run: the GPU reference of issue 5, or the CPU one with --quick."""

    hidden_size: int
    num_layers: int
    vocab_size: int
    tokens_per_batch: int
    lengths: list[int]
    scan_shape: tuple[int, int, int]  # batch, length, channels
    generation: list[tuple[int, int, int]]  # batch, prompt, new tokens
    contexts: list[int]
    repeats: int
    generation_repeats: int  # whole generations timed per shape (median); one on a GPU, where they take seconds


GPU = Settings(
    768,
    12,
    32000,
    16384,
    [512, 1024, 2048, 4096, 8192, 16384],
    (8, 4096, 2048),
    [(1, 512, 256), (32, 512, 256)],
    [512, 2048, 8192, 32768],
    3,
    1,
)
CPU = Settings(
    256, 6, 8192, 4096, [256, 1024, 4096], (4, 1024, 256), [(1, 128, 32), (32, 128, 32)], [256, 1024, 4096], 5, 3
)


class Recorder:
    """Collects (section, name, value) rows and prints each one as it arrives."""

    def __init__(self):
        self.rows: list[dict] = []

    def __call__(self, section: str, name: str, value, **details) -> None:
        self.rows.append({"section": section, "name": name, "value": value, **details})
        print(f"[{section}] {name}: {value}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(function: Callable[[], object], device: torch.device, repeats: int, warmups: int = 1) -> float:
    """Median wall time of `function` in milliseconds, the device's work included, after warm-up calls."""
    return host_and_synchronized_ms(function, device, repeats, warmups)[1]


def host_and_synchronized_ms(
    function: Callable[[], object], device: torch.device, repeats: int, warmups: int = 1
) -> tuple[float, float]:
    """Median milliseconds until `function` returns (the host's work: launching, and any wait for the device inside
    it) and until the device has finished it too, after warm-up calls. Far apart, the device is the bound; close, the
    host is."""
    for _ in range(warmups):
        function()
    host, synchronized = [], []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        host.append((time.perf_counter() - start) * 1e3)
        synchronize(device)
        synchronized.append((time.perf_counter() - start) * 1e3)
    return statistics.median(host), statistics.median(synchronized)


def peak_memory_gib(function: Callable[[], object], device: torch.device) -> float:
    """Peak size of the tensors that one call of `function` allocates beyond those alive before it (activations,
    gradients, workspace; not the resident weights), in GiB.

    CUDA: the caching allocator's peak. CPU: PyTorch keeps no CPU allocator statistics, so the profiler records every
    allocation and free of the call (`profile_memory`), and their running sum gives the peak. Tensor bytes either way,
    not what the allocator caches; exact and repeatable, where the process's resident size varied by 4% between steps.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        function()
        synchronize(device)
        return round((torch.cuda.max_memory_allocated(device) - start) / 2**30, 3)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    records = [event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"]
    live = peak = 0
    for event in sorted(records, key=lambda event: event.start_ns()):
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return round(peak / 2**30, 3)


def scan_backends(device: torch.device) -> list[str]:
    backends = ["chunked"]
    if device.type == "cuda":
        try:
            from pmg.triton_scan import is_triton_available
        except ImportError:
            return backends
        if is_triton_available():
            backends.append("triton")
    return backends


def scan_inputs(batch: int, length: int, channels: int, device: torch.device, dtype: torch.dtype) -> dict:
    generator = torch.Generator().manual_seed(0)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device)

    return dict(
        z=random(batch, length, channels).to(dtype),
        v=random(batch, length, channels).to(dtype),
        sharpness=random(channels).abs() + 0.5,
        shift=random(channels) * 0.3,
        asymmetry=random(channels).abs() + 0.5,
        floor=torch.sigmoid(random(channels)),
    )


def check_parity(record: Recorder, device: torch.device, length: int) -> None:
    inputs = {
        name: tensor.requires_grad_() for name, tensor in scan_inputs(2, length, 64, device, torch.float32).items()
    }
    reference = None
    for impl in ["recurrent", *scan_backends(device)]:
        states, _, _ = pmg_scan(**inputs, impl=impl)
        gradients = torch.autograd.grad(states.square().sum(), list(inputs.values()))
        if reference is None:
            reference = (states, gradients)
            continue
        output_error = (states - reference[0]).abs().max().item()
        gradient_error = max((a - b).abs().max().item() for a, b in zip(gradients, reference[1], strict=True))
        record(
            "parity",
            f"{impl} vs recurrent, T={length}: max output / gradient difference",
            [output_error, gradient_error],
        )


def time_ops(record: Recorder, device: torch.device, settings: Settings) -> None:
    batch, length, channels = settings.scan_shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inputs = scan_inputs(batch, length, channels, device, dtype)
    shape = f"B={batch} T={length} D={channels} {str(dtype).removeprefix('torch.')}"
    # the ideal scan reads z and v and writes h: the same bytes as copying a tensor 1.5 times as large
    source = torch.empty(3 * batch * length * channels // 2, device=device, dtype=dtype)
    target = torch.empty_like(source)
    copy_ms = time_ms(lambda: target.copy_(source), device, settings.repeats)
    record(
        "op",
        f"copy of the scan's bytes ({shape}) ms",
        round(copy_ms, 4),
        bandwidth_gb_s=round(2 * source.numel() * source.element_size() / copy_ms / 1e6, 1),
    )
    leaves = {name: tensor.clone().requires_grad_() for name, tensor in inputs.items()}
    grad_states = torch.randn_like(inputs["v"])
    for impl in scan_backends(device):
        states = partial(scan_states, partial(pmg_scan, impl=impl, return_write=False, raw_shape=True))
        time_forward_and_backward(
            record, f"pmg_scan {impl} {{}} ({shape}) ms", states, leaves, grad_states, device, settings.repeats
        )
    chunk_hgrn = optional_fla_chunk_hgrn()
    if chunk_hgrn is None:
        record("op", "fla chunk_hgrn", "not installed")
        return
    x = inputs["v"].detach().clone().requires_grad_()
    g = nn.functional.logsigmoid(inputs["z"].float()).to(dtype).detach().requires_grad_()
    time_forward_and_backward(
        record,
        f"fla chunk_hgrn {{}} ({shape}) ms",
        partial(scan_states, chunk_hgrn),
        dict(x=x, g=g),
        grad_states,
        device,
        settings.repeats,
    )


def scan_states(scan: Callable, **inputs: torch.Tensor) -> torch.Tensor:
    """The states alone of a scan that returns them first."""
    return scan(**inputs)[0]


def time_forward_and_backward(
    record: Recorder,
    name: str,
    states: Callable[..., torch.Tensor],
    leaves: dict[str, torch.Tensor],
    grad_states: torch.Tensor,
    device: torch.device,
    repeats: int,
) -> None:
    """Record `name` (with "forward" and "forward+backward" put in) for `states(**leaves)` as a model trains it (PMG's
    scans take the gate parameters as a layer stores them, `raw_shape=True`): no autograd in the forward; the backward
    pass from a given dL/dh (a loss such as states.float().sum() would add passes of its own), its gradients returned
    rather than added into .grad (another pass over every input)."""

    def forward() -> None:
        with torch.no_grad():
            states(**leaves)

    def forward_backward() -> None:
        torch.autograd.grad(states(**leaves), list(leaves.values()), grad_states)

    for passes, function in (("forward", forward), ("forward+backward", forward_backward)):
        record("op", name.format(passes), round(time_ms(function, device, repeats), 4))


def time_scan_segments(
    record: Recorder, device: torch.device, settings: Settings, counts: tuple[int, ...] = (1, 2, 4, 8, 16)
) -> None:
    """The Triton scan, forward and forward + backward, on one layer of the longest training batch (1 x 16384 at width
    768 on a GPU: 48 programs a segment), the sequence cut into each of `counts` segments and into as many as
    `segments_for` picks."""
    from pmg.triton_scan import BLOCK_D, BLOCK_T, cdiv, segments_for, triton_pmg_scan

    length = max(settings.lengths)
    batch, channels = settings.tokens_per_batch // length, settings.hidden_size
    leaves, grad_states = bf16_scan_leaves(batch, length, channels, device)
    shape = f"B={batch} T={length} D={channels} bfloat16"
    picked = segments_for(batch * cdiv(channels, BLOCK_D), cdiv(length, BLOCK_T), device)
    for segments in (*counts, None):
        label = f"{picked} (picked)" if segments is None else segments
        states = partial(scan_states, partial(triton_pmg_scan, return_write=False, raw_shape=True, segments=segments))
        name = f"pmg_scan triton {{}} ({shape}), {label} segments ms"
        time_forward_and_backward(record, name, states, leaves, grad_states, device, settings.repeats)


def bf16_scan_leaves(
    batch: int, length: int, channels: int, device: torch.device
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`scan_inputs` in bf16 as leaves that take gradients, and a dL/dh to run the backward pass from."""
    inputs = scan_inputs(batch, length, channels, device, torch.bfloat16)
    leaves = {name: tensor.requires_grad_() for name, tensor in inputs.items()}
    return leaves, torch.randn_like(leaves["v"])


LAUNCHES_PER_SAMPLE = 200


def host_us_per_call(function: Callable[[], object], device: torch.device) -> float:
    """Host microseconds per call of `function`, called back to back without waiting for the device: its kernels are
    tiny, so the device keeps up and the time is that of launching them (Python, dispatch, the launch itself)."""
    function()  # compiles a Triton kernel on its first call
    synchronize(device)
    start = time.perf_counter()
    for _ in range(LAUNCHES_PER_SAMPLE):
        function()
    elapsed = time.perf_counter() - start
    synchronize(device)
    return elapsed / LAUNCHES_PER_SAMPLE * 1e6


def time_launch_overhead(record: Recorder, device: torch.device, settings: Settings) -> None:
    """What launching costs the host, per call: a PyTorch elementwise op, and one PMG layer on one token op by op
    (the PyTorch path) and, on CUDA, with its fused Triton step, the bare Triton kernel and an empty Triton kernel. A
    decoding step at batch 1 (and, on the H100, a training step) waits on the host: where a Triton launch costs more
    than the PyTorch calls it replaces, fusing loses."""
    channels = settings.hidden_size
    a, b, c = (torch.randn(channels, device=device) for _ in range(3))
    calls = {f"a PyTorch elementwise op ({channels} channels)": partial(torch.add, a, b, out=c)}
    x = torch.randn(1, 1, channels, device=device)
    layer = PMGLayer(channels, scan_impl="chunked").to(device).eval()
    calls["a PMG layer on one token, op by op"] = torch.no_grad()(partial(layer, x))
    if "triton" in scan_backends(device):
        import triton

        from pmg.triton_decoding import triton_decoding_step

        fused = PMGLayer(channels, scan_impl="triton").to(device).eval()
        calls["a PMG layer on one token, fused Triton step"] = torch.no_grad()(partial(fused, x))
        parameters = [fused.sharpness_raw, fused.shift, fused.asymmetry_raw, fused.floor_logit]
        calls["the fused step's function alone (checks, allocations, one launch)"] = torch.no_grad()(
            partial(triton_decoding_step, x, x, *parameters)
        )
        calls["an empty Triton kernel, one argument"] = partial(_empty_kernel(triton)[(1,)], c)
    for name, function in calls.items():
        record("op", f"launch overhead: {name}, host us per call", round(host_us_per_call(function, device), 1))


def _empty_kernel(triton):
    """A Triton kernel that does nothing: its launch is the whole cost."""

    @triton.jit
    def empty(pointer):
        pass

    return empty


def time_scan_prefetch(record: Recorder, device: torch.device, settings: Settings) -> None:
    """The Triton scan with and without `triton_scan.PREFETCH` (each chunk's loads issued a chunk ahead), forward and
    forward + backward, at the op section's shape and on one layer of the training batch at length 2048 (8 x 2048 at
    width 768 on a GPU: 384 programs, under 3 per multiprocessor of an H100)."""
    from pmg import triton_scan

    op_batch, op_length, op_channels = settings.scan_shape
    shapes = [(op_batch, op_length, op_channels), (settings.tokens_per_batch // 2048, 2048, settings.hidden_size)]
    states = partial(scan_states, partial(triton_scan.triton_pmg_scan, return_write=False, raw_shape=True))
    default = triton_scan.PREFETCH
    try:
        for batch, length, channels in shapes:
            leaves, grad_states = bf16_scan_leaves(batch, length, channels, device)
            for prefetch in (False, True):
                triton_scan.PREFETCH = prefetch
                name = f"pmg_scan triton {{}} (B={batch} T={length} D={channels} bfloat16), prefetch {prefetch} ms"
                time_forward_and_backward(record, name, states, leaves, grad_states, device, settings.repeats)
    finally:
        triton_scan.PREFETCH = default


def time_layer_ops(record: Recorder, device: torch.device, settings: Settings) -> None:
    """Forward + backward of the short convolution (with padding) on the values of one training batch (rows of 1024
    tokens): PyTorch's path, and on CUDA the Triton kernel at several tile shapes."""
    length = min(1024, settings.tokens_per_batch)
    batch, hidden = settings.tokens_per_batch // length, settings.hidden_size
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layer = PMGLayer(hidden, scan_impl="chunked").to(device)
    values = torch.randn(batch, length, hidden, device=device, dtype=dtype, requires_grad=True)
    mask = torch.ones(batch, length, device=device, dtype=torch.bool)
    mask[0, : length // 10] = False

    def forward_backward(function: Callable[[], torch.Tensor]) -> None:
        function().float().sum().backward()

    dtype_name = str(dtype).removeprefix("torch.")
    conv = f"short conv (B={batch} T={length} D={hidden})"
    weight, bias = layer._conv_parameters()
    # the convolution alone on both sides (padding as zeros; the layer's reordering of padded batches comes on top)
    candidates = {f"{conv} PyTorch": lambda: layer._convolve(values, weight, bias, None, mask, None)}
    if "triton" in scan_backends(device):
        from pmg.triton_conv import triton_short_conv

        # positions per tile, and tiles per backward program (4 x 8 is the default)
        for block_t, row_tiles in ((4, 32), (4, 8), (4, 2), (8, 4), (16, 2)):
            candidates[f"{conv} Triton, {block_t}-position tiles x {row_tiles}"] = partial(
                triton_short_conv, values, weight, bias, mask=mask, block_t=block_t, row_tiles=row_tiles
            )
    for name, function in candidates.items():
        milliseconds = time_ms(partial(forward_backward, function), device, settings.repeats)
        record("op", f"{name} {dtype_name} forward+backward ms", round(milliseconds, 4))


def time_loss_ops(record: Recorder, device: torch.device, settings: Settings) -> None:
    """Loss and gradient of one chunk of the chunked LM loss (the tokens whose logits fill `LOGITS_PER_CHUNK`):
    PyTorch's passes, and on CUDA the Triton kernel, on logits already computed."""
    vocabulary = settings.vocab_size
    logits_per_chunk = LOGITS_PER_CHUNK.get(device.type, DEFAULT_LOGITS_PER_CHUNK)
    rows = min(settings.tokens_per_batch, logits_per_chunk // vocabulary)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    logits = torch.randn(rows, vocabulary, device=device, dtype=dtype)
    targets = torch.randint(0, vocabulary, (rows,), device=device)
    backends = ["PyTorch"] + (["Triton"] if "triton" in scan_backends(device) else [])
    for backend in backends:
        function = softmax_cross_entropy_function(logits, vocabulary, rows, triton=backend == "Triton")
        milliseconds = time_ms(partial(function, logits, targets, True, False), device, settings.repeats)
        name = f"softmax cross-entropy, loss and gradient ({rows} x {vocabulary} {str(dtype).removeprefix('torch.')})"
        record("op", f"{name} {backend} ms", round(milliseconds, 4))


def optional_fla_chunk_hgrn() -> Callable | None:
    try:
        from fla.ops.hgrn import chunk_hgrn
    except Exception:  # ImportError, or fla's own RuntimeError on a machine without a GPU driver
        return None
    return chunk_hgrn


class LSTMLanguageModel(nn.Module):
    """A multi-layer (cuDNN / oneDNN) LSTM language model with tied embeddings, the classic recurrent baseline."""

    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.lstm = nn.LSTM(hidden_size, hidden_size, num_layers, batch_first=True)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> CausalLMOutput:
        hidden, _ = self.lstm(self.embed(input_ids))
        logits = hidden @ self.embed.weight.T
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss, logits=logits)

    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())


def model_factories(record: Recorder, settings: Settings, device: torch.device) -> dict[str, Callable[[], nn.Module]]:
    """How to build each model this machine can run: PMG as configured by default, PMG on the Triton scan (CUDA), PMG
    with the chunked LM head + loss, a Llama of the same width, depth and MLP, fla HGRN when installed, and an LSTM of
    matched size. Nothing is built yet, so a run restricted by --models builds only those."""
    sizes = dict(
        vocab_size=settings.vocab_size, hidden_size=settings.hidden_size, num_hidden_layers=settings.num_layers
    )
    config = PMGConfig(**sizes)
    factories = {"pmg": partial(PMGForCausalLM, config)}
    if "triton" in scan_backends(device):
        factories["pmg-triton"] = partial(PMGForCausalLM, PMGConfig(**sizes, scan_impl="triton"))
        # PyTorch only: the chunked scan, and the decoding step op by op instead of the fused kernel
        factories["pmg-chunked"] = partial(PMGForCausalLM, PMGConfig(**sizes, scan_impl="chunked"))
    factories["pmg-fused-ce"] = partial(PMGForCausalLM, PMGConfig(**sizes, fuse_linear_cross_entropy=True))
    llama_config = matched_llama_config(
        config, attn_implementation="sdpa", max_position_embeddings=max(settings.lengths)
    )
    factories["llama"] = partial(LlamaForCausalLM, llama_config)
    try:
        from fla.models import HGRNConfig, HGRNForCausalLM
    except Exception as error:  # ImportError, or fla's own RuntimeError on a machine without a GPU driver
        record("models", "fla HGRN", f"unavailable ({type(error).__name__})")
    else:
        factories["fla-hgrn"] = partial(HGRNForCausalLM, HGRNConfig(**sizes, tie_word_embeddings=True))
    # an LSTM layer holds 8 h^2 weights: as many layers as make up PMG's non-embedding parameters (counted on the
    # meta device, which allocates nothing)
    with torch.device("meta"):
        body = PMGForCausalLM(config).num_parameters() - settings.vocab_size * settings.hidden_size
    lstm_layers = max(1, round(body / (8 * settings.hidden_size**2)))
    factories["lstm"] = partial(LSTMLanguageModel, settings.vocab_size, settings.hidden_size, lstm_layers)
    return factories


def build_models(
    record: Recorder, factories: dict[str, Callable[[], nn.Module]], device: torch.device
) -> dict[str, nn.Module]:
    """The models, built on `device`, where they stay for the whole run."""
    with device:
        models = {name: build() for name, build in factories.items()}
    for name, model in models.items():
        record("models", f"{name} parameters", model.num_parameters())
    return models


def failure(error: Exception) -> str:
    """A measurement that raised, as its report row shows it: one baseline failing on one shape does not end the run."""
    if isinstance(error, torch.OutOfMemoryError):
        torch.cuda.empty_cache()
        return "out of memory"
    return f"failed: {type(error).__name__}: {error}"[:300]


def training_step(model: nn.Module, ids: torch.Tensor, device: torch.device, bf16: bool) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def time_training(
    record: Recorder,
    models: dict[str, nn.Module],
    device: torch.device,
    settings: Settings,
    compile_models: bool,
    bf16: bool,
) -> None:
    """Tokens/s and peak memory of a training step per model and length, and PMG's speed-up over each baseline. The
    models take their steps in turn, round after round, so a machine whose speed drifts during the run (the 2-core
    CPU machines drift by 10-25%) slows them alike, and each round gives a ratio of two steps taken side by side."""
    for length in settings.lengths:
        batch = max(1, settings.tokens_per_batch // length)
        ids = torch.randint(0, settings.vocab_size, (batch, length), device=device)
        shape = f"{batch}x{length}"
        steps = {}
        for name, model in models.items():
            model.train()
            try:
                steps[name] = warmed_up_training_step(record, name, model, ids, device, bf16, compile_models)
            except Exception as error:
                record("train", f"{name} {shape} tokens/s", failure(error), model=name, length=length, shape=shape)
        times, failures = time_in_rounds(steps, device, settings.repeats)
        for name, step in steps.items():
            details = dict(model=name, length=length, shape=shape)
            if name in failures:
                record("train", f"{name} {shape} tokens/s", failures[name], **details)
                continue
            milliseconds = statistics.median(times[name])
            record("train", f"{name} {shape} tokens/s", round(batch * length / milliseconds * 1e3), **details)
            try:
                peak = peak_memory_gib(step, device)  # an extra, untimed step: the profiler slows it down
            except Exception as error:
                peak = failure(error)
            record("train memory", f"{name} {shape} peak step memory GiB", peak, **details)
        measured = [name for name in steps if name not in failures]
        for pmg in (name for name in measured if name.startswith("pmg")):  # the PMG variants, then the baselines
            for baseline in (name for name in measured if not name.startswith("pmg")):
                ratios = [b / a for a, b in zip(times[pmg], times[baseline], strict=True)]
                pair = f"{pmg} over {baseline}"
                details = dict(model=pair, length=length, shape=shape, rounds=[round(ratio, 2) for ratio in ratios])
                record("train speed-up", f"{pair} {shape}", round(statistics.median(ratios), 2), **details)


def warmed_up_training_step(
    record: Recorder,
    name: str,
    model: nn.Module,
    ids: torch.Tensor,
    device: torch.device,
    bf16: bool,
    compile_models: bool,
) -> Callable[[], None]:
    """One training step of `model` on `ids`, taken once untimed; compiled first with --compile (one compile per
    model and shape, its time reported, not hidden)."""
    if compile_models:
        model = torch.compile(model)
        start = time.perf_counter()
        training_step(model, ids, device, bf16)
        synchronize(device)
        record("train", f"{name} {ids.shape[0]}x{ids.shape[1]} compile s", round(time.perf_counter() - start, 1))
    step = partial(training_step, model, ids, device, bf16)
    step()
    return step


def time_in_rounds(
    steps: dict[str, Callable[[], object]], device: torch.device, rounds: int
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Wall times (ms) of each step, taken in turn `rounds` times (A B C, A B C, ...); a step that raises is dropped
    from later rounds and its failure returned as text (an exception kept would keep the failed step's tensors)."""
    times = {name: [] for name in steps}
    failures = {}
    for _ in range(rounds):
        for name, step in steps.items():
            if name in failures:
                continue
            try:
                times[name].append(time_ms(step, device, repeats=1, warmups=0))
            except Exception as error:
                failures[name] = failure(error)
    return times, failures


# variants of a model that differ only in how they train: their decoding step is the same computation
TRAINING_VARIANTS = {"pmg-triton", "pmg-fused-ce"}


def generating_models(models: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The models whose decoding is measured, in eval mode: those that generate, one per decoding computation."""
    chosen = {name: model for name, model in models.items() if hasattr(model, "generate")}
    return {name: model.eval() for name, model in chosen.items() if name not in TRAINING_VARIANTS}


def greedy_generate(model: nn.Module, ids: torch.Tensor, new_tokens: int, **options) -> None:
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        **options,
    )


def time_generation(
    record: Recorder, models: dict[str, nn.Module], device: torch.device, settings: Settings, compile_models: bool
) -> None:
    """New tokens/s and decoding-step latency. As in training, the models take turns, round after round: a decoding
    step at batch 1 waits on the host, whose speed drifts (the H100 run of 2026-11-27 read 13.9 and 7.5 ms for PMG's
    fused step after 512 and after 32768 tokens, the same work, measured minutes apart)."""
    chosen = generating_models(models)
    time_new_tokens(record, chosen, device, settings, compiled=False)
    if compile_models:
        time_new_tokens(record, chosen, device, settings, compiled=True)
    time_decoding_latency(record, chosen, device, settings)


@torch.no_grad()
def time_new_tokens(
    record: Recorder, models: dict[str, nn.Module], device: torch.device, settings: Settings, compiled: bool
) -> None:
    """New tokens/s of greedy generation; `compiled`: with a static cache, whose decoding step `generate` compiles
    (with CUDA graphs on a GPU) in the first generation of each shape, whose time is reported."""
    options, variant = {}, ""
    if compiled:
        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # transformers compiles on accelerators only unless told so
        options, variant = dict(cache_implementation="static", compile_config=compile_config), " compiled"
    for batch, prompt, new in settings.generation:
        ids = torch.randint(0, settings.vocab_size, (batch, prompt), device=device)
        row = f"batch {batch}, {prompt}+{new}{', static cache, compiled' if compiled else ''}: new tokens/s"
        generations = {}
        for name, model in models.items():
            details = dict(model=name + variant, batch=batch)
            # warm-up: a short generation eagerly (a second full one costs minutes); the same length when compiled,
            # since a static cache of another size recompiles
            start = time.perf_counter()
            try:
                greedy_generate(model, ids, new if compiled else min(new, 8), **options)
                synchronize(device)
            except Exception as error:
                record("generate", f"{name} {row}", failure(error), **details)
                continue
            if compiled:
                record(
                    "generate", f"{name} batch {batch} static cache: compile s", round(time.perf_counter() - start, 1)
                )
            generations[name] = partial(greedy_generate, model, ids, new, **options)
        times, failures = time_in_rounds(generations, device, settings.generation_repeats)
        for name in generations:
            tokens_per_second = failures.get(name) or round(batch * new / statistics.median(times[name]) * 1e3)
            record("generate", f"{name} {row}", tokens_per_second, model=name + variant, batch=batch)


def decoding_step(model: nn.Module, context: int, device: torch.device, settings: Settings) -> Callable[[], object]:
    """One decoding step at batch 1 after a prompt of `context` tokens, as a call that can be repeated: each call
    appends one token to the cache, so the context grows by a handful of tokens at most."""
    ids = torch.randint(0, settings.vocab_size, (1, context), device=device)
    output = model(ids, use_cache=True)
    next_token = output.logits[:, -1:].argmax(-1)
    # PMG names its cache argument and output `cache`; transformers models still use past_key_values
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return partial(model, next_token, use_cache=True, **{cache_name: getattr(output, cache_name)})


# decoding steps timed per model and context, one per round: a step takes milliseconds
LATENCY_ROUNDS_PER_REPEAT = 5


@torch.no_grad()
def time_decoding_latency(
    record: Recorder, models: dict[str, nn.Module], device: torch.device, settings: Settings
) -> None:
    """The latency of one decoding step after growing contexts (median of the rounds)."""
    for context in settings.contexts:
        row = f"one decoding step after {context} tokens ms"
        steps = {}
        for name, model in models.items():
            try:
                steps[name] = decoding_step(model, context, device, settings)
                steps[name]()  # warm-up
            except Exception as error:
                steps.pop(name, None)
                record("latency", f"{name} {row}", failure(error), model=name, context=context)
        times, failures = time_in_rounds(steps, device, settings.repeats * LATENCY_ROUNDS_PER_REPEAT)
        for name in steps:
            latency = failures.get(name) or round(statistics.median(times[name]), 3)
            record("latency", f"{name} {row}", latency, model=name, context=context)


PROFILED_STEPS = 5
# CUDA runtime and driver calls that start a kernel (PyTorch's own, Triton's) or make the host wait for the device
# (`.item()`, `.tolist()`, a copy to the host; the benchmark's own cudaDeviceSynchronize after the steps is not one)
KERNEL_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
DEVICE_SYNCS = ("cudaStreamSynchronize", "cudaEventSynchronize")


def profiled(step: Callable[[], object], device: torch.device, steps: int) -> profile:
    """The profiler's record of `steps` calls of `step`, after one untimed call (cache allocation, kernel compilation
    and autotuning are first-call work, not part of a step)."""
    step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        synchronize(device)
    return profiler


@torch.no_grad()
def profile_decoding(
    record: Recorder, models: dict[str, nn.Module], device: torch.device, settings: Settings, output_dir: Path
) -> None:
    """Operator calls, kernel launches, device syncs and kernel time of a decoding step, averaged over a few steps;
    and, without the profiler, the step's host time against its time to the device's finish."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, model in generating_models(models).items():
        step = decoding_step(model, settings.contexts[0], device, settings)
        host, synchronized = host_and_synchronized_ms(step, device, repeats=10)
        record("profile", f"{name} host ms per decoding step", round(host, 3), model=name)
        record("profile", f"{name} synchronized ms per decoding step", round(synchronized, 3), model=name)
        profiler = profiled(step, device, PROFILED_STEPS)
        events = profiler.events()
        per_step = {
            "operator calls": sum(event.cpu_parent is None and event.name.startswith("aten::") for event in events)
        }
        if device.type == "cuda":
            per_step["kernel launches"] = sum(event.name in KERNEL_LAUNCHES for event in events)
            per_step["device syncs"] = sum(event.name in DEVICE_SYNCS for event in events)
            device_events = [event for event in events if event.device_type == DeviceType.CUDA]
            per_step["kernel time ms"] = sum(event.time_range.elapsed_us() for event in device_events) / 1e3
        for what, total in per_step.items():
            record("profile", f"{name} {what} per decoding step", round(total / PROFILED_STEPS, 3), model=name)
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        (output_dir / f"decoding-profile-{name}.txt").write_text(
            f"{PROFILED_STEPS} decoding steps of {name}\n{table}\n"
        )


PROFILED_TRAINING_STEPS = 2
# what a training step's time goes to, by the operator that ran (on a GPU, that launched) the work; the first match
# names the category, and the rest of the step (elementwise work, norms, the loss, kernels launched outside any
# operator, such as fla's) is "other"
TIME_CATEGORIES = (
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm", "aten::mv")),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")),
    ("PMG Triton scan", ("triton_scan",)),
    ("PMG Triton conv", ("short_conv",)),
    ("copies and casts", ("aten::copy_", "aten::_to_copy", "aten::cat", "aten::clone")),
)


def profile_training(
    record: Recorder,
    models: dict[str, nn.Module],
    device: torch.device,
    settings: Settings,
    output_dir: Path,
    bf16: bool,
) -> None:
    """Where the time of one eager training step goes (also in a --compile run), at the run's longest length: the
    share of matrix products, attention, the PMG scan kernels and copies, and on a GPU the kernels launched and their
    total time, and the step's host time against its time to the device's finish (measured without the profiler: a
    host-bound step has the two close and its kernels' time well below them); the profiler's table of each model goes
    to training-profile-MODEL.txt."""
    output_dir.mkdir(parents=True, exist_ok=True)
    length = max(settings.lengths)
    batch = max(1, settings.tokens_per_batch // length)
    for name, model in models.items():
        ids = torch.randint(0, settings.vocab_size, (batch, length), device=device)
        step = partial(training_step, model.train(), ids, device, bf16)
        host, synchronized = host_and_synchronized_ms(step, device, repeats=3)
        for what, milliseconds in (("host", host), ("synchronized", synchronized)):
            record(
                "train profile",
                f"{name} {batch}x{length} {what} ms per step",
                round(milliseconds, 2),
                model=name,
                shape=f"{batch}x{length}",
            )
        profiler = profiled(step, device, PROFILED_TRAINING_STEPS)
        averages = profiler.key_averages()
        self_time = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        if device.type == "cuda":  # every kernel counts, also those no operator launched
            kernels = [event for event in profiler.events() if event.device_type == DeviceType.CUDA]
            total = sum(event.time_range.elapsed_us() for event in kernels)
            launches = sum(event.name in KERNEL_LAUNCHES for event in profiler.events())
            per_step = {"kernel launches": launches, "kernel time ms": total / 1e3}
        else:
            total = sum(getattr(event, self_time) for event in averages)
            per_step = {"time under the profiler ms": total / 1e3}
        shape = dict(model=name, shape=f"{batch}x{length}")
        for what, value in per_step.items():
            record(
                "train profile",
                f"{name} {batch}x{length} {what} per step",
                round(value / PROFILED_TRAINING_STEPS, 2),
                **shape,
            )
        if total <= 0:  # no kernel was recorded (a profiler without CUPTI): no shares to report
            continue
        shares = dict.fromkeys([category for category, _ in TIME_CATEGORIES], 0.0)
        for event in averages:  # operators only: kernels have rows of their own, whose names may match a key
            if event.device_type != DeviceType.CPU:
                continue
            category = next((c for c, keys in TIME_CATEGORIES if any(key in event.key for key in keys)), None)
            if category is not None:
                shares[category] += getattr(event, self_time)
        shares["other"] = total - sum(shares.values())
        for category, time_us in shares.items():
            share = round(100 * time_us / total, 1)
            record("train profile", f"{name} {batch}x{length} {category} %", share, category=category, **shape)
        table = averages.table(sort_by=self_time, row_limit=40)
        (output_dir / f"training-profile-{name}.txt").write_text(
            f"{PROFILED_TRAINING_STEPS} training steps of {name} at {batch}x{length}\n{table}\n"
        )


# the report's summary tables: section, the row detail that makes the columns, and the title
SUMMARY_TABLES = (
    ("train", "shape", "Training tokens/s (batch x length)"),
    (
        "train speed-up",
        "shape",
        "Training speed-up: a baseline's step time over PMG's, median of rounds (batch x length)",
    ),
    ("train memory", "shape", "Peak memory of a training step beyond the resident weights, GiB"),
    ("generate", "batch", "Generation, new tokens/s (batch size)"),
    ("latency", "context", "One decoding step, ms (context length)"),
    ("train profile", "category", "Where a training step's time goes, % (the longest length)"),
)


def summary_table(rows: list[dict], section: str, column: str, title: str) -> list[str]:
    """The rows of one section as a markdown table: a line per model, a column per shape, batch or context."""
    measured = [row for row in rows if row["section"] == section and column in row]
    if not measured:
        return []
    columns = list(dict.fromkeys(row[column] for row in measured))
    models = list(dict.fromkeys(row["model"] for row in measured))
    cells = {(row["model"], row[column]): row["value"] for row in measured}
    lines = [f"## {title}\n", f"| model | {' | '.join(map(str, columns))} |", "| --- |" + " --- |" * len(columns)]
    lines += [f"| {model} | {' | '.join(str(cells.get((model, key), '')) for key in columns)} |" for model in models]
    return [*lines, ""]


def write_report(rows: list[dict], output_dir: Path, header: dict) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps({**header, "results": rows}, indent=2))
    lines = [
        f"# PMG benchmark\n\n{header['device']}; {header['versions']}; training in {header['training precision']}; "
        f"{header['date']}\n",
    ]
    for table in SUMMARY_TABLES:
        lines += summary_table(rows, *table)
    lines += ["## Every measurement\n", "| section | measurement | value |", "| --- | --- | --- |"]
    lines += [f"| {row['section']} | {row['name']} | {row['value']} |" for row in rows]
    (output_dir / "results.md").write_text("\n".join(lines) + "\n")
    figure = Figure(figsize=(16, 4.5))
    panels = (
        ("train", "length", "training throughput", "sequence length", "tokens/s"),
        ("train memory", "length", "peak training-step memory", "sequence length", "GiB"),
        ("latency", "context", "decoding step latency", "context length (tokens)", "ms"),
    )
    colours = {model: f"C{index}" for index, model in enumerate(dict.fromkeys(row.get("model") for row in rows))}
    for axes, (section, x_key, title, x_label, y_label) in zip(figure.subplots(1, 3), panels, strict=True):
        plotted = [row for row in rows if row["section"] == section and x_key in row]  # not the compile times
        for model in dict.fromkeys(row["model"] for row in plotted):
            points = [
                (row[x_key], row["value"])
                for row in plotted
                if row["model"] == model and isinstance(row["value"], (int, float))
            ]
            if points:
                axes.plot(*zip(*points, strict=True), marker="o", label=model, color=colours[model])
        axes.set_xscale("log", base=2)
        axes.set(title=title, xlabel=x_label, ylabel=y_label)
        if axes.lines:  # a report written before the timed sections has nothing to label yet
            axes.legend()
    figure.tight_layout()
    figure.savefig(output_dir / "results.png", dpi=100)


# environment variables that choose or tune the host allocator: glibc's thresholds, jemalloc, tcmalloc
ALLOCATOR_SETTINGS = (
    "LD_PRELOAD",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_CONF",
    "TCMALLOC_RELEASE_RATE",
)


def host_allocator() -> str:
    """The allocator settings that move CPU timings: glibc's thresholds decide whether every step maps (and faults in)
    fresh pages for its large tensors, which cost PMG up to a third of its CPU speed on the 2-core test machine."""
    settings = [f"{name}={os.environ[name]}" for name in ALLOCATOR_SETTINGS if name in os.environ]
    return ", ".join(settings) or "system default"


def cpu_name() -> str:
    """The processor's model name where Linux reports it, else the architecture: the 2-core test machines differ
    between sessions (fp32 matrix products of these shapes ran at ~300 GFLOP/s on one, ~95 on an AMD EPYC)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the CPU sizes (minutes on 2 cores)")
    parser.add_argument("--output_dir", default="benchmark")
    parser.add_argument(
        "--sections", default="parity,op,train,generate,profile,train-profile", help="comma-separated subset"
    )
    parser.add_argument("--hidden_size", type=int, help="override the model width")
    parser.add_argument("--num_layers", type=int, help="override the model depth")
    parser.add_argument(
        "--lengths", help="override the training sequence lengths, comma-separated (tokens per batch stay)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes everywhere: checks that the script runs")
    parser.add_argument(
        "--precision",
        choices=["bf16", "fp32"],
        help="training precision: bf16 autocast (the default on CUDA; on CPUs with AMX it speeds up matrix products "
        "too) or fp32 (the default on CPU)",
    )
    parser.add_argument("--repeats", type=int, help="override the number of timed repeats")
    parser.add_argument("--models", help="train and generate with only these models, comma-separated (default: all)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="train under torch.compile, and also generate with a static cache that generate compiles (compile "
        "times reported)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    settings = CPU if args.quick or device.type == "cpu" else GPU
    overrides = {}
    if args.smoke:  # everything tiny: a check that the script runs end to end, not a measurement
        overrides = dict(
            hidden_size=32,
            num_layers=2,
            lengths=[16, 32],
            tokens_per_batch=32,
            contexts=[16, 32],
            scan_shape=(2, 32, 64),
            generation=[(1, 8, 4), (4, 8, 4)],
            repeats=1,
            generation_repeats=1,
        )
    if args.lengths:
        lengths = [int(length) for length in args.lengths.split(",")]
        tokens_per_batch = max(*lengths, overrides.get("tokens_per_batch", settings.tokens_per_batch))
        overrides.update(lengths=lengths, tokens_per_batch=tokens_per_batch)
    given = dict(hidden_size=args.hidden_size, num_layers=args.num_layers, repeats=args.repeats)
    overrides.update({key: value for key, value in given.items() if value is not None})
    settings = Settings(**{**vars(settings), **overrides})
    header = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU {cpu_name()} ({torch.get_num_threads()} threads)",
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
        "training precision": args.precision,
        "host allocator": host_allocator(),
        "date": time.strftime("%Y-%m-%d"),
        "settings": vars(settings),
    }
    print(json.dumps(header), flush=True)
    torch.manual_seed(0)
    record = Recorder()
    output_dir = Path(args.output_dir)
    sections = set(args.sections.split(","))
    # the report is rewritten after every section, so a run cut short keeps what it measured
    if "parity" in sections:
        check_parity(record, device, length=min(256, max(settings.lengths)) if device.type == "cpu" else 4096)
        write_report(record.rows, output_dir, header)
    if "op" in sections:
        op_timings = [time_launch_overhead, time_ops]
        if "triton" in scan_backends(device):
            op_timings += [time_scan_segments, time_scan_prefetch]
        op_timings += [time_layer_ops, time_loss_ops]
        for time_op in op_timings:  # the longest section: a report after each measurement
            time_op(record, device, settings)
            write_report(record.rows, output_dir, header)
    if sections & {"train", "generate", "profile", "train-profile"}:
        factories = model_factories(record, settings, device)
        if args.models:
            wanted = args.models.split(",")
            if missing := sorted(set(wanted) - factories.keys()):
                parser.error(f"--models: {missing} unknown or unavailable here; this run has {sorted(factories)}")
            factories = {name: factories[name] for name in wanted}
        models = build_models(record, factories, device)
        if "train" in sections:
            time_training(record, models, device, settings, args.compile, args.precision == "bf16")
            write_report(record.rows, output_dir, header)
        if "generate" in sections:
            time_generation(record, models, device, settings, args.compile)
            write_report(record.rows, output_dir, header)
        if "profile" in sections:
            profile_decoding(record, models, device, settings, output_dir)
            write_report(record.rows, output_dir, header)
        if "train-profile" in sections:
            profile_training(record, models, device, settings, output_dir, args.precision == "bf16")
    write_report(record.rows, output_dir, header)


if __name__ == "__main__":
    main()
