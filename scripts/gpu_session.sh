#!/usr/bin/env bash
# Every GPU measurement of issue 5 in one run, for a borrowed GPU with little time on it: the training benchmark (and
# a profile of its steps) at 8 x 2048, the CUDA tests of the kernels, the op timings, training at 1 x 16384,
# generation and a decoding-step profile, and training under torch.compile.
# Each part has its own time limit and the log is written as it goes, so a run cut short keeps what it measured.
#
#   bash scripts/gpu_session.sh [part ...]     parts: train tests ops long generate compiled compiled-generate
#                                              (default: the first five, in that order)
#
# The device tool allows 10 minutes per command and a session about 15 minutes of device time in all, the machine's
# start included. On an H100 (2026-11-27): training three models (four now) with the profile 60 s, tests 100 s,
# generate 120 s; the op section with the training models' setup ran past 180 s. The parts' limits add up to more than 10 minutes:
# every part also stops at a deadline, GPU_SESSION_SECONDS (default 560) after the start, so that the script itself,
# not the device tool's 600 s, cuts the last part and still packs the reports. Give the command the device's 600 s.
# Run the default (the training targets first), then `compiled` if time is left.
#
# The log goes to $OUT/session.log (the device tool's output folder; else gpu-results/), and every part's reports
# (results.json / .md / .png, profiles) to $OUT/results.tar.gz, packed again after each part: the device tool brings
# back at most 8 files.
#
# A machine without registry access gets the versions this package pins from wheels carried in .whl/ (ignored by
# git), e.g.
# `pip download --no-deps -d .whl transformers==5.24.0 fla-core flash-linear-attention` (not huggingface_hub: its
# current release needs httpx2, which the device lacks, and the device's 1.33 does for transformers 5.24).
set -u
deadline=$((SECONDS + ${GPU_SESSION_SECONDS:-560}))
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(train tests ops long generate)
for part in "${parts[@]}"; do
    case $part in
        train | tests | ops | long | generate | compiled | compiled-generate) ;;
        *) echo "unknown part '$part': see the comment at the top of $0" >&2 && exit 2 ;;
    esac
done
out=${OUT:-gpu-results}
reports=$(mktemp -d)
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

limited() {  # `timeout` with the part's own limit ($1) or the session's deadline, whichever comes first
    local left=$((deadline - SECONDS))
    [ "$left" -lt 15 ] && echo "skipped: the session's deadline is ${left} s away" && return 124
    timeout $(($1 < left ? $1 : left)) "${@:2}"
}

baselines=llama
python -c "import fla.models" 2> /dev/null && baselines+=,fla-hgrn

tests() {  # the kernels and everything that dispatches to them, compiled for this GPU
    limited 180 python -m pytest -q tests/test_triton_scan.py tests/test_triton_decoding.py tests/test_triton_conv.py \
        tests/test_triton_cross_entropy.py tests/test_scan.py tests/test_generation.py tests/test_linear_cross_entropy.py \
        tests/test_modeling.py::test_a_cuda_training_step_never_waits_on_the_device
}
train() {  # and where a step's time goes (training-profile-*.txt)
    limited 150 python scripts/benchmark.py --device cuda --sections train,train-profile --lengths 2048 \
        --models "pmg-triton,pmg-fused-ce,$baselines" --output_dir "$reports/train"
}
ops() {  # the scan against fla's chunk_hgrn and a copy; the short convolution, PyTorch against Triton tile shapes
    limited 150 python scripts/benchmark.py --device cuda --sections op --output_dir "$reports/ops"
}
long() {  # the 16384-token target
    limited 120 python scripts/benchmark.py --device cuda --sections train --lengths 16384 \
        --models "pmg-triton,$baselines" --output_dir "$reports/long"
}
compiled() {  # compile times are reported in the results
    limited 300 python scripts/benchmark.py --device cuda --sections train --compile --lengths 2048 \
        --models pmg-triton,pmg,llama --output_dir "$reports/compiled-train"
}
generate() {  # and the profile of a decoding step: kernel launches, syncs, kernel time against the step's latency;
    # pmg decodes with the fused step kernel, pmg-chunked op by op
    limited 180 python scripts/benchmark.py --device cuda --sections generate,profile \
        --models "pmg,pmg-chunked,$baselines" \
        --output_dir "$reports/generate"
}
compiled-generate() {  # PMG with a static cache, whose decoding step generate compiles with CUDA graphs
    limited 180 python scripts/benchmark.py --device cuda --sections generate --compile --models pmg \
        --output_dir "$reports/compiled-generate"
}

for part in "${parts[@]}"; do
    echo "== $part"
    "$part"
    tar czf "$out/results.tar.gz" -C "$reports" .
done
date -u
