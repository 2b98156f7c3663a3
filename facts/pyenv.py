"""What the Python stage reads: the environment's interpreter, installed distributions,
imports and fingerprint, conda's prefix, and the interpreter a venv is made from.
"""

import json
import shlex

from pyinfra.api import FactBase

from operations.pyplan import normalize
from operations.settings import VERIFIED


# What the environment's interpreter sees, hashed: its version and path, every sys.path
# entry's mtime and names (dist-info names carry versions; an install or removal changes
# the directory's mtime), the loaded NVIDIA module and its device nodes (torch's
# cuda_available). Pure Python, no import of torch: ~20 ms, where the import takes seconds.
# `paths` is sys.path as the interpreter started (setuptools' import hook adds its _vendor).
# (No double quotes, $, backslashes or backticks: it runs inside "..." in sh.)
FINGERPRINT = """
import hashlib, json, os, sys
h = hashlib.sha256(repr((sys.version, os.path.realpath(sys.executable))).encode())
for p in paths:
    try:
        h.update(repr((p, os.stat(p).st_mtime_ns, sorted(os.listdir(p)) if os.path.isdir(p) else [])).encode())
    except OSError:
        pass
try:
    h.update(open('/proc/driver/nvidia/version', 'rb').read())
except OSError:
    pass
h.update(repr(sorted(n for n in os.listdir('/dev') if n.startswith('nvidia'))).encode())
fingerprint = h.hexdigest()
"""


VERIFY = (
    "import sys\npaths = list(sys.path)\nimport json, torch, transformers, cpm_kernels\n" + FINGERPRINT +
    "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
    "'cuda_available': torch.cuda.is_available(), 'transformers': transformers.__version__, "
    "'archs': torch.cuda.get_arch_list() if torch.cuda.is_available() else [], "
    "'fingerprint': fingerprint}))"
)
FINGERPRINT_AND_STAMP = "import sys\npaths = sys.path\n" + FINGERPRINT + """
try:
    stamp = open(sys.argv[1]).read().strip()
except OSError:
    stamp = ''
print(json.dumps({'fingerprint': fingerprint, 'stamp': stamp}))
"""


# The installed distributions, first on sys.path wins (as for imports and pip freeze),
# read from the names of the dist-info/egg-info directories (<name>-<version>.dist-info):
# no metadata file is opened, ~45 ms less than importlib.metadata on a torch env.
LIST_DISTS = """
import os, sys
seen = set()
for p in sys.path:
    try:
        names = sorted(os.listdir(p))
    except OSError:
        continue
    for n in names:
        stem, dot, kind = n.rpartition('.')
        if kind not in ('dist-info', 'egg-info') or not dot:
            continue
        parts = stem.split('-')
        if len(parts) < 2 or parts[0].lower() in seen:
            continue
        seen.add(parts[0].lower())
        print(parts[0] + '==' + parts[1])
"""


ENV_INFO = (
    "import json, os, sys; cfg = os.path.join(sys.prefix, 'pyvenv.cfg'); "
    "lines = open(cfg).read().splitlines() if os.path.exists(cfg) else []; "
    "flag = [l.split('=', 1)[1].strip() for l in lines if l.replace(' ', '').startswith("
    "'include-system-site-packages=')]; "
    "print(json.dumps({'version': '%d.%d' % sys.version_info[:2], 'venv': bool(lines), "
    "'system_site_packages': flag[0] == 'true' if flag else None}))"
)


class PipFreeze(FactBase):
    """Installed distributions of an environment as {normalized name: version} (what
    `pip freeze --all` lists, read from the dist-info names); None if the environment
    has no python."""

    def command(self, venv):
        py = shlex.quote(f"{venv}/bin/python")
        return f"[ -x {py} ] && {py} -c \"{LIST_DISTS}\" 2>/dev/null || echo NOVENV"

    @staticmethod
    def default():
        return {}

    def process(self, output):
        if output == ["NOVENV"]:
            return None
        pins = {}
        for line in output:
            if "==" in line:
                pkg, version = line.split("==", 1)
                pins[normalize(pkg)] = version.strip()
        return pins


class EnvPython(FactBase):
    """The environment's Python: {"version": "3.11", "venv": bool, "system_site_packages":
    bool or None (not a venv)}; None when env/bin/python is missing or broken."""

    def command(self, env):
        py = shlex.quote(f"{env}/bin/python")
        return f"[ -x {py} ] && {py} -c \"{ENV_INFO}\" 2>/dev/null || echo null"

    @staticmethod
    def default():
        return None

    def process(self, output):
        return json.loads(output[-1])


SITE_PTH = (
    "want=$({python} -c 'import site; print(chr(10).join(site.getsitepackages()))'); "
    "pth=$({env}/bin/python -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')"
    "/_chatglm_system_site.pth; "
)


class SystemSitePth(FactBase):
    """Whether the venv's .pth lists the creating interpreter's own site-packages (which
    --system-site-packages misses when that interpreter is itself a venv)."""

    def command(self, env, python):
        return (SITE_PTH.format(env=shlex.quote(env), python=shlex.quote(python))
                + '[ "$(cat "$pth" 2>/dev/null)" = "$want" ] && echo ok || echo missing')

    @staticmethod
    def default():
        return False

    def process(self, output):
        return output[-1].strip() == "ok"


class Interpreter(FactBase):
    """'3.11' for the interpreter that creates the venv, None when it is not there."""

    def command(self, python):
        python = shlex.quote(python)
        return (f"command -v {python} >/dev/null 2>&1 && {python} -c "
                "'import sys; print(\"%d.%d\" % sys.version_info[:2])' 2>/dev/null || echo none")

    @staticmethod
    def default():
        return None

    def process(self, output):
        value = output[-1].strip()
        return None if value == "none" else value


class CondaInstall(FactBase):
    """{"state": "installed" | "partial" | "absent", "version": "24.11.3"} of a conda prefix;
    partial: the directory exists without bin/conda (an interrupted install)."""

    def command(self, prefix):
        conda, prefix = shlex.quote(f"{prefix}/bin/conda"), shlex.quote(prefix)
        return (f"if [ -x {conda} ]; then echo \"installed $({conda} --version "
                f"2>/dev/null)\"; elif [ -e {prefix} ]; then echo partial; else echo absent; fi")

    @staticmethod
    def default():
        return {"state": "absent", "version": ""}

    def process(self, output):
        words = output[-1].split()
        return {"state": words[0], "version": words[-1] if len(words) > 2 else ""}


class PythonStack(FactBase):
    """What the environment imports: torch, its CUDA, transformers, and the environment's
    fingerprint (FINGERPRINT) taken after those imports; {"error": ...} on failure."""

    def command(self, venv):
        py = shlex.quote(f"{venv}/bin/python")
        return (f"[ -x {py} ] || {{ echo '{{\"error\": \"no Python environment\"}}'; exit 0; }}; "
                f"{py} -W ignore -c \"{VERIFY}\" 2>/tmp/.chatglm-verify.err "
                "| tail -1 | grep . || python3 -c 'import json; "
                "print(json.dumps({\"error\": open(\"/tmp/.chatglm-verify.err\").read()[-400:]}))'")

    @staticmethod
    def default():
        return {"error": "no output"}

    def process(self, output):
        return json.loads(output[-1])


class EnvFingerprint(FactBase):
    """{"fingerprint": what the environment's interpreter sees, hashed (FINGERPRINT),
    "stamp": the record pyenv.verify left after its last successful check, '' if none}."""

    def command(self, venv):
        py, stamp = shlex.quote(f"{venv}/bin/python"), shlex.quote(f"{venv}/{VERIFIED}")
        return (f"[ -x {py} ] && {py} -c \"{FINGERPRINT_AND_STAMP}\" "
                f"{stamp} 2>/dev/null || echo '{{\"fingerprint\": \"\", \"stamp\": \"\"}}'")

    @staticmethod
    def default():
        return {"fingerprint": "", "stamp": ""}

    def process(self, output):
        return json.loads(output[-1])
