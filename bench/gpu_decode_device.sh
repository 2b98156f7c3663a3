#!/usr/bin/env bash
# The GPU run of issue 19 on a CUDA machine without internet (the device tool's H200), from the
# repository root:   bench/gpu_decode_device.sh [tests|bench|all] [bench/gpu_decode.py arguments]
# Needs in .whl/ the wheels the image lacks for the fixture's modeling code (Python 3.12):
# transformers 4.40.2, tokenizers 0.19.1, huggingface-hub 0.36.2, cpm-kernels 1.0.11.
# Writes under $OUT (default /tmp/gpu-decode): tests.log, bench.log, gpu_decode.{json,md}.
set -uo pipefail
mode=${1:-all}; shift || true
OUT=${OUT:-/tmp/gpu-decode}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# Triton's cache as the deploy would keep it (bench/gpu_decode.py warms it in a separate process first).
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
python3 -c "import sys, torch, triton, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
# The reference path's int4/int8 kernels, built as the deploy's GPU-kernel stage builds them.
cap=$(python3 -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))")
nvcc -fatbin -O3 -gencode "arch=compute_$cap,code=[sm_$cap,compute_$cap]" data/kernels/quantization_kernels.cu \
  -o /tmp/quantization_kernels.fatbin && export CHATGLM_KERNEL_FATBIN=/tmp/quantization_kernels.fatbin
rc=0
if [ "$mode" = bench ] || [ "$mode" = all ]; then
  timeout ${BENCH_TIMEOUT:-420} python3 bench/gpu_decode.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" || rc=1
fi
if [ "$mode" = tests ] || [ "$mode" = all ]; then
  timeout ${TESTS_TIMEOUT:-240} python3 -m pytest -p no:cacheprovider -q -x tests/test_engine.py -k "cuda or kernel" 2>&1 | tee "$OUT/tests.log" || rc=1
fi
exit $rc
