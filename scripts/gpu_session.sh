#!/usr/bin/env bash
# Every GPU measurement of issue 5 in one run, for a borrowed GPU with little time on it: the CUDA tests of the
# kernels, then the training benchmark at 8 x 2048 eager and under torch.compile. Each part has its own time limit and
# the log is written as it goes, so a run cut short keeps what it measured.
#
#   bash scripts/gpu_session.sh [output_dir]     (default: $OUT, else gpu-results)
#
# A machine without registry access gets the versions this package pins from wheels carried in .whl/ (ignored by
# git), e.g. `pip download --no-deps -d .whl transformers==5.24.0 huggingface_hub fla-core flash-linear-attention`.
set -u
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out"
exec > >(tee -a "$out/session.log") 2>&1

if compgen -G ".whl/*.whl" > /dev/null; then
    pip install -q --no-deps --no-build-isolation --target /tmp/pmg-site .whl/*.whl . || exit 1
    export PYTHONPATH=/tmp/pmg-site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'triton', triton.__version__)"
date -u

echo "== CUDA tests (kernels, scan, generation, fused loss)"
timeout 240 python -m pytest -q tests/test_triton_scan.py tests/test_scan.py tests/test_generation.py \
    tests/test_linear_cross_entropy.py
models=pmg-triton,pmg-fused-ce,llama
python -c "import fla.models" 2> /dev/null && models+=,fla-hgrn
echo "== eager training, 8 x 2048: $models"
timeout 120 python scripts/benchmark.py --device cuda --sections train --lengths 2048 --models "$models" \
    --output_dir "$out/eager-train"
echo "== compiled training, 8 x 2048 (compile times reported)"
timeout 330 python scripts/benchmark.py --device cuda --sections train --compile --lengths 2048 \
    --models pmg-triton,pmg,llama --output_dir "$out/compiled-train"
date -u
