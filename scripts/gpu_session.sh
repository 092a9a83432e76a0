#!/usr/bin/env bash
# Every GPU measurement of issue 5 in one run, for a borrowed GPU with little time on it: the CUDA tests of the
# kernels, the op timings and the training benchmark (and a profile of its steps) at 8 x 2048, generation and a
# decoding-step profile, and training under torch.compile.
# Each part has its own time limit and the log is written as it goes, so a run cut short keeps what it measured.
#
#   bash scripts/gpu_session.sh [part ...]     parts: tests train generate compiled compiled-generate
#                                              (default: the first four, in that order; 14 minutes at most)
#
# The device tool allows 10 minutes per command and a session about 15 minutes of device time in all, the machine's
# start included: run `tests train generate` (9 minutes at most; the issue's training targets come second, so a cut
# leaves them measured), then `compiled` if time is left.
#
# Results go to $OUT (the device tool's output folder), else to gpu-results/. A machine without registry access gets
# the versions this package pins from wheels carried in .whl/ (ignored by git), e.g.
# `pip download --no-deps -d .whl transformers==5.24.0 huggingface_hub fla-core flash-linear-attention`.
set -u
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests train generate compiled)
for part in "${parts[@]}"; do
    case $part in
        tests | train | compiled | generate | compiled-generate) ;;
        *) echo "unknown part '$part': choose from tests, train, compiled, generate, compiled-generate" >&2 && exit 2 ;;
    esac
done
out=${OUT:-gpu-results}
mkdir -p "$out"
exec > >(tee -a "$out/session.log") 2>&1

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # this checkout's pmg, installed or not
if compgen -G ".whl/*.whl" > /dev/null; then
    pip install -q --no-deps --target /tmp/pmg-wheels .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/pmg-wheels:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'triton', triton.__version__)"
date -u

baselines=llama
python -c "import fla.models" 2> /dev/null && baselines+=,fla-hgrn

tests() {  # the kernels and everything that dispatches to them, compiled for this GPU
    timeout 180 python -m pytest -q tests/test_triton_scan.py tests/test_triton_decoding.py tests/test_triton_conv.py \
        tests/test_scan.py tests/test_generation.py tests/test_linear_cross_entropy.py
}
train() {  # with the op section: the scan, the short convolution and x * silu(gate), PyTorch against Triton
    timeout 180 python scripts/benchmark.py --device cuda --sections op,train,train-profile --lengths 2048 \
        --models "pmg-triton,pmg-fused-ce,$baselines" --output_dir "$out/eager-train"
}
compiled() {  # compile times are reported in the results
    timeout 300 python scripts/benchmark.py --device cuda --sections train --compile --lengths 2048 \
        --models pmg-triton,pmg,llama --output_dir "$out/compiled-train"
}
generate() {  # and the profile of a decoding step: kernel launches, syncs, kernel time against the step's latency;
    # pmg decodes with the fused step kernel, pmg-chunked op by op
    timeout 180 python scripts/benchmark.py --device cuda --sections generate,profile \
        --models "pmg,pmg-chunked,$baselines" \
        --output_dir "$out/generate"
}
compiled-generate() {  # PMG with a static cache, whose decoding step generate compiles with CUDA graphs
    timeout 180 python scripts/benchmark.py --device cuda --sections generate --compile --models pmg \
        --output_dir "$out/compiled-generate"
}

for part in "${parts[@]}"; do
    echo "== $part"
    "$part"
done
date -u
