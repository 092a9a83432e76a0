"""Shared fixtures: tiny PMG configs and an offline Hugging Face environment."""

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pmg import PMGConfig

HYBRID_LAYERS = ["linear_attention", "full_attention", "linear_attention", "sliding_attention"]


def tiny_config(**overrides) -> PMGConfig:
    """A 4-layer, 32-wide PMG config that runs in milliseconds on CPU."""
    settings = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        gate_rank=8,
        chunk_size=8,
        sliding_window=6,
        pad_token_id=0,
    )
    settings.update(overrides)
    return PMGConfig(**settings)


@pytest.fixture(autouse=True)
def fixed_seed():
    torch.manual_seed(0)


@pytest.fixture(params=["pmg", "hybrid"])
def layer_types(request) -> list[str]:
    """Every model-level guarantee is checked on an all-PMG stack and on a PMG/attention hybrid."""
    return ["linear_attention"] * 4 if request.param == "pmg" else HYBRID_LAYERS


# where the Triton kernels run in tests: compiled on a GPU, else on CPU tensors in Triton's interpreter
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# every module of pmg with Triton kernels: a model on CUDA, or with scan_impl="triton", calls them
TRITON_MODULES = ("triton_scan", "triton_decoding", "triton_conv", "triton_cross_entropy")


def import_triton_modules(*names: str) -> list:
    """pmg's Triton modules (`pmg.<name>`) for a test module, or skip it. Without a GPU the kernels run in the
    interpreter, which Triton switches on when a kernel is decorated, so TRITON_INTERPRET=1 is set while all of
    pmg's Triton modules first load (the model imports them when it first calls them)."""
    pytest.importorskip("triton")
    if TRITON_DEVICE == "cpu":
        # Triton 3.6's interpreter loops over runtime bounds with int(array), which current numpy (2.4) refuses
        pytest.importorskip("triton", minversion="3.7")
    with pytest.MonkeyPatch.context() as patch:
        if TRITON_DEVICE == "cpu":
            patch.setenv("TRITON_INTERPRET", "1")
        modules = {name: importlib.import_module(f"pmg.{name}") for name in TRITON_MODULES}
    if TRITON_DEVICE == "cpu" and not importlib.import_module("pmg.triton_scan").INTERPRETED:
        pytest.skip("pmg's Triton kernels were loaded before TRITON_INTERPRET=1 was set", allow_module_level=True)
    return [modules[name] for name in names]


def count_calls(monkeypatch, module, name: str) -> list[int]:
    """Record each call of `module.name` (a 1 per call) while still running it; callers that look the function up
    on the module at each call (pmg imports its optional Triton kernels that way) see the recording one."""
    calls = []
    function = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(1) or function(*args, **kwargs))
    return calls


def operator_calls(namespace: str, function) -> list[str]:
    """The calls of custom operators in `namespace` (backward ones included) that `function()` makes, as the profiler
    records them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        function()
    return [event.name for event in profiler.events() if event.name.startswith(f"{namespace}::")]


def assert_accepts_any_strides(operator, *arguments) -> None:
    """A custom operator gives the same outputs, in the dense layout its fake implementation promises, when every
    tensor argument comes strided (inductor may pass, say, rows padded to an aligned length)."""

    def strided(argument):
        if not isinstance(argument, torch.Tensor) or argument.dim() == 0:
            return argument
        storage = argument.new_zeros(*argument.shape[:-1], 2 * argument.shape[-1])
        storage[..., ::2] = argument
        return storage[..., ::2]

    expected = operator(*arguments)
    actual = operator(*map(strided, arguments))
    for output, reference in zip(actual, expected, strict=True):
        assert output.is_contiguous()
        torch.testing.assert_close(output, reference, rtol=0, atol=0)


def assert_padded_steps_are_absent(layer: torch.nn.Module, device: str = "cpu", tolerance: float = 1e-5) -> None:
    """A PMGLayer (with a short conv) treats padded steps as absent, wherever they are: each row of a padded batch
    (left, inside, right; after a previous state; with resets, one of them on a padded step, which is ignored as the
    step is) gives, at its real steps, the outputs, memory, conv window and parameter gradients of its real steps
    alone."""
    from pmg import PMGState

    hidden = layer.value_proj.in_features
    mask = torch.tensor([[1, 1, 0, 1, 0, 0, 1, 1, 0, 1, 1], [0, 0, 1, 1, 1, 1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    resets = torch.zeros_like(mask)
    resets[0, 4] = resets[1, 5] = True  # the first on a padded step
    x = torch.randn(2, 11, hidden)
    state = PMGState(torch.randn(2, layer.inner_size), torch.randn(2, layer.conv.kernel_size[0] - 1, layer.inner_size))
    x, mask, resets, state = x.to(device), mask.to(device), resets.to(device), PMGState(*(t.to(device) for t in state))
    weights = torch.randn(2, 11, hidden, device=device)

    def run(inputs, state, weights, **kwargs):
        """Outputs, final state and the parameter gradients of a weighted sum of the outputs."""
        outputs, final = layer(inputs, state, **kwargs)
        return outputs, final, torch.autograd.grad(outputs.mul(weights).sum(), list(layer.parameters()))

    close = dict(rtol=tolerance, atol=tolerance)
    for row in range(2):
        real = mask[row]
        alone_weights = weights[row : row + 1, : int(real.sum())]
        alone_state = PMGState(*(t[row : row + 1] for t in state))
        alone, alone_final, alone_grads = run(
            x[row : row + 1, real], alone_state, alone_weights, resets=resets[row : row + 1, real]
        )
        row_weights = torch.zeros_like(weights)  # the padded batch's gradients from this row's real outputs alone
        row_weights[row, real] = alone_weights[0]
        outputs, final, grads = run(x, state, row_weights, attention_mask=mask, resets=resets)
        torch.testing.assert_close(outputs[row : row + 1, real], alone, **close)
        torch.testing.assert_close(final.recurrent[row], alone_final.recurrent[0], **close)
        torch.testing.assert_close(final.conv[row], alone_final.conv[0], **close)
        for got, want in zip(grads, alone_grads, strict=True):
            torch.testing.assert_close(got, want, **close)


def perturbed(model: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    """Add noise to every weight. Fresh PMG models are exact identity maps through their residual branches (zero
    output projections), so checks of caching, padding or packing on them would pass vacuously."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * scale)
    return model


def tiny_model(model_class, **overrides):
    """A perturbed tiny model in eval mode."""
    return perturbed(model_class(tiny_config(**overrides))).eval()


def free_port() -> int:
    """A TCP port nothing listens on, for the rendezvous of multi-process runs (not the shared default 29500)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """scripts/<name>.py imported as a module (the scripts are not part of the package)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def saved_activations(function, *args, min_numel: int) -> list[torch.Tensor]:
    """The distinct tensors of at least `min_numel` elements that autograd keeps for the backward pass of `function`."""
    saved = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.numel() >= min_numel:
            saved.setdefault(tensor.untyped_storage().data_ptr(), tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        function(*args)
    return list(saved.values())


def run_remote_code(script: str, *args: str, workdir: Path) -> str:
    """Run `script` in a fresh offline Python process with its own modules cache and no input, as a user loading a
    checkpoint with trust_remote_code would; fail the test with its stderr if it fails, else return its output."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(Path(workdir) / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        cwd=workdir,
        env=environment,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr
