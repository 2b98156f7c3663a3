"""The Python environment on each host: a venv holding the pinned ChatGLM requirements."""

import json
from io import StringIO

from pyinfra import host
from pyinfra.api import FactBase, StringCommand, operation
from pyinfra.api.command import QuoteString
from pyinfra.operations import files

from .common import fail
from .settings import DATA, Settings

VERIFY = (
    "import json, torch, transformers, cpm_kernels; "
    "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
    "'cuda_available': torch.cuda.is_available(), 'transformers': transformers.__version__}))"
)


def read_lock(name: str) -> dict:
    pins = {}
    for line in (DATA / "requirements" / f"{name}.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            pkg, version = line.split("==", 1)
            pins[normalize(pkg)] = version.split(";")[0].strip()
    return pins


def normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


class PipFreeze(FactBase):
    """Installed distributions of a venv as {normalized name: version}; None if no venv."""

    def command(self, venv):
        return f"[ -x {venv}/bin/python ] && {venv}/bin/python -m pip freeze --all 2>/dev/null || echo NOVENV"

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


class PythonStack(FactBase):
    """What the venv imports: torch, its CUDA, transformers; {"error": ...} on failure."""

    def command(self, venv):
        return (f"[ -x {venv}/bin/python ] || {{ echo '{{\"error\": \"no venv\"}}'; exit 0; }}; "
                f"{venv}/bin/python -W ignore -c \"{VERIFY}\" 2>/tmp/.chatglm-verify.err "
                "| tail -1 || python3 -c 'import json; "
                "print(json.dumps({\"error\": open(\"/tmp/.chatglm-verify.err\").read()[-400:]}))'")

    @staticmethod
    def default():
        return {"error": "no output"}

    def process(self, output):
        return json.loads(output[-1])


def _torch_pin(lock: dict, torch_tag: str) -> str:
    base = lock["torch"].split("+")[0]
    return base if torch_tag == "cpu" else f"{base}+{torch_tag}"


@operation()
def venv(s: Settings):
    """
    Create the venv and install the pinned requirements into it.

    + s: the host's settings (install_dir, python, requirements, pip_index_url)
    """
    lock_text = (DATA / "requirements" / f"{s.requirements}.txt").read_text()
    yield from files.directory._inner(path=s.install_dir, mode="755")
    yield from files.put._inner(src=StringIO(lock_text), dest=f"{s.install_dir}/requirements.lock",
                                mode="644")

    installed = host.get_fact(PipFreeze, venv=s.venv)
    if installed is None:
        yield StringCommand(s.python, "-m", "venv", QuoteString(s.venv))
        installed = {}

    wanted = read_lock(s.requirements)
    drift = sorted(f"{k}=={v}" for k, v in wanted.items()
                   if installed.get(k, "").split("+")[0] != v.split("+")[0])
    if not drift:
        host.noop(f"venv {s.venv} matches the {len(wanted)} pins of {s.requirements}")
        return
    index = ["--index-url", QuoteString(s.pip_index_url)] if s.pip_index_url else []
    # --no-deps: the lock is complete, so pip must not resolve anything beyond it.
    yield StringCommand(f"{s.venv}/bin/python", "-m", "pip", "install", "--no-deps",
                        "--no-input", "--progress-bar", "off", "--disable-pip-version-check",
                        *index, "-r", f"{s.install_dir}/requirements.lock")


@operation(is_idempotent=False)
def verify(s: Settings, expect_cuda: bool):
    """
    Import torch, transformers and cpm_kernels in the venv; fail the host on a mismatch.

    + s: the host's settings
    + expect_cuda: whether the resolver planned a CUDA torch for this host
    """
    if not host.state.is_executing:
        host.noop("checked after the install, at execution")
        return
    stack = host.get_fact(PythonStack, venv=s.venv)
    if "error" in stack:
        yield fail(f"the venv {s.venv} cannot import torch/transformers/cpm_kernels: "
                             f"{stack['error']}")
        return
    if stack["cuda_available"] != expect_cuda:
        yield fail(
            f"torch {stack['torch']} reports cuda_available={stack['cuda_available']} but the "
            f"resolver planned {'a CUDA' if expect_cuda else 'a CPU'} build; check the driver "
            "(nvidia-smi) and the torch wheel index")
        return
    host.noop(f"torch {stack['torch']} (CUDA {stack['cuda']}), transformers "
              f"{stack['transformers']}: as planned")
    return
    yield
