"""The ChatGLM code and model repos on each host, and their weights from the share.

Repos are cloned with GIT_LFS_SKIP_SMUDGE=1 at pinned commits, so each weight
file starts as its LFS pointer (oid sha256 + size). The weights are then fetched
from the Seafile share, checked against that pointer, and moved over it.
"""

import logging
import threading
from pathlib import Path

import requests

from pyinfra import host
from pyinfra.api import (FactBase, FileUploadCommand, FunctionCommand,
                         StringCommand, operation)
from pyinfra.api.command import QuoteString

from .common import fail
from . import seafile
from .settings import Settings

STAMPS = ".chatglm-verified"
logger = logging.getLogger("pyinfra")


class GitHead(FactBase):
    """The commit checked out in a repo, or '' when it is not a git checkout."""

    def command(self, path):
        return f"git -C {path} rev-parse HEAD 2>/dev/null || true"

    @staticmethod
    def default():
        return ""

    def process(self, output):
        return output[0].strip()


class LfsFiles(FactBase):
    """LFS-tracked files of a checkout: {name: {oid, size, actual, verified}}.

    oid/size come from the pointer committed at HEAD; actual is the size of the file
    in the work tree; verified is the oid recorded when a download was checked.
    """

    def command(self, path):
        return (
            f"cd {path} 2>/dev/null || exit 0; "
            "git ls-files -z | xargs -0 -r git check-attr filter -- | "
            "sed -n 's/: filter: lfs$//p' | while read -r f; do "
            "  oid=$(git show \"HEAD:$f\" | sed -n 's/^oid sha256://p'); "
            "  size=$(git show \"HEAD:$f\" | sed -n 's/^size //p'); "
            "  actual=$(stat -c %s \"$f\" 2>/dev/null || echo -1); "
            f"  verified=$(cat \"{STAMPS}/$f\" 2>/dev/null || echo -); "
            "  echo \"$f $oid $size $actual $verified\"; "
            "done"
        )

    @staticmethod
    def default():
        return {}

    def process(self, output):
        files = {}
        for line in output:
            name, oid, size, actual, verified = line.rsplit(" ", 4)
            files[name] = {"oid": oid, "size": int(size), "actual": int(actual),
                           "verified": verified}
        return files


@operation()
def clone(url: str, dest: str, revision: str):
    """
    Clone a repo without LFS smudging and check out a pinned revision.

    + url: the remote to clone
    + dest: the checkout's directory on the host
    + revision: the commit to check out (HEAD is compared with it)
    """
    head = host.get_fact(GitHead, path=dest)
    if head and head == revision:
        host.noop(f"{dest} is at {revision[:12]}")
        return
    env = "GIT_LFS_SKIP_SMUDGE=1"
    if not head:
        yield StringCommand("rm", "-rf", QuoteString(dest + ".partial"))
        yield StringCommand(env, "git", "clone", "--quiet", "--no-checkout", QuoteString(url),
                            QuoteString(dest + ".partial"))
        yield StringCommand(env, "git", "-C", QuoteString(dest + ".partial"), "-c",
                            "advice.detachedHead=false", "checkout", "--quiet", "--detach",
                            QuoteString(revision))
        # Only a complete checkout takes the final name.
        yield StringCommand("mv", QuoteString(dest + ".partial"), QuoteString(dest))
    else:
        yield StringCommand(env, "git", "-C", QuoteString(dest), "fetch", "--quiet", "origin")
        yield StringCommand(env, "git", "-C", QuoteString(dest), "-c", "advice.detachedHead=false",
                            "checkout", "--quiet", "--force", "--detach", QuoteString(revision))
        yield StringCommand("rm", "-rf", QuoteString(f"{dest}/{STAMPS}"))
    yield StringCommand("test", f'"$(git -C {dest} rev-parse HEAD)"', "=", QuoteString(revision))


_locks: dict[str, threading.Lock] = {}


def fetch_to_cache(state, host, cache: Path, share: str, share_path: str, name: str, oid: str,
                   size: int) -> bool:
    """Download one weight file into the control cache once, however many hosts need it.

    Returns False (failing only this host) when the share cannot deliver the file.
    """
    target = cache / "blobs" / oid
    lock = _locks.setdefault(oid, threading.Lock())
    try:
        with lock:
            if target.exists() and target.stat().st_size == size:
                return True
            listing = {d.get("file_name"): d for d in seafile.list_folder(share, share_path)}
            if name not in listing:
                raise seafile.ShareError(f"{name!r} is not in folder {share_path!r} of {share}")
            seafile.download(share, listing[name]["file_path"], target, oid, size)
    except (seafile.ShareError, OSError, requests.RequestException) as error:
        host.log_styled(f"weights: {error}", fg="red", log_func=logger.error)
        return False
    return True


@operation()
def weights(s: Settings, model_dir: str, share: str, share_path: str):
    """
    Replace each LFS pointer of a model checkout by the verified weight file.

    + s: the host's settings (weights_mode, weights_cache)
    + model_dir: the model checkout on the host
    + share: the Seafile folder share link holding the weights
    + share_path: the folder inside the share
    """
    files = host.get_fact(LfsFiles, path=model_dir)
    if not files:
        if host.state.is_executing:
            yield fail(f"{model_dir} has no LFS-tracked files: is it a model repo?")
            return
        host.noop(f"weights are listed once {model_dir} is cloned")
        return
    todo = {n: f for n, f in files.items()
            if not (f["verified"] == f["oid"] and f["actual"] == f["size"])}
    if not todo:
        host.noop(f"{len(files)} weight files verified in {model_dir}")
        return
    cache = Path(s.weights_cache).expanduser()
    yield StringCommand("mkdir", "-p", QuoteString(f"{model_dir}/{STAMPS}"))
    for name, f in sorted(todo.items()):
        dest = f"{model_dir}/{name}"
        partial = f"{model_dir}/.{name}.partial"
        if s.weights_mode == "control":
            blob = cache / "blobs" / f["oid"]
            yield FunctionCommand(fetch_to_cache, (cache, share, share_path, name, f["oid"],
                                                   f["size"]), {})
            yield FileUploadCommand(str(blob), partial)
        else:
            yield fail(f"weights_mode={s.weights_mode!r} is not implemented yet")
            return
        # The host checks the bytes itself before they replace the pointer.
        yield StringCommand(
            "sh", "-c", QuoteString(
                f'echo "{f["oid"]}  {partial}" | sha256sum -c --quiet - '
                f'|| {{ rm -f "{partial}"; echo "{name}: sha256 differs from the LFS pointer" >&2; '
                f'exit 1; }}; mv -f "{partial}" "{dest}" && echo {f["oid"]} > "{model_dir}/{STAMPS}/{name}"'))



def auto_variant(plan: dict, ram_bytes: int) -> str:
    """The largest variant the host's first GPU holds (thresholds in data/models.toml);
    int4 on CPU-only hosts, the only variant meant for CPU inference."""
    from .settings import load_toml

    if not plan["gpu"]:
        return "int4"
    mem_gb = plan["gpus"][0]["memory_mib"] / 1024
    variants = load_toml("models.toml")["variants"]
    for name in ("fp16", "int8", "int4"):
        if mem_gb >= variants[name]["gpu_mem_gb"]:
            return name
    return "int4"
