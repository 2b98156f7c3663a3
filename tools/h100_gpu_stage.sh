#!/usr/bin/env bash
# The GPU stage and the library check on a real GPU machine with no internet, through
# pyinfra's @local connector: run from the repo root with the control-side wheels for
# its Python in .whl/ (see README, "Real GPU runs").
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
printf '#!/bin/sh\nPYTHONPATH=/tmp/site exec python3 "$@"\n' > /tmp/py-with-site && chmod +x /tmp/py-with-site
pyinfra() { python3 -m pyinfra "$@"; }
DATA=(--data stages=gpu,cuda_libs --data cudnn=none --data python=/tmp/py-with-site)
LOOKUP='import importlib.util as u, os, json; s = u.find_spec("cpm_kernels"); b = os.path.join(s.submodule_search_locations[0], "library", "base.py"); m = u.module_from_spec(u.spec_from_file_location("b", b)); m.__spec__.loader.exec_module(m); print(json.dumps({n: m.unix_find_lib(n) for n in ("cuda", "cudart", "cublasLt", "nvrtc")}))'

echo "== host"; grep PRETTY /etc/os-release; uname -r
nvidia-smi --query-gpu=name,memory.total,compute_cap,driver_version --format=csv
cat /proc/driver/nvidia/version 2>&1 | head -1
ls -la /usr/local/ | grep -i cuda; ls -la /usr/local/cuda/lib64/ | grep -E "libcuda|libcudart.so|libcublasLt.so|libnvrtc.so" 
ldconfig -p | grep -E "libcuda\.so|libcudart\.so |libcublasLt\.so |libnvrtc\.so "
echo "== cpm_kernels lookup before"; python3 -c "$LOOKUP"
echo "== dry run"; pyinfra @local deploy.py --dry --diff "${DATA[@]}" 2>&1 | tail -30
echo "== deploy"; pyinfra -y -v @local deploy.py "${DATA[@]}" 2>&1 | tail -45
echo "== rerun"; pyinfra -y @local deploy.py "${DATA[@]}" 2>&1 | grep -A30 "Results:"
echo "== cpm_kernels lookup after"; python3 -c "$LOOKUP"
ls -la /usr/local/cuda/lib64/libcuda.so
