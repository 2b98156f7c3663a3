"""A smoke-test generation on every host, its result brought back for the fleet report."""

import base64
import functools
import hashlib
import json
import shlex
from io import StringIO
from pathlib import Path

from pyinfra import host
from pyinfra.api import FactBase, StringCommand, operation
from pyinfra.api.command import QuoteString
from pyinfra.operations import files

from .common import render
from .settings import DATA, ROOT, Settings, load_toml

TEMPLATE = ROOT / "templates" / "smoke_test.py.j2"


class ModelFiles(FactBase):
    """Name, size and mtime of every file at the top of a model checkout, hashed: changes
    when a file of the model is replaced or edited on the host; '' when there is none."""

    def command(self, path):
        return (f"cd {shlex.quote(path)} 2>/dev/null && find . -maxdepth 1 -type f -printf '%P %s %T@\\n' "
                "| LC_ALL=C sort | sha256sum | cut -c1-16 || true")

    @staticmethod
    def default():
        return ""

    def process(self, output):
        return output[0].strip() if output else ""


@functools.lru_cache(maxsize=16)
def _text(path: Path, mtime_ns: int) -> str:
    return path.read_text()


def _read(path: Path) -> str:
    """A control-side file's text, read once per run for all hosts."""
    return _text(path, path.stat().st_mtime_ns)


def smoke_key(s: Settings, variant: str, revision: str, device: str, model_files: str = "") -> str:
    """What the last passing smoke test must have seen for it to still count."""
    parts = [_read(TEMPLATE), _read(DATA / "requirements" / f"{s.requirements}.txt"),
             variant, revision, device, str(s.smoke_max_new_tokens), model_files]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


class SmokeState(FactBase):
    """All the smoke test's no-op check needs, in one command: {"model_files": ModelFiles'
    hash of the checkout, "dir": mode of the smoke directory ('' if absent), "script":
    "<sha1> <mode>" of the uploaded script ('' if absent), "result": result.json's text
    (None if absent)}."""

    batch_inline = True  # see operations.factcache._fact_command

    def command(self, path, smoke_dir):
        d = shlex.quote(smoke_dir)
        return (f"echo \"model $({ModelFiles().command(path)})\"; "
                f"echo \"dir $(stat -c %a {d} 2>/dev/null)\"; "
                f"echo \"script $(sha1sum {d}/smoke_test.py 2>/dev/null | cut -d' ' -f1) "
                f"$(stat -c %a {d}/smoke_test.py 2>/dev/null)\"; "
                f"[ -f {d}/result.json ] && base64 -w0 {d}/result.json && echo || echo __MISSING__")

    @staticmethod
    def default():
        return {"model_files": "", "dir": "", "script": "", "result": None}

    def process(self, output):
        values = {line.split(" ", 1)[0]: line.split(" ", 1)[1].strip() if " " in line else ""
                  for line in output[:3]}
        result = "".join(output[3:])
        return {"model_files": values["model"], "dir": values["dir"], "script": values["script"],
                "result": None if result == "__MISSING__" else base64.b64decode(result).decode()}


@operation()
def run(s: Settings, variant: str, model_dir: str, revision: str, device: str):
    """
    Upload the smoke-test script and run it unless it already passed for this state.

    + s: the host's settings (venv, install_dir, smoke_max_new_tokens)
    + variant: fp16, int8 or int4
    + model_dir: the model checkout to load
    + revision: the model's pinned commit
    + device: 'cuda' or 'cpu'

    One command reads what the check needs (SmokeState); the script's directory and file
    are handed to files.directory / files.put only when they differ.
    """
    smoke_dir = f"{s.install_dir}/smoke"
    script = f"{smoke_dir}/smoke_test.py"
    result = f"{smoke_dir}/result.json"
    seen = host.get_fact(SmokeState, path=model_dir, smoke_dir=smoke_dir)
    key = smoke_key(s, variant, revision, device, seen["model_files"])
    text = render(TEMPLATE.name,
        model_dir=model_dir, revision=revision, device=device,
        queries=load_toml("smoke.toml")["queries"], variant=variant, key=key,
        max_new_tokens=s.smoke_max_new_tokens)
    if seen["dir"] != "755":
        yield from files.directory._inner(path=smoke_dir, mode="755")
    if seen["script"] != f"{hashlib.sha1(text.encode()).hexdigest()} 644":
        yield from files.put._inner(src=StringIO(text), dest=script, mode="644")
    if seen["result"]:
        try:
            last = json.loads(seen["result"])
        except ValueError:
            last = {}
        if last.get("key") == key and last.get("ok"):
            host.noop(f"smoke test passed already for this state ({last.get('tokens_per_s')} tokens/s)")
            return
    yield StringCommand("cd", QuoteString(smoke_dir), "&&",
                        QuoteString(f"{s.venv}/bin/python"), QuoteString(script), QuoteString(result))


class FileSha1(FactBase):
    """sha1 of a file, '' when it does not exist."""

    batch_inline = True  # see operations.factcache._fact_command

    def command(self, path):
        return f"sha1sum {shlex.quote(path)} 2>/dev/null | cut -d' ' -f1; true"

    @staticmethod
    def default():
        return ""

    def process(self, output):
        return output[0].strip() if output else ""


@operation()
def fetch(s: Settings, local_dir: str):
    """
    Bring the host's smoke-test result back to the control machine.

    + s: the host's settings
    + local_dir: the control-side folder for per-host results

    Compared by sha1 first (one command): an unchanged result is not downloaded again.
    """
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    src, dest = f"{s.install_dir}/smoke/result.json", Path(local_dir) / f"{host.name}.json"
    remote = host.get_fact(FileSha1, path=src)
    report = getattr(host.state, "chatglm_report", None)
    if host.state.is_executing and report is not None:
        # The file is this host's result once this operation is through (a failed download
        # fails the host, whose row then shows only what this run printed).
        report.confirm(host.name)
    if remote and dest.is_file() and hashlib.sha1(dest.read_bytes()).hexdigest() == remote:
        host.noop(f"{dest} is the host's result")
        return
    yield from files.get._inner(src=src, dest=str(dest))
