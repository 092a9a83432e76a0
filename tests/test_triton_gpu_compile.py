"""Every Triton kernel of pmg compiles to GPU code (an sm_90 cubin, as for an H100 or H200), without a GPU.

The interpreter that runs the kernels in the other tests executes Python semantics and accepts code that the
compiler refuses: this compiles each kernel, with and without its optional inputs, with Triton's own NVIDIA backend.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia.compiler", reason="this Triton has no NVIDIA backend")

SCRIPT = Path(__file__).with_name("compile_triton_kernels.py")


def test_every_kernel_compiles_for_sm_90():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(results) == 20 and all(results.values()), results
