"""A smoke-test generation on every host, its result brought back for the fleet report."""

import functools
import hashlib
import json
from io import StringIO
from pathlib import Path

from pyinfra import host
from pyinfra.api import StringCommand, operation
from pyinfra.api.command import QuoteString
from pyinfra.facts.files import Sha1File
from pyinfra.operations import files

from facts.smoke import SmokeState

from .common import TEMPLATES, render
from .settings import DATA, load_toml

TEMPLATE = TEMPLATES / "smoke_test.py.j2"


@functools.lru_cache(maxsize=16)
def _text(path: Path, mtime_ns: int) -> str:
    return path.read_text()


def _read(path: Path) -> str:
    """A control-side file's text, read once per run for all hosts."""
    return _text(path, path.stat().st_mtime_ns)


def smoke_key(requirements: str, max_new_tokens: int, variant: str, revision: str, device: str,
              model_files: str = "") -> str:
    """What the last passing smoke test must have seen for it to still count."""
    parts = [_read(TEMPLATE), _read(DATA / "requirements" / f"{requirements}.txt"),
             variant, revision, device, str(max_new_tokens), model_files]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


@operation()
def run(install_dir: str, python: str, requirements: str, max_new_tokens: int, variant: str,
        model_dir: str, revision: str, device: str):
    """
    Upload the smoke-test script and run it unless it already passed for this state.

    + install_dir: the deploy's directory on the host (the test goes to <install_dir>/smoke)
    + python: the env's interpreter
    + requirements: the lock's name (its pins are part of what the test saw)
    + max_new_tokens: the answers' length limit (smoke_max_new_tokens)
    + variant: fp16, int8 or int4
    + model_dir: the model checkout to load
    + revision: the model's pinned commit
    + device: 'cuda' or 'cpu'

    One command reads what the check needs (SmokeState); the script's directory and file
    are handed to files.directory / files.put only when they differ.
    """
    smoke_dir = f"{install_dir}/smoke"
    script = f"{smoke_dir}/smoke_test.py"
    result = f"{smoke_dir}/result.json"
    seen = host.get_fact(SmokeState, path=model_dir, smoke_dir=smoke_dir)
    key = smoke_key(requirements, max_new_tokens, variant, revision, device, seen["model_files"])
    text = render(TEMPLATE.name,
        model_dir=model_dir, revision=revision, device=device,
        queries=load_toml("smoke.toml")["queries"], variant=variant, key=key,
        max_new_tokens=max_new_tokens)
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
                        QuoteString(python), QuoteString(script), QuoteString(result))


@operation()
def fetch(install_dir: str, local_dir: str):
    """
    Bring the host's smoke-test result back to the control machine.

    + install_dir: the deploy's directory on the host
    + local_dir: the control-side folder for per-host results

    Compared by sha1 first (one command): an unchanged result is not downloaded again.
    """
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    src, dest = f"{install_dir}/smoke/result.json", Path(local_dir) / f"{host.name}.json"
    remote = host.get_fact(Sha1File, path=src)
    report = getattr(getattr(host.state, "chatglm", None), "report", None)
    if host.state.is_executing and report is not None:
        # The file is this host's result once this operation is through (a failed download
        # fails the host, whose row then shows only what this run printed).
        report.confirm(host.name)
    if remote and dest.is_file() and hashlib.sha1(dest.read_bytes()).hexdigest() == remote:
        host.noop(f"{dest} is the host's result")
        return
    yield from files.get._inner(src=src, dest=str(dest))
