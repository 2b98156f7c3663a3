#!/usr/bin/env bash
# The whole deploy on a real GPU machine with no internet, through pyinfra's @local
# connector: the lab's stand-ins for every upstream on loopback (fixture models in git
# remotes and a Seafile share, a package index of the carried wheels), then the deploy
# for each variant (fp16, then int4) with its smoke test on the GPU, then one fleet report.
#
#   tools/h100_full_deploy.sh 2>&1 | tee h100-full.log      # as root, from anywhere
#
# Needs on the machine: a supported OS (Ubuntu 24.04 here), the NVIDIA driver and a CUDA
# toolkit already installed (the GPU stage detects and keeps them), git (with git daemon),
# gcc, and a system Python 3.12 holding torch (a CUDA build); in .whl/ the wheels listed
# in docs/h100.md (control side: pyinfra and friends; venv: transformers 4.40.2 and the
# rest of the lock). The venv uses the system Python's torch through the settings of
# issue 4: venv_system_site_packages=true and the lock chatglm-py312-system-torch.
#
# Environment (defaults are the H100 host's):
#   PYTHON=python3          system Python with torch: runs pyinfra, builds the fixtures
#   VENV_PYTHON=$PYTHON     the Python the deploy's venv is made from (setting `python`)
#   REQUIREMENTS=chatglm-py312-system-torch   the lock (setting `requirements`)
#   VARIANTS="fp16 int4"    one deploy run each, in this order
#   WHEELS=.whl             wheels installed into $SITE for the control side
#   INDEX_WHEELS=$WHEELS    wheels the loopback index serves to the venv
#   SITE=/tmp/site
#   INSTALL_DIR=/opt/chatglm
#   STAGES=                 empty: all stages, less `system` unless it has nothing to do
#                           (no internet here: apt can neither update nor install)
#   EXTRA_DATA="k=v ..."    more inventory data (JSON values: smoke_max_new_tokens=64)
#   FIXTURES=               a manifest printed by `python -m lab.fixtures.build` to reuse
#   CHATGLM_LAB_DIR=.lab-local   stand-ins' state and logs; they are stopped at the end
#   CHATGLM_LAB_PORT_OFFSET=0
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
VENV_PYTHON=${VENV_PYTHON:-$(command -v "$PYTHON")}
REQUIREMENTS=${REQUIREMENTS:-chatglm-py312-system-torch}
VARIANTS=${VARIANTS:-fp16 int4}
WHEELS=$(realpath "${WHEELS:-.whl}")
INDEX_WHEELS=$(realpath "${INDEX_WHEELS:-$WHEELS}")
SITE=${SITE:-/tmp/site}
INSTALL_DIR=${INSTALL_DIR:-/opt/chatglm}
STAGES=${STAGES:-}
EXTRA_DATA=${EXTRA_DATA:-}
export CHATGLM_LAB_DIR=${CHATGLM_LAB_DIR:-$ROOT/.lab-local}
LAB=$CHATGLM_LAB_DIR
REPORTS=$ROOT/reports
LOGS=$REPORTS/h100-logs
mkdir -p "$LAB" "$LOGS"

section() { printf '\n== %s\n' "$*"; }
die() { echo "STOP: $*" >&2; exit 2; }

section "host"
grep PRETTY_NAME /etc/os-release; uname -r
nvidia-smi --query-gpu=name,memory.total,compute_cap,driver_version --format=csv 2>&1
nvidia-smi 2>/dev/null | grep -o "CUDA Version: [0-9.]*"
"$PYTHON" - <<'PY'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "numpy", "setuptools", "pip"):
    try:
        mod = importlib.import_module(name)
        extra = f" (CUDA {mod.version.cuda}, available: {mod.cuda.is_available()})" if name == "torch" else ""
        print(f"{name} {mod.__version__}{extra}")
    except Exception as error:
        print(f"{name}: not importable ({error.__class__.__name__}: {error})")
PY
gcc --version 2>&1 | head -1; git --version
[ -x "$(git --exec-path)/git-daemon" ] || die "git daemon is missing ($(git --exec-path)/git-daemon): the git remotes need it"
"$PYTHON" -c "import ensurepip" 2>/dev/null || echo "note: $PYTHON has no ensurepip: 'python -m venv' cannot seed pip (Debian/Ubuntu: python3-venv)"

section "carried wheels: $WHEELS ($(ls "$WHEELS"/*.whl 2>/dev/null | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1)) against tools/h100_wheels.txt"
missing=$(grep -v '^#' tools/h100_wheels.txt | while read -r pin; do
  name=$(echo "${pin%%==*}" | tr 'A-Z.-' 'a-z__'); version=${pin#*==}
  ls "$WHEELS" | tr 'A-Z' 'a-z' | grep -q "^${name}-${version}-" || echo "$pin"
done)
[ -z "$missing" ] || die "wheels missing from $WHEELS: $(echo $missing) (see tools/h100_wheels.txt)"
echo "all $(grep -vc '^#' tools/h100_wheels.txt) listed wheels present"
echo "installing into $SITE"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" "$WHEELS"/*.whl || die "pip could not install the carried wheels"
# $SITE goes on sys.path of the control-side processes only: an exported PYTHONPATH would
# reach the commands pyinfra's @local connector runs, the venv's Python included.
RUNNER=$SITE.run.py
cat > "$RUNNER" <<PY
import os, runpy, sys
sys.path[:0] = ["$SITE", os.getcwd()]
sys.argv = sys.argv[1:]
if sys.argv[0] in ("-", "-c"):  # a script on stdin, or -c CODE
    code = sys.stdin.read() if sys.argv[0] == "-" else sys.argv.pop(1)
    exec(compile(code, "<" + sys.argv[0] + ">", "exec"), {"__name__": "__main__"})
else:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
PY
py() { "$PYTHON" "$RUNNER" "$@"; }
pyinfra() { py pyinfra "$@"; }
pyinfra --version || die "pyinfra does not start from $SITE"

section "lock $REQUIREMENTS against $INDEX_WHEELS"
LOCK=data/requirements/$REQUIREMENTS.txt
[ -f "$LOCK" ] || die "$LOCK is missing: it comes with issue 4 (venv_system_site_packages, lock chatglm-py312-system-torch)"
py - "$LOCK" "$INDEX_WHEELS" <<'PY' || die "the index would not hold every pin of the lock"
import sys
from pathlib import Path
from lab.pyindex import dist_info
from operations.pyplan import normalize, read_lock
lock, wheels = Path(sys.argv[1]), Path(sys.argv[2])
have = {}
for path in wheels.iterdir():
    info = dist_info(path.name)
    if info:
        have.setdefault(normalize(str(info[0])), set()).add(str(info[1]))
pins = read_lock(lock)["pins"]
missing = [f"{n}=={v}" for n, v in sorted(pins.items()) if v not in have.get(n, set())]
print(f"{len(pins)} pins, {len(pins) - len(missing)} served by the index")
if missing:
    print("missing wheels: " + " ".join(missing))
    sys.exit(1)
PY

section "fixture models"
if [ -n "${FIXTURES:-}" ]; then
  cp "$FIXTURES" "$LAB/fixtures.json"
else
  py lab.fixtures.build --out "$LAB/fixtures" > "$LAB/fixtures.json" || die "the fixtures did not build"
fi
py - "$LAB/fixtures.json" <<'PY'
import json, sys
for variant, info in json.load(open(sys.argv[1])).items():
    print(variant, info["dir"], ", ".join(info["weights"]))
PY

section "stand-ins on loopback"
trap 'section "stopping the stand-ins"; py lab.local down' EXIT
DATA=(--data "python=$VENV_PYTHON" --data "requirements=$REQUIREMENTS"
      --data python_backend=venv --data venv_system_site_packages=true --data cudnn=none --data "install_dir=$INSTALL_DIR")
for kv in $EXTRA_DATA; do DATA+=(--data "$kv"); done
py lab.local up --wheels "$INDEX_WHEELS" --fixtures "$LAB/fixtures.json" \
  --inventory "$LAB/inventory.py" "${DATA[@]}" > "$LAB/standins.log" 2>&1
rc=$?; cat "$LAB/standins.log"; [ $rc = 0 ] || die "the stand-ins did not start"
INVENTORY=$(tail -1 "$LAB/standins.log")
cat "$INVENTORY"

if [ -z "$STAGES" ]; then
  # The system stage is kept only where it has nothing to do: no internet for apt here.
  missing=$(py -c "from operations.system import PACKAGES; print(' '.join(PACKAGES))" | xargs -n1 \
    sh -c 'dpkg-query -W -f "\${Status}" "$0" 2>/dev/null | grep -q "install ok installed" || echo "$0"')
  stamp=/var/lib/apt/periodic/update-success-stamp
  if [ -z "$missing" ] && [ -n "$(find "$stamp" -mmin -1380 2>/dev/null)" ]; then
    STAGES=all
  else
    STAGES=gpu,python,cuda_libs,model,kernel,smoke
    echo "stage 'system' left out: missing base packages: $(echo ${missing:-none}); apt lists updated within 23 h: $([ -n "$(find "$stamp" -mmin -1380 2>/dev/null)" ] && echo yes || echo no)"
  fi
  # The serve stage runs the server as a systemd unit: kept only where PID 1 is systemd.
  if [ ! -d /run/systemd/system ]; then
    STAGES=$( [ "$STAGES" = all ] && echo gpu,system,python,cuda_libs,model,kernel,smoke || echo "$STAGES")
    echo "stage 'serve' left out: PID 1 is not systemd here"
  fi
fi
echo "stages: $STAGES"

PARTS=()
for variant in $VARIANTS; do
  RUN=(--data "variant=$variant" --data "stages=$STAGES" --data "report_dir=$REPORTS/h100-$variant")
  section "deploy $variant: dry run"
  pyinfra "$INVENTORY" deploy.py --dry --diff "${RUN[@]}" > "$LOGS/$variant-dry.log" 2>&1
  echo "rc=$?"; sed -n '/Detected changes:/,/Detected changes may not/p' "$LOGS/$variant-dry.log"
  grep -E "SettingError|Error" "$LOGS/$variant-dry.log" | head -5
  section "deploy $variant"
  start=$(date +%s)
  pyinfra -y -v "$INVENTORY" deploy.py "${RUN[@]}" > "$LOGS/$variant-deploy.log" 2>&1
  echo "rc=$? in $(( $(date +%s) - start )) s (log: $LOGS/$variant-deploy.log)"
  grep -E "noop:|ERROR|Error|Fleet report" "$LOGS/$variant-deploy.log" | sed 's/\x1b\[[0-9;]*m//g' | tail -40
  sed -n '/--> Results:/,$p' "$LOGS/$variant-deploy.log"
  section "deploy $variant again: no changes expected where it passed"
  # Twice: the first rerun may read facts the first run never asked for (a file it had
  # to create was not hashed then), the second has them all in its list.
  for pass in 1 2; do
    start=$(date +%s%N)
    pyinfra -y --debug "$INVENTORY" deploy.py "${RUN[@]}" > "$LOGS/$variant-rerun$pass.log" 2>&1
    echo "rerun $pass: rc=$? in $(( ($(date +%s%N) - start) / 1000000 )) ms; shell commands run: $(grep -c 'Running command on' "$LOGS/$variant-rerun$pass.log") (operations/factcache.py: 1 where nothing changed and the list is complete)"
    sed -n '/--> Results:/,/Grand total/p' "$LOGS/$variant-rerun$pass.log" | tail -1
  done
  [ -f "$REPORTS/h100-$variant/fleet.json" ] && PARTS+=("$variant=$REPORTS/h100-$variant")
done

section "what the deploy left"
ls -la /usr/local/cuda/lib64/libcuda.so 2>&1
"$INSTALL_DIR/venv/bin/python" -c "import importlib.util as u, os, json; s = u.find_spec('cpm_kernels'); b = os.path.join(s.submodule_search_locations[0], 'library', 'base.py'); m = u.module_from_spec(u.spec_from_file_location('b', b)); m.__spec__.loader.exec_module(m); print('cpm_kernels lookup:', json.dumps({n: m.unix_find_lib(n) for n in ('cuda', 'cudart', 'cublasLt', 'nvrtc')}))" 2>&1 | tail -1
"$INSTALL_DIR/venv/bin/python" -c "import sys, torch, transformers, tokenizers; print(sys.version.split()[0], 'torch', torch.__version__, torch.__file__, 'cuda', torch.version.cuda, torch.cuda.is_available(), 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__)" 2>&1 | tail -1
ls -la "$INSTALL_DIR"/models/*/quantization_kernels*.so 2>&1
grep -H "chatglm-deploy: prebuilt CPU kernel" "$INSTALL_DIR"/models/*/quantization.py 2>&1
for variant in $VARIANTS; do
  f=$REPORTS/h100-$variant/hosts/@local.json
  [ -f "$f" ] && py - "$f" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
keep = ("variant", "device", "ok", "gpu", "compute_cap", "load_s", "tokens_per_s", "peak_rss_gb",
        "peak_vram_gb", "smi_vram_gb", "smi_vram_source", "versions", "revision_warning", "error")
print(json.dumps({k: r.get(k) for k in keep}, ensure_ascii=False))
PY
done

section "fleet report"
if [ ${#PARTS[@]} -gt 0 ]; then
  py operations.report merge "$REPORTS" "${PARTS[@]}"
  cat "$REPORTS/fleet.md"
else
  echo "no run wrote a report (see $LOGS)"
fi
