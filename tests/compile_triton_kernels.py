"""Compile every Triton kernel of pmg for sm_90 (H100 / H200) with Triton's NVIDIA backend, which needs no GPU, and
print {configuration: whether a cubin came out} as JSON. Run by test_triton_gpu_compile.py in a process of its own:
the test process loads the kernels interpreted."""

import json
import os
import warnings

os.environ.pop("TRITON_INTERPRET", None)
warnings.simplefilter("ignore")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pmg import triton_conv, triton_cross_entropy, triton_decoding, triton_scan  # noqa: E402

# pointers in the dtypes a bf16 training run passes: activations bf16, masks bytes, the rest fp32
BF16 = {"z", "v", "states", "grad_states", "grad_z", "grad_v", "output", "window", "new_window", "values"}
BF16 |= {"grad_output", "grad_values", "grad_window", "logits", "grad"}
BYTES = {"mask", "resets"}
TYPES = {**dict.fromkeys(BF16, "*bf16"), **dict.fromkeys(BYTES, "*u8"), "targets": "*i64"}


def pointer_type(name: str) -> str:
    return TYPES.get(name.removesuffix("_ptr"), "*fp32")


def compiles(kernel, **constants) -> bool:
    signature = {
        name: "constexpr" if name in constants else pointer_type(name) if name.endswith("_ptr") else "i32"
        for name in kernel.arg_names
    }
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    return "cubin" in triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm


def main() -> None:
    results = {}
    scan_tiles = dict(BLOCK_T=triton_scan.BLOCK_T, BLOCK_D=triton_scan.BLOCK_D)
    conv_tiles = dict(BLOCK_T=triton_conv.BLOCK_T, BLOCK_D=triton_conv.BLOCK_D)
    for every in (True, False):  # every optional input, or none
        flags = dict(HAS_MASK=every, HAS_RESETS=every)
        for summary in (True, False):  # the segments' summary pass, or the main pass
            # every option with the gate shape as given and prefetching, or none with a layer's stored parameters
            # and no prefetching (as a layer trains by default)
            scan_options = dict(**scan_tiles, **flags, RAW_SHAPE=not every, SUMMARY=summary, PREFETCH=every)
            results[f"scan forward {every} summary {summary}"] = compiles(
                triton_scan._pmg_scan_forward_kernel, **scan_options, HAS_INITIAL=every, OUTPUT_WRITE=every
            )
            results[f"scan backward {every} summary {summary}"] = compiles(
                triton_scan._pmg_scan_backward_kernel, **scan_options, HAS_GRAD_FINAL=every, HAS_GRAD_WRITE=every
            )
        results[f"decoding step {every}"] = compiles(
            triton_decoding._pmg_decoding_step_kernel,
            TAPS=4,
            BLOCK_D=triton_decoding.BLOCK_D,
            HAS_MASK=every,
            HAS_STATE=every,
            HAS_CONV=every,
            HAS_WINDOW=every,
            OUTPUT_WRITE=every,
        )
        for taps in (4, 1):
            options = dict(TAPS=taps, **conv_tiles, **flags, HAS_WINDOW=every)
            results[f"conv forward K={taps} {every}"] = compiles(triton_conv._short_conv_forward_kernel, **options)
            results[f"conv backward K={taps} {every}"] = compiles(
                triton_conv._short_conv_backward_kernel,
                ROW_TILES=triton_conv.ROW_TILES,
                SUM_ROWS=triton.next_power_of_2(taps + 1),
                **options,
            )
    for write_grad in (True, False):
        results[f"cross-entropy {write_grad}"] = compiles(
            triton_cross_entropy._cross_entropy_kernel,
            IGNORE_INDEX=triton_cross_entropy.IGNORE_INDEX,
            BLOCK_V=triton_cross_entropy.BLOCK_V,
            WRITE_GRAD=write_grad,
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
