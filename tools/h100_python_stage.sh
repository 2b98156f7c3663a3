#!/usr/bin/env bash
# The Python stage on a real GPU machine whose system Python 3.12 has its own CUDA torch,
# through pyinfra's @local connector, with no internet: a venv that reuses the system
# site-packages and the lock data/requirements/chatglm-py312-system-torch.txt installed
# from a local PEP 503 index in .pyidx312/ (python -m lab.pyindex index --wheels DIR
# --index .pyidx312), control-side wheels for that Python in .whl/.
set -uo pipefail
SITE=${CHATGLM_SITE:-/tmp/site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" .whl/*.whl || exit 1
# pyinfra gets $SITE on sys.path, not through PYTHONPATH, which the commands it runs
# on @local would inherit (and the venv's python with them).
pyinfra() { python3 -c "import sys; sys.path.insert(0, \"$SITE\"); sys.argv[0] = \"pyinfra\"
from pyinfra_cli.main import main; sys.exit(main())" "$@"; }
DIR=${CHATGLM_PY_DIR:-/tmp/chatglm-py312}
DATA=(--data stages=python --data python_backend=venv --data venv_system_site_packages=True
      --data requirements=chatglm-py312-system-torch --data "install_dir=$DIR"
      --data "pip_index_url=file://$PWD/.pyidx312/simple/")
IMPORTS='import sys, torch, transformers, tokenizers, cpm_kernels; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.__file__, transformers.__version__, tokenizers.__version__, cpm_kernels.__file__)'

echo "== host"; grep PRETTY /etc/os-release
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c 'import sys, torch; print(sys.executable, sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
echo "== dry run"; pyinfra @local deploy.py --dry "${DATA[@]}" 2>&1 | tail -14
echo "== deploy"; pyinfra -y -v @local deploy.py "${DATA[@]}" 2>&1 | grep -v "^ *\(Collecting\|Downloading\|Using cached\|Processing\)" | tail -40
echo "== rerun (no changes)"; pyinfra -y @local deploy.py "${DATA[@]}" 2>&1 | tail -12
echo "== the venv"; cat "$DIR/venv/pyvenv.cfg"; "$DIR/venv/bin/python" -W ignore -c "$IMPORTS"
echo "== a lock for Python 3.11 on this Python 3.12 host (must fail with the fix)"
pyinfra -y @local deploy.py --data stages=python --data python_backend=venv \
  --data "install_dir=$DIR-cpu" 2>&1 | grep -E "ERROR|Fix" | head -3
