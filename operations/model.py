"""The ChatGLM code and model repos on each host, and their weights from the share.

Repos are cloned with GIT_LFS_SKIP_SMUDGE=1 at pinned commits, so each weight
file starts as its LFS pointer (oid sha256 + size). The weights are then fetched
from the Seafile share, checked against that pointer, and moved over it.
"""

import json
import logging
import shlex
import shutil
import threading
from io import StringIO
from pathlib import Path

from pyinfra import host
from pyinfra.api import (FileUploadCommand, FunctionCommand,
                         StringCommand, operation)
from pyinfra.api.command import QuoteString
from pyinfra.operations import files as files_ops

from facts.model import GitHead, LfsFiles, PointerIndex, RemoteRefs
from facts.system import FreeDiskBytes

from . import hostlock, swarm
from .common import fail
from .resolver import GpuPlan
from .settings import ROOT, VERIFIED, SettingError, Settings, is_commit, load_toml

FETCH = ROOT / "runtime" / "fetch.py"  # the downloader, run on hosts as it is
GB = 10 ** 9  # data/models.toml gives memory and disk in GB
MIB = 1 << 20
logger = logging.getLogger("pyinfra")


def resolve_ref(refs: dict, ref: str) -> tuple[str, str]:
    """(commit, '') for a branch or tag name, or ('', why not)."""
    found = {}
    for kind, name in (("tag", f"refs/tags/{ref}"), ("branch", f"refs/heads/{ref}"),
                       ("ref", ref)):
        commit = refs.get(name + "^{}") or refs.get(name)
        if commit:
            found[kind] = commit
    if not found:
        return "", f"no branch or tag {ref!r}"
    if len(set(found.values())) > 1:
        return "", f"{ref!r} is ambiguous ({', '.join(f'{k} {c[:12]}' for k, c in found.items())})"
    return next(iter(found.values())), ""


def _clear_dest(dest: str, run: str) -> StringCommand:
    """Make room for a clone at dest, which holds no checkout (GitHead found none): an empty
    directory is removed, a repository without a HEAD (a clone cut short) is moved aside
    under a name the log gives; anything else fails the host, naming what is there."""
    d, aside = shlex.quote(dest), shlex.quote(f"{dest}.broken-{run}")
    other = shlex.quote(f"ERROR: {dest} exists and is not a git checkout (it holds: ")
    fix = shlex.quote("); Fix: move it away or remove it, then rerun the deploy")
    return StringCommand("sh", "-c", QuoteString(
        f"if [ -d {d} ] && [ -z \"$(ls -A {d})\" ]; then rmdir {d}; fi; "
        f"if [ -e {d}/.git ] && ! git -C {d} rev-parse -q --verify HEAD >/dev/null 2>&1; then "
        f"mv -T {d} {aside} && echo {shlex.quote(f'{dest}: a checkout without a HEAD (a clone cut short) was moved to {dest}.broken-{run}')} >&2; fi; "
        f"if [ -e {d} ] || [ -L {d} ]; then "
        f"echo {other}\"$(ls -A {d} 2>/dev/null | head -5 | tr '\\n' ' ')\"{fix} >&2; exit 1; fi"))


def _checkout_check(dest: str, commit: str) -> StringCommand:
    d, c = shlex.quote(dest), shlex.quote(commit)
    return StringCommand("sh", "-c", QuoteString(
        f'head=$(git -C {d} rev-parse HEAD) && [ "$head" = {c} ] || '
        f'{{ echo "ERROR: "{d}": HEAD is $head, not the pinned "{c} >&2; exit 1; }}'))


@operation()
def clone(url: str, dest: str, revision: str, allow_floating: bool = False):
    """
    Clone a repo without LFS smudging and check out a pinned revision.

    + url: the remote to clone
    + dest: the checkout's directory on the host
    + revision: the 40-hex commit to check out (HEAD is compared with it); a branch or tag
      only with allow_floating, resolved to its commit on the host at each run
    + allow_floating: accept a branch or tag (inventory: allow_floating_revision)
    """
    commit = revision
    if not is_commit(revision):
        if not allow_floating:
            yield fail(f"{dest}: revision {revision!r} is not a 40-hex commit; pin the commit you "
                       "reviewed, or set allow_floating_revision=True (the model code runs with "
                       "trust_remote_code)")
            return
        commit, why = resolve_ref(host.get_fact(RemoteRefs, url=url, ref=revision), revision)
        if not commit and host.state.is_executing:
            yield fail(f"{url}: {why}; fix model_revision(s)/code_revision")
            return
        if commit:
            host.log_styled(f"floating revision {revision!r} of {url} is {commit} "
                            "(allow_floating_revision)", fg="yellow", log_func=logger.warning)
    head = host.get_fact(GitHead, path=dest)
    if head and head == commit:
        host.noop(f"{dest} is at {commit[:12]}")
        return
    target = commit or revision  # unresolved only while collecting, before git is installed
    env = "GIT_LFS_SKIP_SMUDGE=1"
    if not head:
        # The clone is made beside dest under a name of this run's own, and takes dest's
        # name only once complete. Leftovers of other runs are removed: this runs under
        # the host's deploy lock (operations/hostlock.py), so none of them is still at work.
        run = hostlock.run_info(host.state)["run"]
        partial = f"{dest}.partial-{run}"
        yield _clear_dest(dest, run)
        yield StringCommand("sh", "-c", QuoteString(
            f"rm -rf -- {shlex.quote(dest + '.partial')} {shlex.quote(dest + '.partial-')}*"))
        yield StringCommand(env, "git", "clone", "--quiet", "--no-checkout", QuoteString(url),
                            QuoteString(partial))
        yield StringCommand(env, "git", "-C", QuoteString(partial), "-c",
                            "advice.detachedHead=false", "checkout", "--quiet", "--detach",
                            QuoteString(target))
        yield StringCommand("mv", "-T", QuoteString(partial), QuoteString(dest))
    else:
        yield StringCommand("git", "-C", QuoteString(dest), "remote", "set-url", "origin",
                            QuoteString(url))
        yield StringCommand(env, "git", "-C", QuoteString(dest), "fetch", "--quiet", "--tags",
                            "origin")
        yield StringCommand(env, "git", "-C", QuoteString(dest), "-c", "advice.detachedHead=false",
                            "checkout", "--quiet", "--force", "--detach", QuoteString(target))
        yield StringCommand("rm", "-rf", QuoteString(f"{dest}/{VERIFIED}"))
    yield _checkout_check(dest, target)


def mib_to_gb(value_mib: int) -> float:
    """GPU memory as nvidia-smi gives it (MiB) in the GB of data/models.toml (10^9 bytes)."""
    return value_mib * MIB / GB


def _verified(f: dict) -> bool:
    return f["verified"] == f["oid"] and f["actual"] == f["size"]


def _partial(model_dir: str, name: str) -> str:
    """Where a weight file is assembled, next to its pointer (same filesystem: atomic rename)."""
    folder, _, base = f"{model_dir}/{name}".rpartition("/")
    return f"{folder}/.{base}.partial"


def _free_probe(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def check_memory(s: Settings, variant: str, plan: GpuPlan, ram_bytes: int) -> None:
    """Raise SettingError, while operations are collected, when the host's first GPU (or its
    RAM on a CPU-only host) is smaller than the variant needs (data/models.toml, from the
    ChatGLM-6B README): the inventory asks for what cannot run, so no host is touched."""
    if not s.check_memory:
        return
    need = load_toml("models.toml")["variants"][variant]
    setting = "variant" if s.variant != "auto" else "variant (auto)"
    if plan.gpu:
        gpu = plan.gpus[0]
        have = mib_to_gb(gpu["memory_mib"])
        if have >= need["gpu_mem_gb"]:
            return
        problem = (f"= {variant!r} needs {need['gpu_mem_gb']} GB of GPU memory, GPU 0 "
                   f"({gpu['name']}) has {have:.1f} GB")
        if not gpu["memory_mib"]:
            fix = ("no driver reports GPU 0's memory and data/compat.toml does not know its "
                   "PCI id: set gpu_memory_mib for this host")
        else:
            fix = ("set variant to a smaller one ('int4' needs the least) or 'auto', or use a "
                   "host with more GPU memory (check_memory=False skips this check)")
    else:
        have = ram_bytes / GB
        if have >= need["cpu_ram_gb"]:
            return
        problem = (f"= {variant!r} on CPU needs {need['cpu_ram_gb']} GB of RAM, the host "
                   f"has {have:.1f} GB")
        fix = ("set variant to 'int4' (the CPU variant) or use a host with more RAM "
               "(check_memory=False skips this check)")
    raise SettingError(s.host, setting, problem, fix)


@operation()
def check_resources(variant: str, model_dir: str, weights_mode: str = "control",
                    weights_cache: str = ""):
    """
    Fail the host, before anything is downloaded, when it lacks the disk space the variant's
    weights need (figures in data/models.toml until the LFS pointers give exact sizes).
    Memory is checked earlier, by check_memory, while operations are collected.

    + variant: fp16, int8 or int4
    + model_dir: the model checkout; once cloned its LFS pointers give the exact sizes
    + weights_mode: control, direct or mirror (control: the control cache needs room too)
    + weights_cache: the control-side cache directory (weights_mode control)
    """
    need = load_toml("models.toml")["variants"][variant]
    problems, fixes = [], []

    lfs = host.get_fact(LfsFiles, path=model_dir)
    if lfs:
        todo = {f["oid"]: f["size"] for f in lfs.values() if not _verified(f)}
        weights, basis = sum(todo.values()), "the LFS pointers"
    else:
        todo, weights, basis = None, need["disk_gb"] * GB, "data/models.toml"
    free = host.get_fact(FreeDiskBytes, path=model_dir) if weights else 0  # verified: no df
    if free < weights:
        problems.append(f"the weights need {weights / GB:.2f} GB ({basis}) under {model_dir}, "
                        f"{free / GB:.2f} GB are free")
        fixes.append("free space there or set install_dir to a larger filesystem")
    if weights_mode == "control" and weights:
        cache = Path(weights_cache).expanduser()
        blobs = cache / "blobs"
        cached = 0 if todo is None else sum(
            size for oid, size in todo.items() if (blobs / oid).is_file()
            and (blobs / oid).stat().st_size == size)
        cache_free = shutil.disk_usage(_free_probe(cache)).free
        if cache_free < weights - cached:
            problems.append(f"the control cache {cache} needs {(weights - cached) / GB:.2f} GB, "
                            f"{cache_free / GB:.2f} GB are free on the control machine")
            fixes.append("free space there or set weights_cache to a larger filesystem")
    if problems:
        message = f"{host.name}: " + "; ".join(problems) + ". Fix: " + "; ".join(fixes)
        if not host.state.is_executing:
            # --dry shows it too: the host fails here when the deploy runs.
            host.log_styled(message, fg="red", log_func=logger.error)
        yield fail(message)
        return
    host.noop(f"{variant}: disk space suffices ({basis})")


_locks: dict[str, threading.Lock] = {}


def fetch_to_cache(state, host, cache: Path, share: str, share_path: str, name: str, oid: str,
                   size: int, attempts: int | None = None) -> bool:
    """Download one weight file into the control cache once, however many hosts need it.

    The cache is content-addressed (blobs/<sha256>) and a blob gets its name only once
    verified, so a blob present is never downloaded again. Returns False (failing only
    this host) when the share cannot deliver the file.
    """
    from tqdm import tqdm  # (with the downloader) only when a download runs: a no-op run skips their imports

    from runtime import fetch

    if attempts is None:
        attempts = fetch.ATTEMPTS
    target = cache / "blobs" / oid
    lock = _locks.setdefault(oid, threading.Lock())  # gevent's, under pyinfra's CLI
    try:
        with lock:
            if target.is_file() and target.stat().st_size == size:
                return True
            source = fetch.Share(share, share_path)
            file_path = source.find(name, size, attempts)
            with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                      desc=Path(name).name) as bar:
                fetch.download(source, file_path, str(target), oid, size,
                               f"{Path(name).name} (control cache)", "weights_cache",
                               lambda: target.is_file() and target.stat().st_size == size,
                               hidden=False, fsync=False, attempts=attempts,
                               progress=lambda have, final=False: bar.update(have - bar.n))
    except fetch.SourceError as error:
        host.log_styled(f"weights: {error} ({fetch.SHARE_SETTINGS})", fg="red", log_func=logger.error)
        return False
    except (fetch.Final, OSError) as error:
        host.log_styled(f"weights: {error}", fg="red", log_func=logger.error)
        return False
    return True


def _put_in_place(model_dir: str, name: str, oid: str, src: str = "") -> StringCommand:
    """Check a file's sha256 on the host, then rename it over its pointer and stamp it; the
    file is the upload's partial file beside the pointer, or src."""
    partial = shlex.quote(src or _partial(model_dir, name))
    dest = shlex.quote(f"{model_dir}/{name}")
    stamp = shlex.quote(f"{model_dir}/{VERIFIED}/{name}")
    return StringCommand("sh", "-c", QuoteString(
        f'echo "{oid}  "{partial} | sha256sum -c --quiet - >/dev/null 2>&1 '
        f"|| {{ rm -f {partial}; echo {shlex.quote(f'ERROR: {name}: sha256 differs from the LFS pointer after the transfer; the pointer was left in place')} >&2; exit 1; }}; "
        f'mv -f {partial} {dest} && mkdir -p "$(dirname {stamp})" && echo {oid} > {stamp}.tmp '
        f"&& mv -f {stamp}.tmp {stamp}"))


def _stamp_in_place(model_dir: str, names: dict) -> StringCommand:
    """Hash files already of the right size where they lie; stamp those that match."""
    lines = []
    for name, f in sorted(names.items()):
        dest, stamp = shlex.quote(f"{model_dir}/{name}"), shlex.quote(f"{model_dir}/{VERIFIED}/{name}")
        lines.append(f'if echo "{f["oid"]}  "{dest} | sha256sum -c --quiet - >/dev/null 2>&1; '
                     f'then mkdir -p "$(dirname {stamp})" && echo {f["oid"]} > {stamp}; fi')
    return StringCommand("sh", "-c", QuoteString("; ".join(lines) + "; true"))


def _index_pointers(model_dir: str, head: str, files: dict) -> StringCommand:
    """Keep the LFS pointers of commit head (oid, size, name per line) where LfsFiles reads
    them; written whole or not at all."""
    index = f"{model_dir}/{VERIFIED}/.pointers-{head}"
    lines = "".join(f"{f['oid']} {f['size']} {name}\n" for name, f in sorted(files.items()))
    script = (f"mkdir -p {shlex.quote(f'{model_dir}/{VERIFIED}')} && "
              f"printf %s {shlex.quote(lines)} > {shlex.quote(index + '.tmp')} && "
              f"mv -f {shlex.quote(index + '.tmp')} {shlex.quote(index)}")
    return StringCommand("sh", "-c", QuoteString(script))


@operation()
def weights(s: Settings, model_dir: str, share: str, share_path: str, mirror: str = ""):
    """
    Replace each LFS pointer of a model checkout by the verified weight file.

    + s: the host's settings (weights_mode, weights_transfer, weights_cache, python, install_dir)
    + model_dir: the model checkout on the host
    + share: the Seafile folder share link holding the weights
    + share_path: the folder inside the share
    + mirror: for weights_mode='mirror', the URL of the folder holding this model's files

    weights_mode: 'control' downloads each file once into the control machine's cache, then
    uploads it (weights_transfer='push') or lets the hosts fetch it from the control machine
    and from each other (weights_transfer='swarm', operations/swarm.py); 'direct' and
    'mirror' copy the downloader (runtime/fetch.py) and a job file listing the files to the
    host and run it there, its progress shown as it comes. In every mode the host hashes the
    file against the pointer before it replaces it. The pointers of the checked-out commit
    are indexed once (.chatglm-verified/.pointers-<sha>) so that LfsFiles reads them on later
    runs without starting git.
    """
    files = host.get_fact(LfsFiles, path=model_dir)
    if not files:
        if host.state.is_executing:
            yield fail(f"{model_dir} has no LFS-tracked files: is it a model repo?")
            return
        host.noop(f"weights are listed once {model_dir} is cloned")
        return
    index = host.get_fact(PointerIndex, path=model_dir)
    unindexed = bool(index["head"]) and not index["indexed"]
    if unindexed:  # later runs read this list instead of asking git for it
        yield _index_pointers(model_dir, index["head"], files)
    todo = {n: f for n, f in files.items() if not _verified(f)}
    if not todo:
        if not unindexed:
            host.noop(f"{len(files)} weight files verified in {model_dir}")
        return

    need = sum(f["size"] for f in todo.values() if f["actual"] != f["size"])
    free = host.get_fact(FreeDiskBytes, path=model_dir)
    if free < need:
        yield fail(f"{model_dir}: {free / GB:.2f} GB free, the weights need {need / GB:.2f} GB; "
                   "free space there or set install_dir to a larger filesystem")
        return
    yield StringCommand("mkdir", "-p", QuoteString(f"{model_dir}/{VERIFIED}"))

    # A file already of the right size (a lost stamp, a copy put there by hand) is hashed
    # where it lies rather than downloaded again.
    in_place = {n: f for n, f in todo.items() if f["actual"] == f["size"]}
    if in_place:
        yield _stamp_in_place(model_dir, in_place)
        if host.state.is_executing:
            todo = {n: f for n, f in host.get_fact(LfsFiles, path=model_dir).items()
                    if not _verified(f)}
            if not todo:
                return

    if s.weights_mode == "control":
        cache = Path(s.weights_cache).expanduser()
        for name, f in sorted(todo.items()):
            yield FunctionCommand(fetch_to_cache, (cache, share, share_path, name, f["oid"],
                                                   f["size"], s.weights_attempts), {})
            if s.weights_transfer == "push":
                yield FileUploadCommand(str(cache / "blobs" / f["oid"]), _partial(model_dir, name))
                yield _put_in_place(model_dir, name, f["oid"])
        if s.weights_transfer == "swarm":
            blobs = sorted({(f["oid"], f["size"]) for f in todo.values()})
            yield FunctionCommand(swarm.fetch, (s, model_dir, blobs), {})
            for name, f in sorted(todo.items()):
                yield _put_in_place(model_dir, name, f["oid"], swarm.blob_path(model_dir, f["oid"]))
            yield StringCommand("rm", "-rf", QuoteString(swarm.staging(model_dir)))
        return

    script, job = f"{s.install_dir}/bin/fetch.py", f"{s.install_dir}/bin/fetch-{Path(model_dir).name}.json"
    yield from files_ops.put._inner(src=str(FETCH), dest=script, mode="644")
    yield from files_ops.put._inner(src=StringIO(json.dumps({
        "mode": "mirror" if s.weights_mode == "mirror" else "seafile",
        "source": mirror if s.weights_mode == "mirror" else share, "folder": share_path,
        "model_dir": model_dir, "stamps": VERIFIED, "attempts": s.weights_attempts,
        "files": [{"name": n, "oid": f["oid"], "size": f["size"]} for n, f in sorted(todo.items())],
    }, indent=1) + "\n"), dest=job, mode="644")
    yield FunctionCommand(_run_shown, (StringCommand(QuoteString(s.python), QuoteString(script),
                                                     QuoteString(job)),), {})


def _run_shown(state, host, command: StringCommand) -> bool:
    """Run the host's downloader with its output shown as it comes, at any verbosity: a
    progress line per file every few seconds (bytes, rate, ETA). Its ERROR lines are logged
    again as the host's error, for the fleet report."""
    ok, output = host.run_shell_command(command, print_output=True)
    if not ok:
        fetch_failed(host, output)
    return ok


def fetch_failed(host, output) -> None:
    """Log a host's failed download by its ERROR lines, as the host's error (fleet report)."""
    errors = [line.strip() for line in output.stderr_lines if line.strip().startswith("ERROR:")]
    host.log_styled("weights: " + (" / ".join(e[len("ERROR:"):].strip() for e in errors)
                                   or "the downloader failed (see its output above)"),
                    fg="red", log_func=logger.error)


def auto_variant(plan: GpuPlan, ram_bytes: int) -> str:
    """The largest variant the host's first GPU holds (thresholds in data/models.toml);
    int4 on CPU-only hosts, the only variant meant for CPU inference."""
    if not plan.gpu:
        return "int4"
    mem_gb = mib_to_gb(plan.gpus[0]["memory_mib"])
    variants = load_toml("models.toml")["variants"]
    for name in ("fp16", "int8", "int4"):
        if mem_gb >= variants[name]["gpu_mem_gb"]:
            return name
    return "int4"
