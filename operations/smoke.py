"""A smoke-test generation on every host, its result brought back for the fleet report."""

import hashlib
import json
from pathlib import Path

from pyinfra import host
from pyinfra.api import FactBase, StringCommand, operation
from pyinfra.api.command import QuoteString
from pyinfra.operations import files

from .kernel import FileText
from .settings import DATA, ROOT, Settings, load_toml

TEMPLATE = ROOT / "templates" / "smoke_test.py.j2"


class ModelFiles(FactBase):
    """Name, size and mtime of every file at the top of a model checkout, hashed: changes
    when a file of the model is replaced or edited on the host; '' when there is none."""

    def command(self, path):
        return (f"cd {path} 2>/dev/null && find . -maxdepth 1 -type f -printf '%P %s %T@\\n' "
                "| LC_ALL=C sort | sha256sum | cut -c1-16 || true")

    @staticmethod
    def default():
        return ""

    def process(self, output):
        return output[0].strip() if output else ""


def smoke_key(s: Settings, variant: str, revision: str, device: str, model_files: str = "") -> str:
    """What the last passing smoke test must have seen for it to still count."""
    parts = [TEMPLATE.read_text(), (DATA / "requirements" / f"{s.requirements}.txt").read_text(),
             variant, revision, device, str(s.smoke_max_new_tokens), model_files]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


@operation()
def run(s: Settings, variant: str, model_dir: str, revision: str, device: str):
    """
    Upload the smoke-test script and run it unless it already passed for this state.

    + s: the host's settings (venv, install_dir, smoke_max_new_tokens)
    + variant: fp16, int8 or int4
    + model_dir: the model checkout to load
    + revision: the model's pinned commit
    + device: 'cuda' or 'cpu'
    """
    key = smoke_key(s, variant, revision, device, host.get_fact(ModelFiles, path=model_dir))
    script = f"{s.install_dir}/smoke/smoke_test.py"
    result = f"{s.install_dir}/smoke/result.json"
    yield from files.directory._inner(path=f"{s.install_dir}/smoke", mode="755")
    yield from files.template._inner(
        src=str(TEMPLATE), dest=script, mode="644", model_dir=model_dir, revision=revision,
        device=device, queries=load_toml("smoke.toml")["queries"], variant=variant, key=key,
        max_new_tokens=s.smoke_max_new_tokens)
    previous = host.get_fact(FileText, path=result)
    if previous:
        try:
            last = json.loads(previous)
        except ValueError:
            last = {}
        if last.get("key") == key and last.get("ok"):
            host.noop(f"smoke test passed already for this state ({last.get('tokens_per_s')} tokens/s)")
            return
    yield StringCommand("cd", QuoteString(f"{s.install_dir}/smoke"), "&&",
                        f"{s.venv}/bin/python", QuoteString(script), QuoteString(result))


@operation()
def fetch(s: Settings, local_dir: str):
    """
    Bring the host's smoke-test result back to the control machine.

    + s: the host's settings
    + local_dir: the control-side folder for per-host results
    """
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    yield from files.get._inner(src=f"{s.install_dir}/smoke/result.json",
                                dest=f"{local_dir}/{host.name}.json")
