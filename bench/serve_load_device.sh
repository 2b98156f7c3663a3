#!/usr/bin/env bash
# bench/serve_load.py on a CUDA machine without internet (the device tool's H200), from the
# repository root:   bench/serve_load_device.sh [bench/serve_load.py arguments]
# Needs the wheels the image lacks: .whl/ (the fixture's transformers, as for
# bench/gpu_decode_device.sh) and .whl-serve/ (starlette, uvicorn, pydantic and their
# dependencies, fastapi for the api.py stand-in), all for Python 3.12.
# Writes under $OUT (default /tmp/serve-load): bench.log and the results.
set -uo pipefail
OUT=${OUT:-/tmp/serve-load}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl .whl-serve/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import sys, torch, transformers, starlette, uvicorn; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'starlette', starlette.__version__, 'uvicorn', uvicorn.__version__, 'cpus', __import__('os').cpu_count())"
timeout ${BENCH_TIMEOUT:-500} python3 bench/serve_load.py --device cuda --variant fp16 --threads 0 --out "$OUT" \
  --results-name serve_load_gpu "$@" 2>&1 | tee "$OUT/bench.log"
